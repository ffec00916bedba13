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
                    "--split_method", "layer_split", "--no_tie_modules", "false", "--dataloader_num_workers", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 6/6 | loss" in proc.stdout
    assert "time_pipeline_s" in proc.stdout
    assert "train:" in proc.stderr  # the progress bar
    assert "(mean of the last" in proc.stderr  # ... says what its loss is: the log line's window mean
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
            "train/time_pipeline_s", "time/checkpoint_s"} <= tags
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in losses] == [2, 4, 6]
    logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    for (step, value), row in zip(losses, logged):
        assert row["step"] == step and math.isclose(value, row["loss"], rel_tol=1e-6)
        assert math.isfinite(value) and 3.0 < value < 10.0


def test_bad_flags_fail_fast_with_a_clear_message(tiny_llama, tmp_path):
    proc = torchrun(2, "finetune.py", "--model_path", tiny_llama, "--data_path", SAMPLE,
                    "--output_dir", str(tmp_path / "o"), "--gradient_accumulation_step", "4")
    assert proc.returncode != 0
    assert "unknown flag --gradient_accumulation_step (did you mean --gradient_accumulation_steps" in proc.stderr
    assert "merak_lora/" not in proc.stderr, "a traceback from inside merak_lora reached the user"


def test_merak_s_deepseek_flags_run_unchanged(tiny_llama, tmp_path):
    """Merak's DeepSeek-R1 LoRA run.sh flag set (one microbatch per step on two stages, "CAUSAL LM", input names,
    HF spellings), then its gen_text.py flags: both run; the flags that mean nothing here are named once."""
    lora = tmp_path / "lora_config.json"
    lora.write_text(json.dumps({"r": 8, "lora_alpha": 32, "lora_dropout": 0.05, "task_type": "CAUSAL LM",
                                "target_modules": ["q_proj", "v_proj"], "inference_mode": False}))
    out = tmp_path / "out"
    merak = ["--wall_clock_breakdown", "True", "--partition_method", "uniform_floor", "--no_tie_modules", "true",
             "--input_names", "input_ids", "attention_mask", "--split_method", "layer_split", "--fp16", "false",
             "--save", "true", "--save_steps", "10", "--seq_length", "2048", "--lora_config", str(lora),
             "--model_path", tiny_llama, "--resume_from_checkpoint", tiny_llama, "--gradient_accumulation_steps",
             "1", "--per_device_train_batch_size", "1", "--local_rank=0", "--torch_compile", "false",
             "--report_to", "tensorboard", "--bf16", "False"]
    proc = torchrun(2, "finetune.py", *merak, "--data_path", SAMPLE, "--output_dir", str(out), "--max_steps", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    both = proc.stdout + proc.stderr
    assert both.count("--input_names is accepted but has no effect") == 1
    assert both.count("1 microbatch(es) per step on 2 pipeline ranks: GPipe runs") == 1
    assert (out / "checkpoint-3" / "mp_rank_00_pp_rank_001" / "adapter_model.safetensors").is_file()
    gen = torchrun(2, "gen_text.py", "--model_path", tiny_llama, "--resume_peft_from_checkpoint",
                   str(out / "checkpoint-3"), "--prompt", "你是谁？", "--max_new_tokens", "4", "--return_logits",
                   "true", "--text_generation", "true")
    assert gen.returncode == 0, gen.stderr[-3000:]
    for flag in ("return_logits", "text_generation"):
        assert gen.stderr.count(f"--{flag} is accepted but has no effect") == 1
