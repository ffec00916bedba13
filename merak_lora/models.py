"""Where each model family keeps its decoder layers, embeddings, final norm and head, and its LoRA targets.

The split needs three facts about a causal LM: the one `ModuleList` of decoder layers, the modules that run
before it (stage 0 holds them) and the ones after it (the last stage holds them). Hugging Face models
state the order in `config.base_model_pp_plan`; models without one (GPT-2, Falcon, OPT, custom code) fall
back to a rule: embeddings come before the layers, every other weight after.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .config import ConfigError

# LoRA on every attention and MLP projection, as the fine-tuning tutorials set it (q,k,v,o,gate,up,down).
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE, "gemma3": _LLAMA_LIKE, "gemma3_text": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE, "olmo2": _LLAMA_LIKE, "cohere": _LLAMA_LIKE, "granite": _LLAMA_LIKE,
    "internlm": _LLAMA_LIKE, "yi": _LLAMA_LIKE, "deepseek": _LLAMA_LIKE, "index": _LLAMA_LIKE,
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2_moe": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "deepseek_v2": ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                    "gate_proj", "up_proj", "down_proj"),
    "deepseek_v3": ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                    "gate_proj", "up_proj", "down_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "falcon": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "starcoder2": ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
    "openelm": ("qkv_proj", "out_proj", "proj_1", "proj_2"),
}

# Families whose causal LM computes its logits as exactly `lm_head(final hidden states)` (checked against their
# transformers code and in tests/test_models.py), so the last stage may hand the loss the hidden states and let it
# apply the head chunk by chunk. Others (Cohere's logit scale, Granite's divisor, remote code) keep full logits.
PLAIN_HEAD = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "gemma", "gemma2",
                        "gemma3_text", "phi", "phi3", "gpt2", "gpt_neox", "falcon", "opt", "deepseek_v2"})

# Modules that run before the layers but are not embeddings, for families without a pp plan.
_EXTRA_PRE: dict[str, tuple[str, ...]] = {
    "opt": ("model.decoder.project_in",),
}


@dataclass(frozen=True)
class ModelParts:
    """Names (from the causal LM's root) of the pieces a stage keeps or drops."""

    layers: str                  # the ModuleList of decoder layers, e.g. "model.layers"
    num_layers: int
    pre: tuple[str, ...]         # modules with weights that run before the layers (stage 0)
    post: tuple[str, ...]        # modules with weights after the layers: final norm, head (last stage)
    plain_head: bool = False     # logits are the head applied to the final hidden states, nothing after


def text_config(config):
    """The language model's part of a config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers_of(config) -> int:
    text = text_config(config)
    for key in ("num_hidden_layers", "n_layer", "num_layers", "num_transformer_layers"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(f"model type {config.model_type!r}: the config names no layer count "
                      "(num_hidden_layers, n_layer or num_layers)")


def find_parts(lm: nn.Module, config) -> ModelParts:
    """Locate the decoder layers and classify every other weight-holding module as before or after them."""
    n = num_layers_of(config)
    candidates = [(name, mod) for name, mod in lm.named_modules()
                  if isinstance(mod, nn.ModuleList) and len(mod) == n]
    if not candidates:
        raise ConfigError(
            f"model type {config.model_type!r}: found no ModuleList of {n} decoder layers in "
            f"{type(lm).__name__}, so it cannot be split into stages. merak-lora splits models whose body holds "
            "one list of decoder layers (as Hugging Face causal LMs do).")
    # The decoder list is the one holding the most weights (a model may keep other per-layer lists).
    layers_name, _ = max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))
    prefix = layers_name + "."

    plan_order = _pp_plan_pre(lm, config, layers_name)
    extra_pre = _EXTRA_PRE.get(config.model_type, ())
    pre, post = [], []
    for name, mod in lm.named_modules():
        if name == layers_name or name.startswith(prefix):
            continue
        if not any(True for _ in mod.parameters(recurse=False)):
            continue
        if (name in extra_pre or isinstance(mod, nn.Embedding)
                or any(name == p or name.startswith(p + ".") for p in plan_order)):
            pre.append(name)
        else:
            post.append(name)
    out_emb = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    head = next((name for name, mod in lm.named_modules() if mod is out_emb), None)
    if head is not None and head in pre:  # an untied head that happens to be an Embedding-like module
        pre.remove(head)
        post.append(head)
    if out_emb is None:
        # No head module: the model multiplies by its input embedding (OpenELM's shared input/output layer),
        # so the last stage needs that matrix too.
        emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
        post += [name for name, mod in lm.named_modules() if mod is emb and name not in post]
    plain = (config.model_type in PLAIN_HEAD and out_emb is not None
             and getattr(text_config(config), "final_logit_softcapping", None) is None)
    return ModelParts(layers=layers_name, num_layers=n, pre=tuple(pre), post=tuple(post), plain_head=plain)


def _pp_plan_pre(lm: nn.Module, config, layers_name: str) -> list[str]:
    """Modules the model's own pipeline plan lists before its layers (full names from the LM root)."""
    plan = getattr(config, "base_model_pp_plan", None) or {}
    keys = list(plan)
    leaf = layers_name.rsplit(".", 1)[-1]
    if leaf not in keys:
        return []
    base = layers_name.rsplit(".", 1)[0] if "." in layers_name else ""
    return [f"{base}.{k}" if base else k for k in keys[: keys.index(leaf)]]


def linear_names(lm: nn.Module, parts: ModelParts | None = None) -> list[str]:
    """Distinct leaf names of the linear layers inside the decoder layers (what target_modules matches)."""
    names = set()
    for name, mod in lm.named_modules():
        if parts and not name.startswith(parts.layers + "."):
            continue
        if is_linear(mod):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def is_linear(mod: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D is a linear layer with a transposed weight.
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


def is_adaptable(mod: nn.Module) -> bool:
    """What LoRA can wrap: linears and embeddings."""
    return is_linear(mod) or isinstance(mod, nn.Embedding)


def default_targets(model_type: str, available: list[str]) -> list[str]:
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(
            f"no default LoRA target_modules for model type {model_type!r}; set \"target_modules\" in the LoRA "
            f"config. This model's linear modules are: {', '.join(available)}")
    return [t for t in DEFAULT_TARGETS[model_type] if t in available]
