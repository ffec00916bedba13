"""Quantized frozen bases, linear by linear as a stage loads them, so no device ever holds the stage (let alone the
model) in 16-bit: QLoRA's 4-bit (NF4/FP4) or 8-bit weights through bitsandbytes, or FP8 (`fp8.py`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from . import fp8
from .config import ConfigError

INSTALL = "pip install bitsandbytes (CUDA builds on Linux; bitsandbytes 0.45+ also runs 4-bit on the CPU)"


@dataclass(frozen=True)
class Quantization:
    bits: int                      # 4 or 8
    quant_type: str = "nf4"        # 4-bit: nf4 or fp4
    double_quant: bool = False     # 4-bit: quantize the quantization constants too
    compute_dtype: torch.dtype = torch.bfloat16


@dataclass(frozen=True)
class Fp8:
    """`--fp8 true`: e4m3 base linears with row scales; the products return `compute_dtype`."""
    compute_dtype: torch.dtype = torch.bfloat16


def from_flags(cfg, dtype: torch.dtype) -> Quantization | Fp8 | None:
    if cfg.fp8:
        return Fp8(dtype)
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    compute = {"": dtype, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.bnb_4bit_compute_dtype not in compute:
        raise ConfigError(f"--bnb_4bit_compute_dtype {cfg.bnb_4bit_compute_dtype!r} is not float32, bfloat16 or "
                          "float16")
    return Quantization(4 if cfg.load_in_4bit else 8, cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant,
                        compute[cfg.bnb_4bit_compute_dtype])


def check_available(q: Quantization | Fp8, device: torch.device) -> None:
    """Fail before any weight is read when bitsandbytes is missing or cannot quantize on this device, or the
    device has no FP8 units."""
    if isinstance(q, Fp8):
        why = fp8.device_supports_fp8(device)
        if why:
            raise ConfigError(f"--fp8 true needs an NVIDIA GPU with FP8 matrix units (Hopper or Ada, compute "
                              f"capability 8.9 or later), but {why}; run without --fp8 (bf16), or with "
                              "--load_in_4bit true to save memory")
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"--load_in_{q.bits}bit needs bitsandbytes, which is not installed: {INSTALL}") from None
    try:
        probe = quantized_linear(nn.Linear(64, 64, bias=False).weight.detach(), None, q, device)
        probe(torch.zeros(1, 64, device=device, dtype=q.compute_dtype))
    except Exception as e:  # bitsandbytes raises RuntimeError/NotImplementedError for unsupported devices
        raise ConfigError(f"bitsandbytes cannot run {q.bits}-bit layers on {device} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); {INSTALL}") from None


def takes(q: Quantization | Fp8, shape: tuple[int, ...]) -> bool:
    """Whether a linear of this weight shape is quantized (FP8 products want dimensions in multiples of 16)."""
    return fp8.fits(shape) if isinstance(q, Fp8) else True


def quantized_linear(weight: torch.Tensor | fp8.BlockScaled, bias: torch.Tensor | None, q: Quantization | Fp8,
                     device: torch.device) -> nn.Module:
    """A quantized linear holding `weight` (any float dtype or a block-scaled FP8 tensor, on the CPU),
    quantized on `device`."""
    if isinstance(q, Fp8):
        return fp8.Fp8Linear.from_weight(weight, bias, device, q.compute_dtype)
    if isinstance(weight, fp8.BlockScaled):
        weight = weight.dequantized(q.compute_dtype)
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    if q.bits == 4:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=q.compute_dtype,
                                  quant_type=q.quant_type, compress_statistics=q.double_quant, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=q.quant_type,
                                         compress_statistics=q.double_quant)
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(q.compute_dtype), requires_grad=False)
    return layer.to(device)


def make_optimizer(name: str, params: list, lr: float, betas, eps: float, weight_decay: float):
    """paged_adamw_32bit / adamw_8bit / paged_adamw_8bit from bitsandbytes (as the QLoRA tutorials use)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"--optim {name} needs bitsandbytes: {INSTALL}") from None
    cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "adamw_8bit": bnb.optim.AdamW8bit,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
