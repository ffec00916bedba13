"""Pipeline scaling: tokens/s, measured bubble and peak memory per schedule, launched with torchrun on P GPUs
(pp = P). The bubble is what the schedule leaves idle: 1 - (this rank's compute for the step, timed stage by stage
in isolation) / (the step's time), against the schedule's theory ((p-1)/(m+p-1) for GPipe and 1F1B, with v
stages per rank (p-1)/(v*m+p-1)).

    torchrun --nproc_per_node 4 bench/pipeline_scaling.py --arch llama3-8b --seq 2048 --microbatches 16
    python bench/pipeline_scaling.py --arch llama3-8b --seq 2048 --microbatches 16       # pp=1 reference
    torchrun --nproc_per_node 2 bench/pipeline_scaling.py --arch tiny --seq 64 --microbatches 4 --results -
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import RESULTS, TARGETS, bench_folder, markdown_table, report, write_random_model  # noqa: E402

SCHEDULES = ["gpipe", "1f1b", "interleaved1f1b", "interleaved_zb", "zbv", "dualpipev"]


def theory(schedule: str, p: int, m: int) -> float:
    if p == 1:
        return 0.0
    v = 2 if schedule in ("interleaved1f1b", "interleaved_zb", "zbv", "dualpipev") else 1
    return (p - 1) / (v * m + p - 1)


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def isolated_compute(stages, mbs: int, seq: int, hidden: int, dtype, device, repeats: int = 3) -> float:
    """Seconds one microbatch's forward and backward take on this rank's stages with no communication (the last
    stage with its loss, as in a step)."""
    import torch

    from merak_lora.schedule import TokenLoss
    best = float("inf")
    targets = torch.randint(3, 1000, (mbs, seq), device=device)
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        for stage in stages:
            if stage.spec.is_first:
                x = torch.randint(3, 1000, (mbs, seq), device=device)
            else:
                x = torch.randn(mbs, seq, hidden, device=device, dtype=dtype, requires_grad=True)
            stage.emit_hidden = True
            out = stage(x)
            stage.emit_hidden = False
            if stage.spec.is_last:
                TokenLoss()(out, targets, head=stage.loss_head).backward()
            else:
                out.backward(torch.ones_like(out))
        sync()
        best = min(best, time.perf_counter() - t)
    for stage in stages:
        stage.zero_grad(set_to_none=True)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--microbatches", type=int, default=16)
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compile", default="false")
    ap.add_argument("--partition_method", default="parameters")
    ap.add_argument("--results", default=RESULTS)
    a = ap.parse_args()

    import torch
    import torch.distributed as dist

    from merak_lora.config import SPLIT_BACKWARD_SCHEDULES, Config
    from merak_lora.data import Batch
    from merak_lora.finetune import build_stages, make_plan
    from merak_lora.entry import env_ranks
    from merak_lora.layout import init_distributed
    from merak_lora.schedule import Pipeline, TokenLoss

    rank, world, _ = env_ranks()
    folder = bench_folder(a.arch, weights=False)
    if rank == 0:
        write_random_model(folder, a.arch, weights=False)
    lora = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": TARGETS}
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    base_layout = init_distributed(world, 1, False, "auto")
    for schedule in a.schedules.split(","):
        if world == 1 and schedule not in ("1f1b",):
            continue
        if a.compile == "true" and schedule in SPLIT_BACKWARD_SCHEDULES:
            print(f"skipped {schedule}: the trainer refuses it with --compile true (config.validate)", flush=True)
            continue
        chunks = 2 if schedule in SCHEDULES[2:] else 1
        cfg = Config(model_path=folder, pp=world, pipeline_schedule=schedule, bf16=cuda, random_weights=True,
                     compile=a.compile == "true", partition_method=a.partition_method)
        while not os.path.isfile(os.path.join(folder, "config.json")):
            time.sleep(1)
        plan = make_plan(cfg, world * chunks, lora)
        layout = dataclasses.replace(base_layout, chunks=chunks, v_shape=schedule in ("zbv", "dualpipev"))
        stages = [s.train() for s in build_stages(cfg, plan, layout)]
        pipe = Pipeline(stages, layout, schedule, a.microbatches, TokenLoss(), plan.hidden_size, plan.vocab_size,
                        dtype)
        n = a.microbatches * a.mbs
        ids = torch.randint(3, 1000, (n, a.seq))
        batch = Batch(ids, torch.roll(ids, -1, 1), None, n * a.seq, n * a.seq, (n, a.seq))
        pipe.loss_fn.normalizer = batch.targets_count
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):  # warm-up (and compilation)
            pipe.step(batch)
            for s in stages:
                s.zero_grad(set_to_none=True)
        sync()
        t = time.perf_counter()
        for _ in range(a.steps):
            pipe.step(batch)
            for s in stages:
                s.zero_grad(set_to_none=True)
        sync()
        step_s = (time.perf_counter() - t) / a.steps
        compute = isolated_compute(stages, a.mbs, a.seq, plan.hidden_size, dtype, layout.device) * a.microbatches
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        stats = torch.tensor([step_s, max(0.0, 1 - compute / step_s), peak], dtype=torch.float64,
                             device=layout.device)
        gathered = [torch.zeros_like(stats) for _ in range(world)] if world > 1 else [stats]
        if world > 1:
            dist.all_gather(gathered, stats)
        step_s = max(float(g[0]) for g in gathered)
        bubbles = [float(g[1]) for g in gathered]
        rows.append([schedule, a.partition_method, world, chunks, a.microbatches, f"{n * a.seq / step_s:,.0f}",
                     f"{sum(bubbles) / len(bubbles):.3f}", f"{theory(schedule, world, a.microbatches):.3f}",
                     f"{max(float(g[2]) for g in gathered):.1f}" if cuda else "-"])
        if rank == 0:  # as it is measured, so a later schedule's failure loses nothing
            print("row: " + " | ".join(str(c) for c in rows[-1]), flush=True)
        del pipe, stages
        if cuda:
            torch.cuda.empty_cache()
    if rank == 0:
        table = markdown_table(["schedule", "partition", "pp", "stages/rank", "microbatches", "tokens/s",
                                "bubble measured", "bubble theory", "peak GiB (max rank)"], rows)
        report(f"Pipeline scaling, {a.arch}, sequence {a.seq}, pp={world}", table,
               "Bubble measured = 1 - isolated per-rank compute / step time, averaged over ranks.",
               a.results)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
