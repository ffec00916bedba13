"""Agreement between ranks during start-up, through the rendezvous key-value store instead of collectives.

Start-up work takes as long as it takes: tokenizing ten million records, or reading a 70B stage from a slow
disk. A collective waiting on it would give up after --dist_timeout and end the job while the other rank was
healthy and busy; the store is polled instead, with no deadline. A rank that waits says every half minute what
it waits for, and an error one rank finds (a bad record, a missing file) is published so every rank stops with
the same message.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable

from .config import ConfigError

log = logging.getLogger("merak_lora")
ERROR = "error"


class PeerFailed(RuntimeError):
    """Another rank failed during start-up with an error that is not about the user's input."""


class Coordinator:
    """This rank's handle on the job's store (a local in-memory store in a one-process run)."""

    def __init__(self, store, rank: int, world: int, poll_s: float = 0.2, report_s: float = 30.0):
        self.store, self.rank, self.world = store, rank, world
        self.poll_s, self.report_s = poll_s, report_s
        self._groups: dict[str, list[int]] = {}

    # --- plain values --------------------------------------------------------------------------------
    def set(self, key: str, value: str) -> None:
        self.store.set(key, value)

    def get(self, key: str) -> str | None:
        """The value if it has been set (never blocks)."""
        if not self.store.check([key]):
            return None
        return self.store.get(key).decode()

    def add(self, key: str, amount: int) -> int:
        return int(self.store.add(key, amount))

    def share(self, key: str, compute: Callable[[], str], what: str) -> str:
        """Rank 0 computes a value, every rank gets it."""
        if self.rank == 0:
            self.set(key, compute())
        self.wait([key], lambda: f"rank 0 to finish {what}")
        return self.get(key)  # type: ignore[return-value]

    # --- errors --------------------------------------------------------------------------------------
    def fail(self, message: str, user_error: bool = True) -> None:
        """Publish this rank's error, unless another rank's came first."""
        if self.get(ERROR) is None:
            self.set(ERROR, json.dumps({"rank": self.rank, "message": message, "user": user_error}))

    def raise_if_failed(self) -> None:
        raw = self.get(ERROR)
        if raw is None:
            return
        err = json.loads(raw)
        if err["user"]:
            raise ConfigError(err["message"])
        raise PeerFailed(f"rank {err['rank']} failed: {err['message']}")

    # --- waiting ---------------------------------------------------------------------------------------
    def wait(self, keys: list[str], waiting_for: Callable[[], str], tick: Callable[[], None] = lambda: None,
             until: Callable[[], bool] = lambda: False) -> bool:
        """Return True once every key is set (False if `until()` turns true first); log what is awaited every
        report_s seconds; `tick` runs at each poll."""
        last = time.monotonic()
        while not self.store.check(keys):
            self.raise_if_failed()
            if until():
                return False
            tick()
            if time.monotonic() - last >= self.report_s:
                log.info(f"rank {self.rank} waiting for {waiting_for()}")
                last = time.monotonic()
            time.sleep(self.poll_s)
        self.raise_if_failed()
        return True

    def barrier(self, name: str, doing: str, ranks: list[int] | None = None) -> None:
        """Every rank (of `ranks`) reaches `name`; a rank that waits names the ranks it waits for."""
        ranks = list(range(self.world)) if ranks is None else ranks
        self.set(f"{name}/{self.rank}", "1")
        keys = [f"{name}/{r}" for r in ranks]

        def missing() -> str:
            late = [str(r) for r, k in zip(ranks, keys) if not self.store.check([k])]
            return f"rank(s) {', '.join(late)} to finish {doing}"

        self.wait(keys, missing)

    def leave(self, timeout_s: float = 10.0) -> None:
        """Say this rank is done with the store. Rank 0 hosts it, so it waits (a little) until every rank has
        said so: a rank still reading the store when the host exits would fail with a connection error."""
        try:
            self.add("left", 1)
            deadline = time.monotonic() + timeout_s
            while self.rank == 0 and self.add("left", 0) < self.world and time.monotonic() < deadline:
                time.sleep(self.poll_s)
        except Exception:  # noqa: BLE001 - the store may be gone already; leaving must not raise
            pass

    # --- which ranks see the same folder ---------------------------------------------------------------------
    def sharing(self, folder: str) -> list[int]:
        """The ranks that see the same `folder` as this one (all of them on a shared file system; the ranks of
        this node when the folder is on a node-local disk). Each rank leaves a marker file, and a rank's group is
        the markers it can see."""
        if folder in self._groups:
            return self._groups[folder]
        if self.world == 1:
            self._groups[folder] = [0]
            return [0]
        os.makedirs(folder, exist_ok=True)
        run = self.share(f"probe/{folder}/run", lambda: uuid.uuid4().hex[:12], "choosing a probe name")
        mine = os.path.join(folder, f".probe-{run}-{self.rank}")
        with open(mine, "w") as fh:
            fh.write(str(os.getpid()))
        self.barrier(f"probe/{folder}/written", f"probing {folder}")
        seen = set(os.listdir(folder))
        group = [r for r in range(self.world) if f".probe-{run}-{r}" in seen]
        self.barrier(f"probe/{folder}/read", f"probing {folder}")
        os.remove(mine)
        if len(group) < self.world and self.rank == min(group):
            log.warning(f"ranks {group[0]}..{group[-1]} do not see the other ranks' files in {folder}: they are "
                        "not on a shared file system, so they prepare their own copy of the data there")
        self._groups[folder] = group
        return group
