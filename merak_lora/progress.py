"""How long a run is and where it stands, counted in samples, and the learning rate at each point.

The rule (docs/design.md, "Progress and resuming"):
- A run is a number of samples S: --max_steps x B0, or --num_train_epochs x the data set, rounded down to whole
  steps of B0, where B0 is the global batch of the run's first segment (the run that started from scratch).
- Progress is samples seen. The learning rate is transformers' schedule (`get_scheduler`) over S / B0 steps,
  evaluated at samples seen / B0, so an uninterrupted run steps through it exactly as HF Trainer does.
- Resuming with another global batch (data-parallel width, microbatch size, accumulation) continues at the same
  sample with the same learning-rate curve; the steps left are the samples left over the new global batch (the
  last step holds only what is left).
- Resuming on other data (other records, another seed or packing, which reorder or regroup the samples) stops
  before any weight is read, unless --ignore_data_skip true: then the data starts again at its first sample and
  the step count and schedule carry on (HF Trainer's meaning of that flag). Other tokenization of the same
  records (a new --seq_length or template) keeps the position.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass

import torch

from .checkpoint import Resume, TrainState
from .config import Config, ConfigError

log = logging.getLogger("merak_lora")
# Schedulers that are not a function of the step alone
UNSUPPORTED_SCHEDULERS = {"reduce_lr_on_plateau": "it follows the eval loss, not the step",
                          "greedy": "it follows the training loss, not the step"}


@dataclass(frozen=True)
class DataIdentity:
    """What fixes which sample sits where in the stream."""

    records: str      # fingerprint of the records (data.store.Manifest.records)
    tokens: str       # fingerprint of their tokens
    samples: int
    seed: int
    packing: bool


@dataclass(frozen=True)
class RunLength:
    basis_batch: int     # B0
    total_samples: int   # S
    data_offset: int     # the data stream's position is samples seen - data_offset

    def steps_left(self, consumed: int, global_batch: int) -> int:
        return max(0, -(-(self.total_samples - consumed) // global_batch))


def warmup_steps(total: int, steps: int, ratio: float) -> int:
    return steps if steps > 0 else math.ceil(total * ratio)


class LearningRate:
    """The peak learning rate times transformers' schedule factor, at a fractional step (samples / B0)."""

    def __init__(self, cfg: Config, run: RunLength):
        self.peak = cfg.learning_rate
        self.basis = run.basis_batch
        total = run.total_samples // run.basis_batch
        self.factor = schedule_factor(cfg, total)

    def at(self, consumed: int) -> float:
        return self.peak * self.factor(consumed / self.basis)


def schedule_factor(cfg: Config, total_steps: int):
    """transformers' own schedule function for --lr_scheduler_type (a ConfigError names what is wrong)."""
    from transformers import SchedulerType, get_scheduler

    name = cfg.lr_scheduler_type
    known = [t.value for t in SchedulerType]
    if name not in known:
        raise ConfigError(f"--lr_scheduler_type {name!r} is not one of {', '.join(known)}")
    if name in UNSUPPORTED_SCHEDULERS:
        raise ConfigError(f"--lr_scheduler_type {name} is not supported: {UNSUPPORTED_SCHEDULERS[name]}")
    warmup = warmup_steps(total_steps, cfg.warmup_steps, cfg.warmup_ratio)
    # the peak rate as the optimizer's: some schedules (polynomial's lr_end) are relative to it
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
    try:
        sched = get_scheduler(name, dummy, num_warmup_steps=warmup, num_training_steps=max(1, total_steps),
                              scheduler_specific_kwargs=cfg.scheduler_kwargs())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--lr_scheduler_type {name}: {str(e).splitlines()[0]} (scheduler arguments go in "
                          "--lr_scheduler_kwargs as JSON, e.g. '{\"min_lr_rate\": 0.1}')") from None
    if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        raise ConfigError(f"--lr_scheduler_type {name} is not supported: it is not a function of the step")
    return sched.lr_lambdas[0]


def first_segment(cfg: Config, samples: int, global_batch: int) -> RunLength:
    if cfg.max_steps > 0:
        total = cfg.max_steps * global_batch
    else:
        total = max(1, int(cfg.num_train_epochs * samples / global_batch)) * global_batch
    return RunLength(global_batch, total, 0)


def run_length(cfg: Config, resume: Resume | None, identity: DataIdentity, global_batch: int,
               dp: int) -> tuple[RunLength, TrainState]:
    """The run's length and where it starts: from scratch, or where the checkpoint `resume` stopped."""
    if resume is None:
        return first_segment(cfg, identity.samples, global_batch), TrainState()
    saved = next(iter(resume.states.values()))
    state = TrainState(int(saved["global_step"]), int(saved["consumed_samples"]))
    length = resumed(cfg, resume.meta.get("run"), identity, state.consumed_samples, global_batch, dp,
                     os.path.basename(resume.folder.rstrip("/")))
    return length, state


def saved_run(run: RunLength, identity: DataIdentity, cfg: Config, global_batch: int, dp: int) -> dict:
    """What a checkpoint records of the run, for the next segment to continue it."""
    return {**asdict(run), "data": asdict(identity), "global_batch": global_batch, "dp": dp,
            "per_device_train_batch_size": cfg.per_device_train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "seq_length": cfg.seq_length,
            "max_steps": cfg.max_steps, "num_train_epochs": cfg.num_train_epochs}


def resumed(cfg: Config, saved: dict | None, identity: DataIdentity, consumed: int, global_batch: int, dp: int,
            where: str) -> RunLength:
    """The run's length and data offset when it continues from a checkpoint at `consumed` samples; refuses
    (ConfigError) a data change it cannot place, before any weight is read."""
    if not saved:  # a checkpoint from before the rule: it held no record of the batch it was trained with
        log.warning(f"{where} does not record its global batch or data; resuming as if both were unchanged")
        run = first_segment(cfg, identity.samples, global_batch)
        return run
    basis, offset = int(saved["basis_batch"]), int(saved["data_offset"])
    old = DataIdentity(**saved["data"])
    changed = [name for name, a, b in (("records", old.records, identity.records),
                                       ("sample count", old.samples, identity.samples),
                                       ("--seed", old.seed, identity.seed),
                                       ("--packing", old.packing, identity.packing)) if a != b]
    if changed:
        detail = {"records": "the data files hold other records",
                  "sample count": f"{old.samples} samples then, {identity.samples} now",
                  "--seed": f"--seed {old.seed} then, {identity.seed} now (it orders the data)",
                  "--packing": f"--packing {str(old.packing).lower()} then, {str(identity.packing).lower()} now"}
        what = "; ".join(detail[c] for c in changed)
        if not cfg.ignore_data_skip:
            raise ConfigError(f"{where} was trained on other data ({what}), so its data position (sample "
                              f"{consumed - offset}) means nothing here. Pass --ignore_data_skip true to start "
                              "this data from its first sample (adapter, optimizer, step and learning-rate "
                              "schedule carry on), or resume with the data and flags it was trained with")
        log.warning(f"--ignore_data_skip: {what}; the data starts again at its first sample")
        offset = consumed
    elif old.tokens != identity.tokens:
        log.info(f"{where}: the same records tokenized differently (--seq_length {saved['seq_length']} then, "
                 f"{cfg.seq_length} now, or another template); the data position carries over")
    if cfg.max_steps > 0:
        total = cfg.max_steps * basis
    else:
        total = offset + max(1, int(cfg.num_train_epochs * identity.samples / basis)) * basis
    run = RunLength(basis, total, offset)
    if int(saved["global_batch"]) != global_batch:
        was = {k: saved[k] for k in ("per_device_train_batch_size", "gradient_accumulation_steps", "dp")}
        now = {"per_device_train_batch_size": cfg.per_device_train_batch_size,
               "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "dp": dp}
        diff = ", ".join(f"{k} {was[k]} -> {now[k]}" for k in was if int(was[k]) != now[k])
        log.info(f"resuming with global batch {global_batch} (was {saved['global_batch']}: {diff}): continuing at "
                 f"sample {consumed} of {total}, {run.steps_left(consumed, global_batch)} steps left; the learning "
                 "rate follows the samples seen")
    if total != int(saved["total_samples"]):
        log.info(f"the run's length changed with the flags: {saved['total_samples']} -> {total} samples")
    return run
