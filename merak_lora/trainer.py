"""The loop: one optimizer step is `Trainer.step`, read top to bottom.

Every rank runs the same loop in lock-step. The few numbers all ranks must agree on (loss, gradient norm,
a stop request) travel in one small all-reduce per step, so a NaN seen on one stage skips the step on all.

With several adapters (--adapters) a step is one optimizer step of every adapter still training: their
microbatches run in one schedule (data.interleave), and what an adapter trains with is its own (a `Job`: data,
optimizer, learning rate, clipping, loss scale, skipped steps), so each trains as it would alone.

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

from .adapters import AdapterSpec
from .checkpoint import SavedAdapter, TrainState, save_checkpoint
from .config import Config
from .data import Batch, interleave
from .feed import StepFeed
from .layout import Layout
from .lora import AdapterSwitch
from .metrics import Metrics
from .optim import LossScale
from .progress import LearningRate, RunLength
from .schedule import Pipeline
from .signal_count import SignalCount

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


class Job:
    """One adapter's training: its data, optimizer, learning rate, loss scale and progress. A run trains one
    Job, or with --adapters several over the same stages, each exactly as it would train alone."""

    def __init__(self, spec: AdapterSpec, index: int, feed: StepFeed, optimizer: torch.optim.Optimizer,
                 stage_params: dict[int, dict[str, torch.nn.Parameter]], run: RunLength, state: TrainState,
                 meta: dict, lora_saved: dict, epoch_samples: int, dp: int):
        self.spec, self.cfg, self.index, self.feed = spec, spec.cfg, index, feed
        self.optimizer, self.stage_params = optimizer, stage_params
        self.params = [p for ps in stage_params.values() for p in ps.values()]
        self.run, self.state, self.meta, self.lora_saved = run, state, meta, lora_saved
        self.epoch_samples = epoch_samples
        self.global_batch = spec.cfg.per_device_train_batch_size * spec.cfg.microbatches * dp
        self.total_steps = state.global_step + run.steps_left(state.consumed_samples, self.global_batch)
        self.lr = LearningRate(spec.cfg, run)
        self.scale = LossScale(spec.cfg.fp16)
        if state.scaler:
            self.scale.load_state_dict(state.scaler)
        self.window: list[StepResult] = []
        self.window_start = time.perf_counter()
        self.tokens_seen = 0
        self.best_eval: tuple[float, int] | None = None   # (loss, step)

    @property
    def active(self) -> bool:
        return self.state.global_step < self.total_steps

    def batch(self) -> Batch:
        consumed, run = self.state.consumed_samples, self.run
        return self.feed.batch(consumed - run.data_offset, run.total_samples - run.data_offset)


def rounds(jobs: list[Job]) -> tuple[int, int]:
    """Where the run's step count (what names checkpoint-N) starts and ends: with one adapter its own steps; with
    several, one step of each adapter still training is one step of the run."""
    start = max(j.state.global_step for j in jobs)
    return start, start + max(j.total_steps - j.state.global_step for j in jobs)


class Trainer:
    def __init__(self, cfg: Config, layout: Layout, pipeline: Pipeline, jobs: list[Job], metrics: Metrics,
                 switches: dict[int, AdapterSwitch]):
        self.cfg, self.layout, self.pipeline, self.jobs = cfg, layout, pipeline, jobs
        self.eval_every = cfg.eval_steps or cfg.save_steps
        self.metrics = metrics
        self.switches = switches          # by stage: the dropout streams a checkpoint keeps
        self.round = rounds(jobs)[0]
        self._stop_signal = 0.0
        self._signals: SignalCount | None = None  # while train() holds the signal handlers (main thread)
        self.stopped_by = 0.0            # the stop request the loop ended on (0: it ran to the end)
        self.last_saved = -1
        self.seconds = 0.0
        self._window_peak: float | None = None

    @property
    def tokens_seen(self) -> int:
        return sum(j.tokens_seen for j in self.jobs)

    # --- one optimizer step of every adapter still training --------------------------------------------
    def step(self) -> dict[Job, StepResult]:
        layout = self.layout
        jobs = [j for j in self.jobs if j.active]
        times: dict[str, float] = {}
        t = self._tick()
        batches = [j.batch() for j in jobs]
        batch, owners = interleave(batches, [j.cfg.microbatches for j in jobs])
        if self.pipeline.holds_last:
            counts = self._dp_sum([b.targets_count for b in batches])
            self.pipeline.loss_fn.per_microbatch([jobs[o].scale.scale / max(1, counts[o]) for o in owners])
        times["data"], t = self._tick_tock(t)

        losses = self.pipeline.step_losses(batch, [jobs[o].index for o in owners])
        times["pipeline"], t = self._tick_tock(t)

        self._all_reduce_grads([p for j in jobs for p in j.params])
        zero = torch.zeros((), device=layout.device)
        rows = []
        for k, (job, b) in enumerate(zip(jobs, batches)):
            mine = [loss for loss, o in zip(losses or [], owners) if o == k]
            grads = [p.grad for p in job.params if p.grad is not None]
            # multi-tensor kernels (as clip_grad_norm_ uses), not three tiny ones per adapter tensor: hundreds of
            # launches while the GPU waits at the step's end
            local_sq = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).pow(2).sum() if grads \
                else zero
            rows += [torch.stack(mine).sum() if mine else zero,
                     local_sq / layout.dp,   # every dp replica now holds the same gradients
                     torch.tensor(float(b.tokens if layout.pp_rank == 0 else 0), device=layout.device)]
        shared = torch.stack([*rows, torch.tensor(float(self._stop_signal == STOP_INTERRUPT), device=layout.device),
                              torch.tensor(float(self._stop_signal == STOP_PREEMPT), device=layout.device)]).float()
        if dist.is_initialized():
            dist.all_reduce(shared)
        values = shared.tolist()
        stop = STOP_PREEMPT if values[-1] > 0 else STOP_INTERRUPT if values[-2] > 0 else 0.0
        results = {job: self._update(job, *values[3 * k:3 * k + 3], stop) for k, job in enumerate(jobs)}
        times["optimizer"], t = self._tick_tock(t)
        for r in results.values():
            r.times = times
        return results

    def _update(self, job: Job, loss_sum: float, sq: float, tokens: float, stop: float) -> StepResult:
        """One adapter's optimizer step from its agreed loss and squared gradient norm: clipping, learning rate
        and loss scale are its own; a non-finite step is skipped for this adapter only."""
        cfg, consumed = job.cfg, job.state.consumed_samples
        scale = job.scale.scale
        loss_val = loss_sum / scale
        grad_norm = math.sqrt(max(sq, 0.0)) / scale if math.isfinite(sq) else math.inf
        finite = math.isfinite(loss_val) and math.isfinite(grad_norm)
        lr = job.lr.at(consumed)
        if finite:
            clip = cfg.max_grad_norm / (grad_norm + 1e-6) if cfg.max_grad_norm > 0 else 1.0
            factor = min(clip, 1.0) / scale
            if factor != 1.0:
                torch._foreach_mul_([p.grad for p in job.params if p.grad is not None], factor)
            for group in job.optimizer.param_groups:
                group["lr"] = lr
            job.optimizer.step()
            job.state.skipped_steps = 0
        else:
            job.state.skipped_steps += 1
        job.scale.update(overflow=not finite)
        job.optimizer.zero_grad(set_to_none=True)
        job.state.global_step += 1
        job.state.consumed_samples = min(consumed + job.global_batch, job.run.total_samples)
        job.state.scaler = job.scale.state_dict()
        return StepResult(loss_val, grad_norm, not finite, int(tokens), stop, lr)

    def _all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average LoRA gradients across data-parallel replicas (summed: the loss is already a global mean)."""
        if self.layout.dp == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=self.layout.dp_group)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    def _dp_sum(self, values: list[int]) -> list[int]:
        if self.layout.dp == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.layout.device)
        dist.all_reduce(t, group=self.layout.dp_group)
        return [int(v) for v in t.tolist()]

    def _tick(self) -> float:
        if self.cfg.wall_clock_breakdown and self.layout.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _tick_tock(self, start: float) -> tuple[float, float]:
        now = self._tick()
        return now - start, now

    # --- the loop ------------------------------------------------------------------------------------------
    def train(self) -> None:
        """Run every adapter to its last step, or until a stop signal: then finish the step, save, and return
        with `self.stopped_by` set."""
        handled = (*PREEMPTION_SIGNALS, signal.SIGINT)
        main = _main_thread()  # signal handlers can only be set there
        self._signals = SignalCount() if main else None
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled} if main else {}
        started = time.perf_counter()
        try:
            while any(j.active for j in self.jobs):
                results = self.step()
                self.round += 1
                for job, result in results.items():
                    job.window.append(result)
                    job.tokens_seen += result.tokens
                self.metrics.advance(self._running_losses())
                finished, self._window_peak = False, None
                for job, result in results.items():
                    finished |= self._after_step(job, result)
                if self._window_peak is not None and self.layout.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.layout.device)  # each log line: its own window's peak
                stop = next(iter(results.values())).stop
                if self.cfg.save and (self.round % self.cfg.save_steps == 0 or finished or stop):
                    t = time.perf_counter()
                    self._save()
                    if self.cfg.wall_clock_breakdown:
                        self.metrics.log(self.round, {"checkpoint_s": time.perf_counter() - t}, prefix="time")
                if stop:
                    self.stopped_by = stop
                    break
        finally:
            self.seconds = time.perf_counter() - started
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._signals is not None:
                self._signals.close()
                self._signals = None

    def _running_losses(self) -> dict[str, tuple[float, int]]:
        """Each adapter's mean loss since its last log line (what that line will show), for the progress bar."""
        out = {}
        for job in self.jobs:
            good = [r.loss for r in job.window if not r.skipped]
            if good:
                out[job.spec.label] = (sum(good) / len(good), len(job.window))
        return out

    def _after_step(self, job: Job, result: StepResult) -> bool:
        """Warnings, log line and eval of one adapter's step; True when it was the adapter's last."""
        cfg, step = self.cfg, job.state.global_step
        last = step == job.total_steps
        if result.skipped:
            who = f"adapter {job.spec.label}, " if job.spec.label else ""
            log.warning(f"{who}step {step}: non-finite loss or gradient (loss {result.loss}, grad norm "
                        f"{result.grad_norm}); step skipped on every rank ({job.state.skipped_steps} in a row)")
            # fp16 overflows are the loss scale's business until it cannot shrink any further
            if job.state.skipped_steps > job.cfg.max_skipped_steps and job.scale.scale <= 1.0:
                self._save()
                raise TrainingStopped(
                    f"{who}{job.state.skipped_steps} non-finite steps in a row (limit --max_skipped_steps "
                    f"{job.cfg.max_skipped_steps}); the last good adapter is saved in "
                    f"{cfg.output_dir}/checkpoint-{self.round}. Lower --learning_rate or check the data.")
        if step % cfg.logging_steps == 0 or last:
            self._log(job, step, time.perf_counter() - job.window_start)
            job.window, job.window_start = [], time.perf_counter()
        if job.feed.eval_steps and (step % self.eval_every == 0 or last):
            loss = self.evaluate(job)
            self.metrics.log(step, {"loss": loss}, prefix="eval", adapter=job.spec.label)
            if job.best_eval is None or loss < job.best_eval[0]:
                job.best_eval = (loss, step)
        return last

    def evaluate(self, job: Job) -> float:
        """Token-mean loss of one adapter over its whole eval set (every replica takes its slice of each
        batch)."""
        layout = self.layout
        loss_fn = self.pipeline.loss_fn
        loss_fn.per_microbatch([1.0])
        total = torch.zeros((), device=layout.device)
        tokens = 0
        for stage in self.pipeline.stages:
            stage.eval()
        try:
            for batch in job.feed.eval_batches():
                out = self.pipeline.evaluate(batch, [job.index] * job.cfg.microbatches)
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
        # set only while train() holds the handlers; two Ctrl-Cs that reached one handler call count as a second
        if signum == signal.SIGINT and (self._stop_signal or self._signals.arrived(signum) > 1):
            sys.stderr.write("\nsecond Ctrl-C: stopping now, without saving\n")
            sys.stderr.flush()
            os._exit(130)
        self._stop_signal = max(self._stop_signal, STOP_INTERRUPT if signum == signal.SIGINT else STOP_PREEMPT)

    def _log(self, job: Job, step: int, seconds: float) -> None:
        window = job.window
        good = [r for r in window if not r.skipped]
        values = {
            "loss": sum(r.loss for r in good) / len(good) if good else math.nan,
            "lr": window[-1].lr,
            "grad_norm": good[-1].grad_norm if good else math.nan,
            "tokens_per_s": sum(r.tokens for r in window) / max(seconds, 1e-9),
            "peak_mem_gib": self._peak_memory_gib(),   # since the previous log line (resident: since the start)
            "epoch": (job.state.consumed_samples - job.run.data_offset) / job.epoch_samples,
            "skipped_steps": sum(r.skipped for r in window),
        }
        if job.scale.enabled:
            values["loss_scale"] = job.scale.scale
        if self.cfg.wall_clock_breakdown:
            for key in window[0].times:
                values[f"time_{key}_s"] = sum(r.times[key] for r in window) / len(window)
        self.metrics.log(step, values, adapter=job.spec.label, total=job.total_steps)

    def _peak_memory_gib(self) -> float:
        """The largest memory any rank held since the previous log line (on the CPU: since the process began),
        measured once per step for every adapter's line."""
        if self._window_peak is not None:
            return self._window_peak
        if self.layout.device.type == "cuda":
            value = torch.cuda.max_memory_allocated(self.layout.device) / 2**30
        else:  # resident set size of this process (Linux reports KiB)
            value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        t = torch.tensor([value], device=self.layout.device)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self._window_peak = float(t.item())
        return self._window_peak

    def _save(self) -> None:
        if self.round == self.last_saved:
            return
        streams = {index: switch.streams for index, switch in self.switches.items()}
        parts = [SavedAdapter(job.spec.label, job.stage_params, job.optimizer,
                              {"type": job.cfg.lr_scheduler_type, "step": job.state.global_step}, job.state,
                              job.lora_saved, job.meta, {i: s.get(job.spec.name) for i, s in streams.items()})
                 for job in self.jobs]
        labels = [job.spec.label for job in self.jobs if job.spec.label]
        save_checkpoint(self.cfg.output_dir, self.round, layout=self.layout, adapters=parts,
                        joint={"format": 2, "adapters": labels} if labels else None,
                        save_total_limit=self.cfg.save_total_limit)
        self.last_saved = self.round


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
