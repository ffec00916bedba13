"""Decode speed: merak-lora's pipeline generation (prefill, then a token at a time, each stage with its own KV cache)
against transformers' generate() on the same model, greedy, same prompts.

    python bench/decode.py --arch llama3-8b [--batch 8 --prompt_len 128 --new 128]
    torchrun --nproc_per_node 2 bench/decode.py --arch llama3-8b --pp 2      # stages on 2 GPUs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import RESULTS, markdown_table, report, write_random_model  # noqa: E402


def timed(fn) -> float:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def show_profile(fn, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    print(f"===== {label}")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=55))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3-8b")
    ap.add_argument("--model_dir", default="")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--profile", action="store_true", help="print where 16 decode steps of each spend time")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merak_lora.chat import GenConfig, _pipeline_generator
    from merak_lora.generate import Sampling, left_pad
    from merak_lora.layout import env_ranks

    rank, world, _ = env_ranks()
    model_dir = a.model_dir or write_random_model(os.path.join(tempfile.gettempdir(), "merak-bench", a.arch), a.arch)
    tok = AutoTokenizer.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (a.prompt_len - 8 * (i % 4),), generator=g).tolist() for i in range(a.batch)]
    bf16 = torch.cuda.is_available()
    cfg = GenConfig(model_path=model_dir, pp=a.pp, bf16=bf16)
    gen, _, layout = _pipeline_generator(cfg, tok, None, None, world)
    if layout.rank != 0:
        gen.serve()
        return
    gen.eos_ids = set()  # random weights: never stop early, both sides generate exactly --new tokens
    # warm-up over the whole length: cuDNN builds an attention plan per new key length, once per process
    gen.generate(prompts, Sampling(max_new_tokens=a.new))
    ours_s = timed(lambda: gen.generate(prompts, Sampling(max_new_tokens=a.new)))
    if a.profile:
        show_profile(lambda: gen.generate(prompts, Sampling(max_new_tokens=16)), "merak-lora pipeline")
    gen.close()
    rows = [[f"merak-lora pipeline, pp={a.pp}", a.batch, a.new, f"{ours_s:.2f}", f"{a.batch * a.new / ours_s:,.0f}"]]
    if a.pp == 1:
        del gen
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
        model = model.to(device).eval()
        ids, mask = left_pad(prompts, tok.pad_token_id, device)
        run = lambda n: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,  # noqa
                                       do_sample=False, pad_token_id=tok.pad_token_id)
        run(a.new)  # the same full-length warm-up
        hf_s = timed(lambda: run(a.new))
        if a.profile:
            show_profile(lambda: run(16), "transformers generate()")
        rows.append(["transformers generate(), one process", a.batch, a.new, f"{hf_s:.2f}",
                     f"{a.batch * a.new / hf_s:,.0f}"])
    table = markdown_table(["generator", "batch", "new tokens", "seconds", "decode tokens/s"], rows)
    report(f"Decode, {a.arch}, prompts of ~{a.prompt_len} tokens, greedy", table, "", a.results)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
