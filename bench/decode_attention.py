"""The fused step's attention (merak_lora/decode_kernels.py `decode_attention`) over a cache filled to its length,
one program a head against the cache split among programs (`attention_splits`), at a model's decode shapes: one
query per row, LoRA on q, k, v and o, timed as CUDA-graph replays over enough cache copies to miss the L2 cache;
each split's largest difference to the whole. On a CUDA device.

    python bench/decode_attention.py [--arch llama3-8b] [--rows 1,8] [--slots 256,1024,4096,16384]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import ARCHS, RESULTS, markdown_table, report  # noqa: E402
from bench.four_bit_cuda import replay_us  # noqa: E402

SPLITS = (1, 2, 4, 8, 16, 32)
RANK = 8


def inputs(rows: int, slots: int, heads: int, kv_heads: int, d: int) -> dict:
    """One token's joined q, k, v product with LoRA, its rotary tables, an all-seen bias and o's LoRA A."""
    import torch
    width = (heads + 2 * kv_heads) * d
    angle = torch.rand(rows, d, device="cuda") * 6
    return dict(y=torch.randn(rows, width, device="cuda").to(torch.bfloat16),
                qkv_lora=(torch.randn(rows, 1, RANK, device="cuda"),
                          (torch.randn(width, RANK, device="cuda") * 0.1).to(torch.bfloat16), 0.5),
                cos=angle.cos().to(torch.bfloat16), sin=angle.sin().to(torch.bfloat16),
                bias=torch.zeros(rows, slots, device="cuda", dtype=torch.bfloat16),
                a_o=(torch.randn(RANK, heads * d, device="cuda") * 0.05).to(torch.bfloat16))


def attend(x: dict, keys, values, pos, shares, heads: int, kv_heads: int):
    """The kernel once: (attention output, o's LoRA partials)."""
    import torch

    from merak_lora.decode_kernels import decode_attention
    rows, d = x["y"].shape[0], keys.shape[-1]
    out = torch.empty(rows, heads * d, device="cuda", dtype=torch.bfloat16)
    t_o = torch.empty(rows, heads, RANK, device="cuda")
    decode_attention(x["y"], x["qkv_lora"], x["cos"], x["sin"], keys, values, pos, x["bias"], d ** -0.5, out,
                     heads, kv_heads, a_o=x["a_o"], t_o=t_o, shares=shares)
    return out, t_o


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3-8b", choices=["llama3-8b", "llama3-70b"])
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--slots", default="256,1024,2048,4096,8192,16384")
    ap.add_argument("--results", default=RESULTS)
    a = ap.parse_args()

    import torch

    from merak_lora.decode_kernels import SLOTS_A_SHARE, attention_shares, attention_splits
    c = ARCHS[a.arch]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    d = c["hidden_size"] // heads
    torch.manual_seed(0)
    table = []
    for rows in (int(r) for r in a.rows.split(",")):
        for slots in (int(s) for s in a.slots.split(",")):
            x = inputs(rows, slots, heads, kv_heads, d)
            keys, values = (torch.randn(rows, kv_heads, slots, d, device="cuda").to(torch.bfloat16) for _ in "kv")
            pos = torch.tensor(slots - 1, device="cuda")  # the cache full: this token takes its last slot
            nbytes = 2 * keys.numel() * keys.element_size()
            copies = max(1, math.ceil(150e6 / nbytes))  # past the L2 (50 MB on an H100)
            caches = [(keys.clone(), values.clone()) for _ in range(copies)]
            whole = attend(x, keys.clone(), values.clone(), pos, None, heads, kv_heads)
            chosen = attention_splits(rows, heads, slots, torch.device("cuda"))
            timed, diffs = {}, {}
            for splits in (s for s in SPLITS if s == 1 or s * SLOTS_A_SHARE <= slots):
                shares = attention_shares(rows, heads, splits, d, torch.device("cuda"))
                got = attend(x, keys.clone(), values.clone(), pos, shares, heads, kv_heads)
                diffs[splits] = max((g.float() - w.float()).abs().max().item() for g, w in zip(got, whole))
                timed[splits] = replay_us([lambda kv=kv, s=shares: attend(x, *kv, pos, s, heads, kv_heads)
                                           for kv in caches], copies)
                if shares is not None and shares[1].any():
                    raise SystemExit(f"{splits} shares left their count set after {20 * copies} launches")
            table.append([rows, slots, f"{nbytes / 1e6:.1f}", f"{timed[1]:.1f}", chosen, f"{timed[chosen]:.1f}",
                          f"{timed[1] / timed[chosen]:.2f}x", " / ".join(f"{timed[s]:.1f}" for s in timed),
                          f"{max(diffs.values()):.0e}"])
            print(" | ".join(map(str, table[-1])), flush=True)
            del caches
            torch.cuda.empty_cache()
    report(f"The fused step's attention, whole against split, {a.arch} shapes",
           markdown_table(["rows", "cache slots", "k, v MB a layer", "one program a head, us", "shares chosen",
                           "chosen, us", "speed-up", "us at " + " / ".join(map(str, SPLITS)) + " shares",
                           "largest difference to whole"], table),
           "Microseconds a call: CUDA-graph replays of one call per cache copy, copies past the L2.", a.results)


if __name__ == "__main__":
    main()
