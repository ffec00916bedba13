"""Where a training step's time goes: the top GPU kernels of one step of merak-lora (pp=1) and of the plain
transformers + PEFT loop, from torch.profiler. For deciding what to optimise, not for RESULTS.md.

    python bench/profile_step.py --arch llama3-8b --seq 2048 [--which ours|plain|both|trainer] [--top 25]
        [--microbatch 3 --compile true --fp8 true]

`ours` is one microbatch's forward and backward through the stage; `trainer` one whole optimizer step of the
real entrypoint (four microbatches accumulated, the gradient norm, the optimizer, the step's syncs: the host's
share that one microbatch alone does not show), random weights drawn on the GPU.

After the kernel table, the GPU time of the step by kind of kernel: matrix products (cuBLAS/CUTLASS), flash
attention, Triton kernels (what torch.compile fused), other elementwise kernels, the rest; then where the GPU
waits for the host between kernels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import TARGETS, bench_model, run_ours  # noqa: E402


def profile(step, top: int, label: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    cuda = torch.cuda.is_available()
    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
    walls = []
    for _ in range(3):  # the step's own time, outside the profiler, to compare with its kernels' time
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    print(f"===== {label}")
    key = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))
    if cuda:
        print(kinds(prof))
        busy = sum(e.device_time_total for e in prof.events() if e.device_type.name == "CUDA") / 1e3
        wall = 1e3 * sorted(walls)[1]
        print(f"kernels {busy:.1f} ms of a {wall:.1f} ms step (median of 3, unprofiled): the GPU idles "
              f"{max(0.0, 1 - busy / wall):.0%} of it (host-bound where large); peak "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        print(idle(prof, top))


def idle(prof, top: int) -> str:
    """Where the GPU waits for the host in the profiled step: the gaps between one kernel's end and the next one's
    start, summed by the pair of kernels around them, and the idle time in each tenth of the step."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name[:48]) for e in prof.events()
                   if e.device_type.name == "CUDA")
    if not spans:
        return ""
    first, last = spans[0][0], max(end for _, end, _ in spans)
    tenths = [0.0] * 10
    pairs: dict[tuple[str, str], list[float]] = {}
    reach, before = spans[0][1], spans[0][2]
    for start, end, name in spans[1:]:
        gap = start - reach
        if gap > 0:
            tenths[min(9, int(10 * (reach - first) / max(last - first, 1e-9)))] += gap
            pairs.setdefault((before, name), []).append(gap)
        if end > reach:
            reach, before = end, name
    lines = [f"idle between kernels {sum(tenths) / 1e3:.1f} ms of {(last - first) / 1e3:.1f} ms; by tenth of the "
             f"step (ms): " + " ".join(f"{t / 1e3:.1f}" for t in tenths),
             f"{'idle ms':>8} {'gaps':>5} {'max us':>7}  after -> before"]
    for (a, b), gaps in sorted(pairs.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"{sum(gaps) / 1e3:8.2f} {len(gaps):5d} {max(gaps):7.0f}  {a} -> {b}")
    return "\n".join(lines)


KINDS = (("triton (compiled)", ("triton",)),  # first: fused kernels are named after the ops they hold (_scaled_mm)
         ("matrix products", ("gemm", "cutlass", "cublas", "nvjet", "sm90_xmma", "_mm_")),
         ("flash attention", ("flash", "fmha", "attention")),
         ("elementwise / reductions", ("elementwise", "reduce", "vectorized", "unrolled", "copy", "fill")))


def kinds(prof) -> str:
    """GPU time of the profiled step by kind of kernel (each kernel counted once, by its first matching kind)."""
    totals: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type.name != "CUDA":
            continue
        name = evt.name.lower()
        kind = next((k for k, keys in KINDS if any(key in name for key in keys)), "other")
        totals[kind] = totals.get(kind, 0.0) + evt.device_time_total
    whole = sum(totals.values()) or 1.0
    return "\n".join(f"{k:<26} {v / 1e3:9.1f} ms  {v / whole:5.1%}" for k, v in
                     sorted(totals.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--which", default="both", help="ours, plain, both, or trainer")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--microbatch", type=int, default=1)
    ap.add_argument("--compile", default="false")
    ap.add_argument("--fp8", default="false")
    a = ap.parse_args()

    if a.which == "trainer":
        return profile_trainer(a)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir = bench_model(a.arch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.randint(3, 1000, (a.microbatch, a.seq), device=device)
    if a.which in ("plain", "both"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=TARGETS))
        model.train()

        def plain():
            model(input_ids=ids, labels=ids).loss.backward()
        profile(plain, a.top, "plain transformers + PEFT, one sequence")
        del model
    if a.which in ("ours", "both"):
        import json

        from merak_lora.checks import checked_quantization
        from merak_lora.config import Config
        from merak_lora.finetune import build_stages, make_plan
        from merak_lora.layout import init_distributed
        from merak_lora.schedule import TokenLoss
        lora = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": TARGETS}
        cfg = Config(model_path=model_dir, bf16=True, lora_config=json.dumps(lora), compile=a.compile == "true",
                     fp8=a.fp8 == "true")
        plan = make_plan(cfg, 1, lora)
        layout = init_distributed(1, 1, False, device)
        stage = build_stages(cfg, plan, layout, checked_quantization(cfg, torch.device(device)))[0].train()
        stage.emit_hidden = True  # as a training step runs it: the loss applies the head in chunks
        loss_fn = TokenLoss(compiled=cfg.compile)
        targets = torch.roll(ids, -1, 1)

        def ours():
            loss_fn(stage(ids), targets, head=stage.loss_head).backward()
        profile(ours, a.top, f"merak-lora stage (pp=1), microbatch {a.microbatch}, compile {a.compile}, "
                             f"fp8 {a.fp8}")


def profile_trainer(a) -> None:
    """The entrypoint's third optimizer step run under `profile` (which runs it six times: the trainer's counters
    move on, nothing else depends on them here)."""
    from merak_lora import trainer
    step, calls = trainer.Trainer.step, []

    def profiled(self):
        calls.append(self)
        if len(calls) != 3:
            return step(self)
        result = []
        profile(lambda: result.append(step(self)), a.top, f"merak-lora trainer step (pp=1), 4 microbatches of "
                                                           f"{a.microbatch}, compile {a.compile}, fp8 {a.fp8}")
        return result[-1]

    trainer.Trainer.step = profiled
    flags = ["--random_weights", "true", "--compile", a.compile, "--fp8", a.fp8]
    run_ours(bench_model(a.arch, weights=False), a.seq, a.microbatch, False, 12, 0, flags)


if __name__ == "__main__":
    main()
