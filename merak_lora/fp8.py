"""FP8 frozen base (`--fp8 true`): the linears inside the decoder layers hold their weights in float8 (e4m3) with
one scale per output row, and multiply in FP8 both ways.

With LoRA the base is read and never updated, so it needs no bf16 master copy and no weight gradient: each
linear costs a forward product and an input-gradient product, and both run on the FP8 matrix units
(`torch._scaled_mm`, row-wise scales). The activations are scaled per row as they arrive; the gradient
w.r.t. the input is g @ W = (g * s_w) @ W_q, so the weight's row scales fold into the gradient's columns and
the gradient, too, is quantized per row (e4m3: with a scale per row the range of e5m2 is not needed, and e4m3
keeps one more mantissa bit). LoRA's own tensors, norms, attention, the head and the loss stay in bf16/fp32.

Checkpoints that ship in FP8 (DeepSeek-V3/R1, the Qwen3 FP8 releases: e4m3 weights plus `weight_scale_inv`,
one fp32 scale per 128x128 tile) are read as they are: each band of tile rows is expanded in fp32 and requantized
with one scale per row, so no bf16 copy of the tensor exists. Without `--fp8` such a checkpoint is dequantized
into the training dtype as it loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
BLOCK = 128          # the tile of the block-scaled checkpoints published so far
ALIGN = 16           # _scaled_mm wants every dimension a multiple of 16
# cuBLAS's fast FP8 accumulation (partial sums stay in the tensor cores' accumulator instead of being promoted to
# fp32 every few K blocks), both ways: the step 1.05-1.07x on an H100 with the same losses (bench/RESULTS.md)
FAST_ACCUM = True


@dataclass
class BlockScaled:
    """A checkpoint tensor stored in FP8 with its `weight_scale_inv` (one fp32 scale per tile)."""
    weight: torch.Tensor
    scale_inv: torch.Tensor
    tile: tuple[int, int] = (BLOCK, BLOCK)   # config.json's quantization_config.weight_block_size

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def dequantized(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        return dequantize_blocks(self.weight.to(device), self.scale_inv.to(device), dtype, self.tile)


def quantize_rows(x: torch.Tensor, fmt: torch.dtype = E4M3,
                  amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a 2-D tensor scaled so its largest magnitude is fmt's largest finite value: (q, scale) with
    x ~= q * scale and scale of shape (rows, 1), fp32. `amax`: the rows' largest magnitudes, where a kernel that
    wrote x found them already."""
    top = torch.finfo(fmt).max
    amax = (x.abs().amax(dim=-1, keepdim=True) if amax is None else amax).float().clamp(min=1e-12)
    q = (x.float() * (top / amax)).clamp(-top, top).to(fmt)
    return q, amax / top


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def tiles_fit(shape: tuple[int, ...], scale_shape: tuple[int, ...], tile: tuple[int, int]) -> bool:
    """Whether `weight_scale_inv` of `scale_shape` holds one scale per tile of a weight of `shape`."""
    return len(shape) == 2 and tuple(scale_shape) == (-(-shape[0] // tile[0]), -(-shape[1] // tile[1]))


def quantize_blocks(w: torch.Tensor, tile: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight in the block-scaled layout of the FP8 releases: (q e4m3, scale_inv fp32 of one per tile), with
    w ~= q * scale_inv expanded over each tile. Used to write such checkpoints (tests, benchmarks)."""
    n, k = w.shape
    bn, bk = tile
    top = torch.finfo(E4M3).max
    padded = F.pad(w.float(), (0, -k % bk, 0, -n % bn))
    tiles = padded.view(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
    scale = (tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / top)
    q = (tiles / scale[:, None, :, None]).clamp(-top, top).view_as(padded)[:n, :k].to(E4M3)
    return q, scale


def _expand(scale_inv: torch.Tensor, tile: tuple[int, int], n: int, k: int) -> torch.Tensor:
    return scale_inv.float().repeat_interleave(tile[0], 0)[:n].repeat_interleave(tile[1], 1)[:, :k]


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype,
                      tile: tuple[int, int] = (BLOCK, BLOCK)) -> torch.Tensor:
    """A block-scaled FP8 weight in `dtype`, one band of tile rows at a time (fp32 only for the band)."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for i, start in enumerate(range(0, q.shape[0], tile[0])):
        band = q[start:start + tile[0]]
        out[start:start + tile[0]] = (band.float() * _expand(scale_inv[i:i + 1], tile, band.shape[0],
                                                             q.shape[1])).to(dtype)
    return out


def rows_from_blocks(q: torch.Tensor, scale_inv: torch.Tensor,
                     tile: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    """A block-scaled FP8 weight requantized with one scale per row, band by band."""
    out = torch.empty(q.shape, dtype=E4M3, device=q.device)
    scale = torch.empty(q.shape[0], 1, dtype=torch.float32, device=q.device)
    for i, start in enumerate(range(0, q.shape[0], tile[0])):
        band = q[start:start + tile[0]]
        out[start:start + tile[0]], scale[start:start + tile[0]] = quantize_rows(
            band.float() * _expand(scale_inv[i:i + 1], tile, band.shape[0], q.shape[1]))
    return out, scale


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    extra = -x.shape[0] % ALIGN
    return F.pad(x, (0, 0, 0, extra)) if extra else x


def product(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x @ W^T on the FP8 units, x quantized per row, in x's dtype (no autograd)."""
    flat = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_rows(_pad_rows(flat))
    out = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=w_scale.t(), out_dtype=x.dtype, use_fast_accum=FAST_ACCUM)
    return out[: flat.shape[0]].view(*x.shape[:-1], wq.shape[0])


def input_gradient(grad: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                   amax: torch.Tensor | None = None) -> torch.Tensor:
    """grad @ W on the FP8 units: the weight's row scales folded into grad's columns, which is then quantized per
    row (`amax`: the rows' largest |grad x scale|, where the kernel that wrote grad found them)."""
    flat = grad.reshape(-1, grad.shape[-1])
    gq, gs = quantize_rows(_pad_rows(flat) * w_scale.t(), amax=None if amax is None else _pad_rows(amax))
    # the second operand must be column-major: W_q (out x in) re-laid once per backward, 1 byte a weight
    w_cols = wq.t().contiguous().t()
    ones = torch.ones(1, wq.shape[1], dtype=torch.float32, device=wq.device)
    dx = torch._scaled_mm(gq, w_cols, scale_a=gs, scale_b=ones, out_dtype=grad.dtype, use_fast_accum=FAST_ACCUM)
    return dx[: flat.shape[0]].view(*grad.shape[:-1], wq.shape[1])


class _Fp8Product(torch.autograd.Function):
    """x @ W^T with W frozen in FP8: the forward and the input gradient both on the FP8 units; nothing but the
    weight is kept for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(wq, w_scale)
        return product(x, wq, w_scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        wq, w_scale = ctx.saved_tensors
        return input_gradient(grad, wq, w_scale), None, None


class Fp8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is held in e4m3 with one fp32 scale per output row.

    It stays an nn.Linear so PEFT wraps it like any linear; `compute_dtype` tells PEFT which dtype to give the
    adapter (it would otherwise copy the weight's float8 dtype)."""

    def __init__(self, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.out_features, self.in_features = wq.shape
        self.register_buffer("weight", wq)
        self.register_buffer("weight_scale", scale)
        self.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False) if bias is not None else None
        self.compute_dtype = compute_dtype

    @classmethod
    def from_weight(cls, weight: torch.Tensor | BlockScaled, bias: torch.Tensor | None, device: torch.device,
                    compute_dtype: torch.dtype) -> "Fp8Linear":
        """From a checkpoint tensor: bf16/fp16/fp32 (quantized on `device`) or block-scaled FP8."""
        if isinstance(weight, BlockScaled):
            wq, scale = rows_from_blocks(weight.weight.to(device), weight.scale_inv.to(device), weight.tile)
        else:
            wq, scale = quantize_rows(weight.to(device))
        return cls(wq, scale, bias.to(device) if bias is not None else None, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Fp8Product.apply(x, self.weight, self.weight_scale)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 row-scaled"


def fits(weight_shape: tuple[int, ...]) -> bool:
    """Whether a linear's shape suits the FP8 products (both dimensions multiples of 16)."""
    return len(weight_shape) == 2 and all(d % ALIGN == 0 for d in weight_shape)


def device_supports_fp8(device: torch.device) -> str | None:
    """None when `device` multiplies in FP8, else why not (for the one-line refusal)."""
    if device.type != "cuda":
        return f"this rank's device is {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}"
    return None
