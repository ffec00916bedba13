"""QLoRA memory and speed: merak-lora with a 4-bit (NF4, double quantization, paged AdamW) base against the
16-bit base, same model (random weights), same data, one GPU.

    python bench/qlora.py --arch llama3-8b                       # 7B-class: 16-bit and 4-bit
    python bench/qlora.py --arch llama3-70b --only4bit           # 70B-class: 4-bit, random weights drawn on the GPU
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import RESULTS, markdown_table, report, run_ours, run_worker, bench_model  # noqa

FOUR_BIT = ["--load_in_4bit", "true", "--bnb_4bit_quant_type", "nf4", "--bnb_4bit_use_double_quant", "true",
            "--bnb_4bit_compute_dtype", "bfloat16", "--optim", "paged_adamw_32bit"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--gc", default="true", help="gradient checkpointing (as the QLoRA tutorials set it)")
    ap.add_argument("--only4bit", action="store_true")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--model_dir", default="")
    a = ap.parse_args()
    gc = a.gc == "true"
    if a.worker:
        extra = FOUR_BIT if a.worker == "4bit" else []
        if a.arch == "llama3-70b":
            extra = extra + ["--random_weights", "true"]
        out = run_ours(a.model_dir, a.seq, 1, gc, a.steps, a.warmup, extra)
        print("RESULT " + __import__("json").dumps(out), flush=True)
        return
    big = a.arch == "llama3-70b"
    model_dir = bench_model(a.arch, weights=not big)
    rows = []
    for kind in (["4bit"] if a.only4bit else ["16bit", "4bit"]):
        r = run_worker(__file__, ["--worker", kind, "--arch", a.arch, "--model_dir", model_dir, "--seq",
                                  str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup), "--gc", a.gc],
                       timeout=1500)
        rows.append([kind, "random on GPU" if big else "safetensors", gc,
                     "failed" if r is None else f"{r['peak_gib']:.1f}",
                     "-" if r is None else f"{r['tokens_per_s']:,.0f}"])
    table = markdown_table(["base weights", "loaded from", "grad ckpt", "peak GiB (one rank)", "tokens/s"], rows)
    report(f"QLoRA, {a.arch}, sequence {a.seq}, microbatch 1, pp=1", table, "", a.results)


if __name__ == "__main__":
    main()
