"""The safetensors files of a model folder: which file holds which tensor, and reading only the ones asked for.

Reading goes through safetensors' memory map, so a stage touches the bytes of its own tensors and no others;
`ReadReport` counts them so tests (and the log) can show it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from .config import ConfigError
from .fp8 import BLOCK, FP8_DTYPES, BlockScaled, tiles_fit

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # an FP8 tensor's block scales, as the FP8 releases name them


@dataclass
class ReadReport:
    keys: list[str] = field(default_factory=list)
    bytes: int = 0


class WeightIndex:
    """Maps tensor names to the safetensors file that stores them (sharded or single file)."""

    def __init__(self, folder: str):
        self.folder = folder
        index_path = os.path.join(folder, INDEX_NAME)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as fh:
                self.file_of: dict[str, str] = json.load(fh)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
            if not files:
                has_bin = os.path.isdir(folder) and any(f.endswith(".bin") for f in os.listdir(folder))
                hint = (" It holds PyTorch .bin weights, which can run code when loaded: re-save the model "
                        "once with `AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)`."
                        if has_bin else "")
                raise ConfigError(f"model folder {folder!r} has no safetensors weights "
                                  f"({SINGLE_NAME} or {INDEX_NAME}).{hint}")
            self.file_of = {}
            for name in files:
                with safe_open(os.path.join(folder, name), framework="pt") as fh:
                    for key in fh.keys():
                        self.file_of[key] = name
        self.report = ReadReport()

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def keys(self) -> list[str]:
        return list(self.file_of)

    def files(self) -> list[str]:
        return sorted(set(self.file_of.values()))

    def read(self, keys: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read the named tensors, opening each file once."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            if key not in self.file_of:
                raise KeyError(key)
            by_file.setdefault(self.file_of[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for fname, names in by_file.items():
            path = os.path.join(self.folder, fname)
            try:
                with safe_open(path, framework="pt", device=str(device)) as fh:
                    for key in names:
                        t = fh.get_tensor(key)
                        out[key] = t
                        self.report.keys.append(key)
                        self.report.bytes += t.numel() * t.element_size()
            except (OSError, RuntimeError) as e:  # safetensors raises these for truncated or corrupt files
                raise ConfigError(f"cannot read {path}: {e}. The file may be truncated; copy it again.") from None
        return out

    def total_bytes(self) -> int:
        total = 0
        for fname in self.files():
            with safe_open(os.path.join(self.folder, fname), framework="pt") as fh:
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    numel = 1
                    for d in sl.get_shape():
                        numel *= d
                    total += numel * _dtype_size(sl.get_dtype())
        return total


def _dtype_size(name: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(name, 4)


class KeyMap:
    """Which checkpoint tensors make each model parameter.

    Checkpoints are often saved under other names than the modules use (GPT-NeoX's `embed_out`, Mixtral's
    `block_sparse_moe`), and recent transformers fuses per-expert weights into one 3-D parameter. The rules come
    from transformers' own conversion mapping, so a stage converts exactly as `from_pretrained` would, but only
    for the tensors it owns."""

    def __init__(self, lm, index: WeightIndex):
        self.index = index
        self.sources: dict[str, list[tuple[str, str | None]]] = {}
        self.converters: dict[str, object] = {}
        self.tile = block_tile(getattr(lm.config, "quantization_config", None))
        renamings, converters = _conversion_rules(lm)
        meta = lm.state_dict(keep_vars=True)
        prefix = getattr(lm, "base_model_prefix", None)
        for key in index.keys():
            name, pattern = key, None
            if renamings or converters:
                name, pattern = _rename(key, renamings, converters, prefix, meta)
            self.sources.setdefault(name, []).append((key, pattern))
            if pattern is not None:
                self.converters[name] = next(c for c in converters if pattern in c.source_patterns)

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named parameters' tensors (read on the CPU, converted where the checkpoint stores them split)."""
        keys = sorted({k for n in names for k, _ in self.sources[n]})
        keys += [k + SCALE_SUFFIX for k in keys if k + SCALE_SUFFIX in self.index]
        raw = self.index.read(keys, device="cpu")
        out = {}
        for name in names:
            srcs = self.sources[name]
            conv = self.converters.get(name)
            if any(raw[k].dtype in FP8_DTYPES for k, _ in srcs):
                if conv is not None:
                    raise ConfigError(f"{self.index.folder}: {name} is stored in FP8 and split in the checkpoint "
                                      "(fused experts); such checkpoints are not read here yet: dequantize the "
                                      "model to bf16 once and point --model_path at that copy")
                out[name] = self._block_scaled(srcs[0][0], raw)
                continue
            if conv is None:
                out[name] = raw[srcs[0][0]]
                continue
            grouped: dict[str, list[torch.Tensor]] = {}
            for key, pattern in sorted(srcs, key=lambda s: _natural(s[0])):
                grouped.setdefault(pattern, []).append(raw[key])
            for op in conv.operations:
                grouped = op.convert(grouped, source_patterns=conv.source_patterns,
                                     target_patterns=conv.target_patterns, full_layer_name=name, model=None,
                                     config=None, missing_keys=None)
            (tensor,) = grouped.values()
            out[name] = tensor
        return out


    def _block_scaled(self, key: str, raw: dict[str, torch.Tensor]) -> BlockScaled:
        if key + SCALE_SUFFIX not in raw:
            raise ConfigError(f"{self.index.folder}: tensor {key} is stored in FP8 without a {key}{SCALE_SUFFIX} "
                              "beside it; only block-scaled FP8 checkpoints (the DeepSeek-V3 / Qwen3-FP8 layout) "
                              "are read: dequantize the model to bf16 once and point --model_path at that copy")
        weight, scale = raw[key], raw[key + SCALE_SUFFIX]
        if not tiles_fit(tuple(weight.shape), tuple(scale.shape), self.tile):
            raise ConfigError(f"{self.index.folder}: {key}{SCALE_SUFFIX} has shape {tuple(scale.shape)}, not one "
                              f"scale per {self.tile[0]}x{self.tile[1]} tile of a {tuple(weight.shape)} weight; "
                              "check quantization_config.weight_block_size in config.json")
        return BlockScaled(weight, scale, self.tile)


def block_tile(quantization_config) -> tuple[int, int]:
    """The tile of a block-scaled FP8 checkpoint, from config.json's quantization_config (128x128 if unsaid)."""
    quant = quantization_config or {}
    tile = (quant if isinstance(quant, dict) else vars(quant)).get("weight_block_size") or (BLOCK, BLOCK)
    return int(tile[0]), int(tile[1])


def _conversion_rules(lm) -> tuple[list, list]:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # an older transformers: checkpoints use the module names
        return [], []
    rules = get_model_conversion_mapping(lm)
    return ([r for r in rules if isinstance(r, WeightRenaming)],
            [r for r in rules if isinstance(r, WeightConverter)])


def _rename(key, renamings, converters, prefix, meta):
    from transformers.core_model_loading import rename_source_key
    return rename_source_key(key, renamings, converters, prefix, meta)


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in key.split(".")]


class RandomWeights:
    """Stands in for KeyMap when a benchmark asks for random weights (`--random_weights true`): every parameter
    is drawn on the spot (normal, std 0.02), so a 70B-class stage needs only its config.json."""

    def __init__(self, lm, device: torch.device | str = "cpu"):
        self.shapes = {n: tuple(p.shape) for n, p in lm.state_dict(keep_vars=True).items()}
        self.device = device
        self.index = WeightIndex.__new__(WeightIndex)
        self.index.folder, self.index.report = "(random weights)", ReadReport()

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        # drawn where they will live: a 70B stage's worth of random numbers takes minutes on a CPU
        return {name: torch.randn(self.shapes[name], dtype=torch.bfloat16, device=self.device) * 0.02
                for name in names}
