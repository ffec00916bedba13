"""What a LoRA step could cost at best on this GPU: only the work no schedule or kernel choice can avoid, each piece
timed alone with CUDA events (median of many), summed per token.

With a frozen base a training token needs, per decoder layer: every linear's forward (x W^T) and input gradient
(dy W) - no weight gradient -, attention forward and backward (flash, causal); then the head's forward and input
gradient. LoRA, norms, rotary, activations and the loss are left out: they are what a real step adds.

    python bench/ceiling.py --arch llama3-8b --seq 2048 [--microbatch 1,2,3] [--results bench/RESULTS.md]
    python bench/ceiling.py --arch tiny --seq 64 --microbatch 1 --results -     # CPU: only checks it runs

FP8: the same linears through torch._scaled_mm with row-wise scales (e4m3 activations and weights forward, e5m2
gradients backward, where this torch takes e5m2; else e4m3) and cuBLAS's fast accumulation, as `--fp8 true` runs
them; the rest in bf16.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RESULTS, llama_config, markdown_table, report  # noqa: E402


def _device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _median_ms(fn, repeats: int = 20) -> float:
    """Median time of `fn`: CUDA events on a GPU, the host clock on the CPU."""
    import time

    import torch
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if _device() == "cpu":
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def linear_shapes(config) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's linears: q, k, v, o, gate, up, down."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def bf16_linear_ms(tokens: int, out: int, inp: int) -> float:
    """Forward plus input gradient of one frozen linear, bf16."""
    import torch
    x = torch.randn(tokens, inp, device=_device(), dtype=torch.bfloat16)
    w = torch.randn(out, inp, device=_device(), dtype=torch.bfloat16)
    dy = torch.randn(tokens, out, device=_device(), dtype=torch.bfloat16)
    return _median_ms(lambda: x @ w.t()) + _median_ms(lambda: dy @ w)


def fp8_linear_ms(tokens: int, out: int, inp: int) -> tuple[float, str]:
    """The same two products in FP8 with row-wise scales (quantizing not counted); which gradient format ran."""
    import torch
    e4 = torch.float8_e4m3fn
    x = torch.randn(tokens, inp, device="cuda").to(e4)
    w = torch.randn(out, inp, device="cuda").to(e4)              # rows of W: forward's column-major b = w.t()
    wt = torch.randn(inp, out, device="cuda").to(e4)             # W^T quantized along `out` for the backward
    ones = lambda n, m: torch.ones(n, m, device="cuda")  # noqa: E731
    fwd = _median_ms(lambda: torch._scaled_mm(x, w.t(), ones(tokens, 1), ones(1, out), out_dtype=torch.bfloat16,
                                              use_fast_accum=True))
    for fmt in (torch.float8_e5m2, e4):
        dy = torch.randn(tokens, out, device="cuda").to(fmt)
        try:
            torch._scaled_mm(dy, wt.t(), ones(tokens, 1), ones(1, inp), out_dtype=torch.bfloat16, use_fast_accum=True)
        except RuntimeError:
            continue
        bwd = _median_ms(lambda: torch._scaled_mm(dy, wt.t(), ones(tokens, 1), ones(1, inp),
                                                  out_dtype=torch.bfloat16, use_fast_accum=True))
        return fwd + bwd, "e5m2" if fmt is torch.float8_e5m2 else "e4m3"
    raise RuntimeError("torch._scaled_mm takes neither e5m2 nor e4m3 gradients with row-wise scales here")


def attention_ms(config, mb: int, seq: int) -> float:
    """Causal flash attention, forward and backward, one layer."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // heads
    dev = _device()
    q = torch.randn(mb, heads, seq, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(mb, kv, seq, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(mb, kv, seq, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(mb, heads, seq, d, device=dev, dtype=torch.bfloat16)
    backends = [SDPBackend.FLASH_ATTENTION] if dev == "cuda" else [SDPBackend.MATH]

    def step():
        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(g)

    return _median_ms(step)


def ceiling(config, mb: int, seq: int) -> dict:
    tokens = mb * seq
    shapes = linear_shapes(config)
    layers = config.num_hidden_layers
    attn = attention_ms(config, mb, seq)
    head = bf16_linear_ms(tokens, config.vocab_size, config.hidden_size)
    bf16 = layers * (sum(bf16_linear_ms(tokens, o, i) for o, i in shapes) + attn) + head
    out = {"bf16_tokens_per_s": tokens / (bf16 / 1e3), "fp8_tokens_per_s": float("nan"),
           "attention_share": layers * attn / bf16, "grad_format": "-"}
    if _device() == "cuda":  # FP8 matrix units: Hopper and later
        fp8_parts = [fp8_linear_ms(tokens, o, i) for o, i in shapes]
        fp8 = layers * (sum(ms for ms, _ in fp8_parts) + attn) + head
        out.update(fp8_tokens_per_s=tokens / (fp8 / 1e3), grad_format=fp8_parts[0][1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--microbatch", default="1,2,3")
    ap.add_argument("--results", default=RESULTS)
    a = ap.parse_args()
    config = llama_config(a.arch)
    rows = []
    for mb in (int(x) for x in a.microbatch.split(",")):
        c = ceiling(config, mb, a.seq)
        rows.append([mb, f"{c['bf16_tokens_per_s']:,.0f}", f"{c['fp8_tokens_per_s']:,.0f}",
                     f"{c['attention_share']:.0%}", c["grad_format"]])
        print(" | ".join(map(str, rows[-1])), flush=True)
    table = markdown_table(["microbatch", "bf16 ceiling tokens/s", "FP8-linears ceiling tokens/s",
                            "attention's share (bf16)", "FP8 gradient format"], rows)
    report(f"Ceiling of a LoRA step, {a.arch}, sequence {a.seq}", table,
           "Sum of each unavoidable product timed alone (median of 20, CUDA events): every frozen linear's "
           "forward and input gradient, causal flash attention forward and backward, the head's forward and "
           "input gradient. Quantizing to FP8 is not counted.", a.results)


if __name__ == "__main__":
    main()
