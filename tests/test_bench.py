"""Each benchmark script still runs (tiny sizes, CPU); speed is measured in bench/RESULTS.md, never asserted."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def run_bench(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args, "--results", "-"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_tokenization_bench_runs():
    out = run_bench("data_tokenize.py", "--records", "300")
    assert "| cold (tokenize + write cache) | 300 |" in out and "| cached (read cache) | 300 |" in out
