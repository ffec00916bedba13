"""Data at users' scale, shown small: every rank tokenizes its share of the pieces into one cache that equals
one process's tokens; tokenizing is not under the collective deadline; a bad record deep in a large file is named
by file and line and, once fixed, only its piece is tokenized again; middle stages hold no data. The speed at
1.5 M and 10 M records is measured in bench/data_scale.py."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest

from conftest import LORA_CONFIG, ROOT, SAMPLE
from dist_helper import run_ranks

ENV = {**os.environ, "PYTHON": sys.executable, "CPU_RANKS_PER_NODE": "2", "OMP_NUM_THREADS": "1"}


def write_records(path: str, count: int, bad_line: int = 0) -> str:
    """`count` short mixed Chinese/English alpaca records, one per line (line `bad_line` is broken JSON)."""
    with open(SAMPLE, encoding="utf-8") as fh:
        sample = json.load(fh)
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(1, count + 1):
            a, b = rng.choice(sample), rng.choice(sample)
            line = json.dumps({"instruction": a["instruction"], "input": a["input"],
                               "output": f"{a['output']} {b['output']}"}, ensure_ascii=False)
            fh.write((line[:-5] if i == bad_line else line) + "\n")
    return path


def _prepare(model: str, path: str, cache: str, per_piece: int) -> tuple[list[int], int, str]:
    """On each rank: prepare the data set; returns the pieces this rank tokenized, the example count, and the
    manifest's token fingerprint."""
    from transformers import AutoTokenizer

    import merak_lora.data.prepare as prep
    from merak_lora.config import ConfigError
    from merak_lora.data import DataSpec
    from merak_lora.layout import init_distributed

    mine: list[int] = []
    encode = prep.encode_piece

    def counting(piece, *args, **kw):
        mine.append(piece.first_line)
        return encode(piece, *args, **kw)

    prep.encode_piece = counting
    layout = init_distributed(int(os.environ["WORLD_SIZE"]), 1, False, "cpu")
    try:
        m = prep.prepare(DataSpec(path, seq_length=128), AutoTokenizer.from_pretrained(model), cache, layout.coord,
                         progress=False, lines_per_piece=per_piece)
        result = (mine, m.examples, m.tokens)
    except ConfigError as e:
        result = (mine, -1, str(e))
    layout.coord.leave()  # rank 0 hosts the store: it waits until every rank is done with it
    return result


def test_every_rank_tokenizes_its_share_into_one_process_s_tokens(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from merak_lora.data import DataSpec, TokenStore, tokenize_records
    from merak_lora.data.store import read_manifest
    path = write_records(str(tmp_path / "d.jsonl"), 6000)
    results = run_ranks(_prepare, 2, tiny_llama, path, str(tmp_path / "cache"), 1000)
    assert all(r[0] for r in results), "a rank tokenized nothing"
    assert sorted(line for r in results for line in r[0]) == [1 + 1000 * i for i in range(6)]
    manifest = read_manifest(next(os.path.join(tmp_path, "cache", f) for f in os.listdir(tmp_path / "cache")
                                  if f.startswith("dataset-")), str(tmp_path / "cache"))
    store = TokenStore(manifest)
    want = tokenize_records(DataSpec(path, seq_length=128), AutoTokenizer.from_pretrained(tiny_llama)).examples
    assert len(store) == len(want) == 6000
    for i in (0, 999, 1000, 3456, 5999):
        assert list(store[i].ids) == list(want[i].ids) and [bool(t) for t in store[i].trained] == want[i].trained
    again = run_ranks(_prepare, 2, tiny_llama, path, str(tmp_path / "cache"), 1000)
    assert [r[0] for r in again] == [[], []] and again[0][2] == results[0][2]   # all from the cache


def test_a_bad_record_is_named_and_only_its_piece_is_tokenized_again(tiny_llama, tmp_path):
    path = write_records(str(tmp_path / "d.jsonl"), 6000, bad_line=4321)
    first = run_ranks(_prepare, 2, tiny_llama, path, str(tmp_path / "cache"), 1000)
    assert first[0][1] == first[1][1] == -1
    message = first[0][2]
    assert "d.jsonl: invalid JSON at line 4321" in message and "--skip_bad_records true" in message
    write_records(path, 6000)  # fixed
    second = run_ranks(_prepare, 2, tiny_llama, path, str(tmp_path / "cache"), 1000)
    assert sorted(line for r in second for line in r[0]) == [4001], "only the fixed piece is tokenized again"
    assert second[0][1] == 6000


def test_tokenizing_is_not_under_the_collective_deadline(tiny_llama, tmp_path):
    """100 k records take longer to tokenize on two ranks than --dist_timeout 2 allows a collective to wait."""
    path = write_records(str(tmp_path / "d.jsonl"), 100_000)
    out = str(tmp_path / "out")
    proc = subprocess.run(["bash", os.path.join(ROOT, "slurm", "run.sh"), "--model_path", tiny_llama,
                           "--data_path", path, "--lora_config", LORA_CONFIG, "--output_dir", out, "--max_steps", "2",
                           "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                           "--seq_length", "128", "--dist_timeout", "2", "--report_to", "none"],
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    seconds = float(re.search(r"tokenized data: 100,000 records in (\d+) s", proc.stdout).group(1))
    assert seconds > 2, "tokenizing was too quick to prove anything"
    assert os.path.isdir(os.path.join(out, "checkpoint-2"))


def _holds(model: str, cache: str) -> bool:
    from transformers import AutoTokenizer

    from merak_lora.config import Config
    from merak_lora.data.dataset import load
    from merak_lora.layout import init_distributed
    cfg = Config(model_path=model, data_path=SAMPLE, data_cache_dir=cache, seq_length=128, disable_tqdm=True)
    layout = init_distributed(3, 1, False, "cpu")
    data = load(cfg, AutoTokenizer.from_pretrained(model), layout)
    layout.coord.leave()
    return (data.train is not None, data.samples)


def test_a_middle_stage_holds_no_data(tiny_llama, tmp_path):
    assert run_ranks(_holds, 3, tiny_llama, str(tmp_path / "cache")) == [(True, 253), (False, 253), (True, 253)]


def _losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [r["loss"] for r in map(json.loads, fh) if r["split"] == "train"]


def _train(cfg) -> int:
    from merak_lora.finetune import run
    return run(cfg)[0].global_step


@pytest.mark.parametrize("packing", [False, True])
def test_three_stages_train_like_one_with_the_middle_fed_shapes_only(tiny_llama, tmp_path, packing):
    from merak_lora.config import Config
    lora = tmp_path / "lora.json"
    lora.write_text(json.dumps({"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}))

    def cfg(out: str, pp: int) -> Config:
        return Config(model_path=tiny_llama, data_path=SAMPLE, lora_config=str(lora), output_dir=out, pp=pp,
                      max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=3, seq_length=128,
                      packing=packing, logging_steps=1, learning_rate=5e-3, disable_tqdm=True, report_to="none",
                      device="cpu", data_cache_dir=str(tmp_path / "cache"))
    assert run_ranks(_train, 3, cfg(str(tmp_path / "pp3"), 3)) == [3, 3, 3]
    assert _train(cfg(str(tmp_path / "pp1"), 1)) == 3
    assert _losses(str(tmp_path / "pp3")) == pytest.approx(_losses(str(tmp_path / "pp1")), rel=1e-5)
