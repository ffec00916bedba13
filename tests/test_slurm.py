"""The launchers on a real Slurm (Debian's slurmctld, slurmd and munge, two emulated nodes on this machine):
srun in both task shapes, the yhrun wrapper, sbatch through submitit, gen.sh, and a preemption that checkpoints,
requeues and resumes to the same adapter as an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import LORA_CONFIG, ROOT, SAMPLE
from dist_helper import free_port, run_ranks
from merak_lora.checkpoint import load_adapter_tensors, read_latest, read_meta
from merak_lora.slurm import rendezvous_port


@pytest.fixture(scope="session")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (it writes /etc/slurm and starts slurmctld/slurmd)")
    proc = subprocess.run(["bash", os.path.join(ROOT, "slurm", "local-cluster.sh"), "start"], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"could not start the local Slurm cluster: {proc.stderr.strip()[-500:]}")
    return True


def env(**extra) -> dict:
    path = f"{os.path.join(ROOT, 'tests', 'bin')}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def flags(model: str, out: str, *extra: str) -> list[str]:
    return ["--model_path", model, "--data_path", SAMPLE, "--lora_config", LORA_CONFIG, "--output_dir", out,
            "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "4", "--seq_length", "64", "--disable_tqdm", "true",
            "--report_to", "none", *extra]


def run(cmd: list[str], timeout: int = 300, **extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**extra), cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd[:6])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def stage_folders(out: str, step: int) -> list[str]:
    return sorted(os.listdir(os.path.join(out, f"checkpoint-{step}")))


@pytest.fixture(scope="module")
def trained_under(cluster, tiny_llama, tmp_path_factory):
    """run.sh under a launcher in a task shape, trained once per shape: gen.sh answers from the srun -N2 -n2 run."""
    runs: dict[tuple, tuple[subprocess.CompletedProcess, str]] = {}

    def train(launcher: str, tasks: int, pp: int) -> tuple[subprocess.CompletedProcess, str]:
        if (launcher, tasks, pp) not in runs:
            out = str(tmp_path_factory.mktemp(f"{launcher}-{tasks}") / "out")
            runs[launcher, tasks, pp] = run([launcher, "-N2", f"-n{tasks}", "--kill-on-bad-exit=1", "bash",
                                             "slurm/run.sh", *flags(tiny_llama, out, "--pp", str(pp))],
                                            CPU_RANKS_PER_NODE="1"), out
        return runs[launcher, tasks, pp]
    return train


@pytest.mark.parametrize("launcher,tasks,pp", [("srun", 2, 2), ("srun", 4, 4), ("yhrun", 2, 2)])
def test_run_sh_trains_across_two_nodes(trained_under, launcher, tasks, pp):
    """-N2 -n2: one task per node, run.sh starts torchrun there; -N2 -n4: one task per rank."""
    proc, out = trained_under(launcher, tasks, pp)
    assert "step 4/4 | loss" in proc.stdout
    meta = read_meta(os.path.join(out, "checkpoint-4"))
    assert (meta["pp"], meta["dp"]) == (pp, 1)
    assert stage_folders(out, 4) == ["meta.json"] + [f"mp_rank_00_pp_rank_{s:03d}" for s in range(pp)]
    log0 = open(os.path.join(out, "logs", "rank_000.log")).read()
    assert f"{pp} ranks: 1 pipeline replica(s) x {pp} ranks" in log0
    assert int(re.search(r"rendezvous \S+:(\d+)", log0).group(1)) < 32768  # not a port lent to a connection


def test_gen_sh_answers_under_srun(trained_under, tiny_llama):
    _, out = trained_under("srun", 2, 2)
    proc = run(["srun", "-N2", "-n2", "bash", "slurm/gen.sh", "--model_path", tiny_llama, "--output_dir", out,
                "--resume_peft_from_checkpoint", "latest", "--prompt", "你是谁？", "--compare_base", "true",
                "--max_new_tokens", "8"], CPU_RANKS_PER_NODE="1")
    assert "[base]" in proc.stdout and "[fine-tuned]" in proc.stdout


@pytest.mark.parametrize("user_port", [False, True])
def test_submitit_submission_with_two_nodes(cluster, tiny_llama, tmp_path, user_port):
    """The ranks meet on the user's MASTER_PORT where the submitting shell sets one (submitit's export alone
    refuses it), else on the job's own port (slurm.rendezvous_port): submitit's may fall among the ports lent to
    outgoing connections."""
    out = str(tmp_path / "out")
    port = free_port() if user_port else None
    proc = run([sys.executable, "-m", "merak_lora.submit", "--nodes", "2", "--cpu_ranks_per_node", "1",
                "--partition", "debug", "--time", "10", "--log_dir", str(tmp_path / "logs"), "--wait", "--",
                *flags(tiny_llama, out, "--pp", "2")], **({"MASTER_PORT": str(port)} if port else {}))
    job = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    assert f"job {job} finished" in proc.stdout and "step 4/4 | loss" in proc.stdout
    assert stage_folders(out, 4) == ["meta.json", "mp_rank_00_pp_rank_000", "mp_rank_00_pp_rank_001"]
    log0 = open(os.path.join(out, "logs", "rank_000.log")).read()
    used = int(re.search(r"rendezvous \S+:(\d+)", log0).group(1))
    assert used == port if user_port else used == rendezvous_port(job) < 32768


def _train(argv: list[str]) -> int:
    from merak_lora.finetune import main
    return main(argv)


def _job_state(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def test_preemption_checkpoints_requeues_and_resumes_to_the_same_adapter(cluster, tiny_llama, tmp_path):
    # the signal is sent at step 11 and has ~290 steps (seconds, even on a loaded machine) to arrive before the end
    steps = ["--max_steps", "300", "--save_steps", "10", "--gradient_accumulation_steps", "2",
             "--per_device_train_batch_size", "1"]
    out = str(tmp_path / "preempted")
    proc = run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/job-%j.out",
                "slurm/train.sbatch", *flags(tiny_llama, out, "--pp", "2", *steps)], CPU_RANKS_PER_NODE="1",
               MERAK_ROOT=ROOT)
    job = proc.stdout.strip().split(";")[0]
    # the uninterrupted reference trains meanwhile: the job spends much of its time waiting (for its start, for
    # the requeue's delay) and its two pipeline stages keep the cores only half busy
    clean = str(tmp_path / "clean")
    pool = ThreadPoolExecutor(1)
    reference = pool.submit(run_ranks, _train, 2, flags(tiny_llama, clean, "--pp", "2", *steps))
    pool.shutdown(wait=False)
    deadline = time.time() + 300
    metrics = os.path.join(out, "metrics.jsonl")
    while not (os.path.exists(metrics) and any(json.loads(l)["step"] >= 11 for l in open(metrics))):
        assert time.time() < deadline, f"the job did not reach step 11: {_job_state(job)}"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    while _job_state(job).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.time() < deadline + 300, f"the requeued job did not finish: {_job_state(job)}"
        time.sleep(0.2)
    state = _job_state(job)
    log = open(os.path.join(tmp_path, f"job-{job}.out")).read()
    assert state["JobState"] == "COMPLETED" and int(state["Restarts"]) >= 1, (state, log[-3000:])
    assert "stopped by a preemption signal after step" in log and "resuming from the latest checkpoint" in log
    assert read_latest(out).endswith("checkpoint-300")
    assert reference.result() == [0, 0]
    a = load_adapter_tensors(os.path.join(out, "checkpoint-300"), read_meta(os.path.join(out, "checkpoint-300")))
    b = load_adapter_tensors(os.path.join(clean, "checkpoint-300"), read_meta(os.path.join(clean, "checkpoint-300")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
