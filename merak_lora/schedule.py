"""Runs one optimizer step's microbatches through this rank's stages with a `torch.distributed.pipelining`
schedule chosen by name (or, with one stage, a plain loop).

Stages are given static input/output shapes, so no shape-inference pass runs; a step whose padded length
differs from the last gets a new PipelineStage/schedule pair (cheap: no weights move), and the last two shapes
are kept.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleGPipe,
                                          ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble,
                                          ScheduleZBVZeroBubble)

from .data import IGNORE, Batch
from .layout import Layout
from .stage import Stage

SCHEDULE_CLASSES = {
    "gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved1f1b": ScheduleInterleaved1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble, "zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV,
}
SINGLE_STAGE = ("gpipe", "1f1b")


class TokenLoss:
    """Summed next-token cross-entropy over a microbatch, divided by the trained tokens of the whole global
    batch, so microbatch losses (and their gradients) add up to the global token mean on every layout.

    `scale` is the fp16 loss scale (1 otherwise)."""

    def __init__(self) -> None:
        self.normalizer = 1.0
        self.scale = 1.0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        return loss * (self.scale / self.normalizer)


class Pipeline:
    """This rank's share of one pipeline replica: its stages and the schedule that drives them."""

    def __init__(self, stages: list[Stage], layout: Layout, schedule: str, microbatches: int,
                 loss_fn: TokenLoss, hidden_size: int, vocab_size: int, act_dtype: torch.dtype):
        self.stages = stages
        self.layout = layout
        self.name = schedule
        self.microbatches = microbatches
        self.loss_fn = loss_fn
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.act_dtype = act_dtype
        self._schedules: OrderedDict[tuple, Any] = OrderedDict()

    @property
    def holds_first(self) -> bool:
        return any(s.spec.is_first for s in self.stages)

    @property
    def holds_last(self) -> bool:
        return any(s.spec.is_last for s in self.stages)

    def _io_meta(self, stage: Stage, mbs: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        def meta(*shape: int, dtype: torch.dtype = self.act_dtype) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)
        inp = meta(mbs, seq, dtype=torch.long) if stage.spec.is_first else meta(mbs, seq, self.hidden_size)
        out = (meta(mbs, seq, self.vocab_size, dtype=torch.float32) if stage.spec.is_last
               else meta(mbs, seq, self.hidden_size))
        return inp, out

    def _schedule(self, mbs: int, seq: int, with_loss: bool = True) -> Any:
        key = (mbs, seq, with_loss)
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        pstages = []
        for stage in self.stages:
            inp, out = self._io_meta(stage, mbs, seq)
            pstages.append(PipelineStage(stage, stage.spec.index, stage.spec.num_stages, self.layout.device,
                                         input_args=(inp,), output_args=(out,), group=self.layout.pp_group))
        cls = SCHEDULE_CLASSES[self.name]
        target = pstages[0] if self.name in SINGLE_STAGE else pstages
        sched = cls(target, n_microbatches=self.microbatches, loss_fn=self.loss_fn if with_loss else None,
                    scale_grads=False)
        self._schedules[key] = sched
        if len(self._schedules) > 2:
            self._schedules.popitem(last=False)
        return sched

    def _on_device(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        dev = self.layout.device
        kwargs = {} if batch.position_ids is None else {"position_ids": batch.position_ids.to(dev)}
        return batch.input_ids.to(dev), batch.targets.to(dev), kwargs

    def step(self, batch: Batch) -> torch.Tensor | None:
        """Forward and backward of every microbatch; the summed (scaled) loss where the last stage lives."""
        ids, targets, kwargs = self._on_device(batch)
        if self.layout.pp == 1:
            return self._local_step(ids, targets, kwargs, backward=True)
        mbs = ids.shape[0] // self.microbatches
        sched = self._schedule(mbs, ids.shape[1])
        args = (ids,) if self.holds_first else ()
        losses: list[torch.Tensor] | None = [] if self.holds_last else None
        sched.step(*args, target=targets if self.holds_last else None, losses=losses, **kwargs)
        return torch.stack([l.detach() for l in losses]).sum() if losses else None

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> torch.Tensor | None:
        """Forward only: the summed loss of the microbatches where the last stage lives (eval split)."""
        ids, targets, kwargs = self._on_device(batch)
        if self.layout.pp == 1:
            return self._local_step(ids, targets, kwargs, backward=False)
        sched = self._schedule(ids.shape[0] // self.microbatches, ids.shape[1])
        losses: list[torch.Tensor] | None = [] if self.holds_last else None
        sched.eval(*((ids,) if self.holds_first else ()), target=targets if self.holds_last else None,
                   losses=losses, **kwargs)
        return torch.stack(losses).sum() if losses else None

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Forward only: fp32 logits of the whole batch on the rank holding the last stage."""
        ids = ids.to(self.layout.device)
        if self.layout.pp == 1:
            return torch.cat([self.stages[0](i) for i in ids.chunk(self.microbatches)])
        sched = self._schedule(ids.shape[0] // self.microbatches, ids.shape[1], with_loss=False)
        return sched.step(*((ids,) if self.holds_first else ()))

    def _local_step(self, ids: torch.Tensor, targets: torch.Tensor, kwargs: dict, backward: bool) -> torch.Tensor:
        """One stage holds the whole model: plain gradient accumulation over the microbatches (or, without
        backward, just their summed loss)."""
        stage = self.stages[0]
        total = torch.zeros((), device=ids.device)
        for mb_ids, mb_targets, mb_kw in zip(ids.chunk(self.microbatches), targets.chunk(self.microbatches),
                                            _chunk_kwargs(kwargs, self.microbatches)):
            loss = self.loss_fn(stage(mb_ids, **mb_kw), mb_targets)
            if backward:
                loss.backward()
            total += loss.detach()
        return total


def _chunk_kwargs(kwargs: dict, n: int) -> list[dict]:
    if not kwargs:
        return [{}] * n
    parts = {k: v.chunk(n) for k, v in kwargs.items()}
    return [{k: v[i] for k, v in parts.items()} for i in range(n)]
