"""What a run needs to know about Slurm: whether it was restarted, and how to requeue itself after a
preemption checkpoint."""

from __future__ import annotations

import logging
import os
import subprocess

log = logging.getLogger("merak_lora")


def job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def rendezvous_port(job: str) -> int:
    """The job's rendezvous port, the same on every node: 20000 + job id % 12000. Below Linux's ephemeral range
    (32768 up), so a port the system lends to an outgoing connection never takes it; two jobs sharing a node
    collide only 12,000 job ids apart. slurm/launcher.sh computes the same."""
    return 20000 + int(job) % 12000


def restart_count() -> int:
    """How many times Slurm has requeued this job (0 on the first run)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def requeue(jid: str) -> None:
    """Put batch job `jid` back in the queue (it restarts from scratch and resumes from `latest`). Slurm ends the
    job's processes as it does so: say what happened before calling this."""
    try:
        subprocess.run(["scontrol", "requeue", jid], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning(f"could not requeue Slurm job {jid} ({str(detail).strip()}); only batch jobs can be requeued. "
                    "Resume by hand with --resume_peft_from_checkpoint latest")
