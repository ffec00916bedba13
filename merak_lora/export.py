"""Turn a training checkpoint into what other tools load.

    python -m merak_lora.export --checkpoint out/checkpoint-500 --out adapter/        # a PEFT adapter folder
    python -m merak_lora.export --checkpoint out/checkpoint-500 --merge --out merged/  # base + LoRA merged

The adapter folder is PEFT's own format (adapter_config.json + adapter_model.safetensors with PEFT's key
names), so `PeftModel.from_pretrained(base, folder)` and vLLM's LoRA loader take it as it is. The merge walks
the base model one safetensors shard at a time, so the whole model never sits in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import load_adapter_tensors, read_meta, resolve
from .config import ConfigError
from .weights import INDEX_NAME, WeightIndex

PEFT_PREFIX = "base_model.model."


def peft_config(meta: dict, base_path: str | None = None) -> LoraConfig:
    lora = {k: v for k, v in meta["lora"].items() if k in LoraConfig.__dataclass_fields__ and
            k not in ("peft_type", "auto_mapping", "peft_version", "revision")}
    lora["inference_mode"] = True
    lora["base_model_name_or_path"] = base_path or meta["model_path"]
    return LoraConfig(**lora)


def export_adapter(ckpt: str, out: str) -> str:
    meta = read_meta(ckpt)
    tensors = load_adapter_tensors(ckpt, meta)
    os.makedirs(out, exist_ok=True)
    peft_config(meta).save_pretrained(out)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return out


def _scaling(cfg: LoraConfig, module: str) -> tuple[int, float]:
    """(rank, alpha / rank or alpha / sqrt(rank)) for one module, honouring rank_pattern and alpha_pattern."""
    r, alpha = cfg.r, cfg.lora_alpha
    for pattern, value in (cfg.rank_pattern or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            r = value
    for pattern, value in (cfg.alpha_pattern or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            alpha = value
    return r, (alpha / r ** 0.5) if cfg.use_rslora else alpha / r


def merge(ckpt: str, out: str, model_path: str | None = None) -> str:
    """Write base weights + B @ A * scaling as a Hugging Face model folder, shard by shard."""
    meta = read_meta(ckpt)
    base = model_path or meta["model_path"]
    cfg = peft_config(meta, base)
    if cfg.use_dora:
        raise ConfigError("merging a DoRA adapter is not supported here; export the adapter and merge with PEFT")
    adapters = load_adapter_tensors(ckpt, meta)
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # base weight key -> (A, B)
    for key, a in adapters.items():
        m = re.fullmatch(r"(.+)\.lora_A\.weight", key.removeprefix(PEFT_PREFIX))
        if m:
            deltas[m.group(1)] = (a, adapters[f"{PEFT_PREFIX}{m.group(1)}.lora_B.weight"])
    if any(".lora_embedding_" in k for k in adapters):
        raise ConfigError("merging LoRA on embeddings is not supported here; export the adapter instead")
    index = WeightIndex(base)
    os.makedirs(out, exist_ok=True)
    done: set[str] = set()
    for fname in index.files():
        tensors = {}
        with safe_open(os.path.join(base, fname), framework="pt") as fh:
            for key in fh.keys():
                t = fh.get_tensor(key)
                module = key.removesuffix(".weight")
                if key.endswith(".weight") and module in deltas:
                    t = _merged(t, *deltas[module], *_scaling(cfg, module), cfg.fan_in_fan_out)
                    done.add(module)
                tensors[key] = t
        save_file(tensors, os.path.join(out, fname), metadata={"format": "pt"})
    untied = _merge_tied_head(base, out, index, deltas, done, cfg)
    leftover = sorted(set(deltas) - done - untied)
    if leftover:
        raise ConfigError(f"adapter modules {leftover[:3]} have no weight in {base}; is this the base model the "
                          "adapter was trained on?")
    for name in os.listdir(base):
        src = os.path.join(base, name)
        if os.path.isfile(src) and not name.endswith(".safetensors") and name != INDEX_NAME:
            shutil.copy2(src, os.path.join(out, name))
    if os.path.isfile(os.path.join(base, INDEX_NAME)):
        shutil.copy2(os.path.join(base, INDEX_NAME), os.path.join(out, INDEX_NAME))
    if untied:
        _untie_config(out)
    return out


def _merged(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, r: int, scale: float, fan_in_fan_out: bool):
    delta = (b.float() @ a.float()) * scale
    if fan_in_fan_out:  # GPT-2 style Conv1D stores the weight transposed
        delta = delta.T
    return (w.float() + delta).to(w.dtype)


def _merge_tied_head(base: str, out: str, index: WeightIndex, deltas: dict, done: set[str], cfg) -> set[str]:
    """LoRA on a head that shares the embedding matrix: write the merged head as its own tensor."""
    heads = {m for m in deltas if m not in done and m.endswith("lm_head")}
    if not heads:
        return set()
    embed_key = next((k for k in index.keys() if k.endswith("embed_tokens.weight") or k.endswith("wte.weight")),
                     None)
    if embed_key is None:
        return set()
    w = index.read([embed_key])[embed_key]
    tensors = {f"{m}.weight": _merged(w, *deltas[m], *_scaling(cfg, m), False) for m in heads}
    save_file(tensors, os.path.join(out, "model-lm-head.safetensors"), metadata={"format": "pt"})
    idx_path = os.path.join(base, INDEX_NAME)
    if os.path.isfile(idx_path):
        with open(idx_path, encoding="utf-8") as fh:
            idx = json.load(fh)
    else:
        idx = {"metadata": {}, "weight_map": {k: f for k, f in index.file_of.items()}}
    idx["weight_map"].update({k: "model-lm-head.safetensors" for k in tensors})
    with open(os.path.join(out, INDEX_NAME), "w", encoding="utf-8") as fh:
        json.dump(idx, fh, indent=2)
    return heads


def _untie_config(out: str) -> None:
    path = os.path.join(out, "config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["tie_word_embeddings"] = False
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint-N folder, or an output_dir (its latest)")
    ap.add_argument("--out", required=True, help="folder to write")
    ap.add_argument("--merge", action="store_true", help="write the base model with the adapter merged in")
    ap.add_argument("--model_path", default=None, help="base model folder, if it moved since training")
    a = ap.parse_args(argv)
    try:
        ckpt = resolve(a.checkpoint, a.checkpoint)
        path = merge(ckpt, a.out, a.model_path) if a.merge else export_adapter(ckpt, a.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {'merged model' if a.merge else 'PEFT adapter'} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
