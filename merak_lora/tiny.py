"""Tiny random models with a real tokenizer, for tests and the demo (no hub access on these machines).

    python -m merak_lora.tiny --model_type llama --out DIR [--num_layers 4] [--shards 2] [--tie true]

The tokenizer is a byte-level BPE trained here on the bundled sample data, saved in Hugging Face format with
a ChatML chat template, so the whole product path (templates, masking, generation) runs as it would on a
real model.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE_DATA = os.path.join(os.path.dirname(HERE), "data", "sample.json")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def sample_texts(path: str = SAMPLE_DATA) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        records = json.load(fh)
    texts = []
    for r in records:
        texts += [r.get("instruction", ""), r.get("input", ""), r.get("output", "")]
    return [t for t in texts if t] + ["system user assistant"]


def make_tokenizer(vocab_size: int = 1024, texts: list[str] | None = None):
    """A byte-level BPE tokenizer trained on the sample data, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts or sample_texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, chat_template=CHATML,
                                   additional_special_tokens=["<|im_start|>"])


# Size fields by name, as the configs of transformers' families spell them: a shrunk config sets every one of
# these that its family's default config has (and is not None); everything else keeps the family's default.
_SIZE_FIELDS: dict[str, tuple[str, ...]] = {
    "width": ("hidden_size", "n_embd", "d_model", "emb_dim", "embedding_size", "backbone_hidden_size",
              "word_embed_proj_dim", "input_embedding_size", "output_embedding_size"),
    "ffn": ("intermediate_size", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "dim_ff", "ffn_hidden_size",
            "feed_forward_size", "intermediate_size_mlp", "dense_intermediate_size", "shared_intermediate_size"),
    "expert_ffn": ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
                   "moe_shared_expert_intermediate_size"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
               "num_decoder_layers", "num_encoder_layers"),
    "heads": ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
              "encoder_attention_heads", "attention_heads", "num_decoder_attention_heads",
              "num_encoder_attention_heads", "swa_num_attention_heads", "linear_num_value_heads",
              "linear_num_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "linear_num_key_heads"),
    "head_dim": ("head_dim", "attention_head_dim", "d_head", "dim_head", "swa_head_dim", "linear_key_head_dim",
                 "linear_value_head_dim", "linear_head_dim", "v_head_dim", "index_head_dim"),
    "half_head_dim": ("qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim"),
    "rank": ("kv_lora_rank", "q_lora_rank"),
    "experts": ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
    "experts_per_tok": ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "moe_k"),
    "one": ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "n_group", "topk_group",
            "num_expert_group"),
    "positions": ("max_position_embeddings", "n_positions", "n_ctx", "max_target_positions", "context_length"),
}


def _shrunk_sizes(defaults: dict, hidden: int, num_layers: int) -> dict:
    """The size fields of a family's default config, set for a tiny model (4 heads of hidden/4, 2 KV heads)."""
    heads = 4
    value = {"width": hidden, "ffn": 2 * hidden, "expert_ffn": hidden, "layers": num_layers, "heads": heads,
             "kv_heads": 2, "head_dim": hidden // heads, "half_head_dim": hidden // heads // 2, "rank": 16,
             "experts": 4, "experts_per_tok": 2, "one": 1, "positions": 2048}
    out = {}
    for group, names in _SIZE_FIELDS.items():
        for name in names:
            current = defaults.get(name, False)
            # a None head size or expert count is one the family derives or requires; other Nones mean "off"
            unset = current is None and group in ("head_dim", "kv_heads", "experts", "experts_per_tok")
            if unset or (isinstance(current, int) and not isinstance(current, bool)):
                out[name] = min(current, value[group]) if group == "positions" else value[group]
    if isinstance(defaults.get("attention_hidden_size"), int) and isinstance(defaults.get("hidden_size"), int):
        # a multiple of the width (RWKV: 1, Zamba: 2, as its layers concatenate the embeddings)
        out["attention_hidden_size"] = hidden * defaults["attention_hidden_size"] // defaults["hidden_size"]
    if "kv_lora_rank" in defaults:  # MLA: one KV head per query head
        out["num_key_value_heads"] = heads
    if defaults.get("head_dim") is not None and defaults.get("head_dim") == defaults.get("qk_rope_head_dim"):
        out["head_dim"] = value["half_head_dim"]  # MLA: the rotary tables are as wide as the rotary part
    # dropout (and router jitter) would make the pipeline and the one-process reference draw differently
    out.update({k: 0.0 for k, v in defaults.items()
                if isinstance(v, float) and any(w in k for w in ("dropout", "pdrop", "jitter"))})
    if isinstance(defaults.get("sliding_window"), int):
        out["sliding_window"] = 8  # shorter than the test sequences, so the window matters
    depth = next((defaults[n] for n in _SIZE_FIELDS["layers"] if isinstance(defaults.get(n), int)), None)
    out.update({k: _per_layer(v, num_layers) for k, v in defaults.items()
                if isinstance(v, list) and depth and len(v) == depth})
    return out


def _per_layer(values: list, num_layers: int) -> list:
    """A per-layer list (layer types, per-layer widths) cut to num_layers, keeping one of each kind it holds
    (the last layers give way), so a hybrid family's tiny model still has every kind of layer."""
    kinds = list(dict.fromkeys(map(repr, values)))
    out = values[:num_layers]
    missing = [v for v in {repr(v): v for v in values}.values() if repr(v) not in map(repr, out)]
    if missing and len(kinds) <= num_layers:
        out = out[: num_layers - len(missing)] + missing
    return out


def _shrunk(config, hidden: int, num_layers: int, extra: dict) -> dict:
    """A family's default config as keyword arguments, shrunk, its sub-configs (text, vision, ...) too."""
    defaults = config.to_dict()
    kwargs = {**_shrunk_sizes(defaults, hidden, num_layers), **extra}
    for key, sub in vars(config).items():
        if hasattr(sub, "to_dict") and hasattr(sub, "model_type"):
            # only the text model runs for text; its towers are kept small and shallower than its layers
            layers = num_layers if key in ("text_config", "decoder_config", "global_config") else 2
            kwargs[key] = {**sub.to_diff_dict(), **_shrunk(sub, hidden, layers, extra if key == "text_config" else {})}
    return {**kwargs, **_overrides(config.model_type, hidden, num_layers, kwargs)}


def tiny_config(model_type: str, vocab_size: int, num_layers: int = 4, tie: bool = False,
                hidden: int = 64, special_ids: dict | None = None):
    """A small config of the given architecture: the family's default config with its size fields shrunk by name
    (hidden 64, 4 heads, 2 KV heads where it has them), sub-configs too, then the family's own `_overrides`."""
    from transformers import AutoConfig

    extra = dict(vocab_size=vocab_size, tie_word_embeddings=tie, **(special_ids or {}))
    default = AutoConfig.for_model(model_type)
    config = AutoConfig.for_model(model_type, **_shrunk(default, hidden, num_layers, extra))
    # Wider random weights than a real model's 0.02: with frozen random weights that small, the head's logits
    # stay near uniform and LoRA alone could barely move them, so the demo would learn nothing visible.
    config.initializer_range = 0.2
    return config


def _overrides(model_type: str, hidden: int, num_layers: int, shrunk: dict) -> dict:
    """What a family needs beyond the generic shrink (features the tests should exercise, consistent sizes)."""
    heads = 4
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    table = {
        "mixtral": {"sliding_window": None},
        "qwen2_moe": {"decoder_sparse_step": 1},
        "gemma2": {"layer_types": alternating, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                   "query_pre_attn_scalar": 16},
        "gemma3_text": {"layer_types": alternating, "query_pre_attn_scalar": 16},
        "phi": {"num_key_value_heads": heads, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                  "partial_rotary_factor": 0.5}},
        "phi3": {"num_key_value_heads": heads},
        "falcon": {"num_kv_heads": 1, "multi_query": True, "parallel_attn": True, "new_decoder_architecture": False,
                   "alibi": False},
        "opt": {"word_embed_proj_dim": hidden // 2},
        "deepseek_v2": {"num_key_value_heads": heads, "q_lora_rank": None, "qk_nope_head_dim": 8,
                        "qk_rope_head_dim": 8, "v_head_dim": 16, "head_dim": 8, "num_experts_per_tok": 2,
                        "moe_intermediate_size": hidden // 2, "first_k_dense_replace": 1},
        # hybrids: every kind of layer within 4 layers
        "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
        "bamba": {"attn_layer_indices": [1, 3], "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 1},
        "granitemoehybrid": {"layer_types": ["mamba", "attention", "mamba", "attention"], "mamba_n_heads": 8,
                             "mamba_d_head": 16, "mamba_n_groups": 1},
        "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"], "num_dense_layers": 1},
        "falcon_h1": {"mamba_d_ssm": 2 * hidden, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16,
                      "mamba_chunk_size": 16},
        "mamba2": {"head_dim": 2 * hidden // heads, "n_groups": 1},  # heads x head_dim = expand x hidden
        "mllama": {"text_config": {**shrunk.get("text_config", {}), "cross_attention_layers": [1]}},
        # sizes the default config leaves unset or inconsistent once shrunk
        "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},  # 5.17 reads both
        "dots1": {"n_shared_experts": 1},
        "zaya": {"num_experts_per_tok": 1},  # its only supported value
        "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": hidden // heads,
                           "indexer_budget": 8, "indexer_compress_ratio": 4, "hc_lowrank": 8},
        "cohere_compass_text": {"rope_parameters": {kind: {"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": [3, 3, 2]}
                                                    for kind in ("full_attention", "sliding_attention")}},
        "gemma3n_text": {"num_kv_shared_layers": 0, "activation_sparsity_pattern": [0.0] * num_layers,
                         "layer_types": alternating, "vocab_size_per_layer_input": shrunk.get("vocab_size"),
                         "hidden_size_per_layer_input": 16, "laurel_rank": 8},
        "gemma4_text": {"per_layer_config": {}, "vocab_size_per_layer_input": shrunk.get("vocab_size"),
                        "hidden_size_per_layer_input": 16},
        "gemma4_unified_text": {"per_layer_config": {}},
        # what it needs to build or run at all
        "reformer": {"is_decoder": True, "attn_layers": ["local"] * num_layers, "axial_pos_embds": False,
                     "local_attn_chunk_length": 8, "num_buckets": 4},
        "xmod": {"default_language": "en_XX"},
        "big_bird": {"attention_type": "original_full"},  # block-sparse is refused at pp > 1 (models.py)
    }
    return table.get(model_type, {})


def make_tiny_model(out: str, model_type: str = "llama", num_layers: int = 4, tie: bool = False,
                    shards: int = 1, seed: int = 0, vocab_size: int = 1024, hidden: int = 64) -> str:
    """Write a random tiny model, its config and tokenizer to `out` (safetensors, sharded if asked)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    tokenizer = make_tokenizer(vocab_size)
    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=tokenizer.pad_token_id)
    config = tiny_config(model_type, len(tokenizer), num_layers, tie, hidden, special)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    shard = f"{max(1, size // shards // 1024 + 1)}KB" if shards > 1 else "10GB"
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, max_shard_size=shard)
    if model.config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        # the causal LM of a composite family (Emu3, Mllama) keeps only a text config that AutoModelForCausalLM
        # cannot read back; their checkpoints ship the family's own config
        config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_type", default="llama")
    ap.add_argument("--out", required=True)
    ap.add_argument("--num_layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--tie", default="false", choices=["true", "false"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    path = make_tiny_model(a.out, a.model_type, a.num_layers, a.tie == "true", a.shards, a.seed, hidden=a.hidden)
    print(f"wrote a tiny {a.model_type} model to {path}")


if __name__ == "__main__":
    main()
