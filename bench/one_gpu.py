"""One GPU: merak-lora at pp=1 against the plain transformers + PEFT loop of the fine-tuning tutorials, and the
same loop with Liger kernels (fused RMSNorm, RoPE, SwiGLU, fused linear cross-entropy), same model (random
weights), same sequence length, same LoRA (r=8, alpha=32, dropout 0.1 on q,k,v,o,gate,up,down), bf16, SDPA, in
one run; each as a fraction of the GPU's ceiling for the step (bench/ceiling.py; the FP8 rows, `--fp8 true`,
against the ceiling with the linears in FP8). Each variant runs in its own
process so peak memory is its own.

    python bench/one_gpu.py --arch llama3-8b --seq 2048 [--variants plain,liger_mb2,ours_compile_mb2] [--steps 6]
    python bench/one_gpu.py --arch tiny --seq 128 --results -        # CPU, seconds: only checks it runs

The Liger rows need `liger-kernel` importable (pure Python + Triton; `pip install liger-kernel==0.8.5`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import (RESULTS, TARGETS, flops_per_token, llama_config,  # noqa: E402
                          markdown_table, peak_bf16_tflops, report, run_ours, run_worker, bench_model)

VARIANTS = {  # name: (runner, gradient checkpointing, microbatch, extra flags for merak-lora)
    "plain_gc": ("plain", True, 1, []), "plain_gc_mb4": ("plain", True, 4, []), "plain": ("plain", False, 1, []),
    "liger": ("liger", False, 1, []), "liger_mb2": ("liger", False, 2, []), "liger_mb3": ("liger", False, 3, []),
    "ours": ("ours", False, 1, []), "ours_gc": ("ours", True, 1, []), "ours_gc_mb4": ("ours", True, 4, []),
    "ours_compile": ("ours", False, 1, ["--compile", "true"]),
    "ours_compile_mb2": ("ours", False, 2, ["--compile", "true"]),
    "ours_compile_mb3": ("ours", False, 3, ["--compile", "true"]),
    "ours_compile_gc": ("ours", True, 1, ["--compile", "true"]),
    "ours_compile_gc_mb4": ("ours", True, 4, ["--compile", "true"]),
    "ours_fp8_mb2": ("ours", False, 2, ["--compile", "true", "--fp8", "true"]),
    "ours_fp8_mb3": ("ours", False, 3, ["--compile", "true", "--fp8", "true"]),
    "ours_fp8_mb4": ("ours", False, 4, ["--compile", "true", "--fp8", "true"]),
    "ours_fp8_mb5": ("ours", False, 5, ["--compile", "true", "--fp8", "true"]),
}
# The same runs without merak_lora.fused_lora's kernels (LoRA dropout left to the compiler, the up projection to
# cuBLAS's addmm), without its up projection alone, with one down-projection kernel per target where targets
# share an input (q,k,v; gate,up), with the down projection keeping the MLP's activation for its backward instead
# of computing it again from gate and up (`act_kept`), or on an FP8 base with the SwiGLU's backward left to the
# compiler instead of the down projection's LoRA kernel (`swiglu_apart`); the FP8 runs with cuBLAS's exact
# accumulation, or with the compiler's partitioner recomputing all it may but merak-lora's kernels (less memory,
# for larger microbatches): each one's gain in one call.
VARIANTS.update({f"{name}_{without}": VARIANTS[name] for name in VARIANTS if "--compile" in VARIANTS[name][3]
                 for without in ("compiler_dropout", "addmm_up", "per_target", "act_kept", "swiglu_apart")})
VARIANTS.update({f"{name}_{how}": VARIANTS[name] for name in VARIANTS if name.startswith("ours_fp8_mb")
                 and name.count("_") == 2 for how in ("exact_accum", "recompute")})


def plain_loop(model_dir: str, seq: int, mb: int, gc: bool, steps: int, warmup: int, liger: bool = False) -> dict:
    """The tutorials' loop: AutoModelForCausalLM + get_peft_model, AdamW on the adapter, labels = input ids; with
    `liger`, Liger's kernels patched into transformers' Llama first (as its README shows)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev)
    model.train()  # from_pretrained returns eval mode, where checkpointing and dropout are off; Trainer trains
    if gc:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 1000, (mb, seq), device=dev)
    times = []
    for step in range(warmup + steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t)
    return {"tokens_per_s": mb * seq * len(times) / sum(times),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}


def worker(args) -> None:
    runner, gc, mb, extra = VARIANTS[args.worker]
    if runner in ("plain", "liger"):
        out = plain_loop(args.model_dir, args.seq, mb, gc, args.steps, args.warmup, liger=runner == "liger")
    else:
        from merak_lora import fused_lora
        if args.worker.endswith("_compiler_dropout"):
            fused_lora.usable = lambda x: False
        elif args.worker.endswith("_addmm_up"):
            from merak_lora.lora import added_up_by_cublas
            fused_lora.added_up = added_up_by_cublas
        elif args.worker.endswith("_per_target"):
            from merak_lora import stage
            stage.group_shared_inputs = lambda model: None
        elif args.worker.endswith("_act_kept"):
            from merak_lora import stage
            stage.group_gated_mlps = lambda model: None
        elif args.worker.endswith("_swiglu_apart"):
            from merak_lora import fp8_mlp
            fp8_mlp.serves = lambda *bases: False
        elif args.worker.endswith("_exact_accum"):
            from merak_lora import fp8
            fp8.FAST_ACCUM = False
        elif args.worker.endswith("_recompute"):
            import torch._functorch.config as partitioner
            partitioner.aggressive_recomputation = True
            partitioner.is_non_builtin_to_include = True
        out = run_ours(args.model_dir, args.seq, mb, gc, max(2, args.steps), args.warmup,
                       extra + args.ours_flags.split())
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", default="plain_gc,plain,ours,ours_gc")
    ap.add_argument("--model_dir", default="")
    ap.add_argument("--ours_flags", default="", help="extra flags for merak-lora's runs")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch
    model_dir = bench_model(args.arch, args.model_dir)
    cuda = torch.cuda.is_available()
    peak = peak_bf16_tflops() if cuda else float("nan")
    config = llama_config(args.arch)
    ceilings: dict[int, dict] = {}
    if cuda:
        from bench.ceiling import ceiling
        for mb in sorted({VARIANTS[name][2] for name in args.variants.split(",")}):
            ceilings[mb] = ceiling(config, mb, args.seq)
            print(f"ceiling at microbatch {mb}: bf16 {ceilings[mb]['bf16_tokens_per_s']:,.0f} tokens/s, FP8 "
                  f"linears {ceilings[mb]['fp8_tokens_per_s']:,.0f}", flush=True)
        torch.cuda.empty_cache()  # the variants run in processes of their own: leave them the whole GPU
    rows, measured = [], {}
    for name in args.variants.split(","):
        runner, gc, mb, _ = VARIANTS[name]
        r = run_worker(__file__, ["--worker", name, "--model_dir", model_dir, "--seq", str(args.seq), "--steps",
                                  str(args.steps), "--warmup", str(args.warmup), "--ours_flags", args.ours_flags])
        if r is None:
            rows.append([name, mb, gc, "failed", "-", "-", "-", "-", "-", "-"])
            continue
        measured[name] = r["tokens_per_s"]
        tflops = r["tokens_per_s"] * flops_per_token(config, args.seq) / 1e12
        first = f"{r['first_step_s']:.0f}" if "first_step_s" in r else "-"
        fp8 = "--fp8" in VARIANTS[name][3]
        of_ceiling = (f"{r['tokens_per_s'] / ceilings[mb]['fp8_tokens_per_s' if fp8 else 'bf16_tokens_per_s']:.0%}"
                      f"{' (FP8)' if fp8 else ''}" if mb in ceilings else "-")
        rows.append([name, mb, gc, f"{r['tokens_per_s']:,.0f}", f"{r['peak_gib']:.1f}", f"{tflops:.0f}",
                     f"{100 * tflops / peak:.1f}%" if cuda else "-", of_ceiling, first, ""])
        print(" | ".join(map(str, rows[-1])), flush=True)
    ligers = [n for n in measured if n.startswith("liger")]
    best_liger = max(ligers, key=measured.get) if ligers else None
    for row in rows:
        if row[0] in measured:
            ratios = [f"{measured[row[0]] / measured[b]:.2f}x {b}" for b in ("plain_gc", "plain", best_liger)
                      if b in measured and b != row[0]]
            row[-1] = ", ".join(ratios)
    table = markdown_table(["variant", "microbatch", "grad ckpt", "tokens/s", "peak GiB", "model TFLOP/s",
                            "MFU", "of ceiling", "launch to 1st step (s)", "vs the loops"], rows)
    limits = "; ".join(f"microbatch {mb}: bf16 {c['bf16_tokens_per_s']:,.0f}, FP8 linears "
                       f"{c['fp8_tokens_per_s']:,.0f} tokens/s" for mb, c in ceilings.items())
    report(f"One GPU, {args.arch}, sequence {args.seq}: merak-lora (pp=1) vs transformers + PEFT loop",
           table, f"MFU against the measured bf16 matrix rate of this GPU, {peak:.0f} TFLOP/s; FLOPs "
           f"per token {flops_per_token(config, args.seq) / 1e9:.1f} G (4N + attention + LoRA; frozen "
           "weights have no weight gradient, recomputation not counted). Ceiling (bench/ceiling.py, same run): "
           f"{limits or 'not measured (no GPU)'}.", args.results)


if __name__ == "__main__":
    main()
