"""Tokenizing a data set once, with every rank of the job working on it, into the cache (data.store).

The data set is cut into pieces (data.records); the ranks that see the same cache folder split the pieces in
contiguous runs of about equal size, tokenize their own, and write one shard per piece; the lowest of those
ranks then writes the manifest that lists the shards in order. Coordination goes through the job's store with
no deadline (coordinate.py), and rank 0 shows the progress of the whole job with an ETA.

Bad records: a worker that meets one stops that piece (no shard is written for it), notes the record, and goes
on with its other pieces, so when the run stops (exit 2, naming the first bad record's file and line) every good
piece is cached and the relaunch after the fix tokenizes only the piece that changed. More than
MAX_BAD pieces with bad records (a wrong --data_format or --field_map, say) stop the job at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

from ..coordinate import Coordinator
from .encode import LINES_PER_PIECE, DataSpec, Encoder, encode_piece, make_encoder, check_usable
from .records import SKIP_HINT, BadRecord, DataError, Piece, ReadStats, StreamTexts, list_files, plan_pieces
from .store import (Manifest, dataset_key, has_shard, piece_content, piece_key, read_manifest, shard_stats,
                    tokenizer_fingerprint, write_manifest, write_shard)

log = logging.getLogger("merak_lora")
MAX_BAD = 20


def assign(pieces: list[Piece], workers: int) -> list[range]:
    """Contiguous runs of pieces, one per worker, with about the same number of lines each."""
    total = sum(p.lines for p in pieces) or 1
    runs, start, done = [], 0, 0
    for w in range(workers):
        goal = total * (w + 1) / workers
        stop = start
        while stop < len(pieces) and (done + pieces[stop].lines <= goal or stop == start or w == workers - 1):
            if w < workers - 1 and stop > start and done + pieces[stop].lines / 2 > goal:
                break
            done += pieces[stop].lines
            stop += 1
        runs.append(range(start, stop))
        start = stop
    return runs


class _Stop(Exception):
    """Too many bad records somewhere in the data set: stop tokenizing."""


class _Progress:
    """Lines handled by the whole group (a counter in the store), shown on rank 0 as a bar with an ETA."""

    def __init__(self, coord: Coordinator, key: str, total: int, show: bool, what: str):
        self.coord, self.key, self.total = coord, key, total
        self.bar = None
        if show:
            import sys

            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=f"tokenizing {what}", unit="line", unit_scale=True,
                            mininterval=1.0 if sys.stderr.isatty() else 30.0, smoothing=0.1)

    def add(self, n: int) -> None:
        done = self.coord.add(self.key, n)
        self.refresh(done)

    def refresh(self, done: int | None = None) -> None:
        if self.bar is not None:
            self.bar.update((self.coord.add(self.key, 0) if done is None else done) - self.bar.n)

    def done(self) -> int:
        return self.coord.add(self.key, 0)

    def close(self) -> None:
        if self.bar is not None:
            self.refresh()
            self.bar.close()


def prepare(spec: DataSpec, tokenizer, cache_dir: str, coord: Coordinator, what: str = "data",
            progress: bool = True, lines_per_piece: int = LINES_PER_PIECE) -> Manifest:
    """The data set's manifest, tokenizing what the cache lacks with every rank that sees `cache_dir`."""
    files = list_files(spec.path)
    encoder = make_encoder(spec, tokenizer)
    tok_fp = tokenizer_fingerprint(tokenizer)
    key = dataset_key(spec, tok_fp, files, lines_per_piece)
    path = os.path.join(cache_dir, f"dataset-{key}.json")
    group = coord.sharing(cache_dir)
    leader = min(group)
    ns = f"{what}/{key}/{leader}"

    if coord.rank == leader:  # one rank decides, so a manifest another job writes meanwhile cannot split the group
        coord.set(f"{ns}/hit", "1" if read_manifest(path, cache_dir) else "0")
    coord.wait([f"{ns}/hit"], lambda: f"rank {leader} to look for the cache")
    if coord.get(f"{ns}/hit") == "1":
        manifest = read_manifest(path, cache_dir)
        if manifest is None:
            raise DataError(f"the data cache {path} disappeared while the run started; launch again")
        return manifest

    t0 = time.monotonic()
    pieces = plan_pieces(files, lines_per_piece)
    runs = assign(pieces, len(group))
    bar = _Progress(coord, f"{ns}/lines", sum(p.lines for p in pieces), progress and coord.rank == 0, what)
    try:
        _tokenize_run(spec, encoder, tok_fp, cache_dir, coord, ns, pieces, runs[group.index(coord.rank)], bar)
        if coord.rank == leader:
            manifest = _finish(spec, cache_dir, coord, ns, pieces, path, bar)
            coord.set(f"{ns}/manifest", "1")
        else:
            coord.wait([f"{ns}/manifest"], lambda: f"the other ranks to finish tokenizing {what} "
                       f"({bar.done():,} of {bar.total:,} lines done)", tick=bar.refresh)
            manifest = read_manifest(path, cache_dir)
    except DataError as e:
        coord.fail(str(e))
        raise
    finally:
        bar.close()
    if coord.rank == 0:
        seconds, fresh = time.monotonic() - t0, coord.add(f"{ns}/fresh", 0)
        reused = manifest.stats.records - fresh
        log.info(f"tokenized {what}: {manifest.stats.records:,} records in {seconds:.0f} s "
                 f"({fresh / max(seconds, 1e-9):,.0f} records/s, {len(group)} ranks)"
                 + (f"; {reused:,} of them from the cache" if reused else ""))
    return manifest


def _tokenize_run(spec: DataSpec, encoder: Encoder, tok_fp: str, cache_dir: str, coord: Coordinator, ns: str,
                  pieces: list[Piece], mine: range, bar: _Progress) -> None:
    """Tokenize this rank's pieces (or find their shards), publishing each piece's result in the store."""
    def too_bad() -> bool:
        return coord.add(f"{ns}/bad", 0) > MAX_BAD

    texts = StreamTexts()
    for i in mine:
        coord.raise_if_failed()
        if too_bad():
            return
        piece = pieces[i]
        text = texts.of(piece)
        content = piece_content(piece, text)
        key = piece_key(content, spec, tok_fp)
        result: dict = {"key": key, "content": content}
        if has_shard(cache_dir, key):
            result["count"], stats = shard_stats(cache_dir, key)
            bar.add(piece.lines)
        else:
            stats = ReadStats()
            handled = 0

            def step(n: int) -> None:
                nonlocal handled
                handled += n
                bar.add(n)
                coord.raise_if_failed()
                if too_bad():
                    raise _Stop

            try:
                examples = list(encode_piece(piece, spec, encoder, stats, step, text))
            except _Stop:
                return
            except BadRecord as e:
                bar.add(piece.lines - handled)
                coord.add(f"{ns}/bad", 1)
                coord.set(f"{ns}/piece/{i}", json.dumps({"bad": str(e)}))
                continue
            result["count"] = write_shard(cache_dir, key, examples, stats)
            coord.add(f"{ns}/fresh", stats.records)
        result["stats"] = dataclasses.asdict(stats)
        coord.set(f"{ns}/piece/{i}", json.dumps(result, ensure_ascii=False))


def _finish(spec: DataSpec, cache_dir: str, coord: Coordinator, ns: str, pieces: list[Piece], path: str,
            bar: _Progress) -> Manifest:
    """On the group's leader: gather every piece's result (in order) and write the manifest."""
    keys = [f"{ns}/piece/{i}" for i in range(len(pieces))]

    coord.wait(keys, lambda: f"the other ranks to finish tokenizing ({bar.done():,} of {bar.total:,} lines done)",
               tick=bar.refresh, until=lambda: coord.add(f"{ns}/bad", 0) > MAX_BAD)
    results = [json.loads(coord.get(k)) if coord.get(k) else None for k in keys]
    bad = [r["bad"] for r in results if r and "bad" in r]
    if bad:
        more = f"; {len(bad) - 1} more piece(s) of the data hold bad records too" if len(bad) > 1 else ""
        raise DataError(bad[0].replace(SKIP_HINT, "") + more + SKIP_HINT)
    stats = ReadStats()
    for r in results:
        stats.add(ReadStats(**r["stats"]))
    counts = [r["count"] for r in results]
    check_usable(spec, sum(counts), stats)
    return write_manifest(path, cache_dir, [r["key"] for r in results], [r["content"] for r in results], counts,
                          stats)
