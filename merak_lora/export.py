"""Turn a training checkpoint into what other tools load.

    python -m merak_lora.export --checkpoint out/checkpoint-500 --out adapter/        # a PEFT adapter folder
    python -m merak_lora.export --checkpoint out/checkpoint-500 --merge --out merged/  # base + LoRA merged

A checkpoint of several adapters (--adapters) exports one PEFT folder per adapter, adapter/<name>/ (only those
of --adapter_names a,b when given); --merge takes one of them (--adapter_names a), since each merged model is
a whole copy of the base.

The adapter folder is PEFT's own format (adapter_config.json + adapter_model.safetensors with PEFT's key
names), so `PeftModel.from_pretrained(base, folder)` and vLLM's LoRA loader take it as it is. The merge walks
the base model one safetensors shard at a time, so the whole model never sits in memory. A base shipped in
block-scaled FP8 is merged into bf16 weights (the adapter was trained against its dequantized values).
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
from .fp8 import FP8_DTYPES, dequantize_blocks
from .weights import INDEX_NAME, SCALE_SUFFIX, WeightIndex, block_tile

PEFT_PREFIX = "base_model.model."


def peft_config(meta: dict, base_path: str | None = None) -> LoraConfig:
    lora = {k: v for k, v in meta["lora"].items() if k in LoraConfig.__dataclass_fields__ and
            k not in ("peft_type", "auto_mapping", "peft_version", "revision")}
    lora["inference_mode"] = True
    lora["base_model_name_or_path"] = base_path or meta["model_path"]
    return LoraConfig(**lora)


def _one_adapter_meta(ckpt: str) -> dict:
    """The meta of a checkpoint of one adapter; the root of one of several names its subfolders instead."""
    meta = read_meta(ckpt)
    if meta.get("adapters"):
        names = list(meta["adapters"])
        raise ConfigError(f"checkpoint {ckpt} holds several adapters ({', '.join(names)}): pass one of its "
                          f"subfolders, e.g. {os.path.join(ckpt, names[0])}, or pick with --adapter_names")
    return meta


def export_adapter(ckpt: str, out: str) -> str:
    meta = _one_adapter_meta(ckpt)
    return write_adapter(out, load_adapter_tensors(ckpt, meta), peft_config(meta))


def pick_adapters(ckpt: str, meta: dict, names: str) -> list[str]:
    """The adapters of a checkpoint of several to use: those of `names` (--adapter_names, comma-separated), or
    all of them; [] for a checkpoint of one adapter, which has no names to choose from."""
    held = meta.get("adapters")
    wanted = list(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
    if held is None:
        if wanted:
            raise ConfigError(f"--adapter_names {names}: checkpoint {ckpt} holds one adapter, not several by "
                              "name; drop --adapter_names")
        return []
    unknown = [n for n in wanted if n not in held]
    if unknown:
        raise ConfigError(f"--adapter_names {names}: checkpoint {ckpt} holds no adapter {unknown[0]!r}; it "
                          f"holds {', '.join(held)}")
    return wanted or list(held)


def export_adapters(ckpt: str, out: str, names: str = "") -> list[str]:
    """One PEFT adapter folder per adapter: <out>/<name>/ for a checkpoint of several, else <out> itself."""
    chosen = pick_adapters(ckpt, read_meta(ckpt), names)
    if not chosen:
        return [export_adapter(ckpt, out)]
    return [export_adapter(os.path.join(ckpt, n), os.path.join(out, n)) for n in chosen]


def merge_one(ckpt: str, out: str, model_path: str | None = None, names: str = "") -> str:
    """merge() on a checkpoint of one adapter, or on the one adapter --adapter_names picks from several."""
    chosen = pick_adapters(ckpt, read_meta(ckpt), names)
    if len(chosen) > 1:
        raise ConfigError(f"checkpoint {ckpt} holds {len(chosen)} adapters ({', '.join(chosen)}) and --merge "
                          f"writes one model (a whole copy of the base): pick one with --adapter_names "
                          f"{chosen[0]}, or pass --checkpoint {os.path.join(ckpt, chosen[0])}")
    return merge(os.path.join(ckpt, chosen[0]) if chosen else ckpt, out, model_path)


def write_adapter(out: str, tensors: dict[str, torch.Tensor], config: LoraConfig) -> str:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors), each file written under a
    temporary name and renamed into place."""
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, f".tmp-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    config.save_pretrained(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    os.rmdir(tmp)
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
    meta = _one_adapter_meta(ckpt)
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
    # bias "all" or "lora_only": the trained biases replace the base's (a wrapped layer's sits in base_layer)
    biases = {k.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."): t for k, t in adapters.items()
              if k.endswith(".bias") and ".lora_" not in k}
    index = WeightIndex(base)
    with open(os.path.join(base, "config.json"), encoding="utf-8") as fh:
        tile = block_tile(json.load(fh).get("quantization_config"))
    os.makedirs(out, exist_ok=True)
    done: set[str] = set()
    for fname in index.files():
        tensors = {}
        with safe_open(os.path.join(base, fname), framework="pt") as fh:
            for key in fh.keys():
                if key.endswith(SCALE_SUFFIX):
                    continue
                t = fh.get_tensor(key)
                if t.dtype in FP8_DTYPES:  # an FP8 base: the merged model is written in bf16
                    scale = index.read([key + SCALE_SUFFIX])[key + SCALE_SUFFIX]
                    t = dequantize_blocks(t, scale, torch.bfloat16, tile)
                module = key.removesuffix(".weight")
                if key.endswith(".weight") and module in deltas:
                    t = _merged(t, *deltas[module], *_scaling(cfg, module), cfg.fan_in_fan_out)
                    done.add(module)
                elif key in biases:
                    t = biases[key].to(t.dtype)
                    done.add(key)
                tensors[key] = t
        save_file(tensors, os.path.join(out, fname), metadata={"format": "pt"})
    untied = _merge_tied_head(base, out, index, deltas, done, cfg)
    leftover = sorted((set(deltas) | set(biases)) - done - untied)
    if leftover:
        raise ConfigError(f"adapter modules {leftover[:3]} have no weight in {base}; is this the base model the "
                          "adapter was trained on?")
    for name in os.listdir(base):
        src = os.path.join(base, name)
        if os.path.isfile(src) and not name.endswith(".safetensors") and name != INDEX_NAME:
            shutil.copy2(src, os.path.join(out, name))
    if os.path.isfile(os.path.join(base, INDEX_NAME)) and not untied:  # an untied head wrote its own index
        shutil.copy2(os.path.join(base, INDEX_NAME), os.path.join(out, INDEX_NAME))
    if untied:
        _edit_json(os.path.join(out, "config.json"), _untied)
    if any(k.endswith(SCALE_SUFFIX) for k in index.keys()):
        _edit_json(os.path.join(out, "config.json"), _dequantized)
        if os.path.isfile(os.path.join(out, INDEX_NAME)):
            _edit_json(os.path.join(out, INDEX_NAME), _without_scales)
    return out


def _merged(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, r: int, scale: float, fan_in_fan_out: bool):
    # in float64, so the merged weight is the exactly rounded sum, whatever the base's dtype
    delta = (b.double() @ a.double()) * scale
    if fan_in_fan_out:  # GPT-2 style Conv1D stores the weight transposed
        delta = delta.T
    return (w.double() + delta).to(w.dtype)


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


def _edit_json(path: str, edit) -> None:
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    edit(doc)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)


def _untied(config: dict) -> None:
    config["tie_word_embeddings"] = False


def _dequantized(config: dict) -> None:
    """The merged weights are bf16: the FP8 base's quantization_config no longer describes them."""
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "bfloat16"


def _without_scales(index: dict) -> None:
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if not k.endswith(SCALE_SUFFIX)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint-N folder, or an output_dir (its latest)")
    ap.add_argument("--out", required=True, help="folder to write")
    ap.add_argument("--merge", action="store_true", help="write the base model with the adapter merged in")
    ap.add_argument("--model_path", default=None, help="base model folder, if it moved since training")
    ap.add_argument("--adapter_names", default="", help="a checkpoint of several adapters: export only these "
                    "(comma-separated); --merge takes one")
    a = ap.parse_args(argv)
    try:
        ckpt = resolve(a.checkpoint, a.checkpoint)
        paths = [merge_one(ckpt, a.out, a.model_path, a.adapter_names)] if a.merge else \
            export_adapters(ckpt, a.out, a.adapter_names)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {'merged model' if a.merge else 'PEFT adapter'} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
