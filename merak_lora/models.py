"""Where each model family keeps its decoder layers, embeddings, final norm and head, and its LoRA targets.

The split needs three facts about a causal LM: the one `ModuleList` of decoder layers, the modules that run
before it (stage 0 holds them) and the ones after it (the last stage holds them). They are learned by running
the model's own forward on a meta copy (`trace.trace_forward`), which also tells what a layer returns and what
would make a cut between layers change the numbers. Where the trace cannot run (an op without a meta kernel),
rules take its place: embeddings and what `config.base_model_pp_plan` lists come before the layers, every other
weight after.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

from .config import ConfigError
from .trace import TOKENS, Trace, trace_forward

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


@dataclass(frozen=True)
class ModelParts:
    """Names (from the causal LM's root) of the pieces a stage keeps or drops."""

    layers: str                  # the ModuleList of decoder layers, e.g. "model.layers"
    num_layers: int
    pre: tuple[str, ...]         # modules with weights that run before the layers (stage 0)
    post: tuple[str, ...]        # modules with weights after the layers: final norm, head (last stage)
    plain_head: bool = False     # logits are the head applied to the final hidden states, nothing after
    layer_returns: int = 0       # what a decoder layer returns: 0 a tensor, k a tuple of k (hidden state first)
    unsplittable: str = ""       # why the model cannot be cut between its layers ("" when it can)


def text_config(config):
    """The language model's part of a config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layer_counts(config) -> list[int]:
    """The layer counts the config states, in the order of the usual keys (a model may state two: LongCat's
    num_layers blocks of two sub-layers each)."""
    text = text_config(config)
    counts = [getattr(text, key, None) for key in ("num_hidden_layers", "n_layer", "num_layers",
                                                   "num_transformer_layers", "n_layers")]
    found = list(dict.fromkeys(c for c in counts if isinstance(c, int) and not isinstance(c, bool) and c > 0))
    if not found:
        raise ConfigError(f"model type {config.model_type!r}: the config names no layer count "
                          "(num_hidden_layers, n_layer or num_layers)")
    return found


# Families LoRA cannot train at any stage count, with why.
_UNTRAINABLE = {
    "reformer": ("its reversible layers run inside one autograd function that passes gradients only to its "
                 "input, the frozen embeddings, so no LoRA adapter inside the layers would train"),
}


def find_parts(lm: nn.Module, config) -> ModelParts:
    """Locate the decoder layers and classify every other weight-holding module as before or after them."""
    if config.model_type in _UNTRAINABLE:
        raise ConfigError(f"model type {config.model_type!r} cannot be fine-tuned with LoRA: "
                          f"{_UNTRAINABLE[config.model_type]}")
    counts = layer_counts(config)
    lists = [(name, mod) for name, mod in lm.named_modules() if isinstance(mod, nn.ModuleList)]
    n = next((c for c in counts if any(len(mod) == c for _, mod in lists)), counts[0])
    candidates = [(name, mod) for name, mod in lists if len(mod) == n]
    if not candidates:
        raise ConfigError(
            f"model type {config.model_type!r}: found no ModuleList of {n} decoder layers in "
            f"{type(lm).__name__}, so it cannot be split into stages. merak-lora splits models whose body holds "
            "one list of decoder layers (as Hugging Face causal LMs do).")
    # The decoder list is the one holding the most weights (a model may keep other per-layer lists).
    layers_name, layers = max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))
    trace = trace_forward(lm, layers_name)
    pre, post = _before_and_after(lm, config, layers_name, trace)
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
    # Without a trace, transformers' own layers are taken to return a tensor and remote code the
    # (hidden, attentions, cache) tuple most such layers return.
    returns = trace.returns if trace and trace.returns is not None else \
        (0 if type(layers[0]).__module__.startswith("transformers.") else 3)
    parent = layers_name.rpartition(".")[0]
    siblings = [name for name, _ in candidates if name != layers_name and name.rpartition(".")[0] == parent]
    width = getattr(text_config(config), "hidden_size", None)
    why = _why_unsplittable(layers, siblings, trace, width) or _family_refusal(config)
    refusal = (f"model type {config.model_type!r} cannot be cut between its decoder layers: {why}; "
               "it trains with --pp 1 only") if why else ""
    return ModelParts(layers=layers_name, num_layers=n, pre=tuple(pre), post=tuple(post), plain_head=plain,
                      layer_returns=returns, unsplittable=refusal)


def _before_and_after(lm: nn.Module, config, layers_name: str, trace: Trace | None) -> tuple[list[str], list[str]]:
    """The weight-holding modules outside the layers that run before them (the first stage's) and after them
    (the last stage's). Embeddings and the pp plan's modules count as before, whatever the trace saw; the trace
    adds what the first layer's hidden state is computed from (BLOOM's norm after the embeddings) and tells
    what runs after. A module that runs on both sides is on both lists; one that never runs (a vision tower,
    for text) goes with the last stage."""
    plan = _pp_plan_pre(lm, config, layers_name)
    ran_after = trace.after if trace and trace.after is not None else frozenset()
    pre, post = [], []
    for name, mod in lm.named_modules():
        if name == layers_name or name.startswith(layers_name + ".") or not any(
                True for _ in mod.parameters(recurse=False)):
            continue
        before = (isinstance(mod, nn.Embedding) or any(name == p or name.startswith(p + ".") for p in plan)
                  or (trace is not None and name in trace.hidden_from))
        if before:
            pre.append(name)
        if name in ran_after or not before:
            post.append(name)
    return pre, post


def _family_refusal(config) -> str:
    """Families whose own forward reaches into decoder layers that another stage holds (one line each)."""
    if config.model_type == "xmod":
        return "its forward reads the language adapters of layer 0, which only the first stage holds"
    if config.model_type == "big_bird" and getattr(config, "attention_type", "") == "block_sparse":
        return ("with block-sparse attention its forward switches the attention type of every layer on short "
                "inputs (\"attention_type\": \"original_full\" in config.json avoids it)")
    return ""


def _why_unsplittable(layers: nn.ModuleList, siblings: list[str], trace: Trace | None, width: int | None) -> str:
    """Why cutting between the layers would change the numbers, or "" when it would not. siblings: lists as
    long as the layers beside them (XLM keeps each layer's attention, norms and MLP in four such lists);
    width: the config's hidden_size, the width the stages hand on."""
    if siblings:
        return f"each layer is spread over parallel lists ({', '.join(siblings)} beside the one it was cut by)"
    owners: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            if owners.setdefault(id(p), i) != i:
                return f"layers {owners[id(p)]} and {i} share weights (one module used by several layers)"
    if trace is None:
        return ""
    if trace.side_from:
        names = sorted(trace.side_from)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return (f"its layers also read inputs computed from {shown} before the first layer, which the later "
                "stages do not have")
    if len(trace.hidden_shape) != 3 or trace.hidden_shape[:2] != (1, TOKENS):
        return (f"the hidden state between its layers has shape {trace.hidden_shape} for one sequence of "
                f"{TOKENS} tokens, not (batch, tokens, hidden)")
    if width and trace.hidden_shape[-1] != width:
        return (f"the hidden state between its layers is {trace.hidden_shape[-1]} wide, not its hidden_size "
                f"{width}, the width the stages hand on")
    if trace.output_shape is not None and trace.output_shape != trace.hidden_shape:
        return (f"its layers change the hidden state's shape ({trace.hidden_shape} in, {trace.output_shape} out "
                f"for one sequence of {TOKENS} tokens), so the stages cannot hand it on at one width")
    if trace.carried:
        return ("each layer hands the next one more than its hidden state (a second output the model's loop "
                "carries), which a stage boundary does not pass on")
    return ""


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
    """Distinct names of the linear layers inside the decoder layers as target_modules matches them (by
    suffix): the leaf name, or as many trailing names as it takes to start with a name that is not a position
    and not to also name a module that is not a linear (`ffn.0` in a Sequential; Reformer's `dense.dense`
    inside a block called `dense`).
    Linear subclasses LoRA cannot wrap are left out: MoE routers (they return routing decisions) and grouped
    linears (one weight holding several matrices)."""
    others = {tuple(name.split(".")[-k:]) for name, mod in lm.named_modules() if name and not is_linear(mod)
              for k in range(1, name.count(".") + 2)}
    names = set()
    for name, mod in lm.named_modules():
        if parts and not name.startswith(parts.layers + "."):
            continue
        if is_linear(mod) and not type(mod).__name__.endswith(_NOT_WRAPPABLE):
            path = name.split(".")
            k = next((k for k in range(1, len(path) + 1)
                      if not path[-k].isdigit() and tuple(path[-k:]) not in others), len(path))
            names.add(".".join(path[-k:]))
    return sorted(names)


_NOT_WRAPPABLE = ("Router", "GroupedLinear")


def is_linear(mod: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D is a linear layer with a transposed weight.
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


def is_adaptable(mod: nn.Module) -> bool:
    """What LoRA can wrap: linears and embeddings."""
    return is_linear(mod) or isinstance(mod, nn.Embedding)


@dataclass(frozen=True)
class DefaultTargets:
    """The LoRA targets used when lora_config.json names none, and where they came from."""

    modules: list[str] | str        # leaf names, or a pattern over full module names
    source: str                     # TABLE, PEFT_MAPPING or ALL_LINEAR


TABLE = "merak-lora's table"
PEFT_MAPPING = "PEFT's mapping"
ALL_LINEAR = "every linear of the decoder layers"


def default_targets(model_type: str, layer_linears: list[str], module_names: list[str] = ()) -> DefaultTargets:
    """merak-lora's table, else PEFT's own mapping, else every linear of the decoder layers (PEFT's
    "all-linear", the head left out), each cut to the names this model has.

    layer_linears: leaf names of the linears inside the decoder layers (`linear_names`); module_names: full
    names of every adaptable module, for PEFT's entries written as a pattern. Leaf names match wherever PEFT
    matches them, as with PEFT's own mapping: a same-named linear outside the layers (a vision tower's q_proj)
    gets an adapter too, which text-only training leaves idle."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_mapping

    if model_type in _PEFT_MAMBA:
        layer_linears = [n for n in layer_linears if n not in _PEFT_MAMBA_REFUSED]
    for source, names in ((TABLE, DEFAULT_TARGETS.get(model_type)), (PEFT_MAPPING, peft_mapping.get(model_type))):
        if isinstance(names, str):  # PEFT writes some as a pattern over full names
            if any(re.fullmatch(names, n) for n in module_names):
                return DefaultTargets(names, source)
            continue
        kept = [t for t in names or () if t in layer_linears]
        if kept:
            return DefaultTargets(kept, source)
    if not layer_linears:
        raise ConfigError(f"model type {model_type!r}: its decoder layers hold no linear layer for LoRA to wrap; "
                          "set \"target_modules\" (or \"target_parameters\") in the LoRA config")
    return DefaultTargets(list(layer_linears), ALL_LINEAR)


# PEFT refuses LoRA on these modules of Mamba-style families (their kernels read the weights directly);
# its own list, in peft.tuners.tuners_utils._check_lora_target_modules_mamba.
_PEFT_MAMBA = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})
_PEFT_MAMBA_REFUSED = frozenset({"out_proj", "conv1d"})


# Families whose generation across stages (gen.sh at more than one stage) fails or differs from transformers'
# generate(), found by the family sweep (tests/test_families.py; training them is exact): refused at pp > 1
# before any weight is read (chat.py), one-process generation (transformers' generate) serves them.
_LINEAR_CACHE = ("the stage cache asks an owned linear-attention (recurrent) layer for the sequence length, which "
                 "transformers' cache refuses (ValueError)")
_DIFFERS = "greedy tokens differ from generate() (not investigated)"
_NO_CACHE = "it keeps no KV cache; the pipeline's one-token steps fail"
NO_PIPELINE_GENERATION: dict[str, str] = {
    **dict.fromkeys(["bamba", "granitemoehybrid", "nemotron_h", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"],
                    _LINEAR_CACHE),
    **dict.fromkeys(["bart", "blenderbot", "blenderbot-small", "marian", "mbart", "pegasus", "plbart", "whisper",
                     "mamba2", "longcat_flash", "xlnet"], _DIFFERS),
    **dict.fromkeys(["openai-gpt", "xlm"], _NO_CACHE),
    "cpmant": "its attention fails at the first one-token step (a shape mismatch; not investigated)",
    "mamba": "a rank dies during generation (not investigated)",
    "falcon_mamba": "a rank dies during generation (not investigated)",
    "rwkv": "in eval mode its forward rescales every block's weights, which pass-throughs do not hold",
    "minimax": "transformers refuses a cache other than MiniMax's own",
    "xlstm": "transformers' own generate() fails on the tiny config (matC_old has the wrong shape)",
}
