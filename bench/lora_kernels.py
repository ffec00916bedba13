"""One LoRA target's two halves, forward and backward, at the shapes of a compiled Llama-3-8B microbatch of 3 x 2048
tokens (widths 4096 for q,k,v,o,gate,up and 14336 for down's input and gate's, up's output), against what
`--compile true` ran before the fused Triton kernels (merak_lora.fused_lora) and eager PyTorch; then the kernels'
tile choices:
- down: dropout(x) @ A.T against the compiler's dropout recomputed in the backward;
- up: base + s * low @ B.T against cuBLAS's addmm and its backward's two thin products;
- down for 3 and 2 targets reading one input (q, k, v; gate, up): one kernel for all against one per target.
Both are first checked against torch on the GPU, in bf16, at this size (`fused_lora.disagreement`, the stages' own
check).

    python bench/lora_kernels.py [--tokens 6144] [--sweep true]
    python bench/lora_kernels.py --tokens 64 --results -      # CPU (Triton's interpreter): only checks it runs

The floor is what the kernels must move at this GPU's copy rate, measured with a device-to-device copy of the
activation: down reads x in the forward, and x again in the backward, which writes its gradient (3 passes); up
reads the base output and writes the sum, and reads the output gradient in the backward (3 passes).
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

R, P, S = 8, 0.1, 4.0  # Llama recipes' r=8, alpha=32: scale 4


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
    ap.add_argument("--sweep", default="true", help="true, false, or which kernels: down or up")
    ap.add_argument("--results", default=RESULTS)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from merak_lora import fused_lora
    from merak_lora.lora import _dropped_low_rank, added_up_by_cublas

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    compiled = torch.compile(lambda x, a: checkpoint(_dropped_low_rank, x, a, P, use_reentrant=False), dynamic=False)
    rows = []
    for k in map(int, args.widths.split(",")):
        x = torch.randn(args.tokens, k, device=dev, dtype=dtype, requires_grad=True)
        a = (torch.randn(R, k, device=dev) / k ** 0.5).requires_grad_(True)
        b = (torch.randn(k, R, device=dev) / R ** 0.5).requires_grad_(True)  # the up projection onto width k
        low = torch.randn(args.tokens, R, device=dev, dtype=dtype, requires_grad=True)
        g_low = torch.randn(args.tokens, R, device=dev, dtype=dtype)
        g_out = torch.randn(args.tokens, k, device=dev, dtype=dtype)
        seed = fused_lora.new_seed(dev)

        why = fused_lora.disagreement(dev, dtype, R, args.tokens, k)  # the stages' own check, at this size
        assert why is None, f"fused kernels: {why}"
        keep = fused_lora.dropout_mask(seed, (args.tokens, k), P, dev)
        print(f"{args.tokens} x {k}: keeps {keep.float().mean().item():.4f} (1 - p = {1 - P})", flush=True)

        def down(forward):
            return lambda: torch.autograd.grad(forward(), (x, a), g_low)

        def up(forward):
            return lambda: torch.autograd.grad(forward(), (low, b), g_out)

        def shared(targets: int, one_kernel: bool):
            """The down projections of `targets` reading x: one kernel for all, or one per target (before)."""
            at, g = a_shared[:targets * R], g_shared[:, :targets * R]
            if one_kernel:
                return lambda: torch.autograd.grad(
                    fused_lora.dropped_down(x, at, fused_lora.new_seed(dev, targets), P), (x, a_shared), g)
            return lambda: torch.autograd.grad(torch.cat([fused_lora.dropped_down(
                x, at[t * R:(t + 1) * R], fused_lora.new_seed(dev), P) for t in range(targets)], -1), (x, a_shared), g)

        a_shared = (torch.randn(3 * R, k, device=dev) / k ** 0.5).requires_grad_(True)
        g_shared = torch.randn(args.tokens, 3 * R, device=dev, dtype=dtype)
        base = x.detach()  # stands in for the base layer's output
        variants = {
            "down": {
                "eager PyTorch (dropout, then the product)": down(lambda: F.linear(F.dropout(x, P), a.to(dtype))),
                "compiled, dropout recomputed (before)": down(lambda: compiled(x, a)),
                "fused Triton kernels": down(lambda: fused_lora.dropped_down(x, a, fused_lora.new_seed(dev), P)),
            },
            "up": {
                "addmm and its two thin products (before)": up(lambda: added_up_by_cublas(base, low, b, S)),
                "fused Triton kernels": up(lambda: fused_lora.added_up(base, low, b, S)),
            },
            **{f"down, {n} targets of one input ({names})": {
                "one fused kernel per target (before)": shared(n, False),
                "one fused kernel for all": shared(n, True),
            } for n, names in ((3, "q, k, v"), (2, "gate, up"))},
        }
        copy = timed(lambda: x.detach().clone(), cuda)  # reads and writes an activation once: 2 passes
        floor = copy / 2 * 3
        for half, fns in variants.items():
            ms = {name: gpu_time(fn, cuda) for name, fn in fns.items()}
            wall = {name: timed(fn, cuda) for name, fn in fns.items()}
            before = next(t for name, t in ms.items() if "(before)" in name)
            for name, t in ms.items():
                rows.append([f"{args.tokens} x {k}", half, name, f"{t * 1e3:.0f}", f"{floor / t:.0%}",
                             f"{before / t:.2f}x", f"{wall[name] * 1e3:.0f}"])
                print(" | ".join(rows[-1]), flush=True)
        if args.sweep != "false" and cuda:
            sweep(args.tokens, k, x.detach(), a.detach(), b.detach(), low.detach(), g_low, g_out,
                  "" if args.sweep == "true" else args.sweep)
    table = markdown_table(["activation (tokens x width)", "half", "r=8, p=0.1", "GPU time, forward + backward (us)",
                            "of the copy-rate floor", "vs before", "one eager call, host included (us)"], rows)
    report("LoRA's down and up projections, fused, one target and targets sharing an input (issue 16)", table,
           f"{dtype} activations, fp32 adapter. GPU time: the kernels of one forward and backward, summed from a "
           "profile (a compiled step keeps the GPU busy, so its kernels are what it pays). The floor: three passes "
           "over the activation at the rate of a device-to-device copy of it in the same run.",
           args.results)


def sweep(tokens: int, k: int, x, a, b, low, g_low, g_out, only: str) -> None:
    """Each kernel's launch (those whose name starts with `only`) timed over a grid of tile choices; prints the
    fastest of each."""
    import torch

    from merak_lora import fused_lora
    dev, dtype = x.device, x.dtype
    seed = fused_lora.new_seed(dev)
    out, gx, ga = torch.empty(tokens, R, device=dev, dtype=dtype), torch.empty_like(x), torch.zeros(R, k, device=dev)
    summed, glow, gb = torch.empty_like(x), torch.zeros(tokens, R, device=dev), torch.zeros(k, R, device=dev)
    grids = {
        "down forward": (lambda t: fused_lora.launch_down(x, a, out, seed, P, t),
                         [dict(bm=bm, bk=bk, warps=w) for bm, bk, w in itertools.product((16, 32), (128, 256), (2, 4))]),
        "down backward": (lambda t: fused_lora.launch_down_backward(g_low, x, a, gx, ga, seed, P, True, t),
                          [dict(back_bm=bm, back_bk=bk, programs_per_sm=n)
                           for bm, bk, n in itertools.product((16, 32, 64), (32, 64, 128), (2, 4, 8))]),
        "up forward": (lambda t: fused_lora.launch_up(x, low, b, summed, S, t),
                       [dict(up_bm=bm, up_bn=bn, up_warps=w)
                        for bm, bn, w in itertools.product((32, 64, 128), (64, 128, 256), (4, 8))]),
        "up backward": (lambda t: fused_lora.launch_up_backward(g_out, low, b, glow, gb, S, True, True, t),
                        [dict(up_back_bm=bm, up_back_bn=bn, up_back_warps=w, up_programs_per_sm=n)
                         for bm, bn, w, n in itertools.product((32, 64), (64, 128, 256), (4, 8), (2, 4, 8))]),
    }
    print(f"default tiles {dataclasses.asdict(fused_lora.TILES)}", flush=True)
    for kind, (launch, choices) in grids.items():
        if kind.startswith(only):
            sweep_kernel(k, kind, launch, choices)


def sweep_kernel(k: int, kind: str, launch, choices: list[dict]) -> None:
    """Times one kernel's launch for each tile choice; prints them all and the fastest."""
    from merak_lora import fused_lora
    timings = []
    for choice in choices:
        tiles = dataclasses.replace(fused_lora.TILES, **choice)
        try:
            us = timed(lambda: launch(tiles), True, 100) * 1e3
        except Exception as e:  # noqa: BLE001 - a tile that does not fit (shared memory, registers)
            print(f"{kind} {choice}: {type(e).__name__}", flush=True)
            continue
        timings.append((", ".join(f"{n} {v}" for n, v in choice.items()), us))
    best = min(timings, key=lambda t: t[1])
    print(f"{k} {kind}: best {best[0]} at {best[1]:.0f} us; all: " + "; ".join(f"{c}: {us:.0f}" for c, us in timings),
          flush=True)


if __name__ == "__main__":
    main()
