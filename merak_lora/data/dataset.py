"""The data a training run uses: tokenized by every rank together (prepare.py), then opened memory-mapped on the
ranks whose stages need token ids or targets; the others only learn how many samples there are."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from ..config import Config
from ..layout import Layout
from .batches import Batches, SampleSet, pack, split_eval
from .encode import DataSpec
from .prepare import prepare
from .store import Manifest, TokenStore

log = logging.getLogger("merak_lora")


@dataclass
class TrainingData:
    train: Batches | None      # None on a rank that holds no data (middle stages only)
    evals: Batches | None
    samples: int               # training samples in one epoch (every rank knows)
    eval_samples: int
    records: str               # fingerprints of the training data (progress.DataIdentity)
    tokens: str


def share_cores() -> None:
    """Give each rank of a node its share of the cores for the tokenizer's threads: with as many ranks as cores,
    its thread pool only adds contention (measured: 20% more CPU time per record on 2 cores, 2 ranks)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    per_rank = len(os.sched_getaffinity(0)) // max(1, local)
    if per_rank <= 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    else:
        os.environ.setdefault("RAYON_NUM_THREADS", str(per_rank))


def load(cfg: Config, tokenizer, layout: Layout, adapter: str = "") -> TrainingData:
    """`adapter` (with several adapters) names this adapter's data in the log and in what ranks share."""
    def spec(path: str) -> DataSpec:
        return DataSpec(path, cfg.data_format, cfg.field_map, cfg.template, cfg.system, cfg.seq_length,
                        cfg.skip_bad_records)

    cache_dir = cfg.data_cache_dir or os.path.join(cfg.output_dir, "data_cache")
    progress = not cfg.disable_tqdm
    whose = f"{adapter}'s " if adapter else ""
    train_m = prepare(spec(cfg.data_path), tokenizer, cache_dir, layout.coord, f"{whose}data", progress)
    eval_m = prepare(spec(cfg.eval_data_path), tokenizer, cache_dir, layout.coord, f"{whose}eval data", progress) \
        if cfg.eval_data_path else None
    if layout.rank == 0:
        _report(f"{whose}data", train_m, cfg.seq_length)
        if eval_m is not None:
            _report(f"{whose}eval data", eval_m, cfg.seq_length)

    train = evals = None
    if layout.holds_data():
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        store = TokenStore(train_m)
        members = np.arange(len(store), dtype=np.int64)
        held = None
        if eval_m is not None:
            eval_store = TokenStore(eval_m)
            held = (eval_store, np.arange(len(eval_store), dtype=np.int64))
        elif cfg.eval_ratio:
            members, held_idx = split_eval(len(store), cfg.eval_ratio, cfg.seed)
            held = (store, held_idx)

        def batches(examples, chosen: np.ndarray) -> Batches:
            if cfg.packing:
                samples = SampleSet(examples, *pack(examples.lengths(), chosen, cfg.seq_length, cfg.seed))
            else:
                samples = SampleSet(examples, chosen)
            return Batches(samples, cfg.per_device_train_batch_size, cfg.microbatches, layout.dp, cfg.seed, pad,
                           cfg.pad_to_multiple_of, cfg.seq_length)

        train = batches(store, members)
        evals = batches(*held) if held is not None else None
    counts = layout.coord.share(f"{adapter}/data/samples", lambda: f"{len(train.samples)} "
                                f"{len(evals.samples) if evals is not None else 0}", "counting samples")
    samples, eval_samples = (int(x) for x in counts.split())
    return TrainingData(train, evals, samples, eval_samples, train_m.records, train_m.tokens)


def _report(what: str, m: Manifest, seq_length: int) -> None:
    s = m.stats
    log.info(f"{what}: {m.examples:,} examples from {s.records:,} records; {s.truncated:,} truncated to "
             f"--seq_length {seq_length}, {s.dropped:,} dropped, {s.skipped_bad:,} bad records skipped")
    for example in s.bad_examples[:5]:
        log.warning(f"skipped: {example}")
