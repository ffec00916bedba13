"""Fine-tuning, assembled: flags -> plan and checks -> data -> stages -> pipeline -> trainer.

Everything that can fail on user input (flags, LoRA config, model folder, partition, checkpoint, data, the run's
length) is checked before a single weight is read; start-up work that takes long (tokenizing, reading the
stages) is coordinated without deadlines (coordinate.py), and an error found by one rank stops every rank with
the same message, printed once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from contextlib import contextmanager
from collections.abc import Iterator

import torch
import torch.distributed as dist

from . import failures, slurm
from .adapters import adapter_specs
from .checkpoint import CheckpointError, TrainState, config_hash, gather_adapter, read_latest, restore, versions
from .checks import (check_batch, check_data_files, check_fits, check_shared, checked_quantization,
                     checked_resume, clear_previous_run, previous_run)
from .config import Config, ConfigError, parse_args, validate
from .coordinate import Coordinator, PeerFailed
from .data import dataset
from .feed import StepFeed
from .entry import env_ranks
from .layout import init_distributed, pick_device, stages_of_rank
from .lora import adapter_params, read_lora_config
from .export import peft_config, write_adapter
from .metrics import Metrics, add_log_file, peak_tflops, setup_logging
from .optim import make_optimizer
from .plan import build_stages, compute_dtype, list_target_modules, lora_as_json, make_plan
from .progress import DataIdentity, run_length, saved_run, schedule_factor
from .schedule import Pipeline, TokenLoss
from .trainer import STOP_PREEMPT, Job, Trainer, TrainingStopped, rounds

log = logging.getLogger("merak_lora")
__all__ = ["main", "run", "make_plan", "build_stages"]


class Stopped(RuntimeError):
    """Stopped by a signal after saving a checkpoint (exit code 75: try again / resume). `requeue`: a preemption
    under Slurm, whose job rank 0 puts back in the queue once the line is out (requeueing ends the job at once)."""

    def __init__(self, message: str, requeue: bool = False) -> None:
        super().__init__(message)
        self.requeue = requeue


@contextmanager
def errors_shared(coord: Coordinator) -> Iterator[None]:
    """An error during start-up is published, so ranks waiting on this one stop with it instead of waiting; then
    every rank leaves the store before rank 0, its host, exits."""
    try:
        yield
    except ConfigError as e:
        coord.fail(str(e))
        coord.leave()
        raise
    except PeerFailed:
        coord.leave()
        raise
    except Exception as e:
        coord.fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", user_error=False)
        coord.leave()
        raise


def run(cfg: Config) -> list[TrainState]:
    """Train the run's adapters (one, or those of --adapters); returns each one's final state."""
    rank, world, local_rank = env_ranks()
    specs = adapter_specs(cfg)
    for spec in specs:
        validate(spec.cfg, world)
    setup_logging(rank)
    if slurm.restart_count() and not cfg.resume_peft_from_checkpoint and read_latest(cfg.output_dir):
        log.info(f"Slurm restart {slurm.restart_count()} of this job: resuming from the latest checkpoint")
        cfg = dataclasses.replace(cfg, resume_peft_from_checkpoint="latest")
        specs = [dataclasses.replace(s, cfg=dataclasses.replace(s.cfg, resume_peft_from_checkpoint="latest"))
                 for s in specs]
    stale = previous_run(cfg)
    for spec in specs:
        check_data_files(spec.cfg)
    chunks, pp = cfg.chunks_per_rank(), cfg.pp or world
    v_shape = cfg.pipeline_schedule in ("zbv", "dualpipev")
    plan = make_plan(cfg, pp * chunks, read_lora_config(specs[0].cfg.lora_config))
    loras = [plan.lora_cfg] + [plan.resolve_lora(read_lora_config(s.cfg.lora_config), s.cfg.lora_config)
                               for s in specs[1:]]
    check_shared(specs, loras)
    plan = dataclasses.replace(plan, adapter_numel=sum(plan.lora_numel(lora) for lora in loras))
    check_fits(cfg, plan)
    for spec in specs:
        schedule_factor(spec.cfg, 1)  # the schedule's name and arguments
    quant = checked_quantization(cfg, pick_device(cfg.device, local_rank))
    mine = stages_of_rank(rank % pp, pp, chunks, v_shape)
    resumes = [checked_resume(s.cfg, plan, mine, lora, s.label) for s, lora in zip(specs, loras)]

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path or cfg.weights_path,
                                              trust_remote_code=cfg.trust_remote_code)
    dataset.share_cores()
    layout = init_distributed(pp, chunks, v_shape, cfg.device, cfg.dist_timeout)
    with errors_shared(layout.coord):
        clear_previous_run(cfg, stale, layout)
        add_log_file(layout.rank, os.path.join(cfg.output_dir, "logs"))
        failures.register(cfg.output_dir, layout.rank)
        torch.manual_seed(cfg.seed + 1000 * layout.rank)
        log.info(f"{world} ranks: {layout.dp} pipeline replica(s) x {layout.pp} ranks x {chunks} stage(s) per "
                 f"rank, schedule {cfg.pipeline_schedule}, device {layout.device.type}"
                 + (f", rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}" if world > 1 else "")
                 + f"; layer split {[(s.start, s.stop) for s in plan.specs]}"
                 + (f"; {len(specs)} adapters: {', '.join(s.label for s in specs)}" if len(specs) > 1 else ""))
        datas, runs = [], []
        for spec, resume in zip(specs, resumes):
            data = dataset.load(spec.cfg, tokenizer, layout, spec.label)
            global_batch = spec.cfg.per_device_train_batch_size * spec.cfg.microbatches * layout.dp
            check_batch(spec.cfg, data.samples, global_batch, layout.dp, spec.label)
            identity = DataIdentity(data.records, data.tokens, data.samples, spec.cfg.seed, spec.cfg.packing)
            datas.append(data)
            runs.append((identity, global_batch, *run_length(spec.cfg, resume, identity, global_batch, layout.dp)))
        if all(length.steps_left(state.consumed_samples, gb) == 0 for _, gb, length, state in runs):
            log.warning(f"{resumes[0].folder} is at the end of the run: the run is complete; raise --max_steps "
                        "or --num_train_epochs to train further")
            return [state for *_, state in runs]

        started = time.perf_counter()
        stages = build_stages(cfg, plan, layout, quant, [(s.name, lora, s.cfg.seed) for s, lora in zip(specs, loras)])
        for s in stages:
            s.train()
        if plan.index is not None:
            log.info(f"rank {layout.rank}: read {plan.index.report.bytes / 2**20:.1f} MiB of base weights "
                     f"({len(plan.index.report.keys)} tensors) for stages {layout.stage_ids()} in "
                     f"{time.perf_counter() - started:.1f} s")
        switches = {s.spec.index: s.adapters for s in stages if s.adapters is not None}
        split = [[s.start, s.stop] for s in plan.specs]
        jobs = []
        for k, (spec, lora, resume, data, (identity, global_batch, length, state)) in enumerate(
                zip(specs, loras, resumes, datas, runs)):
            stage_params = {s.spec.index: adapter_params(s.model, spec.name) for s in stages}
            params = [p for ps in stage_params.values() for p in ps.values()]
            c = spec.cfg
            optimizer = make_optimizer(c.optim, params, c.learning_rate, (c.adam_beta1, c.adam_beta2),
                                       c.adam_epsilon, c.weight_decay)
            for index, switch in switches.items():
                switch.seed({spec.name: c.seed}, index, layout.dp_rank)
            if resume is not None:
                state = restore(resume, stage_params, optimizer, layout, c.seed, switches, spec.name, split)
                log.info(f"{'adapter ' + spec.label + ': ' if spec.label else ''}resumed from {resume.folder} at "
                         f"step {state.global_step}")
            lora_saved = {**lora_as_json(lora), "base_model_name_or_path": os.path.abspath(cfg.weights_path)}
            meta = checkpoint_meta(c, layout, plan, lora_saved,
                                   saved_run(length, identity, c, global_batch, layout.dp))
            feed = StepFeed(layout, data.train, data.evals, -(-data.eval_samples // global_batch))
            jobs.append(Job(spec, k, feed, optimizer, stage_params, length, state, meta, lora_saved, data.samples,
                            layout.dp))
        layout.coord.barrier("stages loaded", "reading their stages' weights")

    microbatches = sum(j.cfg.microbatches for j in jobs if j.active)
    if cfg.pipeline_schedule == "1f1b" and microbatches < layout.pp:
        log.warning(f"{microbatches} microbatch(es) per step on {layout.pp} pipeline ranks: GPipe runs (1F1B is "
                    f"the same schedule here) and {layout.pp - microbatches} of {layout.pp} stages idle at any "
                    f"moment; --gradient_accumulation_steps {4 * layout.pp} or more keeps them busy")
    if len({j.cfg.per_device_train_batch_size for j in jobs}) > 1:
        log.warning("the adapters' --per_device_train_batch_size differ: every microbatch of a step has the "
                    "largest one's rows, the smaller ones padded with empty rows (compute spent on nothing)")
    pipeline = Pipeline(stages, layout, cfg.pipeline_schedule, cfg.microbatches, TokenLoss(compiled=cfg.compile),
                        plan.hidden_size, plan.vocab_size, compute_dtype(cfg))
    first, last = rounds(jobs)
    metrics = Metrics(cfg.output_dir, layout.rank == 0, last, first, cfg.report_to != "none",
                      progress=not cfg.disable_tqdm)
    trainer = Trainer(cfg, layout, pipeline, jobs, metrics, switches)
    for job in jobs:
        steps = job.total_steps - job.state.global_step
        log.info(f"{'adapter ' + job.spec.label + ': ' if job.spec.label else ''}training {steps} steps of "
                 f"{job.global_batch} sequences ({job.cfg.per_device_train_batch_size} per microbatch x "
                 f"{job.cfg.microbatches} microbatches x {layout.dp} replicas); "
                 f"{sum(p.numel() for p in job.params)} trainable parameters on this rank")
    try:
        trainer.train()
    finally:
        metrics.close()
    states = [job.state for job in jobs]
    if trainer.stopped_by:
        requeue = trainer.stopped_by == STOP_PREEMPT and slurm.job_id() is not None
        why = "a preemption signal" if trainer.stopped_by == STOP_PREEMPT else "Ctrl-C"
        saved = f"checkpoint-{trainer.round} is saved" if cfg.save else "nothing saved (--save false)"
        raise Stopped(f"stopped by {why} after step {trainer.round}: {saved}"
                      + ("; requeueing the job, which resumes from it" if requeue else
                         "; continue with --resume_peft_from_checkpoint latest"), requeue)
    folders = []
    for job in jobs:
        folder = os.path.join(cfg.output_dir, "adapter", job.spec.label) if cfg.save else None
        tensors = gather_adapter(layout, job.stage_params) if folder else {}
        if layout.rank == 0 and folder:
            write_adapter(folder, tensors, peft_config(job.meta))
        folders.append(folder)
    if layout.rank == 0:
        log.info(summary(cfg, plan, layout, trainer, folders))
    return states


def checkpoint_meta(cfg: Config, layout, plan, lora_saved: dict, run_info: dict) -> dict:
    """What every checkpoint's meta.json records of this run (docs/design.md, "Checkpoint format")."""
    return {"format": 2, "pp": layout.pp, "dp": layout.dp, "num_stages": layout.num_stages,
            "stages_per_rank": layout.chunks, "schedule": cfg.pipeline_schedule,
            "layer_split": [[s.start, s.stop] for s in plan.specs], "model_path": os.path.abspath(cfg.weights_path),
            "model_type": plan.model_config.model_type, "base_config_hash": config_hash(plan.model_config),
            "lora": lora_saved, "versions": versions(), "seed": cfg.seed, "run": run_info}


def summary(cfg: Config, plan, layout, trainer: Trainer, adapters: list[str | None]) -> str:
    """The end-of-run line: what was trained, how fast, and where the results are."""
    jobs = trainer.jobs
    seconds = max(trainer.seconds, 1e-9)
    rate = trainer.tokens_seen / seconds
    steps = ", ".join(f"{j.spec.label} {j.state.global_step}" for j in jobs) if len(jobs) > 1 else \
        f"{jobs[0].state.global_step}"
    samples = sum(j.state.consumed_samples for j in jobs)
    parts = [f"done: {steps} steps, {samples:,} samples, {trainer.tokens_seen:,} tokens in {seconds:,.0f} s "
             f"({rate:,.0f} tokens/s)"]
    peak = peak_tflops(layout.device)
    if peak:  # matmul work per token with a frozen base: forward 2N, input gradients 2N; LoRA 6 per weight
        flops = 4 * plan.matmul_params + 6 * plan.adapter_numel / len(jobs)
        parts.append(f"MFU {rate * flops / (peak * 1e12 * layout.world):.0%} (linear layers and LoRA, of "
                     f"{peak:.0f} TFLOP/s bf16 per GPU)")
    for job in jobs:
        if job.best_eval is not None:
            who = f"{job.spec.label} " if job.spec.label else ""
            parts.append(f"{who}best eval loss {job.best_eval[0]:.4f} at step {job.best_eval[1]}")
    shown = [a for a in adapters if a]
    if shown:
        parts.append(f"adapter (PEFT): {shown[0]}" if len(shown) == 1 else
                     f"adapters (PEFT): {os.path.dirname(shown[0])}/{{{','.join(j.spec.label for j in jobs)}}}")
    latest = read_latest(cfg.output_dir)
    if latest:
        parts.append(f"last checkpoint: {latest}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input, 3 stopped (non-finite steps, failed save), 4 another rank failed,
    75 stopped by a signal after a checkpoint (requeued under Slurm for preemption), 130 interrupted before
    training started, 1 this rank failed."""
    argv = sys.argv[1:] if argv is None else argv
    rank, world, _ = env_ranks()
    setup_logging(rank)
    cfg = None

    def say(text: str) -> None:  # one line on the job's console, from rank 0; every rank keeps it in its log
        if rank == 0:
            print(text, file=sys.stderr, flush=True)
        log.info(text, extra={"file_only": True})

    try:
        cfg = parse_args(argv, warn=lambda m: rank == 0 and print(m, file=sys.stderr))
        if cfg.list_target_modules:
            if rank == 0:
                print(list_target_modules(cfg))
            return 0
        run(cfg)
    except Stopped as e:
        say(str(e))
        if e.requeue and rank == 0:
            slurm.requeue(slurm.job_id())
        leave_group()
        return 75
    except KeyboardInterrupt:
        say("interrupted before training started; nothing was saved")
        return 130
    except (ConfigError, TrainingStopped, CheckpointError) as e:
        say(f"error: {e}")
        leave_group()
        return 2 if isinstance(e, ConfigError) else 3
    except PeerFailed as e:
        say(f"error: {e}")
        return 4
    except Exception as e:  # noqa: BLE001 - every failure gets a named cause before the process ends
        out = cfg.output_dir if cfg else "."
        if world > 1 and failures.is_peer_failure(e):
            failures.record(out, rank, e, victim=True)
            say(f"error: {failures.explain(out, world, rank)}")
            return 4
        failures.record(out, rank, e)
        log.exception(f"rank {rank} failed")
        return 1
    leave_group()
    return 0


def leave_group() -> None:
    """Shut the process group down where every rank stops together, between collectives (done, a signal's
    checkpoint, bad input). Left to the interpreter's exit, gloo's threads can abort the process ("terminate called
    without an active exception") after its last line. Not after a rank failed or a Ctrl-C while loading: peers may
    be gone or a collective cut short, and NCCL's shutdown could wait on them."""
    if dist.is_initialized():
        dist.destroy_process_group()
