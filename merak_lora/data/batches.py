"""Tokens -> samples -> microbatches.

A sample is one example, or with --packing several short ones sharing a sequence. The stream of samples is a
seeded permutation per epoch, consumed a global batch at a time; where the stream stands is one number (samples
consumed), so a resume continues exactly, also with another global batch (progress.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .encode import Example

IGNORE = -100


class SampleSet:
    """Samples over a set of examples (a TokenStore, or a list in tests): `members[bounds[s]:bounds[s+1]]` are the
    examples of sample s (one each without packing, when `bounds` is None)."""

    def __init__(self, examples, members: np.ndarray, bounds: np.ndarray | None = None):
        self.examples, self.members, self.bounds = examples, members, bounds

    def __len__(self) -> int:
        return len(self.members) if self.bounds is None else len(self.bounds) - 1

    def __getitem__(self, s: int) -> list[Example]:
        if self.bounds is None:
            return [self.examples[int(self.members[s])]]
        return [self.examples[int(i)] for i in self.members[self.bounds[s]:self.bounds[s + 1]]]


def split_eval(count: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded hold-out of `ratio` of the examples (at least one) for the eval loss: (train, held) indices."""
    order = np.random.default_rng(seed + 1).permutation(count)
    n_eval = max(1, int(count * ratio))
    return np.sort(order[n_eval:]).astype(np.int64), np.sort(order[:n_eval]).astype(np.int64)


def pack(lengths: np.ndarray, members: np.ndarray, seq_length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit packing of the examples `members` (in a seeded order) into sequences of at most seq_length tokens:
    each example goes to the fullest sequence it still fits in. Sequences are kept in buckets by the room they
    have left, so each placement costs a bisection over at most seq_length distinct rooms (millions of examples
    pack in seconds). Returns (members in sample order, sample bounds)."""
    order = members[np.random.default_rng(seed).permutation(len(members))]
    by_room: dict[int, list[int]] = {}
    rooms: list[int] = []             # distinct rooms that some sequence has, sorted
    bins: list[list[int]] = []
    for i in order.tolist():
        size = int(lengths[i])
        at = bisect.bisect_left(rooms, size)
        if at < len(rooms):
            room = rooms[at]
            b = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(at)
            bins[b].append(i)
            room -= size
        else:
            b = len(bins)
            bins.append([i])
            room = seq_length - size
        if room > 0:
            if room not in by_room:
                by_room[room] = []
                bisect.insort(rooms, room)
            by_room[room].append(b)
    bounds = np.zeros(len(bins) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in bins], out=bounds[1:])
    return np.fromiter((i for b in bins for i in b), dtype=np.int64, count=int(bounds[-1])), bounds


@dataclass
class Batch:
    """One pipeline replica's microbatches for one optimizer step, stacked on dim 0. On a rank whose stages need
    neither token ids nor targets only `shape` (and packed positions) is filled in (feed.py)."""

    input_ids: torch.Tensor | None     # [rows, width]
    targets: torch.Tensor | None       # next-token labels, IGNORE where not trained or padded
    position_ids: torch.Tensor | None  # set when sequences are packed (positions restart per record)
    tokens: int                        # real (non-pad) tokens
    targets_count: int                 # trained tokens
    shape: tuple[int, int]             # (rows, width)


def collate(samples: list[list[Example]], pad_id: int, multiple: int, seq_length: int) -> Batch:
    """Pad every sample to the longest in the step (rounded up to `multiple`), shift labels."""
    lengths = [sum(len(e.ids) for e in s) for s in samples]
    width = min(seq_length, -(-max(max(lengths, default=0), 1) // multiple) * multiple)
    n = len(samples)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    targets = np.full((n, width), IGNORE, dtype=np.int64)
    packed = any(len(s) > 1 for s in samples)
    pos = np.zeros((n, width), dtype=np.int64) if packed else None
    for row, sample in enumerate(samples):
        at = 0
        for ex in sample:
            t = np.asarray(ex.ids, dtype=np.int64)
            size = len(t)
            ids[row, at:at + size] = t
            # target of position j is token j+1 when that token is trained (within the same record)
            trained = np.asarray(ex.trained, dtype=bool)[1:]
            targets[row, at:at + size - 1] = np.where(trained, t[1:], IGNORE)
            if pos is not None:
                pos[row, at:at + size] = np.arange(size)
            at += size
        if pos is not None and at < width:  # padding continues the last record's positions
            pos[row, at:] = np.arange(width - at) + (pos[row, at - 1] + 1 if at else 0)
    return Batch(torch.from_numpy(ids), torch.from_numpy(targets), None if pos is None else torch.from_numpy(pos),
                 sum(lengths), int((targets != IGNORE).sum()), (n, width))


def interleave(batches: list[Batch], microbatches: list[int]) -> tuple[Batch, list[int]]:
    """Several adapters' batches as one step of microbatches, taken in turn (a0 b0 a1 b1 ...), so that one
    schedule runs them all; returns the joint batch and, per microbatch, the index of the batch it came from.

    A schedule needs one shape for all its microbatches: narrower ones are padded on the right to the widest
    (padding holds no targets, and causal attention keeps later positions from earlier ones), and microbatches
    of fewer rows get empty rows. Rank-local batches without ids or targets (middle stages) interleave as shapes
    and positions alone."""
    if len(batches) == 1:
        return batches[0], [0] * microbatches[0]
    mbs = max(b.shape[0] // m for b, m in zip(batches, microbatches))
    width = max(b.shape[1] for b in batches)
    owners = [j for k in range(max(microbatches)) for j, m in enumerate(microbatches) if k < m]
    packed = any(b.position_ids is not None for b in batches)

    def joint(field: str, fill: int) -> torch.Tensor | None:
        if getattr(batches[0], field) is None and not (field == "position_ids" and packed):
            return None
        out = torch.full((len(owners) * mbs, width), fill, dtype=torch.long)
        if field == "position_ids":
            out[:] = torch.arange(width)
        seen = [0] * len(batches)
        for slot, j in enumerate(owners):
            b, rows = batches[j], batches[j].shape[0] // microbatches[j]
            part = getattr(b, field)
            if part is not None:
                out[slot * mbs:slot * mbs + rows, :b.shape[1]] = part[seen[j] * rows:(seen[j] + 1) * rows]
            seen[j] += 1
        return out

    return Batch(joint("input_ids", 0), joint("targets", IGNORE), joint("position_ids", 0),
                 sum(b.tokens for b in batches), sum(b.targets_count for b in batches),
                 (len(owners) * mbs, width)), owners


class Batches:
    """The deterministic sample stream: per epoch a seeded permutation, consumed a global batch at a time."""

    def __init__(self, samples: SampleSet, mbs: int, microbatches: int, dp: int, seed: int, pad_id: int,
                 multiple: int, seq_length: int):
        self.samples = samples
        self.mbs, self.microbatches, self.dp, self.seed = mbs, microbatches, dp, seed
        self.pad_id, self.multiple, self.seq_length = pad_id, multiple, seq_length
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def per_replica(self) -> int:
        return self.mbs * self.microbatches

    @property
    def global_batch(self) -> int:
        return self.per_replica * self.dp

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng(self.seed * 7919 + epoch).permutation(len(self.samples)))
        return self._perm[1]

    def step_samples(self, position: int, dp_rank: int, end: int | None = None) -> list[list[Example]]:
        """Replica dp_rank's samples of the global batch starting at stream `position`; positions at or past
        `end` (the run's last sample) give empty rows, which hold padding only and train nothing."""
        n = len(self.samples)
        out = []
        for pos in range(position + dp_rank * self.per_replica, position + (dp_rank + 1) * self.per_replica):
            out.append([] if end is not None and pos >= end else self.samples[int(self._order(pos // n)[pos % n])])
        return out

    def batch(self, position: int, dp_rank: int, end: int | None = None) -> Batch:
        return collate(self.step_samples(position, dp_rank, end), self.pad_id, self.multiple, self.seq_length)

    def sequential(self, dp_rank: int) -> Iterator[Batch]:
        """Every sample once, in order, a global batch at a time (an eval pass); rows past the end are empty
        (all padding, no targets) so every replica runs the same number of full-shaped steps."""
        for start in range(0, len(self.samples), self.global_batch):
            first = start + dp_rank * self.per_replica
            rows = [self.samples[i] if i < len(self.samples) else [] for i in range(first, first + self.per_replica)]
            yield collate(rows, self.pad_id, self.multiple, self.seq_length)

    def eval_steps(self) -> int:
        return -(-len(self.samples) // self.global_batch)
