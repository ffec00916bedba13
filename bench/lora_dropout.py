"""One LoRA target's down projection with dropout, forward and backward, at the input shapes of a compiled
Llama-3-8B microbatch of 3 x 2048 tokens (hidden 4096 for q,k,v,o,gate,up; 14336 for down): the fused Triton
kernels (merak_lora.fused_lora) against what `--compile true` ran before them (the compiler's dropout, recomputed in
the backward) and eager PyTorch; then the fused kernels' tile choices. The fused result is first checked against
torch with the kernels' own mask on the GPU, in bf16, at this size (`fused_lora.disagreement`, the stages' check).

    python bench/lora_dropout.py [--tokens 6144] [--sweep true]
    python bench/lora_dropout.py --tokens 64 --results -      # CPU (Triton's interpreter): only checks it runs

The floor is what the kernels must move (x read by the forward; x read and its gradient written by the backward)
at this GPU's copy rate, measured with a device-to-device copy of x.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import RESULTS, markdown_table, report  # noqa: E402

R, P = 8, 0.1


def timed(fn, cuda: bool, rep: int = 300) -> float:
    """Median milliseconds of fn (events on the GPU, `rep` ms of repeats; one host-timed call on the CPU)."""
    if cuda:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")
    import time
    fn()
    t = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t)


def gpu_time(fn, cuda: bool, calls: int = 20) -> float:
    """Milliseconds of GPU kernels per call of fn, summed from a profile: eager calls of one small target are
    bound by the host (dispatch, autograd), which a compiled step overlaps with the GPU's work."""
    if not cuda:
        return timed(fn, cuda)
    import torch
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=6144)
    ap.add_argument("--widths", default="4096,14336")
    ap.add_argument("--sweep", default="true")
    ap.add_argument("--results", default=RESULTS)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from merak_lora import fused_lora
    from merak_lora.lora import _dropped_low_rank

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    compiled = torch.compile(lambda x, a: checkpoint(_dropped_low_rank, x, a, P, use_reentrant=False), dynamic=False)
    rows, sweep_rows = [], []
    for k in map(int, args.widths.split(",")):
        x = torch.randn(args.tokens, k, device=dev, dtype=dtype, requires_grad=True)
        a = (torch.randn(R, k, device=dev) / k ** 0.5).requires_grad_(True)
        g = torch.randn(args.tokens, R, device=dev, dtype=dtype)
        seed = fused_lora.new_seed(dev)

        why = fused_lora.disagreement(dev, dtype, R, args.tokens, k)  # the stages' own check, at this size
        assert why is None, f"fused kernels: {why}"
        keep = fused_lora.dropout_mask(seed, (args.tokens, k), P, dev)
        print(f"{args.tokens} x {k}: keeps {keep.float().mean().item():.4f} (1 - p = {1 - P})", flush=True)

        def step(forward):
            return lambda: torch.autograd.grad(forward(), (x, a), g)

        variants = {
            "eager PyTorch (dropout, then the product)": step(lambda: F.linear(F.dropout(x, P), a.to(dtype))),
            "compiled, dropout recomputed (before)": step(lambda: compiled(x, a)),
            "fused Triton kernels": step(lambda: fused_lora.dropped_down(x, a, fused_lora.new_seed(dev), P)),
        }
        ms = {name: gpu_time(fn, cuda) for name, fn in variants.items()}
        wall = {name: timed(fn, cuda) for name, fn in variants.items()}
        copy = timed(lambda: x.detach().clone(), cuda)  # reads and writes x once: 2 passes
        floor = copy / 2 * 3  # forward reads x; backward reads x and writes its gradient
        for name, t in ms.items():
            rows.append([f"{args.tokens} x {k}", name, f"{t * 1e3:.0f}", f"{floor / t:.0%}",
                         f"{ms['compiled, dropout recomputed (before)'] / t:.2f}x", f"{wall[name] * 1e3:.0f}"])
            print(" | ".join(rows[-1]), flush=True)
        if args.sweep == "true" and cuda:
            x2, seed2 = x.detach(), fused_lora.new_seed(dev)
            out = torch.empty(args.tokens, R, device=dev, dtype=dtype)
            gx = torch.empty_like(x2)
            ga = torch.zeros(R, k, device=dev)
            for bm, bk, warps in itertools.product((16, 32), (128, 256), (2, 4)):
                t = fused_lora.Tiles(bm=bm, bk=bk, warps=warps)
                sweep_rows.append([f"{args.tokens} x {k}", "forward", f"bm {bm}, bk {bk}, warps {warps}",
                                   f"{timed(lambda: fused_lora.launch_down(x2, a, out, seed2, P, t), cuda, 100) * 1e3:.0f}"])
            for bm, bk, warps, per_sm in itertools.product((16, 32, 64), (32, 64, 128), (4,), (2, 4, 8)):
                t = fused_lora.Tiles(back_bm=bm, back_bk=bk, back_warps=warps, programs_per_sm=per_sm)
                sweep_rows.append([f"{args.tokens} x {k}", "backward",
                                   f"bm {bm}, bk {bk}, warps {warps}, {per_sm} per SM",
                                   f"{timed(lambda: fused_lora.launch_down_backward(g, x2, a, gx, ga, seed2, P, True, t), cuda, 100) * 1e3:.0f}"])
            default = dataclasses.asdict(fused_lora.TILES)
            print(f"default tiles {default}", flush=True)
            for kind in ("forward", "backward"):
                mine = [r for r in sweep_rows if r[0] == f"{args.tokens} x {k}" and r[1] == kind]
                best = min(mine, key=lambda r: float(r[3]))
                print(f"{k} {kind}: best {best[2]} at {best[3]} us; all: "
                      + "; ".join(f"{r[2]}: {r[3]}" for r in mine), flush=True)
    table = markdown_table(["x (tokens x width)", "down projection with dropout, r=8, p=0.1",
                            "GPU time, forward + backward (us)", "of the copy-rate floor", "vs before",
                            "one eager call, host included (us)"], rows)
    report("LoRA's down projection with dropout, fused, one target (issue 16)", table,
           f"{dtype} activations, fp32 adapter. GPU time: the kernels of one forward and backward, summed from a "
           "profile (a compiled step keeps the GPU busy, so its kernels are what it pays). The floor: x read twice "
           "and its gradient written once, at the rate of a device-to-device copy of x in the same run.",
           args.results)


if __name__ == "__main__":
    main()
