"""signal_count.SignalCount: two Ctrl-Cs that reach a process inside one long C call are one handler call to
Python, and two arrivals to SignalCount (so a fast second Ctrl-C still stops a run at once, trainer.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from conftest import ROOT

CHILD = textwrap.dedent("""
    import json, signal, sys, time
    import torch
    from merak_lora.signal_count import SignalCount
    counts = SignalCount()
    calls = []
    signal.signal(signal.SIGINT, lambda signum, frame: calls.append(counts.arrived(signum)))
    a = torch.randn(1500, 1500, dtype=torch.float64)
    print("busy", flush=True)
    start = time.time()
    while time.time() - start < 3:  # C calls of ~0.3 s each, Python's handler runs between them
        a = torch.linalg.matrix_exp(a / a.norm())
    counts.close()
    print(json.dumps(calls), flush=True)
""")


def test_two_signals_in_one_c_call_count_twice():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert child.stdout.readline().strip() == "busy"
    time.sleep(0.5)
    os.kill(child.pid, signal.SIGINT)
    time.sleep(0.05)  # apart enough for the kernel to deliver each, inside one C call most of the time
    os.kill(child.pid, signal.SIGINT)
    calls = json.loads(child.stdout.readline())
    assert child.wait(timeout=60) == 0
    assert sum(calls) == 2, calls  # one handler call counting two, or two calls counting one each
