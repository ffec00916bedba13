"""Optimizer, learning-rate schedule and the fp16 loss scale for the adapter parameters of this rank."""

from __future__ import annotations

import math

import torch


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the peak learning rate at a step, with the formulas of transformers' schedulers."""

    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return max(0.0, (total - step) / max(1, total - warmup))  # linear

    return f


def warmup_steps(total: int, steps: int, ratio: float) -> int:
    return steps if steps > 0 else math.ceil(total * ratio)


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float],
                   eps: float, weight_decay: float) -> torch.optim.Optimizer:
    # A rank with no adapter tensors (a stage whose layers hold no target module) still steps in lock-step.
    params = params or [torch.nn.Parameter(torch.zeros(1))]
    if name != "adamw_torch":
        from .quant import make_optimizer as bnb_optimizer
        return bnb_optimizer(name, params, lr, betas, eps, weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)


class LossScale:
    """Dynamic fp16 loss scale shared by every stage: all ranks see the same overflow flag (it travels in the
    step's all-reduce), so they halve or grow the scale together."""

    def __init__(self, enabled: bool, init: float = 2.0**12, growth_interval: int = 1000):
        self.enabled = enabled
        self.scale = init if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2.0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
