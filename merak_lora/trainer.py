"""The loop: one optimizer step is `Trainer.step`, read top to bottom.

Every rank runs the same loop in lock-step. The few numbers all ranks must agree on (loss, gradient norm,
a stop request) travel in one small all-reduce per step, so a NaN seen on one stage skips the step on all.

Stopping: a preemption signal (SIGUSR1/SIGUSR2/SIGTERM) or a first Ctrl-C (SIGINT) lets every rank finish the
step, save a checkpoint and leave the loop; a second Ctrl-C ends the process at once.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .checkpoint import TrainState, save_checkpoint
from .config import Config
from .feed import StepFeed
from .layout import Layout
from .metrics import Metrics
from .optim import LossScale
from .progress import LearningRate, RunLength
from .schedule import Pipeline

log = logging.getLogger("merak_lora")


# Slurm's --signal=USR1@T (sbatch), submitit's USR2, and the SIGTERM of scancel or of a launcher passing one on.
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
STOP_INTERRUPT, STOP_PREEMPT = 1.0, 2.0   # what a stop request means (the larger wins across ranks)


class TrainingStopped(RuntimeError):
    """Training could not go on (too many non-finite steps); the last good state was saved."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    tokens: int
    stop: float                       # 0, STOP_INTERRUPT or STOP_PREEMPT, agreed by every rank
    lr: float
    times: dict[str, float] = field(default_factory=dict)


class Trainer:
    def __init__(self, cfg: Config, layout: Layout, pipeline: Pipeline, feed: StepFeed,
                 optimizer: torch.optim.Optimizer, stage_params: dict[int, dict[str, torch.nn.Parameter]],
                 run: RunLength, state: TrainState, meta: dict, lora_saved: dict, metrics: Metrics,
                 epoch_samples: int):
        self.cfg, self.layout, self.pipeline, self.feed = cfg, layout, pipeline, feed
        self.eval_every = cfg.eval_steps or cfg.save_steps
        self.optimizer = optimizer
        self.stage_params = stage_params
        self.params = [p for ps in stage_params.values() for p in ps.values()]
        self.run = run
        self.global_batch = cfg.per_device_train_batch_size * cfg.microbatches * layout.dp
        self.total_steps = state.global_step + run.steps_left(state.consumed_samples, self.global_batch)
        self.epoch_samples = epoch_samples
        self.state = state
        self.meta, self.lora_saved, self.metrics = meta, lora_saved, metrics
        self.lr = LearningRate(cfg, run)
        self.scale = LossScale(cfg.fp16)
        if state.scaler:
            self.scale.load_state_dict(state.scaler)
        self._stop_signal = 0.0
        self.stopped_by = 0.0            # the stop request the loop ended on (0: it ran to the end)
        self.last_saved = -1
        self.tokens_seen = 0
        self.seconds = 0.0
        self.best_eval: tuple[float, int] | None = None   # (loss, step)

    # --- one optimizer step ------------------------------------------------------------------------------
    def step(self) -> StepResult:
        cfg, layout = self.cfg, self.layout
        times: dict[str, float] = {}
        t = self._tick()
        consumed, run = self.state.consumed_samples, self.run
        batch = self.feed.batch(consumed - run.data_offset, run.total_samples - run.data_offset)
        if self.pipeline.holds_last:
            self.pipeline.loss_fn.normalizer = max(1, self._dp_sum(batch.targets_count))
        self.pipeline.loss_fn.scale = self.scale.scale
        times["data"], t = self._tock(t)

        loss = self.pipeline.step(batch)
        times["pipeline"], t = self._tock(t)

        self._all_reduce_grads()
        local_sq = sum((p.grad.float().pow(2).sum() for p in self.params if p.grad is not None),
                       torch.zeros((), device=layout.device))
        shared = torch.stack([
            loss if loss is not None else torch.zeros((), device=layout.device),
            local_sq / layout.dp,   # every dp replica now holds the same gradients
            torch.tensor(float(batch.tokens if layout.pp_rank == 0 else 0), device=layout.device),
            torch.tensor(float(self._stop_signal == STOP_INTERRUPT), device=layout.device),
            torch.tensor(float(self._stop_signal == STOP_PREEMPT), device=layout.device),
        ]).float()
        if dist.is_initialized():
            dist.all_reduce(shared)
        stop = STOP_PREEMPT if shared[4].item() > 0 else STOP_INTERRUPT if shared[3].item() > 0 else 0.0
        scale = self.scale.scale
        loss_val = shared[0].item() / scale
        grad_norm = math.sqrt(max(shared[1].item(), 0.0)) / scale if math.isfinite(shared[1].item()) else math.inf
        finite = math.isfinite(loss_val) and math.isfinite(grad_norm)
        lr = self.lr.at(consumed)

        if finite:
            clip = cfg.max_grad_norm / (grad_norm + 1e-6) if cfg.max_grad_norm > 0 else 1.0
            factor = min(clip, 1.0) / scale
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(factor)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.state.skipped_steps = 0
        else:
            self.state.skipped_steps += 1
        self.scale.update(overflow=not finite)
        self.optimizer.zero_grad(set_to_none=True)
        times["optimizer"], t = self._tock(t)

        self.state.global_step += 1
        self.state.consumed_samples = min(consumed + self.global_batch, run.total_samples)
        self.state.scaler = self.scale.state_dict()
        return StepResult(loss_val, grad_norm, not finite, int(shared[2].item()), stop, lr, times)

    def _all_reduce_grads(self) -> None:
        """Average LoRA gradients across data-parallel replicas (summed: the loss is already a global mean)."""
        if self.layout.dp == 1 or not self.params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=self.layout.dp_group)
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    def _dp_sum(self, value: int) -> int:
        if self.layout.dp == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.layout.device)
        dist.all_reduce(t, group=self.layout.dp_group)
        return int(t.item())

    def _tick(self) -> float:
        if self.cfg.wall_clock_breakdown and self.layout.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _tock(self, start: float) -> tuple[float, float]:
        now = self._tick()
        return now - start, now

    # --- the loop ------------------------------------------------------------------------------------------
    def train(self) -> TrainState:
        """Run to the last step, or until a preemption signal: then finish the step, save, and return with
        `self.stopped_by` set."""
        cfg = self.cfg
        handled = (*PREEMPTION_SIGNALS, signal.SIGINT)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled} if _main_thread() else {}
        window: list[StepResult] = []
        window_start = started = time.perf_counter()
        try:
            while self.state.global_step < self.total_steps:
                result = self.step()
                window.append(result)
                self.tokens_seen += result.tokens
                good = [r.loss for r in window if not r.skipped]
                self.metrics.advance(sum(good) / len(good) if good else None, len(window))
                step = self.state.global_step
                if result.skipped:
                    log.warning(f"step {step}: non-finite loss or gradient (loss {result.loss}, grad norm "
                                f"{result.grad_norm}); step skipped on every rank "
                                f"({self.state.skipped_steps} in a row)")
                    # fp16 overflows are the loss scale's business until it cannot shrink any further
                    if self.state.skipped_steps > cfg.max_skipped_steps and self.scale.scale <= 1.0:
                        self._save(step)
                        raise TrainingStopped(
                            f"{self.state.skipped_steps} non-finite steps in a row (limit --max_skipped_steps "
                            f"{cfg.max_skipped_steps}); the last good adapter is saved in "
                            f"{cfg.output_dir}/checkpoint-{step}. Lower --learning_rate or check the data.")
                if step % cfg.logging_steps == 0 or step == self.total_steps:
                    self._log(step, window, time.perf_counter() - window_start)
                    window, window_start = [], time.perf_counter()
                if self.feed.eval_steps and (step % self.eval_every == 0 or step == self.total_steps):
                    loss = self.evaluate()
                    self.metrics.log(step, {"loss": loss}, prefix="eval")
                    if self.best_eval is None or loss < self.best_eval[0]:
                        self.best_eval = (loss, step)
                if cfg.save and (step % cfg.save_steps == 0 or step == self.total_steps or result.stop):
                    t = time.perf_counter()
                    self._save(step)
                    if cfg.wall_clock_breakdown:
                        self.metrics.log(step, {"checkpoint_s": time.perf_counter() - t}, prefix="time")
                if result.stop:
                    self.stopped_by = result.stop
                    break
        finally:
            self.seconds = time.perf_counter() - started
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.state

    def evaluate(self) -> float:
        """Token-mean loss over the whole eval set (every replica takes its slice of each batch)."""
        layout = self.layout
        loss_fn = self.pipeline.loss_fn
        loss_fn.normalizer, loss_fn.scale = 1.0, 1.0
        total = torch.zeros((), device=layout.device)
        tokens = 0
        for stage in self.pipeline.stages:
            stage.eval()
        try:
            for batch in self.feed.eval_batches():
                out = self.pipeline.evaluate(batch)
                if out is not None:
                    total += out.float()
                tokens += batch.targets_count if layout.pp_rank == 0 else 0
        finally:
            for stage in self.pipeline.stages:
                stage.train()
        both = torch.stack([total, torch.tensor(float(tokens), device=layout.device)])
        if dist.is_initialized():
            dist.all_reduce(both)
        return both[0].item() / max(both[1].item(), 1.0)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._stop_signal:
            sys.stderr.write("\nsecond Ctrl-C: stopping now, without saving\n")
            sys.stderr.flush()
            os._exit(130)
        self._stop_signal = max(self._stop_signal, STOP_INTERRUPT if signum == signal.SIGINT else STOP_PREEMPT)

    def _log(self, step: int, window: list[StepResult], seconds: float) -> None:
        good = [r for r in window if not r.skipped]
        values = {
            "loss": sum(r.loss for r in good) / len(good) if good else math.nan,
            "lr": window[-1].lr,
            "grad_norm": good[-1].grad_norm if good else math.nan,
            "tokens_per_s": sum(r.tokens for r in window) / max(seconds, 1e-9),
            "peak_mem_gib": self._peak_memory_gib(),
            "epoch": (self.state.consumed_samples - self.run.data_offset) / self.epoch_samples,
            "skipped_steps": sum(r.skipped for r in window),
        }
        if self.scale.enabled:
            values["loss_scale"] = self.scale.scale
        if self.cfg.wall_clock_breakdown:
            for key in window[0].times:
                values[f"time_{key}_s"] = sum(r.times[key] for r in window) / len(window)
        self.metrics.log(step, values)

    def _peak_memory_gib(self) -> float:
        if self.layout.device.type == "cuda":
            value = torch.cuda.max_memory_allocated(self.layout.device) / 2**30
        else:  # resident set size of this process (Linux reports KiB)
            value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        t = torch.tensor([value], device=self.layout.device)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def _save(self, step: int) -> None:
        if step == self.last_saved:
            return
        save_checkpoint(self.cfg.output_dir, step, layout=self.layout, stage_params=self.stage_params,
                        optimizer=self.optimizer, scheduler_state={"type": self.cfg.lr_scheduler_type, "step": step},
                        state=self.state, lora_raw=self.lora_saved, meta=self.meta,
                        save_total_limit=self.cfg.save_total_limit)
        self.last_saved = step


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
