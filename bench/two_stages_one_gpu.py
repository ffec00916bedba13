"""Two stages as two processes on ONE GPU, to prove that a pipeline's generation works there (issue 17 allows it
where no two-GPU machine is lent), not to time it: the processes share the GPU's time. NCCL refuses two ranks on one
GPU (layout.check_a_gpu_each stops such a launch), so here the ranks start a gloo group first and the generator's
sends and receives go through host memory.

    python bench/two_stages_one_gpu.py --out DIR [--load_in_4bit true]                  # pp=1: the reference answers
    torchrun --nproc_per_node 2 bench/two_stages_one_gpu.py --out DIR [--load_in_4bit true]   # pp=2, compared

Both decode the same greedy prompts at batch 1 and 8 (LoRA r=8 apart, gen.sh's fastest settings). pp=2 runs a
batch as one group per stage in flight, so pp=1 also decodes the batch of 8 as those two groups of 4: on a GPU a
group can round differently from the whole batch (cuBLAS chooses its kernels by row count), and pp=2's answers are
checked against the groups as well as against the whole batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import TARGETS, bench_model, markdown_table, report  # noqa: E402
from bench.decode import agreement, timed  # noqa: E402


def through_host() -> None:
    """A gloo group whose point-to-point messages may be CUDA tensors: copied to host memory and back."""
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo")
    send, recv, isend = dist.send, dist.recv, dist.isend
    kept = []  # host copies of pending isends

    def host_send(t, dst=None, group=None, **kw):
        return send(t.cpu(), dst=dst, group=group, **kw)

    def host_recv(t, src=None, group=None, **kw):
        h = torch.empty(t.shape, dtype=t.dtype)
        work = recv(h, src=src, group=group, **kw)
        t.copy_(h)
        return work

    def host_isend(t, dst=None, group=None, **kw):
        kept.append(t.cpu())
        return isend(kept[-1], dst=dst, group=group, **kw)
    dist.send, dist.recv, dist.isend = host_send, host_recv, host_isend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3-8b")
    ap.add_argument("--model_dir", default="")
    ap.add_argument("--load_in_4bit", default="true")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--out", required=True, help="folder for pp=1's answers, which the pp=2 run reads")
    ap.add_argument("--results", default="-", help="bench/RESULTS.md to add the pp=2 table there")
    a = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        through_host()

    import torch
    from transformers import AutoTokenizer

    from merak_lora.chat import GenConfig, _pipeline_generator
    from merak_lora.generate import Sampling

    cuda = torch.cuda.is_available()
    model_dir = bench_model(a.arch, a.model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = GenConfig(model_path=model_dir, pp=world, bf16=cuda, compare_base=True,
                    load_in_4bit=cuda and a.load_in_4bit == "true")
    meta = {"lora": {"r": 8, "lora_alpha": 32, "target_modules": TARGETS, "init_lora_weights": False}}
    gen, _, layout = _pipeline_generator(cfg, tok, None, meta, world)
    if layout.rank != 0:
        gen.serve()
        return
    gen.eos_ids = set()  # random weights: every answer runs to --new tokens
    g = torch.Generator().manual_seed(0)
    answers, rates = {}, {}
    for batch in (1, 8):
        prompts = [[min(t, tok.vocab_size - 1) for t in torch.randint(3, 1000, (128 - 8 * (i % 4),),
                                                                        generator=g).tolist()]
                   for i in range(batch)]
        gen.generate(prompts, Sampling(max_new_tokens=a.new))  # warm-up: the step's graph is captured here
        seconds = timed(lambda: answers.__setitem__(str(batch), gen.generate(prompts, Sampling(max_new_tokens=a.new))))
        rates[batch] = batch * a.new / seconds
        if world == 1 and batch == 8:
            answers["8 as 2 groups"] = [row for half in (prompts[:4], prompts[4:])
                                        for row in gen.generate(half, Sampling(max_new_tokens=a.new))]
    if gen.fused_notes:
        print(f"the fused step was not used: {sorted(gen.fused_notes)}")
    gen.close()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"pp{world}.json"), "w") as fh:
        json.dump(answers, fh)
    if world == 1:
        print(f"pp=1 answers written to {a.out}; batch 8 as two groups of 4 against the whole batch: "
              f"{agreement(answers['8 as 2 groups'], answers['8'])}")
        return
    with open(os.path.join(a.out, "pp1.json")) as fh:
        ref = json.load(fh)
    rows = [[batch, f"{rates[batch]:,.0f}", agreement(answers[str(batch)], ref[str(batch)]),
             agreement(answers["8"], ref["8 as 2 groups"]) if batch == 8 else "-"] for batch in (1, 8)]
    report(f"Decode across two stages as two processes on one GPU, {a.arch}"
           f"{', 4-bit base' if cfg.load_in_4bit else ''}",
           markdown_table(["batch", "tokens/s (two processes sharing the GPU: not a speed figure)",
                           f"{a.new} greedy tokens as pp=1's", "as pp=1's, the batch decoded as pp=2's groups"],
                          rows), path=a.results)


if __name__ == "__main__":
    main()
    import torch.distributed as dist
    if dist.is_initialized():  # both ranks, once main returns; left to exit, gloo's threads can abort
        dist.destroy_process_group()
