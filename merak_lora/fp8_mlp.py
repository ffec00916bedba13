"""A gated MLP's down projection on an FP8 base, with the activation's backward inside its LoRA kernel.

In a compiled FP8 step the SwiGLU's backward was the largest kernel the compiler wrote: it added the down
projection's two input gradients (base and LoRA), took their sum through silu(gate) * up, and quantized gate's and
up's gradients per row for their FP8 products. A row is 14,336 wide at 8B shapes, so it passed over its inputs
twice, once for each row's maximum and once to quantize: 1.08 ms a layer at microbatch 4, ~2.2x what its bytes
need (bench/PERF_NOTES.md). Here the down projection's LoRA backward kernel, which reads gate and up anyway to
rebuild its input, also reads the base product's gradient, writes gate's and up's gradients and finds each row's
maximum as it goes; the quantization is then one pass. That takes gate's and up's input-gradient products out of
their own linears: their base outputs are computed without a graph (`lora.GatedMlp`), and this function returns
their input gradient for the MLP's input instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fp8, fused_lora
from .fp8 import Fp8Linear


class _GatedDown(torch.autograd.Function):
    """(base, low) of down(silu(gate) * up): the FP8 base product and LoRA's dropped down projection. The
    gradients go to gate and up (LoRA's and the base's parts of the activation's gradient, through the SwiGLU), to
    A, and to x, the MLP's input, through gate's and up's FP8 weights."""

    @staticmethod
    def forward(ctx, gate, up, x, a, seed, p, wd, sd, wg, sg, wu, su):
        act = (F.silu(gate.float()) * up.float()).to(gate.dtype)
        base = fp8.product(act, wd, sd)
        low = fused_lora.gated_dropped_down(act, gate, up, a, seed, p)
        ctx.save_for_backward(gate, up, a, seed, wd, sd, wg, sg, wu, su)
        ctx.p = p
        return base, low

    @staticmethod
    def backward(ctx, g_base, g_low):
        gate, up, a, seed, wd, sd, wg, sg, wu, su = ctx.saved_tensors
        d = fp8.input_gradient(g_base, wd, sd)
        scales = torch.cat([sg.view(1, -1), su.view(1, -1)])
        gu, amax, ga = fused_lora.swiglu_down_backward(g_low, gate, up, d, a, seed, ctx.p, scales)
        dx = fp8.input_gradient(gu[0], wg, sg, amax[0]) + fp8.input_gradient(gu[1], wu, su, amax[1])
        return gu[0], gu[1], dx, ga, None, None, None, None, None, None, None, None


def gated_down(gate: torch.Tensor, up: torch.Tensor, x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float,
               down: Fp8Linear, gate_base: Fp8Linear, up_base: Fp8Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """down's base output and LoRA low-rank output (dropout(silu(gate) * up) @ a.T, the mask from `seed`) for
    gate's and up's outputs computed from x, their FP8 base products having run without a graph."""
    return _GatedDown.apply(gate, up, x, a, seed, p, down.weight, down.weight_scale, gate_base.weight,
                            gate_base.weight_scale, up_base.weight, up_base.weight_scale)


def serves(*bases: torch.nn.Module) -> bool:
    """Whether gate's, up's and down's base layers are FP8 linears without bias, as `gated_down` needs."""
    return all(type(b) is Fp8Linear and b.bias is None for b in bases)
