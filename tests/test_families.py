"""Every decoder-only family transformers ships splits exactly or is refused before a weight is read
(tests/families.py sorts them; docs/models.md lists the outcome). "Exactly" is tests/test_models.py's check: at 2
and 3 stages the loss and every LoRA gradient equal one-process PEFT's, and greedy tokens at 2 stages equal
transformers' generate(). The default run covers one family per path of the split and every refusal;
`pytest -m slow` (make test-slow) runs all the other families."""

from __future__ import annotations

import re

import pytest

from families import FAST, IDLE, NO_GENERATION, ONE_STAGE_UNCHECKED, PP1_ONLY, REFUSED, SPLITS
from family_check import LORA, check
from test_models import HF_FAMILIES


def _params(names) -> list:
    """One parameter per family, marked slow unless it is one of the default run's."""
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow, id=n) for n in sorted(names)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    made: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in made:
            from merak_lora.tiny import make_tiny_model
            made[family] = make_tiny_model(str(tmp_path_factory.mktemp(family)), family, num_layers=4, shards=2)
        return made[family]
    return get


def config_only(tmp_path, family: str, **overrides) -> str:
    """A model folder holding only config.json: a refusal must come from the config alone."""
    from merak_lora.tiny import tiny_config
    config = tiny_config(family, 1024, special_ids={"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    for key, value in overrides.items():
        setattr(config, key, value)
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def plan(folder: str, stages: int):
    from merak_lora.chat import GenConfig
    from merak_lora.finetune import make_plan
    return make_plan(GenConfig(model_path=folder, random_weights=True), stages, LORA)


@pytest.mark.parametrize("family", _params(set(SPLITS) - set(HF_FAMILIES)))
def test_family_splits_exactly(tiny_model, family):
    check(tiny_model(family), LORA, idle=IDLE.get(family, ()), generation=family not in NO_GENERATION)


@pytest.mark.parametrize("family", sorted(PP1_ONLY))
def test_family_refused_at_more_than_one_stage(tmp_path, family):
    from merak_lora.config import ConfigError
    folder = config_only(tmp_path, family)
    reason = re.escape(PP1_ONLY[family])
    with pytest.raises(ConfigError, match=rf"model type '{family}' cannot be cut .*{reason}.*--pp 1 only"):
        plan(folder, 2)
    assert len(plan(folder, 1).specs) == 1


@pytest.mark.parametrize("family", _params(set(PP1_ONLY) - set(ONE_STAGE_UNCHECKED)))
def test_family_exact_at_one_stage(tiny_model, family):
    check(tiny_model(family), LORA, stages=(1,), idle=IDLE.get(family, ()), generation=family not in NO_GENERATION)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_family_refused_before_weights(tmp_path, family):
    from merak_lora.config import ConfigError
    with pytest.raises(ConfigError, match=rf"model type '{family}'.*{re.escape(REFUSED[family])}"):
        plan(config_only(tmp_path, family), 1)


def test_block_sparse_big_bird_refused_at_more_than_one_stage(tmp_path):
    """Its forward switches every layer's attention type on short inputs; with full attention it splits."""
    from merak_lora.config import ConfigError
    with pytest.raises(ConfigError, match="model type 'big_bird' cannot be cut .*original_full"):
        plan(config_only(tmp_path, "big_bird", attention_type="block_sparse"), 2)


def test_default_targets_come_from_the_table_then_peft_then_all_linear():
    import torch

    from merak_lora.models import ALL_LINEAR, PEFT_MAPPING, TABLE, default_targets, find_parts, linear_names
    from merak_lora.stage import build_skeleton
    from merak_lora.tiny import tiny_config

    expected = {"llama": (TABLE, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
                "bloom": (PEFT_MAPPING, ["query_key_value"]),
                # "0" alone would name layer 0 too: the Sequential's linears are named by their last two names
                "ctrl": (ALL_LINEAR, ["Wk", "Wq", "Wv", "dense", "ffn.0", "ffn.2"])}
    for family, (source, modules) in expected.items():
        config = tiny_config(family, 1024, special_ids={"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
        lm = build_skeleton(config, torch.float32, False, "sdpa")
        names = [n for n, m in lm.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
        found = default_targets(family, linear_names(lm, find_parts(lm, config)), names)
        assert (found.source, found.modules) == (source, modules), family
