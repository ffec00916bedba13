"""When a rank fails, say which one and why, on rank 0's console and log.

A rank that raises writes <output_dir>/logs/failure_rank_XXX.json before it exits. The other ranks only see a
broken connection or a timed-out collective; rank 0 then reads those records (or, for a rank killed from
outside, finds its process gone) and names the rank and its error, so nobody has to grep 64 log files.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback

PEER_ERROR_HINTS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out",
                    "Timed out", "NCCL communicator", "ProcessGroupGloo", "ProcessGroupNCCL", "DistBackendError")


def _logs(output_dir: str) -> str:
    return os.path.join(output_dir, "logs")


def register(output_dir: str, rank: int) -> None:
    """Note this rank's host and pid, so rank 0 can tell later whether it is still alive."""
    os.makedirs(_logs(output_dir), exist_ok=True)
    stale = os.path.join(_logs(output_dir), f"failure_rank_{rank:03d}.json")
    if os.path.exists(stale):  # from an earlier attempt of this run
        os.remove(stale)
    with open(os.path.join(_logs(output_dir), f"rank_{rank:03d}.pid"), "w") as fh:
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, fh)


def record(output_dir: str, rank: int, exc: BaseException, victim: bool = False) -> None:
    """Leave this rank's reason for exiting: its own error, or (victim) that it stopped because a peer failed."""
    root = exc
    while root.__cause__ is not None:  # torch's pipelining wraps a stage's error in its own RuntimeError
        root = root.__cause__
    text = next((line for line in str(root).splitlines() if line.strip()), "")
    try:
        os.makedirs(_logs(output_dir), exist_ok=True)
        with open(os.path.join(_logs(output_dir), f"failure_rank_{rank:03d}.json"), "w") as fh:
            json.dump({"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                       "victim": victim, "error": f"{type(root).__name__}: {text.strip()}"[:500],
                       "traceback": traceback.format_exception(exc)[-6:]}, fh)
    except OSError:
        pass  # reporting must never mask the original error


def is_peer_failure(exc: BaseException) -> bool:
    """A collective or point-to-point call that failed because another rank went away or stalled."""
    import torch.distributed as dist
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(h in str(exc) for h in PEER_ERROR_HINTS)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its launcher) is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def _records(logs: str, world: int, me: int) -> list[dict]:
    out = []
    for r in range(world):
        path = os.path.join(logs, f"failure_rank_{r:03d}.json")
        if r != me and os.path.isfile(path):
            try:
                with open(path) as fh:
                    out.append(json.load(fh))
            except (OSError, json.JSONDecodeError):
                continue
    return out


def _dead_here(logs: str, world: int, me: int, reported: set[int]) -> list[int]:
    """Ranks on this host whose process is gone without leaving any record."""
    host, gone = socket.gethostname(), []
    for r in range(world):
        try:
            with open(os.path.join(logs, f"rank_{r:03d}.pid")) as fh:
                info = json.load(fh)
        except (OSError, json.JSONDecodeError):
            continue
        if r != me and r not in reported and info["host"] == host and not _alive(info["pid"]):
            gone.append(r)
    return gone


def explain(output_dir: str, world: int, me: int, wait_s: float = 5.0) -> str:
    """Why the job broke: the earliest failure record, else the ranks whose process vanished."""
    logs = _logs(output_dir)
    deadline = time.time() + wait_s
    dead_since = None
    while True:
        records = _records(logs, world, me)
        failures = [f for f in records if not f.get("victim")]
        if failures:
            first = min(failures, key=lambda f: f["time"])
            return f"rank {first['rank']} (host {first['host']}) failed: {first['error']}"
        gone = _dead_here(logs, world, me, {f["rank"] for f in records})
        now = time.time()
        if gone:
            dead_since = dead_since or now
            if now - dead_since > 1.0:  # a crashing rank writes its record before it dies; a killed one never
                return (f"rank {', '.join(map(str, gone))} died without reporting an error (killed from "
                        "outside: kill -9, the out-of-memory killer, scancel, or a crash in native code)")
        if now > deadline:
            return ("another rank stopped answering without reporting an error (it may have been killed, or its "
                    "node failed); torchrun's or Slurm's summary names it")
        time.sleep(0.1)
