"""Run a function on N gloo ranks in real processes and collect what each returns.

Children come from a forkserver that has already imported torch, transformers and PEFT, so a multi-rank test
costs the work it does, not seconds of imports per rank."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback
from typing import Any
from collections.abc import Callable

from merak_lora.launch import free_port

_ctx = mp.get_context("forkserver")
_ctx.set_forkserver_preload(["torch", "transformers", "peft", "merak_lora.finetune",
                             "transformers.models.llama.modeling_llama"])


def _worker(fn: Callable, rank: int, world: int, port: int, args: tuple, env: dict, queue) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **env})
    import torch
    torch.set_num_threads(1)
    try:
        # plain pickle: tensors travel by value (torch's multiprocessing reducers would share memory that
        # disappears when this process exits)
        queue.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the child's traceback
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable, world: int, *args: Any, env: dict | None = None, timeout: float = 600) -> list[Any]:
    """fn(*args) on ranks 0..world-1 (RANK/WORLD_SIZE/MASTER_* set); returns the results by rank."""
    queue = _ctx.Queue()
    port = free_port()
    procs = [_ctx.Process(target=_worker, args=(fn, r, world, port, args, env or {}, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]


def _raw_worker(fn: Callable, rank: int, world: int, port: int, args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    import torch
    torch.set_num_threads(1)
    code = fn(*args)
    os._exit(code if isinstance(code, int) else 0)


def start_ranks(fn: Callable, world: int, *args: Any) -> list:
    """Start fn(*args) on `world` ranks and return the processes (for tests that kill or expect failures);
    each process exits with fn's integer return value."""
    port = free_port()
    procs = [_ctx.Process(target=_raw_worker, args=(fn, r, world, port, args)) for r in range(world)]
    for p in procs:
        p.start()
    return procs
