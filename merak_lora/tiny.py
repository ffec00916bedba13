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


def tiny_config(model_type: str, vocab_size: int, num_layers: int = 4, tie: bool = False,
                hidden: int = 64, special_ids: dict | None = None):
    """A small config of the given architecture (hidden 64, 4 heads, 2 KV heads where it has them)."""
    from transformers import AutoConfig

    ids = special_ids or {}
    heads = 4
    common = dict(vocab_size=vocab_size, tie_word_embeddings=tie, **ids)
    llama_like = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                      num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=2048)
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    moe = dict(num_local_experts=4, num_experts_per_tok=2)
    table = {
        "llama": llama_like,
        "mistral": {**llama_like, "sliding_window": 8},
        "mixtral": {**llama_like, **moe, "sliding_window": None},
        "qwen2": llama_like,
        "qwen3": {**llama_like, "head_dim": hidden // heads},
        "qwen2_moe": {**llama_like, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": hidden,
                      "shared_expert_intermediate_size": hidden, "decoder_sparse_step": 1},
        "gemma": {**llama_like, "head_dim": hidden // heads},
        "gemma2": {**llama_like, "head_dim": hidden // heads, "sliding_window": 8, "layer_types": alternating,
                   "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 16},
        "gemma3_text": {**llama_like, "head_dim": hidden // heads, "sliding_window": 8, "layer_types": alternating,
                        "query_pre_attn_scalar": 16},
        "phi": {**llama_like, "num_key_value_heads": heads, "rope_parameters": {"rope_type": "default",
                "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
        "phi3": {**llama_like, "num_key_value_heads": heads},
        "gpt2": dict(n_embd=hidden, n_layer=num_layers, n_head=heads, n_positions=2048, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0),
        "gpt_neox": dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                         num_attention_heads=heads, max_position_embeddings=2048),
        "falcon": dict(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                       num_kv_heads=1, multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                       max_position_embeddings=2048, alibi=False),
        "opt": dict(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                    word_embed_proj_dim=hidden // 2, max_position_embeddings=2048, dropout=0.0),
        "deepseek_v2": {**llama_like, "num_key_value_heads": heads, "kv_lora_rank": 16, "q_lora_rank": None,
                        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 16, "head_dim": 8,
                        "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
                        "moe_intermediate_size": hidden // 2, "first_k_dense_replace": 1},
    }
    if model_type not in table:
        raise SystemExit(f"no tiny config for model type {model_type!r}; known: {', '.join(sorted(table))}")
    config = AutoConfig.for_model(model_type, **common, **table[model_type])
    # Wider random weights than a real model's 0.02: with frozen random weights that small, the head's logits
    # stay near uniform and LoRA alone could barely move them, so the demo would learn nothing visible.
    config.initializer_range = 0.2
    return config


def make_tiny_model(out: str, model_type: str = "llama", num_layers: int = 4, tie: bool = False,
                    shards: int = 1, seed: int = 0, vocab_size: int = 1024, hidden: int = 64) -> str:
    """Write a random tiny model, its config and tokenizer to `out` (safetensors, sharded if asked)."""
    from transformers import AutoModelForCausalLM

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
