"""QLoRA: 4-bit (NF4/FP4) or 8-bit base weights through bitsandbytes, quantized linear by linear as a stage
loads them, so no device ever holds the stage (let alone the model) in 16-bit."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import ConfigError

INSTALL = "pip install bitsandbytes (CUDA builds on Linux; bitsandbytes 0.45+ also runs 4-bit on the CPU)"


@dataclass(frozen=True)
class Quantization:
    bits: int                      # 4 or 8
    quant_type: str = "nf4"        # 4-bit: nf4 or fp4
    double_quant: bool = False     # 4-bit: quantize the quantization constants too
    compute_dtype: torch.dtype = torch.bfloat16


def from_flags(cfg, dtype: torch.dtype) -> Quantization | None:
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    compute = {"": dtype, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.bnb_4bit_compute_dtype not in compute:
        raise ConfigError(f"--bnb_4bit_compute_dtype {cfg.bnb_4bit_compute_dtype!r} is not float32, bfloat16 or "
                          "float16")
    return Quantization(4 if cfg.load_in_4bit else 8, cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant,
                        compute[cfg.bnb_4bit_compute_dtype])


def check_available(q: Quantization, device: torch.device) -> None:
    """Fail before any weight is read when bitsandbytes is missing or cannot quantize on this device."""
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


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, q: Quantization,
                     device: torch.device) -> nn.Module:
    """A bitsandbytes linear holding `weight` (any float dtype, on the CPU), quantized as it moves to `device`."""
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
