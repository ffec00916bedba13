"""Shared fixtures: tiny models written once per test session."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SAMPLE = os.path.join(ROOT, "data", "sample.json")
LORA_CONFIG = os.path.join(ROOT, "configs", "lora_config.json")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from merak_lora.tiny import make_tiny_model
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")), "llama", num_layers=4, shards=2)


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory) -> str:
    from merak_lora.tiny import make_tiny_model
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_tied")), "llama", num_layers=4, tie=True, seed=1)
