"""Launch to the first step for a model in many shards, fresh and resumed: each rank reads only its stage's
tensors, once (the resume reads the checkpoint's headers to check it, then only the stage files it needs).

    python bench/startup.py [--arch llama-250m] [--shards 8] [--ranks 2] [--workdir /tmp/merak-startup]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RESULTS, llama_config, markdown_table, report, write_random_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(model: str, out: str, ranks: int, *extra: str) -> dict:
    argv = [sys.executable, "-m", "merak_lora.launch", "--nproc_per_node", str(ranks),
            os.path.join(ROOT, "launch", "finetune.py"), "--model_path", model,
            "--data_path", os.path.join(ROOT, "data", "sample.json"),
            "--lora_config", os.path.join(ROOT, "configs", "lora_config.json"), "--output_dir", out,
            "--pp", str(ranks), "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", str(ranks),
            "--seq_length", "64", "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none", *extra]
    start = time.time()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"launch failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    reads = []
    for r in range(ranks):
        log = open(os.path.join(out, "logs", f"rank_{r:03d}.log")).read()
        m = re.findall(r"read ([\d.]+) MiB of base weights \((\d+) tensors\) for stages \[[\d, ]+\] in ([\d.]+) s", log)
        reads.append(m[-1])
    return {"first_step_s": rows[-1]["time"] - start if "--resume_peft_from_checkpoint" in extra
            else rows[0]["time"] - start, "reads": reads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama-250m")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join("/tmp", "merak-startup"))
    ap.add_argument("--results", default=RESULTS, help="markdown file to append to ('-' prints only)")
    a = ap.parse_args()

    config = llama_config(a.arch)
    params = sum(p.numel() for p in _meta_model(config).parameters())
    model = write_random_model(os.path.join(a.workdir, f"{a.arch}-{a.shards}"), a.arch,
                               shard_bytes=params * 2 // (a.shards + 1))  # at least --shards files
    shards = len([f for f in os.listdir(model) if f.endswith(".safetensors")])
    out = os.path.join(a.workdir, "out")
    shutil.rmtree(out, ignore_errors=True)
    fresh = launch(model, out, a.ranks, "--max_steps", "2", "--save_steps", "1")
    resumed = launch(model, out, a.ranks, "--max_steps", "3", "--resume_peft_from_checkpoint", "latest")
    rows = []
    for label, r in (("fresh", fresh), ("resumed from checkpoint-2", resumed)):
        reads = " / ".join(f"{mib} MiB, {n} tensors, {s} s" for mib, n, s in r["reads"])
        rows.append([label, f"{params / 1e6:,.0f} M", shards, a.ranks, f"{r['first_step_s']:.1f}", reads])
        print(" | ".join(map(str, rows[-1])), flush=True)
    table = markdown_table(["launch", "parameters", "shards", "ranks", "launch -> first step (s)",
                            "base weights read per rank"], rows)
    report("Start-up: a model in many shards, fresh and resumed, 2 CPU ranks", table,
           "Each rank opens the shards that hold its stage's tensors and reads those tensors once; on resume it "
           "checks every checkpoint file's header, then reads the adapter and optimizer state of the saved stages "
           "that overlap its own.", a.results)


def _meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


if __name__ == "__main__":
    main()
