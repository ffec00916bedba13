"""The learning rate is transformers' schedule: step by step against `get_scheduler` driving an optimizer, for every
schedule type it has that is a function of the step; and at fractional steps (samples seen / B0) after a resume
with another global batch."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from merak_lora.config import Config, ConfigError
from merak_lora.progress import LearningRate, RunLength, schedule_factor

CASES = [("linear", {}), ("cosine", {}), ("cosine_with_restarts", {"num_cycles": 3}), ("polynomial", {"power": 2.0}),
         ("constant", {}), ("constant_with_warmup", {}), ("inverse_sqrt", {}), ("cosine_with_min_lr",
                                                                               {"min_lr_rate": 0.1}),
         ("warmup_stable_decay", {"num_decay_steps": 10})]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_every_step_matches_get_scheduler(name, kwargs):
    import json
    total, warmup, peak, batch = 40, 6, 3e-4, 8
    cfg = Config(learning_rate=peak, lr_scheduler_type=name, warmup_steps=warmup,
                 lr_scheduler_kwargs=json.dumps(kwargs) if kwargs else "")
    ours = LearningRate(cfg, RunLength(batch, total * batch, 0))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    ref = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                        scheduler_specific_kwargs=kwargs)
    for step in range(total):
        assert ours.at(step * batch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step
        opt.step()
        ref.step()


def test_constant_ignores_warmup_as_transformers_does():
    cfg = Config(learning_rate=1.0, lr_scheduler_type="constant", warmup_steps=5)
    assert LearningRate(cfg, RunLength(1, 10, 0)).at(0) == 1.0
    cfg = Config(learning_rate=1.0, lr_scheduler_type="constant_with_warmup", warmup_steps=5)
    assert LearningRate(cfg, RunLength(1, 10, 0)).at(0) == 0.0


def test_a_larger_global_batch_reads_the_same_curve_between_its_steps():
    """Resumed with a global batch of 6 where the run started with 4: the rate at every sample is the curve's."""
    cfg = Config(learning_rate=1.0, lr_scheduler_type="cosine", warmup_steps=3)
    lr = LearningRate(cfg, RunLength(4, 400, 0))
    curve = schedule_factor(cfg, 100)
    for seen in range(120, 400, 6):
        assert lr.at(seen) == pytest.approx(curve(seen / 4))


def test_schedule_arguments_it_needs_are_asked_for():
    with pytest.raises(ConfigError, match="--lr_scheduler_kwargs"):
        schedule_factor(Config(lr_scheduler_type="cosine_with_min_lr"), 10)
