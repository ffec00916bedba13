"""The fused one-token step (fused_decode.py, decode_kernels.py) under Triton's interpreter: each kernel against
torch and transformers' own arithmetic, and whole answers against the transformers layers it replaces."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoTokenizer, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from merak_lora import decode_kernels as kernels
from test_generate import _ids, memorised  # noqa: F401 - the fixture

NO_BNB = importlib.util.find_spec("bitsandbytes") is None
pytestmark = pytest.mark.triton


def _lora(rows: int, rank: int, partials: int, m: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, partials, rank, generator=g), torch.randn(rows, rank, generator=g) * 0.1, 0.5


def test_residual_norm_adds_the_product_and_its_lora_then_normalizes():
    g = torch.Generator().manual_seed(0)
    m, k, ra = 3, 96, 5
    h, y = torch.randn(m, k, generator=g), torch.randn(m, k, generator=g)
    t, b, scale = _lora(k, 8, 6, m, 1)
    norm = LlamaRMSNorm(k, eps=1e-5)
    norm.weight.data = torch.randn(k, generator=g)
    a = torch.randn(ra, k, generator=g)
    h_out, x = torch.full_like(h, float("nan")), torch.full_like(h, float("nan"))
    t_a = torch.full((m, ra), float("nan"))
    kernels.residual_norm(h, h_out, y, (t, b, scale), norm=(norm.weight, 1e-5, x), a=a, t_a=t_a)
    want_h = h + y + scale * t.sum(1) @ b.t()
    torch.testing.assert_close(h_out, want_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x, norm(want_h), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t_a, norm(want_h) @ a.t(), rtol=1e-4, atol=1e-4)


def test_gated_activation_with_both_adapters():
    g = torch.Generator().manual_seed(2)
    m, n, rank = 2, 700, 4  # two programs, the second one partly past the end
    y = torch.randn(m, 2 * n, generator=g)
    t, b, scale = _lora(2 * n, 2 * rank, 1, m, 3)
    a_down = torch.randn(3, n, generator=g)
    act = torch.full((m, n), float("nan"))
    programs = -(-n // kernels.GATED_COLUMNS)
    t_down = torch.full((m, programs, 3), float("nan"))
    kernels.gated_activation(y, (t, b, scale), act, a_down, t_down)
    full = y + scale * t.sum(1) @ b.t()
    want = F.silu(full[:, :n]) * full[:, n:]
    torch.testing.assert_close(act, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t_down.sum(1), want @ a_down.t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, splits", [(torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 4),
                                           (torch.bfloat16, 8)])
def test_attention_matches_transformers_rotary_cache_and_masked_softmax(dtype, splits):
    """Two rows (one left-padded by 30), grouped query heads, a cache holding 70 slots: q, k and v from the joined
    product with their LoRA, rotated as transformers rotates them; the new k and v land in the cache; the output is
    softmax attention over the seen slots; o's LoRA partials are its heads' products. Split among 4 or 8 programs
    a head (shares of 20 or 12 slots): a share of padding only, empty shares (8), padding at -inf (8), and the
    counts back at zero for the next token."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    g = torch.Generator().manual_seed(4)
    m, heads, kv, d, slots, pos, pad = 2, 4, 2, 16, 96, 70, 30
    config = LlamaConfig(hidden_size=heads * d, num_attention_heads=heads, num_key_value_heads=kv)
    width = (heads + 2 * kv) * d
    y = torch.randn(m, width, generator=g).to(dtype)
    t, b, scale = _lora(width, 6, 1, m, 5)
    keys, values = (torch.randn(m, kv, slots, d, generator=g).to(dtype) for _ in range(2))
    positions = torch.tensor([[pos], [pos - pad]])  # the second row's prompt was 30 tokens shorter
    cos, sin = LlamaRotaryEmbedding(config)(y[:, None], positions)
    key_ok = torch.ones(m, slots, dtype=torch.bool)
    key_ok[1, :pad] = False
    from merak_lora.decode import attention_bias
    bias = attention_bias(key_ok, pos, 1, dtype)
    if splits == 8:
        bias[1, ..., :pad] = float("-inf")
    a_o = torch.randn(3, heads * d, generator=g).to(dtype)
    out = torch.full((m, heads * d), float("nan"), dtype=dtype)
    t_o = torch.full((m, heads, 3), float("nan"))
    k_cache, v_cache = keys.clone(), values.clone()
    shares = kernels.attention_shares(m, heads, splits, d, torch.device("cpu"))
    if shares is not None:
        shares[0].fill_(float("nan"))
    kernels.decode_attention(y, (t, b.to(dtype), scale), cos.view(m, -1), sin.view(m, -1), k_cache, v_cache,
                             torch.tensor(pos), bias.view(m, -1), d ** -0.5, out, heads, kv, a_o=a_o, t_o=t_o,
                             shares=shares, block=32 if splits == 1 else 4)
    if shares is not None:
        assert torch.equal(shares[1], torch.zeros(m, heads, dtype=torch.int32))

    full = (y.float() + scale * t.sum(1) @ b.to(dtype).float().t()).to(dtype)
    q, k_new, v_new = full.split([heads * d, kv * d, kv * d], dim=-1)
    q, k_new = apply_rotary_pos_emb(q.view(m, 1, heads, d).transpose(1, 2), k_new.view(m, 1, kv, d).transpose(1, 2),
                                    cos, sin)
    v_new = v_new.view(m, 1, kv, d).transpose(1, 2)
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(k_cache[:, :, pos], k_new[:, :, 0], **(tol if dtype == torch.bfloat16 else
                                                                       dict(rtol=1e-6, atol=1e-6)))
    torch.testing.assert_close(v_cache[:, :, pos], v_new[:, :, 0])
    torch.testing.assert_close(k_cache[:, :, :pos], keys[:, :, :pos])  # the slots before are only read
    all_k = torch.cat([keys[:, :, :pos], k_new], dim=2).float().repeat_interleave(heads // kv, dim=1)
    all_v = torch.cat([values[:, :, :pos], v_new], dim=2).float().repeat_interleave(heads // kv, dim=1)
    want = F.scaled_dot_product_attention(q.float(), all_k, all_v, attn_mask=bias[..., :pos + 1].float())
    want = want.transpose(1, 2).reshape(m, heads * d)
    torch.testing.assert_close(out.float(), want, **(dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else tol))
    torch.testing.assert_close(t_o, (out.float().view(m, heads, 1, d) * a_o.float().view(3, heads, d)
                                     .transpose(0, 1)[None]).sum(-1), rtol=1e-4, atol=1e-4)


@pytest.fixture
def canonical_4bit(monkeypatch):
    """bitsandbytes' 4-bit layers keep their own packing on the CPU (AVX512-BF16 CPUs repack them at the first
    forward, which keeps q, k, v and gate, up from joining: shared_products._joinable)."""
    import bitsandbytes.nn.modules as modules
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: False)


def _four_answers(gen, prompts: list[list[int]], sampling) -> tuple[dict, int]:
    """Greedy answers with the fused step and with the transformers layers, adapter on and off; and how many
    one-token steps the fused step ran."""
    from merak_lora.fused_decode import FusedStep
    calls = [0]
    run = FusedStep.__call__

    def counted(self, *args):
        calls[0] += 1
        return run(self, *args)
    FusedStep.__call__ = counted
    try:
        answers = {(fused, adapter): None for fused in (True, False) for adapter in (True, False)}
        for fused, adapter in answers:
            gen.fused = fused
            answers[fused, adapter] = gen.generate(prompts, sampling, adapter=adapter)
    finally:
        FusedStep.__call__ = run
    return answers, calls[0]


def _answers(model: str, ckpt: str, prompts: list[list[int]], flags: dict) -> tuple[dict, int, int]:
    """`_four_answers` from a checkpoint's adapter, and the generator's stage count."""
    from merak_lora.chat import GenConfig, _pipeline_generator
    from merak_lora.checkpoint import read_meta
    cfg = GenConfig(model_path=model, resume_peft_from_checkpoint=ckpt, max_new_tokens=6, device="cpu",
                    compare_base=True, **flags)
    gen, _, _ = _pipeline_generator(cfg, AutoTokenizer.from_pretrained(model), ckpt, read_meta(ckpt), 1)
    return (*_four_answers(gen, prompts, cfg.sampling()), len(gen.stages))


@pytest.mark.parametrize("flags", [
    pytest.param(dict(load_in_4bit=True, bnb_4bit_compute_dtype="float32"), id="4bit",
                 marks=pytest.mark.skipif(NO_BNB, reason="needs bitsandbytes")),
    pytest.param(dict(pipeline_schedule="interleaved1f1b", stages_per_rank=2), id="two-stages")])
def test_fused_step_answers_as_the_transformers_layers(tiny_llama, memorised, canonical_4bit, flags):  # noqa: F811
    """A tiny Llama with its adapter, greedy, prompts of different lengths in one batch: the fused step gives the
    transformers layers' tokens with the adapter and without (the base), and decoded every token after the
    prompt. On a 4-bit base (bitsandbytes' products), and on a plain one in two stages of one process (the
    first stage's step starts from the embedding and hands its residual stream on; the last one's ends in the
    head)."""
    ckpt, _ = memorised
    answers, calls, stages = _answers(tiny_llama, ckpt, _ids(tiny_llama)[:2], flags)
    assert calls == 2 * stages * (6 - 1), "the fused step did not decode every token after the prompt"
    assert answers[True, True] == answers[False, True]
    assert answers[True, False] == answers[False, False]
    assert answers[True, True] != answers[True, False], "the adapter changed nothing, so the check proves little"


def test_a_product_that_adds_its_lora_is_handed_it_and_the_kernels_add_it_no_more(tiny_llama, memorised,  # noqa: F811
                                                                                 monkeypatch):
    """merak-lora's 4-bit product adds each linear's LoRA up projection as it writes its output, and the kernel
    after it must then not add it again. Here every product does so (in torch, on the CPU): answers stay the
    transformers layers', adapter on and off, and every product was handed its LoRA."""
    from merak_lora import four_bit_cuda
    handed = []

    def product_for(product, dtype, rows):
        def run(x, lora=None):
            y = product(x)
            if lora is not None:
                t, b, scale = lora
                handed.append(tuple(b.shape))
                y = (y.float() + scale * (t.sum(1) @ b.float().T)).to(y.dtype)
            return y, None
        return run
    monkeypatch.setattr(four_bit_cuda, "product_for", product_for)
    ckpt, _ = memorised
    answers, calls, stages = _answers(tiny_llama, ckpt, _ids(tiny_llama)[:2],
                                      dict(pipeline_schedule="interleaved1f1b", stages_per_rank=2))
    assert calls == 2 * stages * (6 - 1)
    assert answers[True, True] == answers[False, True]
    assert answers[True, False] == answers[False, False]
    assert answers[True, True] != answers[True, False]
    layers = AutoConfig.from_pretrained(tiny_llama).num_hidden_layers
    assert len(handed) == 4 * layers * (6 - 1), "a product with LoRA was not handed it at every step"


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _random_adapter_answers(model: str, targets: list[str]) -> tuple[dict, int]:
    """`_four_answers` for a model folder without a checkpoint: a fresh random adapter on `targets`."""
    from merak_lora.chat import GenConfig, _pipeline_generator
    meta = {"lora": {"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": False}}
    cfg = GenConfig(model_path=model, max_new_tokens=6, device="cpu", compare_base=True)
    gen, _, _ = _pipeline_generator(cfg, AutoTokenizer.from_pretrained(model), None, meta, 1)
    return _four_answers(gen, [[5, 17, 29, 3, 77, 12, 40], [9, 31, 4, 66]], cfg.sampling())


def test_attention_split_among_programs_answers_as_the_transformers_layers(tiny_llama, memorised,  # noqa: F811
                                                                             monkeypatch):
    """The tiny cache split as a long one is (shares of whole 4-slot blocks, up to the CPU stand-in's 16 units'
    worth of programs): the fused step still gives the transformers layers' tokens, adapter on and off."""
    from functools import partial
    ckpt, _ = memorised
    monkeypatch.setattr(kernels, "SLOTS_A_SHARE", 2)
    monkeypatch.setattr(kernels, "decode_attention", partial(kernels.decode_attention, block=4))
    made, splits = [], kernels.attention_splits
    monkeypatch.setattr(kernels, "attention_splits", lambda *a: made.append(splits(*a)) or made[-1])
    answers, calls, _ = _answers(tiny_llama, ckpt, _ids(tiny_llama)[:2], {})
    assert calls and made and all(n > 1 for n in made), "nothing was split"
    assert answers[True, True] == answers[False, True]
    assert answers[True, False] == answers[False, False]


@pytest.mark.parametrize("model_type, targets", [("qwen2", ALL), ("mistral", ALL), ("llama", ["q_proj", "v_proj"])])
def test_other_families_and_targets(tmp_path, model_type, targets):
    """Qwen2 (biases on q, k and v), Mistral (without a sliding window, as its v0.2 and later ship), and LoRA on q
    and v alone (k, o and the MLP without): the fused step gives the transformers layers' tokens, adapter on and
    off."""
    import json
    from merak_lora.tiny import make_tiny_model
    folder = make_tiny_model(str(tmp_path / model_type), model_type, num_layers=2)
    config = json.load(open(f"{folder}/config.json"))
    config["sliding_window"] = None
    json.dump(config, open(f"{folder}/config.json", "w"))
    answers, calls = _random_adapter_answers(folder, targets)
    assert calls == 2 * (6 - 1)
    assert answers[True, True] == answers[False, True]
    assert answers[True, False] == answers[False, False]
    assert answers[True, True] != answers[True, False], "the adapter changed nothing, so the check proves little"


def test_the_next_request_of_the_same_shape_keeps_the_fused_step(tmp_path):
    """The fused step a request built (each 4-bit weight's quant state converted, buffers made) serves the next
    request of the same shape as it is, and its answers are a fresh step's."""
    from merak_lora.chat import GenConfig, _pipeline_generator
    from merak_lora.fused_decode import FusedStep
    from merak_lora.tiny import make_tiny_model
    folder = make_tiny_model(str(tmp_path / "llama"), "llama", num_layers=2)
    meta = {"lora": {"r": 4, "lora_alpha": 8, "target_modules": ALL, "init_lora_weights": False}}
    cfg = GenConfig(model_path=folder, max_new_tokens=2, device="cpu", compare_base=True)  # one token fused
    gen, _, _ = _pipeline_generator(cfg, AutoTokenizer.from_pretrained(folder), None, meta, 1)
    gen.generate([[5, 17, 29, 3, 77, 12, 40], [9, 31, 4, 66]], cfg.sampling())
    ((_, decoder),) = gen.pool.entries
    step = decoder.fused
    assert isinstance(step, FusedStep)
    other = [[8, 2, 51, 19], [70, 6, 33, 14, 21, 9, 45]]
    again = gen.generate(other, cfg.sampling())
    assert gen.pool.entries[0][1] is decoder and decoder.fused is step
    gen.pool.clear()
    assert gen.generate(other, cfg.sampling()) == again
    assert gen.pool.entries[0][1].fused is not step


def test_a_stage_the_fused_step_cannot_serve_says_why_once(tiny_llama, memorised, caplog):  # noqa: F811
    """With the growing cache (a model without static decoding) every token runs the transformers layers, and
    the log says why once per stage, not once per request."""
    import logging
    from merak_lora.chat import GenConfig, _pipeline_generator
    from merak_lora.checkpoint import read_meta
    ckpt, _ = memorised
    cfg = GenConfig(model_path=tiny_llama, resume_peft_from_checkpoint=ckpt, max_new_tokens=4, device="cpu")
    gen, _, _ = _pipeline_generator(cfg, AutoTokenizer.from_pretrained(tiny_llama), ckpt, read_meta(ckpt), 1)
    prompts = _ids(tiny_llama)[:2]
    want = gen.generate(prompts, cfg.sampling())
    gen.static, gen.fused = False, True
    with caplog.at_level(logging.INFO, logger="merak_lora"):
        got = [gen.generate(prompts, cfg.sampling()) for _ in range(2)]
    assert got == [want, want]
    said = [r.getMessage() for r in caplog.records if "not the fused step" in r.getMessage()]
    assert said == ["stage 0: decoding with the transformers layers, not the fused step: the model decodes with a "
                    "growing cache"]
