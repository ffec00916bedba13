"""Each benchmark script still runs (tiny sizes, CPU); speed is measured in bench/RESULTS.md, never asserted."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest

from conftest import ROOT

NO_BNB = importlib.util.find_spec("bitsandbytes") is None


def run_bench(script: str, *args: str, torchrun: int = 0, results: bool = True, env: dict | None = None) -> str:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)] \
        if torchrun else [sys.executable]
    proc = subprocess.run([*launcher, os.path.join(ROOT, "bench", script), *args,
                           *(["--results", "-"] if results else [])], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def runs(workdir) -> dict[str, partial]:
    """Each test's benchmark run, in the order they start: a long launch beside a one-process script."""
    return {
        "test_data_scale_bench_runs": partial(run_bench, "data_scale.py", "--records", "3000", "--workdir",
                                              str(workdir / "data_scale"), "--bad_line", "2500"),
        "test_one_gpu_bench_runs": partial(run_bench, "one_gpu.py", "--arch", "tiny", "--seq", "64", "--steps", "1",
                                           "--warmup", "1", "--variants", "plain_gc,ours"),
        "test_data_scale_bench_runs_several_adapters": partial(run_bench, "data_scale.py", "--records", "2000",
                                                               "--workdir", str(workdir / "adapters"),
                                                               "--adapters", "2"),
        **({} if NO_BNB else {"test_qlora_bench_runs": partial(run_bench, "qlora.py", "--arch", "tiny", "--seq",
                                                               "64", "--steps", "1", "--warmup", "1")}),
        "test_startup_bench_runs": partial(run_bench, "startup.py", "--arch", "tiny", "--shards", "3", "--workdir",
                                           str(workdir / "startup")),
        "test_profile_bench_runs": partial(run_bench, "profile_step.py", "--arch", "tiny", "--seq", "32", "--top",
                                           "5", results=False),
        "test_profile_trainer_bench_runs": partial(run_bench, "profile_step.py", "--arch", "tiny", "--seq", "32",
                                                   "--which", "trainer", "--top", "5", results=False),
        "test_seventy_b_bench_runs": partial(run_bench, "seventy_b.py", "--arch", "tiny", "--gpus", "2", "--seq",
                                             "32", "--microbatches", "2", "--steps", "1"),
        "test_decode_bench_runs": partial(run_bench, "decode.py", "--arch", "tiny", "--batch", "2", "--prompt_len",
                                          "16", "--new", "4", "--repeats", "3"),
        "test_decode_bench_runs_drawn": partial(run_bench, "decode.py", "--arch", "tiny", "--batch", "2",
                                                "--prompt_len", "16", "--new", "4", "--random_weights", "true",
                                                "--ahead", "false"),
        "test_pipeline_scaling_bench_runs": partial(run_bench, "pipeline_scaling.py", "--arch", "tiny", "--seq", "32",
                                                    "--microbatches", "2", "--steps", "1", "--schedules", "1f1b,zbv",
                                                    torchrun=2),
        "test_ceiling_bench_runs": partial(run_bench, "ceiling.py", "--arch", "tiny", "--seq", "64", "--microbatch",
                                           "1"),
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def started(request, workdir):
    """The selected tests' runs, two at a time from the module's start: most keep one core busy (a script, then its
    workers one after another) or leave cores idle between launches, and the machine may have only two."""
    from bench.common import bench_model
    # the random models the scripts share, written here once, not by two of them at a time: with weights, and
    # without (seventy_b.py and pipeline_scaling.py, which may run side by side)
    bench_model("tiny")
    bench_model("tiny", weights=False)
    selected = {item.name for item in request.session.items if item.module is request.module}
    # the environment as the module starts: a test marked `triton` sets TRITON_INTERPRET while it runs, and a run
    # starting meanwhile must not take it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with ThreadPoolExecutor(2) as pool:
        yield {name: pool.submit(run, env=env) for name, run in runs(workdir).items() if name in selected}


@pytest.fixture
def out(request, started) -> str:
    """This test's benchmark output."""
    return started[request.node.name].result()


def test_data_scale_bench_runs(out):
    for launch in ("cold: tokenize", "second launch: cache", "cache, 3 stages", "bad record at line 2,500",
                   "after the fix (0 records cached)"):
        assert re.search(rf"3,000 \(\d+ MB\) \| {re.escape(launch)} \|", out), launch
    assert "bad.jsonl: invalid JSON at line 2500" in out


def test_data_scale_bench_runs_several_adapters(out, workdir):
    """Two adapters, each with its own records: the cold launch tokenizes both data sets (their two log lines
    summed), the second reads both from the cache."""
    cold = re.search(r"2 x 2,000 \(\d+ MB\) \| cold: tokenize \| 2 \| \d+ \| ([\d.]+) \| ([\d,]+) \|", out)
    assert cold and float(cold.group(1)) >= 0, out[-1500:]
    assert re.search(r"2 x 2,000 \(\d+ MB\) \| second launch: cache \| 2 \| \d+ \| - \| \(cached\) \|", out)
    manifests = [n for n in os.listdir(workdir / "adapters" / "cache-2000-2") if n.startswith("dataset-")]
    assert len(manifests) == 2, "each adapter's data set is cached on its own"


def test_one_gpu_bench_runs(out):
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


def test_decode_bench_runs(out):
    assert "merak-lora pipeline, pp=1" in out and "transformers generate()" in out
    # three timings of each of merak-lora's rows: their median, then their range, low to high
    assert "tokens/s past the first 1, median of 3 (range)" in out
    ranges = re.findall(r"\| ([\d,]+) \(([\d,]+)-([\d,]+)\) \|", out)
    assert ranges and all(int(lo.replace(",", "")) <= int(mid.replace(",", "")) <= int(hi.replace(",", ""))
                          for mid, lo, hi in ranges), out


def test_decode_bench_runs_drawn(out):
    # weights drawn in memory, as for 70B: generate() runs on the stage's own model, so its answers must match
    assert "generate(), one process, PEFT LoRA r=8, on the pipeline stage's model" in out
    assert "gives the same 4 greedy tokens as merak-lora's first row for 2 of 2 prompts" in out


@pytest.mark.skipif(NO_BNB, reason="needs bitsandbytes")
def test_qlora_bench_runs(out):
    assert "| 16bit |" in out and "| 4bit |" in out and "failed" not in out


def test_pipeline_scaling_bench_runs(out):
    assert "| 1f1b | parameters | 2 | 1 | 2 |" in out and "| zbv | parameters | 2 | 2 | 2 |" in out


def test_seventy_b_bench_runs(out):
    assert "merak-lora pp=2" in out and 'device_map="auto"' in out


def test_profile_bench_runs(out):
    assert "===== plain transformers + PEFT" in out and "===== merak-lora stage (pp=1)" in out


def test_profile_trainer_bench_runs(out):
    assert "===== merak-lora trainer step (pp=1), 4 microbatches of 1" in out and "done: 12 steps" in out


def test_startup_bench_runs(out):
    assert "| fresh |" in out and "| resumed from checkpoint-2 |" in out


def test_ceiling_bench_runs(out):
    assert "| bf16 ceiling tokens/s |" in out
