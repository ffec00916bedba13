"""Million-record data sets on this machine: seconds from launch to the first step, records/s, and every rank's
peak memory, for a cold start (tokenizing), a second launch (the cache), and three stages (a middle rank holds
no data).

    python bench/data_scale.py [--records 1500000,10000000] [--ranks 2] [--workdir /tmp/merak-data-scale]
    python bench/data_scale.py --records 1000000 --adapters 2     # several adapters, each its own data set

Records are short mixed Chinese/English alpaca records (about 185 bytes each, like the 1.5 M-record, 280 MB file
of the report that asked for this), written once per size and reused. The model is the tiny Llama of the tests
(its byte-level tokenizer), so the time is the data's, not the model's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RESULTS, markdown_table, report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_records(path: str, count: int, seed: int = 0) -> str:
    if os.path.isfile(path):
        return path
    with open(os.path.join(ROOT, "data", "sample.json"), encoding="utf-8") as fh:
        sample = json.load(fh)
    rng = random.Random(seed)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for i in range(count):
            a = rng.choice(sample)
            answer = " ".join(rng.choice(sample)["output"] for _ in range(4))
            fh.write(json.dumps({"instruction": a["instruction"], "input": a["input"], "output": answer},
                                ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def peak_rss_gib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        return None


def with_bad_line(good: str, path: str, line: int) -> str:
    """A copy of `good` whose line `line` is cut short (invalid JSON)."""
    with open(good, encoding="utf-8") as src, open(path, "w", encoding="utf-8") as dst:
        for n, text in enumerate(src, 1):
            dst.write(text[:-10] + "\n" if n == line else text)
    return path


def adapters_file(workdir: str, count: int, k: int) -> str:
    """An adapters.json of k adapters, each with its own data set of `count` records and learning rate."""
    entries = [{"name": f"a{i}", "data_path": write_records(os.path.join(workdir, f"records-{count}-a{i}.jsonl"),
                                                            count, seed=i + 1),
                "learning_rate": 1e-4 * (i + 1)} for i in range(k)]
    path = os.path.join(workdir, f"adapters-{count}-{k}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"adapters": entries}, fh)
    return path


def launch(model: str, data: str, out: str, cache: str, ranks: int, pp: int, expect: int = 0,
           data_flag: str = "--data_path") -> dict:
    """One training launch to its first step (or to its error, when `expect` is not 0); what it took and each
    rank's peak RSS. `data` is a data file, or with `data_flag` "--adapters" an adapters.json."""
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "merak_lora.launch", "--nproc_per_node", str(ranks),
            os.path.join(ROOT, "launch", "finetune.py"), "--model_path", model, data_flag, data,
            "--lora_config", os.path.join(ROOT, "configs", "lora_config.json"), "--output_dir", out,
            "--data_cache_dir", cache, "--pp", str(pp), "--max_steps", "1", "--save", "false",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", str(max(pp, 2)),
            "--seq_length", "256", "--disable_tqdm", "true", "--report_to", "none"]
    start = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    peaks: dict[int, float] = {}
    while proc.poll() is None:
        for r in range(ranks):
            try:
                with open(os.path.join(out, "logs", f"rank_{r:03d}.pid")) as fh:
                    pid = json.load(fh)["pid"]
            except (OSError, ValueError):
                continue
            value = peak_rss_gib(pid)
            if value is not None:
                peaks[r] = max(peaks.get(r, 0.0), value)
        time.sleep(0.2)
    text = proc.stdout.read()
    if proc.returncode != expect:
        raise SystemExit(f"launch ended with {proc.returncode}, not {expect}:\n{text[-3000:]}")
    if expect:
        error = next(line for line in text.splitlines() if line.startswith("error:"))
        return {"seconds": time.time() - start, "error": error, "peaks": peaks}
    first = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    # one line per data set tokenized (several adapters: one each)
    found = re.findall(r"tokenized [^:\n]*: ([\d,]+) records in (\d+) s \(([\d,]+) records/s[^;\n]*"
                       r"(?:; ([\d,]+) of them from the cache)?\n", text)
    number = lambda x: int(x.replace(",", ""))  # noqa: E731
    records, seconds = sum(number(f[0]) for f in found), sum(float(f[1]) for f in found)
    cached = sum(number(f[3]) for f in found if f[3])
    return {"first_step_s": first["time"] - start, "tokenize_s": seconds if found else None,
            "records": records if found else None,
            "rate": f"{(records - cached) / max(seconds, 1e-9):,.0f}" if found else None,
            "cached": f"{cached:,}" if cached else None, "peaks": peaks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default="1500000,10000000")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join("/tmp", "merak-data-scale"))
    ap.add_argument("--bad_line", type=int, default=1_234_567, help="also time a file with this line broken")
    ap.add_argument("--adapters", type=int, default=1,
                    help="above 1: that many adapters in one run (--adapters), each with its own records")
    ap.add_argument("--results", default=RESULTS, help="markdown file to append to ('-' prints only)")
    a = ap.parse_args()

    from merak_lora.tiny import make_tiny_model
    os.makedirs(a.workdir, exist_ok=True)
    model = os.path.join(a.workdir, "tiny-llama")
    if not os.path.isfile(os.path.join(model, "config.json")):
        make_tiny_model(model, "llama", num_layers=4)
    rows, notes = [], []
    for count in (int(x) for x in a.records.split(",")):
        if a.adapters > 1:
            data = adapters_file(a.workdir, count, a.adapters)
            mb = sum(os.path.getsize(e["data_path"]) for e in json.load(open(data))["adapters"]) / 2**20
        else:
            data = write_records(os.path.join(a.workdir, f"records-{count}.jsonl"), count)
            mb = os.path.getsize(data) / 2**20
        cache = os.path.join(a.workdir, f"cache-{count}-{a.adapters}")
        shutil.rmtree(cache, ignore_errors=True)
        out = os.path.join(a.workdir, "out")
        for label, ranks, pp in (("cold: tokenize", a.ranks, a.ranks), ("second launch: cache", a.ranks, a.ranks),
                                 ("cache, 3 stages", 3, 3)):
            r = launch(model, data, out, cache, ranks, pp, data_flag="--adapters" if a.adapters > 1 else "--data_path")
            rate = r["rate"] if r["tokenize_s"] is not None and not r["cached"] else "(cached)"
            peaks = " / ".join(f"{r['peaks'].get(i, float('nan')):.2f}" for i in range(ranks))
            size = f"{count:,} ({mb:,.0f} MB)" if a.adapters == 1 else f"{a.adapters} x {count:,} ({mb:,.0f} MB)"
            rows.append([size, label, ranks, f"{r['first_step_s']:.0f}",
                         r["tokenize_s"] if r["tokenize_s"] is not None else "-", rate, peaks])
            print(" | ".join(map(str, rows[-1])), flush=True)
        # once, on the first size that has the line (one data set)
        if a.bad_line and a.bad_line <= count and not notes and a.adapters == 1:
            # a malformed record deep in the file: the error after one pass, then the relaunch after the fix
            bad = with_bad_line(data, os.path.join(a.workdir, "bad.jsonl"), a.bad_line)
            bad_cache = os.path.join(a.workdir, "cache-bad")
            shutil.rmtree(bad_cache, ignore_errors=True)
            r = launch(model, bad, out, bad_cache, a.ranks, a.ranks, expect=2)
            rows.append([f"{count:,} ({mb:,.0f} MB)", f"bad record at line {a.bad_line:,}", a.ranks,
                         f"{r['seconds']:.0f} (to the error)", "-", "-", "-"])
            print(" | ".join(map(str, rows[-1])), "|", r["error"], flush=True)
            notes.append(f"The bad record's message: `{r['error']}`")
            shutil.copyfile(data, bad)  # fixed
            r = launch(model, bad, out, bad_cache, a.ranks, a.ranks)
            rows.append([f"{count:,} ({mb:,.0f} MB)", f"after the fix ({r['cached'] or 0} records cached)", a.ranks,
                         f"{r['first_step_s']:.0f}", r["tokenize_s"], "-", "-"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    table = markdown_table(["records", "launch", "ranks", "launch -> first step (s)", "tokenizing (s)",
                            "records/s", "peak RSS per rank (GiB)"], rows)
    title = "Data at scale: launch to the first step, 2 CPU cores" + \
        (f", {a.adapters} adapters in one run, each with its own records" if a.adapters > 1 else "")
    report(title, table,
           "Every rank tokenizes its share of 10,000-line pieces into the cache (one shard per piece, memory-mapped "
           "when read); rank 0 shows the whole job's progress. The 3-stage row's middle rank holds no data: its "
           "RSS is the model's and the runtime's only.\n\n" + "\n".join(notes), a.results)


if __name__ == "__main__":
    main()
