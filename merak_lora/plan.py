"""The plan of a run, from the model's config alone: its stage cuts, the resolved LoRA config, the weight index;
and turning the plan into this rank's stages."""

from __future__ import annotations

import dataclasses
import logging
import re
from enum import Enum
from typing import Any

import torch

from .config import Config
from .lora import adapter_numel, build_lora_config
from .models import default_targets, find_parts, is_adaptable, is_linear, linear_names, text_config
from .stage import build_skeleton, build_stage, load_model_config, plan_stages
from .weights import WeightIndex

log = logging.getLogger("merak_lora")


def compute_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32


def lora_as_json(lora_cfg) -> dict:
    """The resolved LoRA config in PEFT's field names, JSON-ready (sets sorted, enums as values)."""
    out = {}
    for f in dataclasses.fields(lora_cfg):
        v = getattr(lora_cfg, f.name)
        if isinstance(v, set):
            v = sorted(v)
        elif isinstance(v, Enum):
            v = v.value
        if isinstance(v, (str, int, float, bool, list, dict, type(None))):
            out[f.name] = v
    return out


@dataclasses.dataclass
class Plan:
    """What the checks produced: the model's config, its stage cuts, the resolved LoRA config."""

    model_config: Any
    specs: list
    lora_cfg: Any
    index: WeightIndex | None     # None with --random_weights
    hidden_size: int          # width of the activations passed between stages
    vocab_size: int
    adapter_numel: int = 0
    matmul_params: int = 0    # weights of the linear layers and the head: what a token's matmuls read
    names: tuple = ((), (), ())   # the skeleton's adaptable modules, its layers' linear leaves, its parameters
    skeleton: Any = dataclasses.field(default=None, repr=False)   # on meta: sizes other adapters' tensors

    def resolve_lora(self, raw: dict, source: str):
        """Another adapter's LoRA config, checked against this model like the plan's own."""
        modules, leaves, params = self.names
        return build_lora_config(raw, self.model_config.model_type, list(modules), list(leaves), source=source,
                                 param_names=list(params))

    def lora_numel(self, lora_cfg) -> int:
        return adapter_numel(lora_cfg, self.skeleton)


def make_plan(cfg: Config, num_stages: int, lora_raw: dict | None) -> Plan:
    """Model config, weight index, stage cuts and resolved LoRA config (None: no adapter), from config alone."""
    model_config = load_model_config(cfg.model_path or cfg.weights_path, cfg.trust_remote_code)
    if getattr(model_config, "output_router_logits", False):
        # The router's load-balancing loss mixes every layer's routing statistics, which live on different
        # stages; the router itself is frozen under LoRA, so the pipeline trains on the language-model loss.
        log.warning("config.json sets output_router_logits: training without the MoE auxiliary loss")
        model_config.output_router_logits = False
    index = None if cfg.random_weights else WeightIndex(cfg.weights_path)
    skeleton = build_skeleton(model_config, compute_dtype(cfg), cfg.trust_remote_code, cfg.attn_implementation)
    parts = find_parts(skeleton, model_config)
    module_names = [n for n, m in skeleton.named_modules() if is_adaptable(m)]
    names = (tuple(module_names), tuple(linear_names(skeleton, parts)),
             tuple(n for n, _ in skeleton.named_parameters()))
    lora_cfg = None if lora_raw is None else build_lora_config(
        lora_raw, model_config.model_type, module_names, list(names[1]), source=cfg.lora_config,
        param_names=list(names[2]))
    specs = plan_stages(skeleton, parts, num_stages, cfg.partition_method)
    numel = adapter_numel(lora_cfg, skeleton) if lora_cfg is not None else 0
    matmul = sum(m.weight.numel() for m in skeleton.modules() if is_linear(m))
    embed = skeleton.get_input_embeddings()
    head = skeleton.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else embed.num_embeddings
    text = text_config(model_config)
    # the layers' width (OPT projects its narrower embeddings up to it); remote code may only have the embedding
    hidden = getattr(text, "hidden_size", None) or embed.embedding_dim
    return Plan(model_config, specs, lora_cfg, index, hidden, vocab, numel, matmul, names, skeleton)


def build_stages(cfg: Config, plan: Plan, layout, quant=None, adapters: list | None = None) -> list:
    """This rank's stages, each holding only its own weights, and LoRA: the plan's config, or every
    (name, LoraConfig, seed) of `adapters`."""
    return [build_stage(plan.specs[i], plan.model_config, plan.index, device=layout.device,
                        dtype=compute_dtype(cfg), lora_config=plan.lora_cfg, seed=cfg.seed,
                        trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation,
                        gradient_checkpointing=cfg.gradient_checkpointing, tie=not cfg.no_tie_modules, quant=quant,
                        compile=cfg.compile, adapters=adapters)
            for i in layout.stage_ids()]


def list_target_modules(cfg: Config) -> str:
    """The linear modules of a model, from its config alone (built on the meta device), for lora_config.json."""
    config = load_model_config(cfg.model_path or cfg.weights_path, cfg.trust_remote_code)
    lm = build_skeleton(config, torch.float32, cfg.trust_remote_code, cfg.attn_implementation)
    parts = find_parts(lm, config)
    names = linear_names(lm, parts)  # as target_modules matches them: `ffn.0`, not `0`
    found: dict[str, list[str]] = {n: [] for n in names}
    for name, mod in lm.named_modules():
        if name.startswith(parts.layers + ".") and is_linear(mod):
            key = next((n for n in names if name == n or name.endswith("." + n)), None)
            if key is not None:
                found[key].append(name)
    lines = [f"{config.model_type}: linear modules in the {parts.num_layers} decoder layers (\"target_modules\"):"]
    for leaf, full in sorted(found.items()):
        w = lm.get_submodule(full[0]).weight
        lines.append(f"  {leaf:<24} x{len(full):<4} e.g. {full[0]}  {tuple(w.shape)}")
    fused = sorted({re.sub(rf"^{re.escape(parts.layers)}\.\d+\.", "", n) for n, p in lm.named_parameters()
                    if p.dim() == 3})
    if fused:
        lines.append(f"fused 3-D parameters (\"target_parameters\"): {', '.join(fused)}")
    outside = [n for n in parts.pre + parts.post if isinstance(lm.get_submodule(n), torch.nn.Linear)]
    if outside:
        lines.append(f"outside the layers: {', '.join(outside)}")
    default = default_targets(config.model_type, names, [n for n, m in lm.named_modules() if is_adaptable(m)])
    lines.append(f"default target_modules ({default.source}): {default.modules}")
    return "\n".join(lines)
