"""Several adapters over one base: `--adapters adapters.json` read into one Config per adapter.

    {"adapters": [{"name": "a", "lora_config": "a.json", "data_path": "a.jsonl", "learning_rate": 2e-4},
                  {"name": "b", "lora_config": "b.json", "data_path": "b.jsonl", "seed": 7}]}

An entry uses the command line's flag names without the dashes; the command line gives every adapter's defaults.
Only what belongs to one adapter's training may differ (PER_ADAPTER); the model, the pipeline, the precision and
the output are the run's. Relative paths in an entry are read from the folder of adapters.json.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass
from typing import Any, get_type_hints

from .config import Config, ConfigError, _convert, read_json_file

# Flags an adapter may set for itself: its LoRA config, data, batch, optimizer, schedule and seed.
PER_ADAPTER = (
    "lora_config", "data_path", "eval_data_path", "eval_ratio", "data_format", "field_map", "system", "template",
    "skip_bad_records", "packing", "seq_length", "pad_to_multiple_of", "per_device_train_batch_size",
    "gradient_accumulation_steps", "optim", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio",
    "num_train_epochs", "max_steps", "seed", "max_skipped_steps", "ignore_data_skip",
)
PATHS = ("lora_config", "data_path", "eval_data_path")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a run. `label` names its folders and metrics; it is empty for the single adapter of a run
    without --adapters, whose files keep the one-adapter layout."""

    name: str        # the PEFT adapter name inside the stages
    label: str
    cfg: Config


def adapter_specs(cfg: Config) -> list[AdapterSpec]:
    """The run's adapters: those of --adapters, or the command line's one."""
    if not cfg.adapters:
        return [AdapterSpec("default", "", cfg)]
    path = cfg.adapters
    data = read_json_file(path, "adapters")
    entries = data.get("adapters") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"--adapters {path}: expected {{\"adapters\": [{{\"name\": ..., \"lora_config\": ..., "
                          "\"data_path\": ...}, ...]}")
    base = os.path.dirname(os.path.abspath(path))
    specs = [_spec(cfg, entry, i, path, base) for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ConfigError(f"--adapters {path}: the name {s.name!r} is used twice; names must be unique")
        seen.add(s.name)
    return specs


def _spec(cfg: Config, entry: dict, i: int, path: str, base: str) -> AdapterSpec:
    where = f"--adapters {path}, entry {i + 1}"
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"{where}: \"name\" must be letters, digits, - or _ (up to 64, it names folders and "
                          f"metrics), got {name!r}")
    where = f"--adapters {path}, adapter {name!r}"
    hints = get_type_hints(Config)
    fields = {f.name for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    for key, value in entry.items():
        if key == "name":
            continue
        if key not in fields:
            close = difflib.get_close_matches(key, PER_ADAPTER, n=2)
            raise ConfigError(f"{where}: unknown key {key!r}" + (f" (did you mean {', '.join(close)}?)" if close
                                                                 else "; keys are the flags' names without --"))
        if key not in PER_ADAPTER:
            raise ConfigError(f"{where}: --{key} is shared by every adapter of the run (one base, one pipeline, "
                              f"one output); set it on the command line. An adapter may set: {', '.join(PER_ADAPTER)}")
        values[key] = _typed(where, key, hints[key], value)
        if key in PATHS and values[key] and not os.path.isabs(values[key]):
            values[key] = os.path.join(base, values[key])
    return AdapterSpec(name, name, dataclasses.replace(cfg, **values))


def _typed(where: str, key: str, kind: Any, value: Any) -> Any:
    kind = {"bool": bool, "int": int, "float": float, "str": str}.get(kind, kind) if isinstance(kind, str) else kind
    if isinstance(value, str) and kind is not str:
        try:
            return _convert(key, kind, [value])
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, str))
    if not ok:
        raise ConfigError(f"{where}: {key!r} takes {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value
