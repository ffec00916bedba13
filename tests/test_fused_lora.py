"""The fused LoRA kernels (merak_lora.fused_lora) against torch, forward and backward, on shapes that leave partial
tiles in every direction: the down projection against dropout(x) @ A.T with the kernels' own mask, the up projection
against base + s * low @ B.T. Triton's
interpreter runs the kernels on the CPU (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from merak_lora import fused_lora

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("m,k,r,p,dtype,targets", [
    (70, 64, 6, 0.1, torch.float32, 1),     # rows and rank not multiples of a tile
    (33, 136, 24, 0.5, torch.float32, 1),   # columns past one 128-wide block, a rank over 16
    (96, 256, 8, 0.25, torch.bfloat16, 1),  # bf16 activations, an fp32 adapter (as in training)
    (70, 136, 6, 0.25, torch.float32, 3),   # three targets reading one input (q, k, v): one kernel, three masks
    (96, 256, 8, 0.1, torch.bfloat16, 2),   # two (gate, up) in bf16
])
def test_fused_down_projection_matches_torch_with_the_same_mask(m, k, r, p, dtype, targets):
    torch.manual_seed(0)
    x = torch.randn(2, m, k).to(dtype).requires_grad_(True)
    a = torch.randn(targets * r, k, requires_grad=True)
    seed = fused_lora.new_seed(x.device, targets)
    out = fused_lora.dropped_down(x, a, seed, p)

    keeps = [fused_lora.dropout_mask(seed[t:t + 1], (2 * m, k), p, x.device).view(2, m, k) for t in range(targets)]
    for keep in keeps:
        assert abs(keep.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / keep.numel()) ** 0.5
    if targets > 1:  # each target its own mask
        assert (keeps[0] != keeps[1]).float().mean() > p * (1 - p)
    x_ref = x.detach().clone().requires_grad_(True)
    a_ref = a.detach().clone().requires_grad_(True)
    ref = torch.cat([(x_ref.float() * keep / (1 - p)) @ a_ref[t * r:(t + 1) * r].to(dtype).float().t()
                     for t, keep in enumerate(keeps)], dim=-1)
    upstream = torch.randn(out.shape).to(dtype)
    (out.float() * upstream.float()).sum().backward()
    (ref * upstream.float()).sum().backward()

    # bf16: one rounding of the result (2**-8 relative) apart from the fp32 reference
    rel = 1e-4 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and out.shape == (2, m, targets * r)
    for got, want in ((out, ref), (x.grad, x_ref.grad), (a.grad, a_ref.grad)):
        torch.testing.assert_close(got.float(), want.float(), rtol=rel, atol=rel * want.abs().max().item())


@pytest.mark.parametrize("m,k,r,dtype", [(70, 136, 6, torch.float32), (96, 256, 8, torch.bfloat16)])
def test_gated_down_projection_computes_its_input_again_from_gate_and_up(m, k, r, dtype):
    """A gated MLP's down projection, x = silu(gate) * up (rounded once, as the compiler computes it): the same
    output and gradients for gate, up and A as `dropped_down` of x, with x overwritten after the forward, so the
    backward must have read gate and up instead."""
    torch.manual_seed(4)
    p = 0.25
    gate = torch.randn(2, m, k).to(dtype).requires_grad_(True)
    up = torch.randn(2, m, k).to(dtype).requires_grad_(True)
    a = torch.randn(r, k, requires_grad=True)
    seed = fused_lora.new_seed(gate.device)
    refs = [t.detach().clone().requires_grad_(True) for t in (gate, up, a)]

    def activation(g, u):
        return (torch.nn.functional.silu(g.float()) * u.float()).to(dtype)

    x = activation(gate, up)
    out = fused_lora.gated_dropped_down(x, gate, up, a, seed, p)
    with torch.no_grad():
        x.zero_()
    ref = fused_lora.dropped_down(activation(refs[0], refs[1]), refs[2], seed, p)
    upstream = torch.randn(out.shape).to(dtype)
    (out.float() * upstream.float()).sum().backward()
    (ref.float() * upstream.float()).sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in zip((gate.grad, up.grad, a.grad), (t.grad for t in refs)):
        assert want.abs().max() > 0
        torch.testing.assert_close(got.float(), want.float(), rtol=rel, atol=rel * want.abs().max().item())


@pytest.mark.parametrize("m,k,r,dtype", [(70, 136, 6, torch.float32), (96, 256, 8, torch.bfloat16)])
def test_swiglu_backward_in_the_down_kernel_gives_gate_and_up_their_gradients(m, k, r, dtype):
    """`swiglu_down_backward`: the LoRA gradient of the gated down projection plus the base product's share d,
    taken through silu(gate) * up by the kernel, against torch's autograd of the same sum (same masks), and each
    row's largest |gradient x weight scale| for the FP8 products of gate and up."""
    torch.manual_seed(5)
    p = 0.25
    gate, up = (torch.randn(2, m, k).to(dtype).requires_grad_(True) for _ in range(2))
    a = torch.randn(r, k, requires_grad=True)
    d = torch.randn(2, m, k).to(dtype)
    scales = torch.rand(2, k) + 0.5
    seed = fused_lora.new_seed(gate.device)
    act = (torch.nn.functional.silu(gate.float()) * up.float()).to(dtype)
    low = fused_lora.gated_dropped_down(act, gate, up, a, seed, p)
    g = torch.randn(low.shape).to(dtype)
    gu, amax, ga = fused_lora.swiglu_down_backward(g, gate, up, d, a, seed, p, scales)

    ref_gate, ref_up, ref_a = (t.detach().clone().requires_grad_(True) for t in (gate, up, a))
    ref_act = torch.nn.functional.silu(ref_gate.float()) * ref_up.float()
    ref_low = fused_lora.dropped_down(ref_act.to(dtype), ref_a, seed, p).float()
    ((ref_low * g.float()).sum() + (ref_act * d.float()).sum()).backward()
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in ((gu[0], ref_gate.grad), (gu[1], ref_up.grad), (ga, ref_a.grad)):
        assert want.abs().max() > 0
        torch.testing.assert_close(got.float(), want.float(), rtol=rel, atol=rel * want.abs().max().item())
    for i in range(2):  # the maxima of what the kernel wrote, exactly
        want = (gu[i].reshape(-1, k).float() * scales[i]).abs().amax(dim=-1, keepdim=True)
        torch.testing.assert_close(amax[i], want, rtol=0, atol=0)


@pytest.mark.parametrize("m,n,r,dtype", [
    (70, 200, 6, torch.float32),      # rows, columns and rank not multiples of a tile
    (33, 136, 24, torch.float32),     # a rank over 16
    (96, 256, 8, torch.bfloat16),     # bf16 activations, an fp32 adapter (as in training)
])
def test_fused_up_projection_matches_torch(m, n, r, dtype):
    """base + s * low @ B.T and its gradients for base, low and B, all from one read of the output gradient."""
    torch.manual_seed(2)
    base = torch.randn(2, m, n).to(dtype).requires_grad_(True)
    low = torch.randn(2, m, r).to(dtype).requires_grad_(True)
    b = torch.randn(n, r, requires_grad=True)
    out = fused_lora.added_up(base, low, b, 2.5)
    refs = [t.detach().clone().requires_grad_(True) for t in (base, low, b)]
    ref = refs[0].float() + 2.5 * refs[1].float() @ refs[2].to(dtype).float().t()
    upstream = torch.randn(out.shape).to(dtype)
    (out.float() * upstream.float()).sum().backward()
    (ref * upstream.float()).sum().backward()

    rel = 1e-4 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and out.shape == base.shape and low.grad.dtype == dtype and b.grad.dtype == b.dtype
    for got, want in ((out, ref), (base.grad, refs[0].grad), (low.grad, refs[1].grad), (b.grad, refs[2].grad)):
        torch.testing.assert_close(got.float(), want.float(), rtol=rel, atol=rel * want.abs().max().item())


def test_fused_up_projection_computes_only_the_gradients_asked_for():
    """A frozen B (another adapter's turn is not this one's; an inference-mode adapter): only the low-rank
    gradient is formed, and the other way round."""
    torch.manual_seed(3)
    base, low, b = torch.randn(40, 48), torch.randn(40, 4, requires_grad=True), torch.randn(48, 4)
    g_low, = torch.autograd.grad(fused_lora.added_up(base, low, b, 0.5).sum(), low)
    torch.testing.assert_close(g_low, 0.5 * torch.ones(40, 48) @ b, rtol=1e-4, atol=1e-4)
    low, b = low.detach(), b.requires_grad_(True)
    g_b, = torch.autograd.grad(fused_lora.added_up(base, low, b, 0.5).sum(), b)
    torch.testing.assert_close(g_b, 0.5 * torch.ones(48, 40) @ low, rtol=1e-4, atol=1e-4)


def test_input_that_needs_no_gradient_gets_none_and_the_adapter_still_learns():
    """A first stage's first layer: its input comes from a frozen embedding."""
    torch.manual_seed(1)
    x = torch.randn(40, 64)
    a = torch.randn(4, 64, requires_grad=True)
    seed = fused_lora.new_seed(x.device)
    fused_lora.dropped_down(x, a, seed, 0.3).sum().backward()
    keep = fused_lora.dropout_mask(seed, (40, 64), 0.3, x.device)
    want = (x * keep / 0.7).sum(0).expand(4, 64)
    torch.testing.assert_close(a.grad, want, rtol=1e-4, atol=1e-4)


def test_masks_follow_the_generator():
    """The seed comes from torch's generator, so a restored RNG state (resume, an adapter's own stream) gives the
    same masks, and a new draw gives other ones."""
    x = torch.randn(64, 128)
    a = torch.randn(8, 128)
    torch.manual_seed(5)
    first = fused_lora.dropped_down(x, a, fused_lora.new_seed(x.device), 0.5)
    second = fused_lora.dropped_down(x, a, fused_lora.new_seed(x.device), 0.5)
    torch.manual_seed(5)
    again = fused_lora.dropped_down(x, a, fused_lora.new_seed(x.device), 0.5)
    assert torch.equal(first, again)
    assert not torch.allclose(first, second)


def test_the_eight_elements_of_one_random_draw_are_not_alike():
    """Each Philox call masks 8 neighbouring columns: the mask of a column must not follow its neighbours'."""
    keep = fused_lora.dropout_mask(torch.tensor([7]), (512, 64), 0.5, torch.device("cpu")).float()
    lanes = keep.view(512, 8, 8)  # [row, group, lane]
    for lane in range(1, 8):
        agree = (lanes[..., lane] == lanes[..., 0]).float().mean().item()
        assert abs(agree - 0.5) < 0.03, (lane, agree)


def _mlp(fp8: bool = False) -> torch.nn.Module:
    """transformers' LlamaMLP, small, after a norm: gate and up read one input (one shared down-projection kernel),
    down its own, whose backward forms its input again from gate's and up's outputs (lora.GatedMlp); with `fp8`,
    the MLP's linears FP8 without bias (fp8_mlp)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from merak_lora.fp8 import Fp8Linear
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
                               hidden_act="silu", mlp_bias=not fp8))
    for name in ("gate_proj", "up_proj", "down_proj") if fp8 else ():
        setattr(mlp, name, Fp8Linear.from_weight(getattr(mlp, name).weight.detach(), None, torch.device("cpu"),
                                                 torch.float32))
    return _Normed(mlp)


class _Normed(torch.nn.Module):
    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.norm, self.mlp = torch.nn.LayerNorm(16), mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x))


@pytest.mark.parametrize("fp8", [False, True])
def test_a_checkpointed_compiled_layer_recomputes_with_the_forward_masks(fp8, monkeypatch):
    """--compile with --gradient_checkpointing: the compiled layer runs again in the backward, drawing its seeds
    (two at once for gate and up, one for down) from the RNG state the checkpoint restores, and handing gate's and
    up's outputs (on an FP8 base, and their input) to down again, so every gradient equals the run that kept its
    activations."""
    from peft import LoraConfig

    from merak_lora.lora import apply_lora, group_gated_mlps, group_shared_inputs
    from merak_lora.stage import _checkpointed

    seeds, gated = [], []
    real, real_back = fused_lora.launch_down, fused_lora.launch_down_backward
    monkeypatch.setattr(fused_lora, "launch_down", lambda *a, **kw: (seeds.append(a[3].numel()), real(*a, **kw))[1])
    monkeypatch.setattr(fused_lora, "launch_down_backward",
                        lambda *a, **kw: (gated.append((kw.get("up2") is not None, kw.get("swiglu") is not None)),
                                          real_back(*a, **kw))[1])
    torch._dynamo.reset()
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = apply_lora(_mlp(fp8), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False,
                                              target_modules=["gate_proj", "up_proj", "down_proj"]), seed=0)
        group_shared_inputs(model)
        group_gated_mlps(model)
        model.train()
        body = model.base_model.model
        layer = torch.compile(body.forward)
        run = _checkpointed(layer, None) if recompute else layer
        x = torch.randn(24, 16, requires_grad=True)
        torch.manual_seed(1)
        seeds.clear()
        gated.clear()
        run(x).square().sum().backward()
        assert sorted(seeds) == ([1, 1, 2, 2] if recompute else [1, 2])
        assert sorted(gated) == [(False, False), (True, fp8)]
        grads.append([x.grad] + [p.grad for n, p in model.named_parameters() if "lora_" in n])
    for plain, again in zip(*grads):
        torch.testing.assert_close(again, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("broken,gradient", [("launch_down_backward", "A's gradient"),
                                             ("launch_up_backward", "B's gradient")])
def test_a_compiled_stage_trains_without_the_kernels_when_they_disagree(broken, gradient, tiny_llama, monkeypatch,
                                                                      caplog):
    """The stage's check runs the kernels once against torch: agreeing, its LoRA linears use them; with one made to
    give a wrong adapter gradient, the stage says so in one warning and a training step runs without any of them."""
    import logging

    from peft.tuners.lora.layer import Linear as LoraLinear

    from family_check import LORA, batch
    from merak_lora.config import Config
    from merak_lora.layout import init_distributed
    from merak_lora.plan import build_stages, make_plan
    from merak_lora.schedule import Pipeline, TokenLoss

    cfg = Config(model_path=tiny_llama, compile=True, seed=3)
    plan = make_plan(cfg, 1, {**LORA, "lora_dropout": 0.1})
    layout = init_distributed(1, 1, False, "cpu")
    flags = lambda stage: {getattr(m, "fused_kernels", True) for m in stage.model.modules()  # noqa: E731
                           if type(m) is LoraLinear}
    assert flags(build_stages(cfg, plan, layout)[0]) == {True}

    launched = []
    for name in ("launch_down", "launch_down_backward", "launch_up", "launch_up_backward"):
        def launch(*args, _real=getattr(fused_lora, name), _name=name, **kw):
            launched.append(_name)
            _real(*args, **kw)
            if _name == broken:
                args[4].mul_(1.5)  # the adapter tensor's gradient: ga of the down projection, gb of the up one
        monkeypatch.setattr(fused_lora, name, launch)
    with caplog.at_level(logging.WARNING, logger="merak_lora"):
        stage = build_stages(cfg, plan, layout)[0].train()
    assert flags(stage) == {False}
    warned = [r.getMessage() for r in caplog.records if "fused LoRA kernels" in r.getMessage()]
    assert len(warned) == 1 and f"{gradient} is off" in warned[0], warned

    torch._dynamo.reset()
    launched.clear()
    b = batch(tiny_llama, rows=2, seq=16)
    pipe = Pipeline([stage], layout, "1f1b", 1, TokenLoss(), plan.hidden_size, plan.vocab_size, torch.float32)
    pipe.loss_fn.normalizer = b.targets_count
    assert torch.isfinite(pipe.step(b))
    assert launched == [] and all(p.grad is not None for n, p in stage.model.named_parameters() if "lora_" in n)


def test_targets_sharing_an_input_run_one_kernel_and_give_what_each_alone_gives(tiny_llama, monkeypatch):
    """A compiled Llama stage: q, k, v and gate, up read one input each, so their down projections run as one
    kernel per group (one launch with three seeds, one with two) forward and backward; o and down alone. A drop
    probability under the kernels' 2**-17 drops nothing (still the dropout path), so the grouped step must give the
    loss and every LoRA gradient of the same step with each target on its own."""
    from family_check import LORA, batch
    from merak_lora.config import Config
    from merak_lora.layout import init_distributed
    from merak_lora.plan import build_stages, make_plan
    from merak_lora.schedule import Pipeline, TokenLoss

    cfg = Config(model_path=tiny_llama, compile=True, seed=3)
    plan = make_plan(cfg, 1, {**LORA, "lora_dropout": 1e-9})
    layout = init_distributed(1, 1, False, "cpu")
    stage = build_stages(cfg, plan, layout)[0].train()
    launched = []
    for name in ("launch_down", "launch_down_backward"):
        def launch(*args, _real=getattr(fused_lora, name), _name=name, **kw):
            launched.append((_name, args[3 if _name == "launch_down" else 5].numel()))
            _real(*args, **kw)
        monkeypatch.setattr(fused_lora, name, launch)
    b = batch(tiny_llama, rows=2, seq=16)
    pipe = Pipeline([stage], layout, "1f1b", 1, TokenLoss(), plan.hidden_size, plan.vocab_size, torch.float32)
    pipe.loss_fn.normalizer = b.targets_count
    lora = [p for n, p in stage.model.named_parameters() if "lora_" in n]

    def step():
        launched.clear()
        for p in lora:
            p.grad = None
        loss = pipe.step(b)
        return loss, [p.grad.clone() for p in lora]

    torch._dynamo.reset()
    grouped_loss, grouped = step()
    layers = len(stage.layers())
    for kernel in ("launch_down", "launch_down_backward"):
        assert sorted(t for k, t in launched if k == kernel) == [1] * 2 * layers + [2] * layers + [3] * layers
    for mod in stage.model.modules():
        mod.__dict__.pop("shared_input", None)
    alone_loss, alone = step()
    assert sorted({t for _, t in launched}) == [1]
    torch.testing.assert_close(grouped_loss, alone_loss, rtol=1e-6, atol=0)
    for g, want in zip(grouped, alone):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("fp8", [False, True])
def test_a_gated_mlp_keeps_gate_and_up_instead_of_its_activation(fp8, tmp_path, monkeypatch):
    """A compiled Llama stage: down's LoRA reads silu(gate) * up, and its backward computes that again from gate
    and up (kept for the activation's backward anyway) instead of keeping it. Same masks, so the step gives the
    loss and every LoRA gradient of the step where down keeps its input, and its graphs keep one activation-sized
    tensor a layer less. On an FP8 base down computes the activation itself, and its kernel's backward carries the
    activation's gradient on to gate and up (fp8_mlp): the same loss and gradients again, with the same FP8
    roundings (the kernel finds the rows' maxima the products' quantization would)."""
    from family_check import LORA, batch
    from merak_lora.config import Config
    from merak_lora.layout import init_distributed
    from merak_lora.plan import build_stages, make_plan
    from merak_lora.quant import Fp8
    from merak_lora.schedule import Pipeline, TokenLoss
    from merak_lora.tiny import make_tiny_model

    tiny_llama = make_tiny_model(str(tmp_path), "llama", num_layers=2)  # each layer's kernels run interpreted
    cfg = Config(model_path=tiny_llama, compile=True, seed=3)
    plan = make_plan(cfg, 1, {**LORA, "lora_dropout": 0.25})
    layout = init_distributed(1, 1, False, "cpu")
    stage = build_stages(cfg, plan, layout, Fp8(torch.float32) if fp8 else None)[0].train()
    gated = []
    real = fused_lora.launch_down_backward

    def launch(*args, **kw):
        gated.append((kw.get("up2") is not None, kw.get("swiglu") is not None))
        return real(*args, **kw)
    monkeypatch.setattr(fused_lora, "launch_down_backward", launch)
    b = batch(tiny_llama, rows=2, seq=16)
    pipe = Pipeline([stage], layout, "1f1b", 1, TokenLoss(), plan.hidden_size, plan.vocab_size, torch.float32)
    pipe.loss_fn.normalizer = b.targets_count
    lora = [p for n, p in stage.model.named_parameters() if "lora_" in n]
    width = stage.model.get_base_model().config.intermediate_size

    def step():
        gated.clear()
        for p in lora:
            p.grad = None
        kept = []

        def pack(t):
            kept.append(t.shape[-1] == width and t.dtype in (torch.float32, torch.bfloat16))
            return t
        torch.manual_seed(11)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = pipe.step(b)
        return loss, [p.grad.clone() for p in lora], sum(kept)

    torch._dynamo.reset()
    loss, grads, kept = step()
    layers = len(stage.layers())
    assert sorted(gated) == [(False, False)] * 3 * layers + [(True, fp8)] * layers
    for mod in stage.model.modules():
        mod.__dict__.pop("gated_mlp", None)
    torch._dynamo.reset()
    alone_loss, alone, alone_kept = step()
    assert not any(up for up, _ in gated)
    if not fp8:
        assert kept == alone_kept - layers
    torch.testing.assert_close(loss, alone_loss, rtol=1e-6, atol=0)
    for g, want in zip(grads, alone):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
