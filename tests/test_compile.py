"""--compile true compiles each decoder layer's forward: the same loss and LoRA gradients as eager."""

from __future__ import annotations

import torch

from family_check import LORA, batch
from reference import rel


def _loss_and_grads(model_dir: str, compile: bool, b):
    from merak_lora.config import Config
    from merak_lora.finetune import build_stages, make_plan
    from merak_lora.layout import init_distributed
    from merak_lora.lora import adapter_params
    from merak_lora.schedule import Pipeline, TokenLoss

    cfg = Config(model_path=model_dir, compile=compile, seed=3)
    plan = make_plan(cfg, 1, LORA)
    layout = init_distributed(1, 1, False, "cpu")
    stages = [s.train() for s in build_stages(cfg, plan, layout)]
    pipe = Pipeline(stages, layout, "1f1b", 2, TokenLoss(), plan.hidden_size, plan.vocab_size, torch.float32)
    pipe.loss_fn.normalizer = b.targets_count
    loss = pipe.step(b).item()
    return loss, {n: p.grad for n, p in adapter_params(stages[0].model).items()}


def test_compiled_layers_train_like_eager(tiny_llama):
    b = batch(tiny_llama, rows=2, seq=32)
    eager = _loss_and_grads(tiny_llama, False, b)
    compiled = _loss_and_grads(tiny_llama, True, b)
    assert abs(compiled[0] - eager[0]) <= 1e-5 * abs(eager[0])
    assert compiled[1].keys() == eager[1].keys()
    assert max(rel(compiled[1][k], eager[1][k]) for k in eager[1]) < 1e-4
