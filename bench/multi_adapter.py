"""Several adapters in one pipeline (--adapters) against the same adapters trained one run after another.

    python bench/multi_adapter.py --mode cpu [--adapters 4] [--steps 30]         # 2 gloo ranks, pp=2, tiny model
    python bench/multi_adapter.py --mode gpu --arch llama3-8b --seq 2048         # one GPU, pp=1, compiled

CPU: the wall time of one launch training K adapters against K launches of one adapter each (same flags, data
cache warm for both), the part of it spent in steps, and the peak resident memory of a rank. GPU: tokens/s summed
over K adapters in one run against one adapter's run (same microbatch and accumulation per adapter), and peak
memory against one run's plus the extra adapters' weights, gradients and AdamW moments.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import (RESULTS, TARGETS, bench_model, long_records, markdown_table, report,  # noqa: E402
                          run_worker)

# K adapters that differ as a sweep's would: rank, targets, learning rate, seed
LORAS = [{"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": TARGETS},
         {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": TARGETS},
         {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
         {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS}]


def write_adapters(folder: str, k: int, mix: str = "mixed") -> list[dict]:
    """K LoRA configs and their adapters.json entries (lr and seed differ too): of LORAS in turn ("mixed"), all
    the first one's shape ("sweep": a learning-rate sweep), or all LORAS[int(mix)]."""
    entries = []
    for i in range(k):
        path = os.path.join(folder, f"lora_{i}.json")
        lora = LORAS[i % len(LORAS)] if mix == "mixed" else LORAS[0] if mix == "sweep" else LORAS[int(mix)]
        with open(path, "w") as fh:
            json.dump(lora, fh)
        entries.append({"name": f"a{i}", "lora_config": path, "learning_rate": 1e-4 * (i + 1), "seed": 10 + i})
    with open(os.path.join(folder, "adapters.json"), "w") as fh:
        json.dump({"adapters": entries}, fh)
    return entries


def launch(flags: list[str], ranks: int, out: str) -> dict:
    """One training launch on `ranks` local ranks (merak-lora's launcher): wall seconds, seconds from the first to
    the last step, and the largest resident memory of a rank (metrics.jsonl's peak_mem_gib: the max over ranks)."""
    argv = [sys.executable, "-m", "merak_lora.launch", "--nproc_per_node", str(ranks),
            os.path.join(ROOT, "launch", "finetune.py"), "--output_dir", out, *flags]
    start = time.time()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"launch failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"train"' in line]
    return {"wall_s": wall, "steps_s": max(r["time"] for r in rows) - min(r["time"] for r in rows),
            "first_step_s": min(r["time"] for r in rows) - start, "rss_gib": max(r["peak_mem_gib"] for r in rows)}


def cpu(args) -> None:
    work = tempfile.mkdtemp(prefix="merak-multi-")
    model = bench_model("tiny")
    entries = write_adapters(work, args.adapters)
    data = os.path.join(ROOT, "data", "sample.json") if args.data == "sample" else \
        long_records(os.path.join(work, "long.jsonl"), 512)
    common = ["--model_path", model, "--data_path", data, "--pp", "2",
              "--seq_length", str(args.seq), "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
              "4", "--max_steps", str(args.steps), "--logging_steps", "1", "--save_steps", str(args.steps),
              "--disable_tqdm", "true", "--report_to", "none", "--data_cache_dir", os.path.join(work, "cache")]
    launch(common + ["--lora_config", entries[0]["lora_config"], "--max_steps", "1"], 2, os.path.join(work, "warm"))
    alone = []
    for e in entries:
        alone.append(launch(common + ["--lora_config", e["lora_config"], "--learning_rate", str(e["learning_rate"]),
                                      "--seed", str(e["seed"])], 2, os.path.join(work, e["name"])))
        print(f"{e['name']} alone: {alone[-1]}", flush=True)
    joint = launch(common + ["--adapters", os.path.join(work, "adapters.json")], 2, os.path.join(work, "joint"))
    print(f"joint: {joint}", flush=True)
    seq_wall, seq_steps = sum(r["wall_s"] for r in alone), sum(r["steps_s"] for r in alone)
    one_rss = max(r["rss_gib"] for r in alone)
    rows = [[f"{len(entries)} runs one after another", f"{seq_wall:.1f}", f"{seq_steps:.1f}",
             f"{sum(r['first_step_s'] for r in alone):.1f}", f"{one_rss:.2f}", "1.00x", "1.00x"],
            [f"one run, --adapters ({len(entries)})", f"{joint['wall_s']:.1f}", f"{joint['steps_s']:.1f}",
             f"{joint['first_step_s']:.1f}", f"{joint['rss_gib']:.2f}", f"{joint['wall_s'] / seq_wall:.2f}x",
             f"{joint['rss_gib'] / one_rss:.2f}x"]]
    table = markdown_table(["run", "wall s", "in steps s", "launch to 1st step s", "peak RSS per rank GiB",
                            "wall vs sequential", "memory vs one run"], rows)
    what = "data/sample.json (rows of varied length)" if args.data == "sample" else "rows all full (no padding)"
    report(f"Several adapters in one pipeline, CPU (2 gloo ranks, pp=2, tiny Llama, {len(entries)} adapters, {what})",
           table, f"Each adapter: {args.steps} steps of 2 microbatch rows x 4 microbatches, sequence {args.seq}; the "
           "adapters differ in rank (4-16), targets, learning rate and seed. Data cache warm for every launch. "
           "\"in steps\": first to last logged step (the pipeline's own time); the rest of the wall time is "
           "start-up (interpreter, imports, rendezvous, stage build), which the joint run pays once.", args.results)


GPU_RUNS = {  # label: (adapters, which LoRA configs)
    "one adapter (r=8, all 7 projections, dropout 0.1)": (1, "0"),
    "one adapter (r=8, all 7 projections, dropout 0)": (1, "3"),
    "4 adapters, a learning-rate sweep (the first's shape, lr and seed differ)": (4, "sweep"),
    "4 adapters, mixed (r 8/16/4/8, targets, dropout 0.1/0.05/0.1/0)": (4, "mixed"),
}


def gpu(args) -> None:
    import torch
    model = bench_model(args.arch, args.model_dir)
    rows, measured = [], {}
    for label, (k, mix) in GPU_RUNS.items():
        r = run_worker(__file__, ["--worker", f"{k}:{mix}", "--model_dir", model, "--seq", str(args.seq), "--steps",
                                  str(args.steps), "--warmup", str(args.warmup), "--mb", str(args.mb)], timeout=1500)
        if r is None:
            rows.append([label, "failed", "-", "-", "-", "-"])
            continue
        measured[mix] = r
        print(f"{label}: tokens/s per measured step {[round(x) for x in r['per_step']]}", flush=True)
        rows.append([label, f"{r['tokens_per_s']:,.0f}", f"{r['peak_gib']:.1f}", f"{r['steady_gib']:.1f}",
                     f"{r['adapter_gib']:.2f}", ""])
        print(" | ".join(map(str, rows[-1])), flush=True)
    one = measured.get("0")
    for row, (label, (k, mix)) in zip(rows, GPU_RUNS.items()):
        many = measured.get(mix)
        if k == 1 or one is None or many is None:
            continue
        # the adapter whose own run holds the most sets the joint run's peak: the mixed set's is dropout 0's
        base = max((measured[m] for m in ("0", "3") if m in measured and (mix == "mixed" or m == "0")),
                   key=lambda r: r["steady_gib"])
        allowed = base["steady_gib"] + many["adapter_gib"] - base["adapter_gib"]
        row[-1] = (f"{many['tokens_per_s'] / one['tokens_per_s']:.2f}x the tokens/s of one adapter; peak in "
                   f"steps {many['steady_gib']:.1f} GiB vs {allowed:.1f} (the hungriest adapter's own run + the "
                   "other adapters' state)")
    table = markdown_table(["run", "tokens/s (sum)", "peak GiB (whole run)", "peak GiB (measured steps)",
                            "adapters' state GiB", "vs one adapter"], rows)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    report(f"Several adapters in one pipeline, one GPU ({name}), {args.arch}, sequence {args.seq}, pp=1, compiled",
           table, f"Microbatch {args.mb} x 4 microbatches per adapter per step, bf16, --compile true, random "
           "weights, rows full (no padding). Adapter state: fp32 weights, gradients and two AdamW moments "
           "(16 bytes per parameter), all adapters of the run summed. \"Peak in measured steps\" is the largest "
           "peak_mem_gib logged after the warm-up (each log line's own window). A compiled layer with a dropout-0 "
           "adapter keeps more activations than with dropout (the compiler saves the projections' inputs that it "
           "otherwise recomputes with the dropout), so a set with such an adapter peaks at that adapter's own "
           "run's memory, not the first's.", args.results)


def worker(args) -> None:
    """One run in this process (pp=1): K=1 with the first LoRA config, or K adapters through --adapters."""
    from merak_lora.finetune import main

    tmp = tempfile.mkdtemp()
    k, mix = int(args.worker.split(":")[0]), args.worker.split(":")[1]
    entries = write_adapters(tmp, k, mix)
    data = long_records(os.path.join(tmp, "long.jsonl"), 64)
    which = ["--lora_config", entries[0]["lora_config"]] if k == 1 else \
        ["--adapters", os.path.join(tmp, "adapters.json")]
    code = main(["--model_path", args.model_dir, "--data_path", data, *which, "--output_dir",
                 os.path.join(tmp, "out"), "--bf16", "true", "--seq_length", str(args.seq), "--pad_to_multiple_of",
                 "64", "--per_device_train_batch_size", str(args.mb), "--gradient_accumulation_steps", "4",
                 "--max_steps", str(args.warmup + args.steps), "--logging_steps", "1", "--save", "false",
                 "--compile", "true", "--disable_tqdm", "true", "--report_to", "none"])
    if code != 0:
        raise SystemExit(f"training failed with exit code {code}")
    rows = [json.loads(line) for line in open(os.path.join(tmp, "out", "metrics.jsonl"))]
    after = [r for r in rows if r["step"] > args.warmup and r["split"] == "train"]
    steps = sorted({r["step"] for r in after})
    per_step = [sum(r["tokens_per_s"] for r in after if r["step"] == s) for s in steps]
    numel = sum(_numel(json.load(open(e["lora_config"])), args.model_dir) for e in entries)
    print("RESULT " + json.dumps({"tokens_per_s": sum(per_step) / len(per_step), "per_step": per_step,
                                  "peak_gib": max(r["peak_mem_gib"] for r in rows),
                                  "steady_gib": max(r["peak_mem_gib"] for r in after),
                                  "adapter_gib": numel * 16 / 2**30}), flush=True)


def _numel(lora: dict, model_dir: str) -> int:
    """An adapter's parameter count on a Llama of this config: r x (in + out) for each targeted linear."""
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(model_dir)
    h, i = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * h // c.num_attention_heads
    sizes = {"q_proj": h + h, "k_proj": h + kv, "v_proj": h + kv, "o_proj": h + h, "gate_proj": h + i,
             "up_proj": h + i, "down_proj": i + h}
    return lora["r"] * c.num_hidden_layers * sum(sizes[t] for t in lora["target_modules"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--data", choices=("sample", "long"), default="sample",
                    help="CPU: the shipped sample data, or rows that all fill --seq (no padding)")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--arch", default="llama3-8b")
    ap.add_argument("--model_dir", default="")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--mb", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    return cpu(args) if args.mode == "cpu" else gpu(args)


if __name__ == "__main__":
    main()
