"""The CUDA 4-bit product for a few rows (merak_lora/four_bit_cuda.py) against bitsandbytes' on a GPU: the error
of each against the codes decoded in float64, and their times at a model's decode shapes (q, k, v joined; o;
gate, up joined; down), timed as CUDA-graph replays over enough copies of the weight to miss the L2 cache.

    python bench/four_bit_cuda.py [--arch llama3-8b|llama3-70b] [--rows 1,8]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import ARCHS, RESULTS, markdown_table, report  # noqa: E402
from bench.decode import copy_bandwidth  # noqa: E402

# the kernel's launches: warps a block, 64-code groups a warp loads at once, blocks a multiprocessor
LAUNCHES = [(16, 4, 2), (8, 8, 2), (8, 4, 2), (8, 4, 4)]


def shapes(arch: str) -> dict[str, tuple[int, int]]:
    """The one-token step's four products (out x in) of a Llama shape in bench.common.ARCHS."""
    c = ARCHS[arch]
    hidden, inter, head = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    return {"q, k, v": ((c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * head, hidden),
            "o": (hidden, hidden), "gate, up": (2 * inter, hidden), "down": (hidden, inter)}


def replay_us(calls, copies: int) -> float:
    """Microseconds per call: `copies` calls (one per weight copy) captured in a graph, replayed 20 times."""
    import torch
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (20 * copies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3-8b", choices=["llama3-8b", "llama3-70b"])
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--results", default=RESULTS)
    a = ap.parse_args()

    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    import torch

    from merak_lora.four_bit_cuda import build, planes

    ext = build()  # a compiler error shows whole here
    torch.manual_seed(0)
    rows_out, notes = [], [f"Device copy: {copy_bandwidth() / 1e12:.2f} TB/s."]
    for (name, (n, k)), m in itertools.product(shapes(a.arch).items(), [int(r) for r in a.rows.split(",")]):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        codes, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        del w
        table = planes(state.code)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        unpacked = torch.stack([codes.view(-1) >> 4, codes.view(-1) & 15], 1).view(n, k).long()
        values = state.code.float().to(torch.bfloat16).double()
        ref = x.double() @ (values[unpacked] * state.absmax.double().repeat_interleave(64).view(n, k)).T
        del unpacked
        errs = {}
        for launch in LAUNCHES:
            ours = ext.rows_product(x, codes, state.absmax, None, n, 64, table, *launch, None, None, 0.0).double()
            errs[launch] = ((ours - ref).norm() / ref.norm()).item()
        theirs = bnb.matmul_4bit(x, codes.t(), quant_state=state).double()
        err_bnb = ((theirs - ref).norm() / ref.norm()).item()
        nbytes = codes.numel() + state.absmax.numel() * 4
        copies = max(1, -(-120_000_000 // nbytes))  # more than twice the 50 MB L2
        many = [codes.clone() for _ in range(copies)]
        bnb_us = replay_us([lambda c=c: bnb.matmul_4bit(x, c.t(), quant_state=state) for c in many], copies)
        timed = {launch: replay_us([lambda c=c, launch=launch: ext.rows_product(
            x, c, state.absmax, None, n, 64, table, *launch, None, None, 0.0) for c in many], copies)
                 for launch in LAUNCHES}
        best = min(timed, key=timed.get)
        rows_out.append([name, f"{n} x {k}", m, f"{bnb_us:.1f}", f"{nbytes / bnb_us / 1e6:.2f}",
                         f"{timed[best]:.1f}", f"{nbytes / timed[best] / 1e6:.2f}", f"{bnb_us / timed[best]:.2f}x",
                         "{} x {} x {}".format(*best), " / ".join(f"{timed[p]:.1f}" for p in LAUNCHES),
                         f"{max(errs.values()):.1e} / {err_bnb:.1e}"])
        print(" | ".join(map(str, rows_out[-1])), flush=True)
        del many
    table = markdown_table(["weight", "N x K", "rows", "bitsandbytes us", "TB/s", "CUDA product us (best)", "TB/s",
                            "speed-up", "warps x groups x blocks, best",
                            "us at " + " / ".join("{} x {} x {}".format(*w) for w in LAUNCHES),
                            "error vs float64 (bf16 outputs): ours / bitsandbytes"], rows_out)
    report(f"The CUDA 4-bit product for a few rows against bitsandbytes', {a.arch} shapes", table, " ".join(notes),
           a.results)


if __name__ == "__main__":
    main()
