"""The product as users run it: torchrun + launch/finetune.py with Merak-style flags, real processes; the
console shows progress, TensorBoard holds the scalars, each stage leaves its checkpoint folder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import LORA_CONFIG, ROOT, SAMPLE


def torchrun(nproc: int, script: str, *flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(ROOT, "launch", script), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_finetune_cli_two_stages_with_tensorboard(tiny_llama, tmp_path):
    out = tmp_path / "out"
    proc = torchrun(2, "finetune.py", "--model_path", tiny_llama, "--data_path", SAMPLE,
                    "--lora_config", LORA_CONFIG, "--output_dir", str(out), "--max_steps", "6",
                    "--logging_steps", "2", "--save_steps", "3", "--per_device_train_batch_size", "2",
                    "--gradient_accumulation_steps", "2", "--seq_length", "128", "--partition_method", "uniform",
                    "--fp16", "false", "--save", "true", "--wall_clock_breakdown", "true",
                    "--input_names", "input_ids", "labels", "--split_method", "layer_split",
                    "--no_tie_modules", "false", "--dataloader_num_workers", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 6/6 | loss" in proc.stdout
    assert "time_pipeline_s" in proc.stdout
    assert "train:" in proc.stderr  # the progress bar
    assert "--dataloader_num_workers is accepted but has no effect" in proc.stderr

    for step in (3, 6):
        for stage in (0, 1):
            d = out / f"checkpoint-{step}" / f"mp_rank_00_pp_rank_{stage:03d}"
            assert {p.name for p in d.iterdir()} == {"lora_config.json", "adapter_model.safetensors",
                                                      "lora_partial_model_optim.pt"}
    assert (out / "latest").read_text().strip() == "checkpoint-6"
    assert not list(out.glob("*.partial"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_mem_gib",
            "train/time_pipeline_s"} <= tags
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in losses] == [2, 4, 6]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for (step, value), row in zip(losses, logged):
        assert row["step"] == step and math.isclose(value, row["loss"], rel_tol=1e-6)
        assert math.isfinite(value) and 3.0 < value < 10.0


def test_bad_flags_fail_fast_with_a_clear_message(tiny_llama, tmp_path):
    proc = torchrun(2, "finetune.py", "--model_path", tiny_llama, "--data_path", SAMPLE,
                    "--output_dir", str(tmp_path / "o"), "--gradient_accumulation_step", "4")
    assert proc.returncode != 0
    assert "unknown flag --gradient_accumulation_step (did you mean --gradient_accumulation_steps" in proc.stderr
    assert "merak_lora/" not in proc.stderr, "a traceback from inside merak_lora reached the user"
