"""A 70B Llama-architecture model with LoRA across the GPUs of one machine: merak-lora's pipeline (pp = GPUs,
no checkpointing) against what the tutorials do on several GPUs, `device_map="auto"` with PEFT (one GPU at a
time, gradient checkpointing, microbatch 1). Random weights, drawn on the GPUs.

    python bench/seventy_b.py --arch llama3-70b --gpus 4 --seq 2048 --microbatches 16
    python bench/seventy_b.py --arch tiny --gpus 2 --seq 64 --microbatches 4 --results -     # CPU check
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

from bench.common import (RESULTS, TARGETS, long_records, markdown_table, report, run_worker,  # noqa: E402
                          bench_model)


def baseline(folder: str, gpus: int, seq: int, steps: int) -> dict:
    """device_map="auto": layers spread over the GPUs, run one after the other (accelerate's dispatch)."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from merak_lora.stage import params_on_meta
    cuda = torch.cuda.is_available()
    config = AutoConfig.from_pretrained(folder)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    # an even share of the weights per GPU, plus room for a layer (accelerate fills GPUs in order)
    share = sum(p.numel() * p.element_size() for p in model.parameters()) // gpus // 2**30 + 4
    devices = {i: f"{share}GiB" for i in range(gpus)} if cuda else {"cpu": "64GiB"}
    device_map = infer_auto_device_map(model, max_memory=devices, no_split_module_classes=["LlamaDecoderLayer"])
    for name, p in list(model.named_parameters()):
        owner = next(device_map[k] for k in sorted(device_map, key=len, reverse=True)
                     if name == k or name.startswith(k + ".") or k == "")
        dev = f"cuda:{owner}" if isinstance(owner, int) else owner
        mod = model.get_submodule(name.rsplit(".", 1)[0])
        mod._parameters[name.rsplit(".", 1)[1]] = torch.nn.Parameter(
            torch.randn(p.shape, dtype=p.dtype, device=dev) * 0.02, requires_grad=False)
    model = dispatch_model(model, device_map=device_map)
    model.train()
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    first = "cuda:0" if cuda else "cpu"
    ids = torch.randint(3, 1000, (1, seq), device=first)
    times = []
    for step in range(steps + 1):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t)
    peaks = [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(gpus)] if cuda else [float("nan")]
    return {"tokens_per_s": seq * len(times) / sum(times), "peak_gib": max(peaks), "min_gib": min(peaks)}


def ours(folder: str, gpus: int, seq: int, microbatches: int, steps: int, out: str, compile: bool,
         extra: list[str]) -> dict:
    """torchrun over the GPUs: one pipeline stage per GPU, weights drawn per stage on its own GPU."""
    tmp = tempfile.mkdtemp()
    data = long_records(os.path.join(tmp, "long.jsonl"), 4 * microbatches)
    lora = os.path.join(tmp, "lora.json")
    with open(lora, "w") as fh:
        json.dump({"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": TARGETS}, fh)
    import torch
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
           os.path.join(ROOT, "launch", "finetune.py"), "--model_path", folder, "--random_weights", "true",
           "--data_path", data, "--lora_config", lora, "--output_dir", out, "--pp", str(gpus),
           "--seq_length", str(seq), "--pad_to_multiple_of", "64", "--per_device_train_batch_size", "1",
           "--gradient_accumulation_steps", str(microbatches), "--max_steps", str(steps + 1), "--logging_steps", "1",
           "--save", "false", "--disable_tqdm", "true", "--report_to", "none",
           "--compile", str(compile).lower(), "--bf16", str(torch.cuda.is_available()).lower(), *extra]
    launched = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"merak-lora run failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in rows[1:]) / max(1, len(rows) - 1),
            "peak_gib": max(r["peak_mem_gib"] for r in rows), "first_step_s": rows[0]["time"] - launched}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3-70b")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--microbatches", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--compile", default="false", help="merak-lora's --compile")
    ap.add_argument("--ours_flags", default="", help="more flags for merak-lora's run, e.g. '--fp8 true'")
    ap.add_argument("--baseline", default="true", help="false: merak-lora's row alone (e.g. when the baseline's "
                    "bf16 weights cannot fit)")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    folder = bench_model(a.arch, weights=False)
    if a.worker == "baseline":
        print("RESULT " + json.dumps(baseline(folder, a.gpus, a.seq, a.steps)), flush=True)
        return
    base = run_worker(__file__, ["--worker", "baseline", "--arch", a.arch, "--gpus", str(a.gpus), "--seq",
                                 str(a.seq), "--steps", str(a.steps)], timeout=3000) if a.baseline == "true" else None
    mine = ours(folder, a.gpus, a.seq, a.microbatches, a.steps, tempfile.mkdtemp(), a.compile == "true",
                a.ours_flags.split())
    rows = [['device_map="auto" + PEFT, grad ckpt, microbatch 1',
             "-" if base is None else f"{base['tokens_per_s']:,.0f}",
             "-" if base is None else f"{base['peak_gib']:.1f}", "-", "1.00x"],
            [f"merak-lora pp={a.gpus}, 1f1b, {a.microbatches} microbatches, compile {a.compile}"
             f"{', ' + a.ours_flags if a.ours_flags else ''}",
             f"{mine['tokens_per_s']:,.0f}", f"{mine['peak_gib']:.1f}", f"{mine['first_step_s']:.0f}",
             "-" if base is None else f"{mine['tokens_per_s'] / base['tokens_per_s']:.2f}x"]]
    if base is None:
        rows = rows[1:]
    table = markdown_table(["run", "tokens/s", "peak GiB (max GPU)", "launch to 1st step (s)", "ratio"], rows)
    report(f"{a.arch} across {a.gpus} GPUs: merak-lora pipeline vs device_map=auto", table, "", a.results)


if __name__ == "__main__":
    main()
