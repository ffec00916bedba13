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
import merak_lora.decode_kernels  # noqa: E402,F401
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


@pytest.fixture(scope="session")
def run_sh_trained(tiny_llama, tmp_path_factory) -> tuple:
    """Two steps trained by slurm/run.sh into a folder named with quotes, `$HOME` and `$(touch pwned)`: one launch
    that test_faults checks for quoting and the chat tests of test_launch answer from. Returns the folder the
    launch ran in, the output folder and the finished process."""
    import subprocess
    cwd = tmp_path_factory.mktemp("run_sh")
    out = cwd / "out dir" / "it's \"$HOME\" $(touch pwned)"
    proc = subprocess.run(["bash", os.path.join(ROOT, "slurm", "run.sh"), "--model_path", tiny_llama, "--data_path",
                           SAMPLE, "--lora_config", LORA_CONFIG, "--output_dir", str(out), "--max_steps", "2",
                           "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "2",
                           "--gradient_accumulation_steps", "2", "--seq_length", "64", "--learning_rate", "5e-3",
                           "--disable_tqdm", "true", "--report_to", "none", "--device", "cpu", "--seed", "5"],
                          capture_output=True, text=True, timeout=300, cwd=str(cwd),
                          env={**os.environ, "PYTHON": sys.executable, "CPU_RANKS_PER_NODE": "2"})
    return cwd, out, proc
