"""What each rank needs of a step's data.

Ranks holding the first stage (token ids) or the last (targets) read their replica's samples from the token
cache. A rank whose stages are all in the middle holds no data at all, so its memory does not grow with the data
set: it receives each step's shape (and, with packing, the positions the model's mask is built from) from its
replica's first stage, one small broadcast per step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from .data import Batch, Batches
from .layout import Layout


class StepFeed:
    def __init__(self, layout: Layout, train: Batches | None, evals: Batches | None, eval_steps: int):
        self.layout = layout
        self.train, self.evals, self.eval_steps = train, evals, eval_steps
        # the broadcast runs only where some rank of the pipeline holds no data
        self.shared = any(not layout.holds_data(p) for p in range(layout.pp))

    def batch(self, position: int, end: int) -> Batch:
        """This replica's microbatches of the global batch at stream `position` (empty rows from `end` on)."""
        b = self.train.batch(position, self.layout.dp_rank, end) if self.train is not None else None
        return self._share(b)

    def eval_batches(self) -> Iterator[Batch]:
        source = self.evals.sequential(self.layout.dp_rank) if self.evals is not None else iter(())
        for _ in range(self.eval_steps):
            yield self._share(next(source, None))

    def _share(self, b: Batch | None) -> Batch:
        if not self.shared:
            return b  # type: ignore[return-value]
        layout = self.layout
        src = layout.global_rank_of(0)
        header = torch.tensor([*b.shape, b.position_ids is not None] if b is not None else [0, 0, 0],
                              dtype=torch.long, device=layout.device)
        dist.broadcast(header, src=src, group=layout.pp_group)
        rows, width, packed = header.tolist()
        pos = None
        if packed:
            pos = b.position_ids.to(layout.device) if b is not None else \
                torch.empty((rows, width), dtype=torch.long, device=layout.device)
            dist.broadcast(pos, src=src, group=layout.pp_group)
        return b if b is not None else Batch(None, None, pos, 0, 0, (rows, width))
