"""Print docs/models.md's table of every model type transformers maps to a causal LM:

    .venv/bin/python tests/family_table.py > table.md

Everything is read from a tiny config of the type, as a run reads it: the refusal message, where the layers
are, what runs before them, what a layer returns, the default LoRA targets and where they come from. It stops if
a status disagrees with tests/families.py, whose statuses `make test-slow` checks against the one-process
reference."""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from families import IDLE, NO_GENERATION, OUT_OF_SCOPE, PP1_ONLY, REFUSED  # noqa: E402

IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def row(model_type: str) -> str:
    """One markdown row: type, status, default targets (source), what is special."""
    if model_type in OUT_OF_SCOPE:
        return f"| `{model_type}` | out of scope: {OUT_OF_SCOPE[model_type]} | | |"
    import torch

    from merak_lora.config import ConfigError
    from merak_lora.models import default_targets, find_parts, is_adaptable, linear_names
    from merak_lora.stage import build_skeleton
    from merak_lora.tiny import tiny_config

    config = tiny_config(model_type, 1024, special_ids=IDS)
    lm = build_skeleton(config, torch.float32, False, "sdpa")
    try:
        parts = find_parts(lm, config)
    except ConfigError as e:
        _agrees(model_type, "refused")
        return f"| `{model_type}` | refused: {_after_type(str(e))} | | |"
    _agrees(model_type, "pp1" if parts.unsplittable else "splits")
    names = [n for n, m in lm.named_modules() if is_adaptable(m)]
    targets = default_targets(model_type, linear_names(lm, parts), names)
    modules = targets.modules if isinstance(targets.modules, str) else ", ".join(targets.modules)
    status = f"--pp 1 only: {_after_type(parts.unsplittable)}" if parts.unsplittable else "splits (2 and 3 stages)"
    return f"| `{model_type}` | {status} | {modules} ({targets.source}) | {_special(lm, config, parts)} |"


def _agrees(model_type: str, found: str) -> None:
    listed = "refused" if model_type in REFUSED else "pp1" if model_type in PP1_ONLY else "splits"
    if found != listed:
        raise SystemExit(f"{model_type}: tests/families.py lists it as {listed!r}, the code finds {found!r}")


def _after_type(message: str) -> str:
    """A refusal without its leading "model type 'x'" and its trailing advice."""
    return message.split(": ", 1)[-1].replace("; it trains with --pp 1 only", "")


def _special(lm, config, parts) -> str:
    import torch.nn as nn
    notes = []
    if parts.layer_returns:
        notes.append(f"layers return a {parts.layer_returns}-tuple")
    before = [n for n in parts.pre if not isinstance(lm.get_submodule(n), nn.Embedding)]
    if before:
        notes.append(f"before the layers: {', '.join(before)}")
    if not getattr(config.get_text_config(), "base_model_pp_plan", None):
        notes.append("no pipeline plan")
    if parts.layers.count(".") > 1 or not parts.layers.endswith("layers"):
        notes.append(f"layers in `{parts.layers}`")
    if config.model_type in IDLE:
        notes.append(f"adapters idle on this input: {', '.join(IDLE[config.model_type])}")
    if config.model_type in NO_GENERATION:
        notes.append(f"**pipeline generation not supported**: {NO_GENERATION[config.model_type]}")
    return "; ".join(notes)


def main() -> None:
    import logging

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    print("| model type | status | default `target_modules` (from) | what is special |")
    print("| --- | --- | --- | --- |")
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        print(row(model_type), flush=True)


if __name__ == "__main__":
    main()
