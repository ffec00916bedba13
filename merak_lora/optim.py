"""Optimizer and the fp16 loss scale for the adapter parameters of this rank (the learning rate: progress.py)."""

from __future__ import annotations

import torch


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float],
                   eps: float, weight_decay: float) -> torch.optim.Optimizer:
    # A rank with no adapter tensors (a stage whose layers hold no target module) still steps in lock-step.
    params = params or [torch.nn.Parameter(torch.zeros(1))]
    if name != "adamw_torch":
        from .quant import make_optimizer as bnb_optimizer
        return bnb_optimizer(name, params, lr, betas, eps, weight_decay)
    # on a GPU one fused kernel updates every adapter tensor (hundreds of them) instead of a launch per op each
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False,
                             fused=fused or None)


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
