"""FP8 against bf16 on the loss: the same model, data, seed and steps trained twice (`--fp8 false` / `true`),
every logged loss compared. A GPU with FP8 units (Hopper, Ada) only: the CPU refuses `--fp8 true`.

    python bench/fp8_curve.py --arch llama3-8b --seq 2048 --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import TARGETS, markdown_table, report, RESULTS, run_worker, bench_model  # noqa: E402


def varied_records(path: str, n: int, words: int = 1200) -> str:
    """Alpaca records cut from the sample texts at different offsets, so the adapter learns a distribution
    (the loss falls slowly and stays far from zero) rather than one memorized passage."""
    from merak_lora.tiny import sample_texts
    text = " ".join(sample_texts()).split()
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            start = (i * 97) % max(1, len(text) - words)
            body = " ".join((text * 2)[start:start + words])
            fh.write(json.dumps({"instruction": f"Continue passage {i}.", "input": "", "output": body},
                                ensure_ascii=False) + "\n")
    return path


def worker(args) -> None:
    from merak_lora.finetune import main
    tmp = tempfile.mkdtemp()
    data = varied_records(os.path.join(tmp, "varied.jsonl"), 256)
    lora = os.path.join(tmp, "lora.json")
    with open(lora, "w") as fh:
        json.dump({"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": TARGETS}, fh)
    out = os.path.join(tmp, "out")
    code = main(["--model_path", args.model_dir, "--data_path", data, "--lora_config", lora, "--output_dir", out,
                 "--bf16", "true", "--seq_length", str(args.seq), "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "1", "--max_steps", str(args.steps), "--learning_rate", "2e-4",
                 "--logging_steps", "10", "--save", "false", "--disable_tqdm", "true", "--report_to", "none",
                 "--seed", "7", "--compile", "true", "--fp8", args.worker])
    if code != 0:
        raise SystemExit(f"training failed with exit code {code}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    print("RESULT " + json.dumps({"losses": {r["step"]: r["loss"] for r in rows if "loss" in r},
                                  "peak_gib": max(r["peak_mem_gib"] for r in rows),
                                  "tokens_per_s": sum(r["tokens_per_s"] for r in rows[1:]) / max(1, len(rows) - 1)}),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--model_dir", default="")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    model_dir = bench_model(args.arch, args.model_dir)
    runs = {}
    for fp8 in ("false", "true"):
        r = run_worker(__file__, ["--worker", fp8, "--model_dir", model_dir, "--seq", str(args.seq), "--steps",
                                  str(args.steps)], timeout=1800)
        if r is None:
            raise SystemExit(f"the --fp8 {fp8} run failed")
        runs[fp8] = r
    bf16, f8 = runs["false"]["losses"], runs["true"]["losses"]
    rows, worst = [], 0.0
    for step in sorted(bf16, key=int):
        rel = abs(f8[step] - bf16[step]) / abs(bf16[step])
        worst = max(worst, rel)
        rows.append([step, f"{bf16[step]:.4f}", f"{f8[step]:.4f}", f"{rel:.2%}"])
    print(markdown_table(["step", "bf16 loss", "FP8 loss", "difference"], rows), flush=True)
    summary = [["bf16", f"{runs['false']['tokens_per_s']:,.0f}", f"{runs['false']['peak_gib']:.1f}"],
               ["FP8", f"{runs['true']['tokens_per_s']:,.0f}", f"{runs['true']['peak_gib']:.1f}"]]
    report(f"FP8 against bf16 on the loss, {args.arch}, sequence {args.seq}, {args.steps} steps",
           markdown_table(["step", "bf16 loss", "FP8 loss", "difference"], rows) + "\n\n"
           + markdown_table(["run", "tokens/s", "peak GiB"], summary),
           f"Largest difference at a logged step: {worst:.2%} (target: under 1%). Same model (random weights), "
           "data (256 records cut from the sample texts), seed 7, microbatch 2, lr 2e-4, --compile true.",
           args.results)


if __name__ == "__main__":
    main()
