"""Start a job's ranks on this node and see them to the end: `torchrun`'s static mode, with the project's exit
codes and signal handling.

    python -m merak_lora.launch --nproc_per_node 4 launch/finetune.py --model_path M ...        (one node)
    python -m merak_lora.launch --nnodes 8 --node_rank $SLURM_NODEID --nproc_per_node 4 \\
        --master_addr HOST --master_port PORT launch/finetune.py ...                            (one of 8 nodes)

Why not torch's elastic agent (docs/design.md, "Launching"): it sends SIGKILL 30 s after passing on a signal
(a step plus a checkpoint of a large adapter can take longer), a second Ctrl-C during that wait leaves the ranks
running without it, and every failure ends in its own ChildFailedError traceback with exit code 1, hiding the
ranks' own codes (2 bad input, 75 stopped after saving). Here:
- every rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and MASTER_PORT; rank 0
  hosts the rendezvous store; the ranks run in their own session and die with the launcher;
- SIGINT, SIGTERM, SIGUSR1, SIGUSR2 and SIGHUP are passed to every rank once each time they arrive; a second
  Ctrl-C ends the ranks at once (they exit by themselves; stragglers are killed after KILL_AFTER_S);
- when a rank fails, the others get GRACE_S to stop by themselves (they notice within seconds and rank 0 names
  the failed rank), then are killed;
- the exit code is the ranks' own: the first of 2, 3, 1, 130, 75, 4 that any rank returned.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

from .signal_count import SignalCount

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
PRIORITY = (2, 3, 1, 130, 75, 4)  # the code that explains the outcome best comes first
GRACE_S = 30.0
KILL_AFTER_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing on `host` holds now ("": every address)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _prepare_rank() -> None:
    """In the child, before the rank's Python starts: SIGKILL when the launcher dies (so a killed launcher leaves no
    ranks behind), and SIGINT back to its default. The launcher passes Ctrl-C on to the ranks, but a process started
    with SIGINT ignored (a script's background job, a parent that ignored it) hands that on, and Python then keeps
    ignoring it instead of raising KeyboardInterrupt: the chat would not end, nor a step be finished and saved."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m merak_lora.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc_per_node", "--nproc-per-node", type=int, default=1)
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--node_rank", "--node-rank", type=int, default=0)
    ap.add_argument("--master_addr", "--master-addr", default="127.0.0.1")
    ap.add_argument("--master_port", "--master-port", type=int, default=0, help="0: a free port (one node)")
    ap.add_argument("--standalone", action="store_true", help="one node on this machine (the default)")
    ap.add_argument("script")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    if a.nnodes > 1 and not a.master_port:
        ap.error("--master_port is required with --nnodes > 1")
    return a


class Ranks:
    """This node's rank processes and what happened to them."""

    def __init__(self, a: argparse.Namespace):
        port = a.master_port or free_port()
        world = a.nnodes * a.nproc_per_node
        self.procs: list[subprocess.Popen] = []
        self.first_rank = a.node_rank * a.nproc_per_node
        for local in range(a.nproc_per_node):
            rank = self.first_rank + local
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(world),
                   "LOCAL_WORLD_SIZE": str(a.nproc_per_node), "GROUP_RANK": str(a.node_rank),
                   "MASTER_ADDR": a.master_addr, "MASTER_PORT": str(port)}
            env.setdefault("OMP_NUM_THREADS", "1")
            self.procs.append(subprocess.Popen([sys.executable, "-u", a.script, *a.args], env=env,
                                               stdin=None if rank == 0 else subprocess.DEVNULL,
                                               start_new_session=True, preexec_fn=_prepare_rank))
        self.interrupts = 0
        self.kill_at: float | None = None
        self.arrivals = SignalCount()  # made in the main thread, before main() sets the handlers that ask it

    def signal_all(self, signum: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    def on_signal(self, signum: int, frame) -> None:
        times = self.arrivals.arrived(signum)  # passed on as often as it came
        for _ in range(times):
            self.signal_all(signum)
        if signum == signal.SIGINT:
            self.interrupts += times
            if self.interrupts >= 2:
                self.kill_at = time.monotonic() + KILL_AFTER_S

    def wait(self) -> list[int]:
        """Return codes once every rank has ended (killing stragglers after a failure or a second Ctrl-C)."""
        while any(p.poll() is None for p in self.procs):
            now = time.monotonic()
            failed = [p for p in self.procs if p.poll() not in (None, 0, 75)]
            if failed and self.kill_at is None:
                self.kill_at = now + GRACE_S
            if self.kill_at is not None and now >= self.kill_at:
                self.signal_all(signal.SIGKILL)
            time.sleep(0.1)
        return [p.returncode for p in self.procs]


def outcome(codes: list[int], first_rank: int) -> tuple[int, str]:
    """The launcher's exit code, and a line to print when no rank could explain the end itself."""
    if all(c == 0 for c in codes):
        return 0, ""
    for code in PRIORITY:
        if code in codes:
            return code, ""
    rank, code = next((first_rank + i, c) for i, c in enumerate(codes) if c != 0)
    if code < 0:
        name = signal.Signals(-code).name
        return 128 - code, (f"error: rank {rank} was killed by {name} without a word (the out-of-memory killer, "
                            "kill -9 or scancel); its log is <output_dir>/logs/rank_*.log")
    return code, f"error: rank {rank} exited with code {code}"


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    ranks = Ranks(a)
    for sig in FORWARDED:
        signal.signal(sig, ranks.on_signal)
    code, line = outcome(ranks.wait(), ranks.first_rank)
    if line:
        print(line, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
