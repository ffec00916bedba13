"""The launcher as users meet it: a bad flag is one line and exit code 2; Ctrl-C (a real SIGINT to the launcher's
process group, as a terminal sends it) finishes the step, saves and exits 75, a second one stops at once; the
interactive chat ends quietly on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import LORA_CONFIG, ROOT, SAMPLE
from merak_lora.checkpoint import read_latest

ENV = {**os.environ, "PYTHON": sys.executable, "CPU_RANKS_PER_NODE": "2", "OMP_NUM_THREADS": "1"}


def flags(model: str, out: str, *extra: str) -> list[str]:
    return ["--model_path", model, "--data_path", SAMPLE, "--lora_config", LORA_CONFIG, "--output_dir", out,
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--seq_length", "64",
            "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none", *extra]


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "r0.json").write_text(json.dumps({"r": 0}))
    (d / "target.json").write_text(json.dumps({"target_modules": ["query"]}))
    (d / "empty").mkdir()
    return {"r=0": ["--lora_config", str(d / "r0.json")],
            "unknown target module": ["--lora_config", str(d / "target.json")],
            "--pp 3 on 2 ranks": ["--pp", "3"],
            "--seq_length 0": ["--seq_length", "0"],
            "empty data folder": ["--data_path", str(d / "empty")]}


@pytest.mark.parametrize("case", ["r=0", "unknown target module", "--pp 3 on 2 ranks", "--seq_length 0",
                                  "empty data folder"])
def test_a_bad_flag_is_one_line_and_exit_code_2(tiny_llama, tmp_path, bad_inputs, case):
    proc = subprocess.run(["bash", os.path.join(ROOT, "slurm", "run.sh"),
                           *flags(tiny_llama, str(tmp_path / "out")), *bad_inputs[case]],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=ENV)
    out = lines(proc.stdout + proc.stderr)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(out) == 1 and out[0].startswith("error: "), out


def test_the_launcher_alone_gives_the_same_one_line(tiny_llama, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "merak_lora.launch", "--nproc_per_node", "2",
                           os.path.join(ROOT, "launch", "finetune.py"), *flags(tiny_llama, str(tmp_path / "out")),
                           "--learning_rate", "-1"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert proc.returncode == 2
    assert lines(proc.stdout + proc.stderr) == ["error: --learning_rate must be positive"]


def test_a_taken_rendezvous_port_is_one_line_and_exit_code_2(tiny_llama, tmp_path):
    """Rank 0 of two, as srun starts it, with MASTER_PORT held by another process: it names the port and the fix
    at once (exit 2) instead of waiting as if a peer had gone."""
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "finetune.py"),
                               *flags(tiny_llama, str(tmp_path / "out"))], capture_output=True, text=True,
                              timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = lines(proc.stdout + proc.stderr)
    assert len(out) == 1 and out[0].startswith(f"error: rank 0 cannot host the job's rendezvous: MASTER_PORT={port} "
                                               "is taken"), out
    assert "start the job with MASTER_PORT set to a free port" in out[0]


class Running:
    """run.sh in its own session (a terminal's foreground job), its output collected as it comes."""

    def __init__(self, argv: list[str], cwd: str, stdin=subprocess.DEVNULL):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=stdin,
                                     text=True, cwd=cwd, env=ENV, start_new_session=True)
        self.text = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stdout.read(1), ""):
            self.text += chunk

    def wait_for(self, needle: str, timeout: float = 240, count: int = 1) -> None:
        deadline = time.time() + timeout
        while self.text.count(needle) < count:
            assert self.proc.poll() is None, f"ended before {needle!r}:\n{self.text[-3000:]}"
            assert time.time() < deadline, f"no {needle!r} within {timeout} s:\n{self.text[-3000:]}"
            time.sleep(0.05)

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


def test_ctrl_c_finishes_the_step_saves_and_exits_75(tiny_llama, tmp_path):
    out = str(tmp_path / "out")
    job = Running(["bash", os.path.join(ROOT, "slurm", "run.sh"),
                   *flags(tiny_llama, out, "--max_steps", "400", "--save_steps", "1000")], str(tmp_path))
    job.wait_for("step 3/400")
    job.ctrl_c()
    assert job.finish() == 75, job.text[-3000:]
    assert "Traceback" not in job.text and "KeyboardInterrupt" not in job.text
    last = lines(job.text)[-1]
    step = int(read_latest(out).rsplit("-", 1)[1])
    assert last == (f"stopped by Ctrl-C after step {step}: checkpoint-{step} is saved; continue with "
                    "--resume_peft_from_checkpoint latest")
    assert 3 <= step < 400
    resumed = subprocess.run(["bash", os.path.join(ROOT, "slurm", "run.sh"),
                              *flags(tiny_llama, out, "--max_steps", str(step + 2), "--save_steps", "1000",
                                     "--resume_peft_from_checkpoint", "latest")],
                             capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_latest(out).endswith(f"checkpoint-{step + 2}")


def test_a_second_ctrl_c_stops_at_once_without_saving(tiny_llama, tmp_path):
    out = str(tmp_path / "out")
    # longer steps (32 sequences each), so both signals land inside one
    job = Running(["bash", os.path.join(ROOT, "slurm", "run.sh"),
                   *flags(tiny_llama, out, "--max_steps", "7", "--save_steps", "1000", "--seq_length", "256",
                          "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "8")],
                  str(tmp_path))
    job.wait_for("step 1/7")
    job.ctrl_c()
    time.sleep(0.05)
    job.ctrl_c()
    assert job.finish() == 130, job.text[-3000:]
    assert "second Ctrl-C: stopping now, without saving" in job.text and "Traceback" not in job.text
    assert read_latest(out) is None


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_at_the_chat_prompt_ends_quietly(inherited, tiny_llama, run_sh_trained, tmp_path):
    """ignored: gen.sh started with SIGINT ignored (a script's background job), which its processes inherit; the
    launcher still passes Ctrl-C on, and the ranks must act on it. The adapter: conftest's run.sh training."""
    _, trained, proc = run_sh_trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = signal.signal(signal.SIGINT, signal.SIG_IGN if inherited == "ignored" else signal.default_int_handler)
    try:
        chat = Running(["bash", os.path.join(ROOT, "slurm", "gen.sh"), "--model_path", tiny_llama, "--output_dir",
                        str(trained), "--resume_peft_from_checkpoint", "latest", "--max_new_tokens", "8"],
                       str(tmp_path), stdin=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGINT, before)
    chat.proc.stdin.write("你是谁？\n")
    chat.proc.stdin.flush()
    chat.wait_for(">>> ", count=2)  # the question was answered and the next prompt is up
    chat.ctrl_c()
    assert chat.finish() == 0, chat.text[-3000:]
    assert "Traceback" not in chat.text and "KeyboardInterrupt" not in chat.text and "error" not in chat.text
