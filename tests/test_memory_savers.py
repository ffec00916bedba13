"""What the memory savers change is only what is kept for the backward: the chunked head loss gives the loss and
hidden-state gradient of full-logits cross-entropy, and LoRA dropout recomputed in the backward of a compiled
layer, or drawn inside the fused Triton down projection, uses the very mask of the forward in the backward (the
eager case, which saves the mask, checks the test itself); the fused up projection's backward gives B's gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from merak_lora.data import IGNORE
from merak_lora.schedule import TokenLoss


@pytest.mark.parametrize("bias,compiled", [(False, False), (True, False), (True, True)])
def test_chunked_head_loss_matches_full_cross_entropy(bias, compiled):
    """Eager and compiled (--compile: one fused pass per chunk, rows of the last chunk dynamic)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).requires_grad_(False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9))
    targets[0, :4] = IGNORE
    # 18 tokens in chunks of 4: five chunks, the last of 2 rows
    full, chunked = TokenLoss(), TokenLoss(chunk_elements=4 * 50, compiled=compiled)
    for fn in (full, chunked):
        fn.normalizer, fn.scale = 14.0, 8.0
    want = F.cross_entropy(head(hidden).reshape(-1, 50), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum") * 8.0 / 14.0
    want_grad, = torch.autograd.grad(want, hidden)
    got = chunked(hidden, targets, head=head)
    got_grad, = torch.autograd.grad(got * 3.0, hidden)  # an upstream factor reaches the stored gradient
    assert torch.allclose(got, want, rtol=1e-6)
    assert torch.allclose(full(head(hidden), targets), want, rtol=1e-6)
    assert torch.allclose(got_grad, 3.0 * want_grad, rtol=1e-5, atol=1e-6)
    assert got_grad[0, :4].abs().max() == 0  # ignored positions get no gradient
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        assert torch.allclose(chunked(hidden, targets, head=head), want, rtol=1e-6)


def test_last_stage_hands_hidden_states_to_the_loss_only_while_training(tiny_llama):
    from merak_lora.config import Config
    from merak_lora.finetune import build_stages, make_plan
    from merak_lora.layout import init_distributed
    from merak_lora.schedule import Pipeline

    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    cfg = Config(model_path=tiny_llama, seed=3)
    plan = make_plan(cfg, 1, lora)
    layout = init_distributed(1, 1, False, "cpu")
    stage = build_stages(cfg, plan, layout)[0]
    assert stage.loss_head is stage.base_lm().lm_head
    seen = []
    pipe = Pipeline([stage], layout, "1f1b", 1, lambda out, targets, head: seen.append(out.shape) or out.sum(),
                    plan.hidden_size, plan.vocab_size, torch.float32)
    ids = torch.randint(3, plan.vocab_size, (1, 8))
    from merak_lora.data import Batch
    pipe.step(Batch(ids, ids, None, 8, 8, tuple(ids.shape)))
    assert seen == [(1, 8, plan.hidden_size)]
    assert pipe.logits(ids).shape == (1, 8, plan.vocab_size)  # generation and logits still get the head's output

    # LoRA on the head makes it trainable: the loss cannot stand in for it, the stage keeps returning logits
    with_head = {**lora, "target_modules": ["q_proj", "v_proj", "lm_head"]}
    stage = build_stages(cfg, make_plan(cfg, 1, with_head), layout)[0]
    assert stage.loss_head is None


@pytest.mark.parametrize("compiled,fused", [(False, False), (True, False), (True, True)])
def test_dropout_backward_uses_the_forward_mask(compiled, fused, monkeypatch):
    """A square adapter (in = out = r) lets the test read the dropped input back from the forward's output and
    derive lora_A's and the input's gradients by hand; a mask drawn afresh in the backward would differ in half
    the entries. fused: the mask drawn inside the Triton down projection (run by Triton's interpreter here)
    and drawn again from its seed in the backward; otherwise the compiler's recomputed dropout, or eager's."""
    from peft import LoraConfig

    from merak_lora import fused_lora
    from merak_lora.lora import apply_lora
    if fused:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # see tests/conftest.py
    torch._dynamo.reset()  # the environment is not among dynamo's guards: no graph of another case is reused
    torch.manual_seed(0)
    r = 8
    net = torch.nn.Sequential(torch.nn.Linear(r, r, bias=False))
    model = apply_lora(net, LoraConfig(r=r, lora_alpha=16, lora_dropout=0.5, target_modules=["0"],
                                       init_lora_weights=False), seed=0)
    model.train()
    lin = model.base_model.model[0]
    if compiled:
        lin.forward = torch.compile(lin.forward)
    launched = []
    for name in ("launch_down", "launch_down_backward", "launch_up", "launch_up_backward"):
        real = getattr(fused_lora, name)
        monkeypatch.setattr(fused_lora, name, lambda *a, _real=real, _name=name, **kw: (launched.append(_name),
                                                                                         _real(*a, **kw))[1])
    x = torch.randn(64, r, requires_grad=True)
    y = lin(x)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    assert sorted(launched) == (["launch_down", "launch_down_backward", "launch_up", "launch_up_backward"]
                                if fused else [])
    a, b, s = lin.lora_A["default"].weight, lin.lora_B["default"].weight, lin.scaling["default"]
    with torch.no_grad():
        dropped = ((y - lin.base_layer(x)) / s) @ torch.linalg.inv(b).T @ torch.linalg.inv(a).T
        assert 0.3 < (dropped.abs() < 1e-4).float().mean() < 0.7  # dropout really dropped about half
        want = s * (upstream @ b).T @ dropped
        want_x = upstream @ lin.base_layer.weight + s * (upstream @ b @ a) * (dropped / x)
        want_b = s * upstream.T @ (dropped @ a.T)
    assert torch.allclose(b.grad, want_b, rtol=1e-3, atol=1e-3 * want_b.abs().max().item())
    assert torch.allclose(a.grad, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    assert torch.allclose(x.grad, want_x, rtol=1e-3, atol=1e-3 * want_x.abs().max().item())
