"""How fast records become tokens: 100k records, cold (tokenizing) and cached (reading the cache).

    python bench/data_tokenize.py [--records 100000] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RESULTS, markdown_table, report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--results", default=RESULTS, help="markdown file to append to ('-' prints only)")
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from merak_lora.data import DataSpec, prepare
    from merak_lora.tiny import SAMPLE_DATA, make_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = os.path.join(tmp, "tok")
        make_tokenizer().save_pretrained(tok_dir)
        tok = AutoTokenizer.from_pretrained(tok_dir)
        sample = json.load(open(SAMPLE_DATA, encoding="utf-8"))
        path = os.path.join(tmp, "records.jsonl")
        with open(path, "w", encoding="utf-8") as fh:
            for i in range(a.records):
                r = sample[i % len(sample)]
                fh.write(json.dumps({**r, "instruction": f"{r['instruction']} ({i})"}, ensure_ascii=False) + "\n")
        spec = DataSpec(path, seq_length=512)
        rows = []
        for label in ("cold (tokenize + write cache)", "cached (read cache)"):
            t = time.perf_counter()
            data, hit, _ = prepare(spec, tok, os.path.join(tmp, "cache"))
            dt = time.perf_counter() - t
            tokens = sum(len(e.ids) for e in data.examples)
            rows.append([label, f"{a.records:,}", f"{tokens:,}", f"{dt:.2f}", f"{a.records / dt:,.0f}"])
            assert hit == label.startswith("cached")
    table = markdown_table(["pass", "records", "tokens", "seconds", "records/s"], rows)
    report("Tokenization: records/s, cold and cached", table,
           "Chat template rendering and tokenization of every turn happen once on rank 0; other ranks "
           "and restarts read the safetensors cache.", a.results)


if __name__ == "__main__":
    main()
