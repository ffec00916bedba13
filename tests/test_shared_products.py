"""Generation's q, k, v (and gate, up) as one product over side-by-side weights: the same outputs as each linear
alone, for every adapter state, on a plain and a 4-bit base, without a second copy of the weights."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import LlamaConfig, LlamaForCausalLM

NO_BNB = importlib.util.find_spec("bitsandbytes") is None


def _model(dtype: torch.dtype, bias: bool = False) -> nn.Module:
    """A two-layer Llama with two adapters: "a" on every linear, "b" (another rank and scale) on q and v only."""
    from merak_lora.lora import apply_adapters
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_bias=bias)).to(dtype)
    return apply_adapters(lm, [("a", LoraConfig(r=8, lora_alpha=32, target_modules="all-linear",
                                                init_lora_weights=False), 1),
                               ("b", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False), 2)]).eval()


def _use(model: nn.Module, name: str) -> None:
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m._active_adapter = name


def _counted(groups) -> list[int]:
    calls = [0]
    for g in groups:
        product = g.base_product
        g.base_product = lambda x, product=product: (calls.__setitem__(0, calls[0] + 1), product(x))[1]
    return calls


def _logits(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits with each adapter, then with none (PEFT's switch), for the whole sequence and one token."""
    from merak_lora.lora import adapters_off
    out = {}
    with torch.no_grad():
        for name in ("a", "b"):
            _use(model, name)
            out[name], out[name + "-one"] = model(input_ids=ids).logits, model(input_ids=ids[:1, :1]).logits
        _use(model, "a")
        with adapters_off(model):
            out["base"] = model(input_ids=ids).logits
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linears_reading_one_input_give_what_each_gives_alone(dtype):
    from merak_lora.lora import adapters_in_dtype, merge_for_generation
    from merak_lora.shared_products import group_for_generation
    model = _model(dtype, bias=True)
    adapters_in_dtype(model, dtype)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    alone = copy.deepcopy(model)
    want = _logits(alone, ids)
    groups = group_for_generation(model)
    assert len(groups) == 4  # q, k, v and gate, up in each of two layers
    calls = _counted(groups)
    got = _logits(model, ids)
    assert calls[0] == 5 * 4, "each forward runs each group's product once"
    tol = 0 if dtype == torch.bfloat16 else 1e-5  # float32 sums in another order; bf16 rounds them alike here
    for key in want:
        assert (got[key] - want[key]).abs().max() <= tol * want[key].abs().max(), key
    assert not torch.equal(got["a"], got["b"]) and not torch.equal(got["a"], got["base"])
    attn = model.base_model.model.model.layers[0].self_attn
    storages = {m.get_base_layer().weight.untyped_storage().data_ptr() for m in (attn.q_proj, attn.k_proj,
                                                                                 attn.v_proj)}
    assert len(storages) == 1, "the members' weights are views of one buffer, not copies"
    # merged in place through the views: the group's product sees the merged weights
    _use(model, "a"), _use(alone, "a")
    assert merge_for_generation(model) == merge_for_generation(alone) == 14
    with torch.no_grad():
        merged, reference = model(input_ids=ids).logits, alone(input_ids=ids).logits
    assert (merged - reference).abs().max() <= tol * reference.abs().max()


def test_a_member_given_another_input_computes_alone():
    from merak_lora.shared_products import group_for_generation
    model = _model(torch.float32)
    attn = model.base_model.model.model.layers[0].self_attn
    x, y = torch.randn(1, 3, 128), torch.randn(1, 3, 128)
    with torch.no_grad():
        want_q, want_k = attn.q_proj(x), attn.k_proj(y)
        calls = _counted(group_for_generation(model))
        got_q, got_k = attn.q_proj(x), attn.k_proj(y)
        assert calls[0] == 2
        torch.testing.assert_close(got_q, want_q)
        torch.testing.assert_close(got_k, want_k)
        with torch.enable_grad():  # training is never served from the group's copies of the adapter
            attn.q_proj(x)
        assert calls[0] == 2


@pytest.mark.skipif(NO_BNB, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("double_quant", [False, True])
def test_four_bit_linears_join_with_their_scales(double_quant):
    """The packed codes and per-block scales concatenated (double-quantized scales expanded first) give each
    member's bitsandbytes product, bias included."""
    from merak_lora.quant import Quantization, quantized_linear
    from merak_lora.shared_products import group_for_generation
    model = _model(torch.bfloat16, bias=True)
    q = Quantization(4, "nf4", double_quant, torch.bfloat16)
    for m in list(model.modules()):
        if type(m) is LoraLinear:
            b = m.base_layer
            m.base_layer = quantized_linear(b.weight.data, None if b.bias is None else b.bias.data, q,
                                            torch.device("cpu"))
            m.base_layer.support_avx512bf16_for_cpu = False  # the repacked CPU layout stays apart (_joinable)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    want = _logits(model, ids)
    groups = group_for_generation(model)
    assert len(groups) == 4
    calls = _counted(groups)
    got = _logits(model, ids)
    assert calls[0] == 5 * 4
    for key in want:
        assert torch.equal(got[key], want[key]), key
    states = [m.get_base_layer().weight.quant_state for g in groups for m in g.members]
    assert not any(s.nested for s in states), "double-quantized scales are expanded once, not on every call"


def test_linears_without_lora_join_those_with_it():
    """LoRA on q and v alone (the tutorials' config): k, gate and up, without LoRA, still join their groups and
    add nothing of an adapter; every output is the one each linear gives alone, with the adapter and without."""
    from merak_lora.lora import adapters_off, apply_adapters
    from merak_lora.shared_products import group_for_generation
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2))
    model = apply_adapters(lm, [("a", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False), 1)]).eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with adapters_off(model):
            want_base = model(input_ids=ids).logits
        groups = group_for_generation(model)
        assert len(groups) == 4 and type(groups[0].members[1]) is torch.nn.Linear  # k, with no LoRA
        assert sorted(groups[0].adapters) == ["a"] and not groups[1].adapters  # gate, up: no adapter to stack
        calls = _counted(groups)
        got = model(input_ids=ids).logits
        with adapters_off(model):
            got_base = model(input_ids=ids).logits
    assert calls[0] == 2 * 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_base, want_base, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, got_base)
