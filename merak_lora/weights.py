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

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


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
