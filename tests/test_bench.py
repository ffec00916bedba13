"""Each benchmark script still runs (tiny sizes, CPU); speed is measured in bench/RESULTS.md, never asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def run_bench(script: str, *args: str, torchrun: int = 0, results: bool = True) -> str:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)] \
        if torchrun else [sys.executable]
    proc = subprocess.run([*launcher, os.path.join(ROOT, "bench", script), *args,
                           *(["--results", "-"] if results else [])], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_data_scale_bench_runs(tmp_path):
    out = run_bench("data_scale.py", "--records", "3000", "--workdir", str(tmp_path), "--bad_line", "2500")
    for launch in ("cold: tokenize", "second launch: cache", "cache, 3 stages", "bad record at line 2,500",
                   "after the fix (0 records cached)"):
        assert re.search(rf"3,000 \(\d+ MB\) \| {re.escape(launch)} \|", out), launch
    assert "bad.jsonl: invalid JSON at line 2500" in out


def test_data_scale_bench_runs_several_adapters(tmp_path):
    """Two adapters, each with its own records: the cold launch tokenizes both data sets (their two log lines
    summed), the second reads both from the cache."""
    out = run_bench("data_scale.py", "--records", "2000", "--workdir", str(tmp_path), "--adapters", "2")
    cold = re.search(r"2 x 2,000 \(\d+ MB\) \| cold: tokenize \| 2 \| \d+ \| ([\d.]+) \| ([\d,]+) \|", out)
    assert cold and float(cold.group(1)) >= 0, out[-1500:]
    assert re.search(r"2 x 2,000 \(\d+ MB\) \| second launch: cache \| 2 \| \d+ \| - \| \(cached\) \|", out)
    manifests = [n for n in os.listdir(tmp_path / "cache-2000-2") if n.startswith("dataset-")]
    assert len(manifests) == 2, "each adapter's data set is cached on its own"


def test_one_gpu_bench_runs():
    out = run_bench("one_gpu.py", "--arch", "tiny", "--seq", "64", "--steps", "1", "--warmup", "1",
                    "--variants", "plain_gc,ours")
    assert "| plain_gc | 1 | True |" in out and "| ours | 1 | False |" in out and "failed" not in out


@pytest.mark.triton
def test_lora_kernels_bench_runs():
    """The kernels' bench on the CPU, through Triton's interpreter: its correctness check against the mask runs."""
    out = run_bench("lora_kernels.py", "--tokens", "32", "--widths", "64", "--sweep", "false")
    for half, name in (("down", "eager PyTorch"), ("down", "compiled, dropout recomputed (before)"),
                       ("down", "fused Triton kernels"), ("up", "addmm and its two thin products (before)"),
                       ("up", "fused Triton kernels")):
        assert re.search(rf"\| 32 x 64 \| {half} \| {re.escape(name)}", out), (half, name)
    assert "32 x 64: keeps" in out


def test_decode_bench_runs():
    out = run_bench("decode.py", "--arch", "tiny", "--batch", "2", "--prompt_len", "16", "--new", "4")
    assert "merak-lora pipeline, pp=1" in out and "transformers generate()" in out


@pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_bench_runs():
    out = run_bench("qlora.py", "--arch", "tiny", "--seq", "64", "--steps", "1", "--warmup", "1")
    assert "| 16bit |" in out and "| 4bit |" in out and "failed" not in out


def test_pipeline_scaling_bench_runs():
    out = run_bench("pipeline_scaling.py", "--arch", "tiny", "--seq", "32", "--microbatches", "2", "--steps", "1",
                    "--schedules", "1f1b,zbv", torchrun=2)
    assert "| 1f1b | parameters | 2 | 1 | 2 |" in out and "| zbv | parameters | 2 | 2 | 2 |" in out


def test_seventy_b_bench_runs():
    out = run_bench("seventy_b.py", "--arch", "tiny", "--gpus", "2", "--seq", "32", "--microbatches", "2",
                    "--steps", "1")
    assert "merak-lora pp=2" in out and 'device_map="auto"' in out


def test_profile_bench_runs():
    out = run_bench("profile_step.py", "--arch", "tiny", "--seq", "32", "--top", "5", results=False)
    assert "===== plain transformers + PEFT" in out and "===== merak-lora stage (pp=1)" in out


def test_startup_bench_runs(tmp_path):
    out = run_bench("startup.py", "--arch", "tiny", "--shards", "3", "--workdir", str(tmp_path))
    assert "| fresh |" in out and "| resumed from checkpoint-2 |" in out


def test_ceiling_bench_runs():
    out = run_bench("ceiling.py", "--arch", "tiny", "--seq", "64", "--microbatch", "1")
    assert "| bf16 ceiling tokens/s |" in out
