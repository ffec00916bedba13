"""Shared fixtures: tiny models written once per test session."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# merak_lora.fused_lora's Triton kernels are built for Triton's interpreter (which decides as they are defined), so
# that tests marked `triton` can run them on the CPU. Every other test, and every rank a test launches, takes the CPU
# path users' CPU runs take: the interpreter is thousands of times slower.
os.environ["TRITON_INTERPRET"] = "1"
import merak_lora.fused_lora  # noqa: E402,F401
del os.environ["TRITON_INTERPRET"]
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


@pytest.fixture(autouse=True)
def triton_interpreter(request, monkeypatch):
    """Tests marked `triton` run the fused kernels (merak_lora.fused_lora.usable reads the flag at each call)."""
    if request.node.get_closest_marker("triton") is not None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
