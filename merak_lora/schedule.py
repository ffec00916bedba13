"""Runs one optimizer step's microbatches through this rank's stages with a `torch.distributed.pipelining`
schedule chosen by name (or, with one stage, a plain loop).

Stages are given static input/output shapes, so no shape-inference pass runs; a step whose padded length
differs from the last gets a new PipelineStage/schedule pair (cheap: no weights move), and the last two shapes
are kept.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
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

    `scale` is the fp16 loss scale (1 otherwise). Given the last stage's frozen `head`, the output is the final
    hidden states and the head is applied here a chunk of tokens at a time (see _HeadLoss).

    With several adapters in one step each microbatch has its own factor (its adapter's loss scale over its
    adapter's token count): `per_microbatch` sets them for a step, and the calls take them in turn, since a
    schedule computes the losses in microbatch order (torch's schedules index them by that order)."""

    def __init__(self, chunk_elements: int = 1 << 26, compiled: bool = False) -> None:
        self.normalizer = 1.0
        self.scale = 1.0
        self.chunk_elements = chunk_elements  # logits held at once by the chunked loss (256 MiB in fp32)
        # with --compile the chunk's loss and gradient are fused too (rows vary with the step: dynamic shapes)
        self.loss_of_chunk = torch.compile(chunk_loss, dynamic=True) if compiled else chunk_loss
        self._factors: list[float] = []
        self._calls = 0

    def per_microbatch(self, factors: list[float]) -> None:
        self._factors, self._calls = list(factors), 0

    def _factor(self) -> float:
        if not self._factors:
            return self.scale / self.normalizer
        factor = self._factors[self._calls % len(self._factors)]
        self._calls += 1
        return factor

    def __call__(self, out: torch.Tensor, targets: torch.Tensor, head: nn.Linear | None = None) -> torch.Tensor:
        factor = self._factor()
        if head is not None:
            rows = max(1, self.chunk_elements // head.out_features)
            want_grad = torch.is_grad_enabled() and out.requires_grad
            return _HeadLoss.apply(out, head.weight, head.bias, targets, factor, rows, want_grad, self.loss_of_chunk)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        return loss * factor


def chunk_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
               want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of one chunk of logits (rows x vocabulary) and, with `want_grad`, its gradient times
    each row's weight, (softmax - one-hot) x weight, in the logits' dtype.

    Compiled (--compile), the one-hot is a comparison, so inductor makes the whole gradient one pass over the
    logits after the reduction, instead of six fp32 passes (cast, logsumexp, exp, scatter, scale, cast:
    bench/PERF_NOTES.md); eagerly, the same arithmetic runs in place on the fp32 copy, holding no other
    chunk-sized temporary."""
    x = logits.float()
    picked = targets.clamp(min=0)[:, None]
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    loss = ((lse - x.gather(1, picked))[:, 0] * (targets != IGNORE)).sum()
    if not want_grad:
        return loss, None
    if torch.compiler.is_compiling():
        onehot = torch.arange(x.shape[1], device=x.device)[None, :] == picked
        grad = ((x - lse).exp() - onehot.float()) * weights[:, None]
    else:
        grad = x.sub_(lse).exp_().scatter_add_(1, picked, torch.full_like(lse, -1.0)).mul_(weights[:, None])
    return loss, grad.to(logits.dtype)


class _HeadLoss(torch.autograd.Function):
    """factor x summed cross-entropy of `hidden @ weight.T + bias`, never holding more than `rows` tokens' logits.

    The head is frozen, so the only gradient is the hidden states'; it is computed in the forward, chunk by
    chunk, while each chunk's logits exist ((softmax - onehot) @ weight, as cross-entropy's backward would),
    and scaled in the backward. A 128k vocabulary at 2048 tokens would otherwise hold ~3 GiB of logits, their
    fp32 copy, log-softmax and gradient per microbatch; this holds 256 MiB and does no extra matmul."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                factor: float, rows: int, want_grad: bool, loss_of_chunk) -> torch.Tensor:
        h = hidden.reshape(-1, hidden.shape[-1])
        t = targets.reshape(-1)
        weights = (t != IGNORE).float() * factor
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if want_grad else None
        for i in range(0, h.shape[0], rows):
            loss, g = loss_of_chunk(F.linear(h[i:i + rows], weight, bias), t[i:i + rows], weights[i:i + rows],
                                    want_grad)
            total += loss
            if want_grad:
                grad[i:i + rows] = g.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.shape = hidden.shape
        return total * factor

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * g).view(ctx.shape), None, None, None, None, None, None, None


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

    @property
    def _head(self) -> nn.Linear | None:
        """The last stage's head when the loss applies it (chunked); None: the last stage returns logits."""
        return next((s.loss_head for s in self.stages if s.spec.is_last), None)

    @contextlib.contextmanager
    def _head_in_loss(self) -> Iterator[None]:
        """For this call only, a last stage with a loss head returns hidden states (others always return
        logits: generation and `logits` reuse the same stages)."""
        for stage in self.stages:
            stage.emit_hidden = True
        try:
            yield
        finally:
            for stage in self.stages:
                stage.emit_hidden = False

    def _loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(out, targets, head=self._head)

    def _io_meta(self, stage: Stage, mbs: int, seq: int, with_loss: bool) -> tuple[torch.Tensor, torch.Tensor]:
        def meta(*shape: int, dtype: torch.dtype = self.act_dtype) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)
        inp = meta(mbs, seq, dtype=torch.long) if stage.spec.is_first else meta(mbs, seq, self.hidden_size)
        logits = stage.spec.is_last and not (with_loss and stage.loss_head is not None)
        out = meta(mbs, seq, self.vocab_size, dtype=torch.float32) if logits else meta(mbs, seq, self.hidden_size)
        return inp, out

    def _schedule(self, mbs: int, seq: int, with_loss: bool = True, microbatches: int | None = None) -> Any:
        n = microbatches or self.microbatches
        key = (mbs, seq, with_loss, n)
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        pstages = []
        for stage in self.stages:
            inp, out = self._io_meta(stage, mbs, seq, with_loss)
            pstages.append(PipelineStage(stage, stage.spec.index, stage.spec.num_stages, self.layout.device,
                                         input_args=(inp,), output_args=(out,), group=self.layout.pp_group))
        # with fewer microbatches than pipeline ranks 1F1B has no steady state and is GPipe (torch refuses it)
        name = "gpipe" if self.name == "1f1b" and n < self.layout.pp else self.name
        cls = SCHEDULE_CLASSES[name]
        target = pstages[0] if name in SINGLE_STAGE else pstages
        sched = cls(target, n_microbatches=n, loss_fn=self._loss if with_loss else None, scale_grads=False)
        self._schedules[key] = sched
        if len(self._schedules) > 2:
            self._schedules.popitem(last=False)
        return sched

    def _on_device(self, batch: Batch, owners: list[int] | None) -> tuple[torch.Tensor | None,
                                                                         torch.Tensor | None, dict]:
        """What of the batch this rank's stages use, on its device (a middle stage gets only packed positions),
        and, per row on the CPU, the adapter each microbatch belongs to."""
        dev = self.layout.device
        kwargs = {} if batch.position_ids is None else {"position_ids": batch.position_ids.to(dev)}
        if owners is not None:
            kwargs["adapter"] = torch.tensor(owners).repeat_interleave(batch.shape[0] // len(owners))
        ids = batch.input_ids.to(dev) if self.holds_first else None
        targets = batch.targets.to(dev) if self.holds_last else None
        return ids, targets, kwargs

    def step(self, batch: Batch) -> torch.Tensor | None:
        """Forward and backward of every microbatch; the summed (scaled) loss where the last stage lives."""
        losses = self.step_losses(batch)
        return torch.stack(losses).sum() if losses is not None else None

    def step_losses(self, batch: Batch, owners: list[int] | None = None) -> list[torch.Tensor] | None:
        """Forward and backward of every microbatch (microbatch i runs adapter owners[i]); each microbatch's
        (scaled) loss where the last stage lives."""
        ids, targets, kwargs = self._on_device(batch, owners)
        n = len(owners) if owners is not None else self.microbatches
        if self.layout.pp == 1:
            with self._head_in_loss():
                return self._local_step(ids, targets, kwargs, n, backward=True)
        rows, width = batch.shape
        sched = self._schedule(rows // n, width, microbatches=n)
        args = (ids,) if self.holds_first else ()
        losses: list[torch.Tensor] | None = [] if self.holds_last else None
        with self._head_in_loss():
            sched.step(*args, target=targets if self.holds_last else None, losses=losses, **kwargs)
        return [loss.detach() for loss in losses] if losses is not None else None

    @torch.no_grad()
    def evaluate(self, batch: Batch, owners: list[int] | None = None) -> torch.Tensor | None:
        """Forward only: the summed loss of the microbatches where the last stage lives (eval split)."""
        ids, targets, kwargs = self._on_device(batch, owners)
        n = len(owners) if owners is not None else self.microbatches
        if self.layout.pp == 1:
            with self._head_in_loss():
                return torch.stack(self._local_step(ids, targets, kwargs, n, backward=False)).sum()
        rows, width = batch.shape
        sched = self._schedule(rows // n, width, microbatches=n)
        losses: list[torch.Tensor] | None = [] if self.holds_last else None
        with self._head_in_loss():
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

    def _local_step(self, ids: torch.Tensor, targets: torch.Tensor, kwargs: dict, n: int,
                    backward: bool) -> list[torch.Tensor]:
        """One stage holds the whole model: plain gradient accumulation over the n microbatches (or, without
        backward, just their losses)."""
        stage = self.stages[0]
        losses = []
        for mb_ids, mb_targets, mb_kw in zip(ids.chunk(n), targets.chunk(n), _chunk_kwargs(kwargs, n)):
            loss = self._loss(stage(mb_ids, **mb_kw), mb_targets)
            if backward:
                loss.backward()
            losses.append(loss.detach())
        return losses


def _chunk_kwargs(kwargs: dict, n: int) -> list[dict]:
    if not kwargs:
        return [{}] * n
    parts = {k: v.chunk(n) for k, v in kwargs.items()}
    return [{k: v[i] for k, v in parts.items()} for i in range(n)]
