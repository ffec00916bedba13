"""Resuming on another layout (docs/design.md, "Progress and resuming"): with another data-parallel width,
microbatch count or data, the step count, the learning rate and the data position follow the rule, checked
against the run without interruption; what cannot be placed stops before any weight is read."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import SAMPLE
from dist_helper import run_ranks
from merak_lora.checkpoint import load_adapter_tensors, read_meta
from merak_lora.config import Config
from reference import rel

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("lora") / "lora.json"
    path.write_text(json.dumps(LORA))
    return str(path)


def _cfg(model: str, lora: str, out: str, **kw) -> Config:
    base = dict(model_path=model, data_path=SAMPLE, lora_config=lora, output_dir=out, seq_length=64, pp=2,
                per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=1, logging_steps=1,
                save_steps=10, learning_rate=5e-3, seed=3, disable_tqdm=True, report_to="none", device="cpu",
                data_cache_dir=os.path.join(os.path.dirname(out), "cache"))
    base.update(kw)
    return Config(**base)


def _train(cfg: Config) -> int:
    from merak_lora.finetune import run
    return run(cfg)[0].global_step


def _rows(out: str) -> dict[int, dict]:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return {r["step"]: r for r in map(json.loads, fh) if r["split"] == "train"}


def _continue_from(src: str, step: int, dst: str) -> None:
    os.makedirs(dst)
    shutil.copytree(os.path.join(src, f"checkpoint-{step}"), os.path.join(dst, f"checkpoint-{step}"))
    with open(os.path.join(dst, "latest"), "w") as fh:
        fh.write(f"checkpoint-{step}\n")


def _adapter(out: str, step: int) -> dict:
    ckpt = os.path.join(out, f"checkpoint-{step}")
    return load_adapter_tensors(ckpt, read_meta(ckpt))


@pytest.fixture(scope="module")
def dp1_run(tiny_llama, lora_file, tmp_path_factory):
    """Uninterrupted: pp 2, dp 1, global batch 4: 63 steps over the 253 samples."""
    out = str(tmp_path_factory.mktemp("dp1") / "out")
    assert run_ranks(_train, 2, _cfg(tiny_llama, lora_file, out)) == [63, 63]
    return out


def _expected_lr(step_fraction: float, peak: float = 5e-3, total: int = 63) -> float:
    from transformers import get_scheduler
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return peak * get_scheduler("linear", dummy, num_warmup_steps=0, num_training_steps=total).lr_lambdas[0](
        step_fraction)


def test_more_replicas_continue_at_the_same_sample_with_the_same_learning_rate(tiny_llama, lora_file, tmp_path,
                                                                            dp1_run):
    """dp 1 -> 2 at step 30 of 63: 120 of 252 samples seen, 132 left at 8 a step: 17 steps, the last one half full."""
    out = str(tmp_path / "out")
    _continue_from(dp1_run, 30, out)
    cfg = _cfg(tiny_llama, lora_file, out, resume_peft_from_checkpoint="latest")
    assert run_ranks(_train, 4, cfg) == [47] * 4
    rows, ref = _rows(out), _rows(dp1_run)
    assert sorted(rows) == list(range(31, 48))
    for step, row in rows.items():
        seen = 120 + 8 * (step - 31)                           # samples before this step
        assert row["lr"] == pytest.approx(ref[seen // 4 + 1]["lr"], rel=1e-9)  # the uninterrupted run's, there
    assert rows[47]["epoch"] == pytest.approx(ref[63]["epoch"]) == pytest.approx(252 / 253)
    meta = read_meta(os.path.join(out, "checkpoint-47"))
    assert (meta["run"]["basis_batch"], meta["run"]["global_batch"], meta["run"]["total_samples"]) == (4, 8, 252)


def test_fewer_replicas_continue_at_the_same_sample_with_the_same_learning_rate(tiny_llama, lora_file, tmp_path):
    """dp 2 -> 1 at step 15 of 31 (global batch 8 -> 4): 120 seen, 128 left, 32 steps; the learning rate is
    the schedule at samples seen / 8, as in an uninterrupted run, halfway between its steps."""
    first = str(tmp_path / "dp2")
    assert run_ranks(_train, 4, _cfg(tiny_llama, lora_file, first, max_steps=15, num_train_epochs=1)) == [15] * 4
    # the --max_steps 15 run records a 15-step length; the resume asks for the epoch again
    out = str(tmp_path / "out")
    _continue_from(first, 15, out)
    assert run_ranks(_train, 2, _cfg(tiny_llama, lora_file, out, resume_peft_from_checkpoint="latest")) == [47, 47]
    rows = _rows(out)
    assert sorted(rows) == list(range(16, 48))
    for step, row in rows.items():
        seen = 120 + 4 * (step - 16)
        assert row["lr"] == pytest.approx(_expected_lr(seen / 8, total=31), rel=1e-9)
    assert rows[47]["epoch"] == pytest.approx(248 / 253)


def test_same_global_batch_on_fewer_replicas_gives_the_same_losses(tiny_llama, lora_file, tmp_path):
    """dp 2 x 2 microbatches -> dp 1 x 4 microbatches: the same samples in every step, the same numbers."""
    full = str(tmp_path / "full")
    assert run_ranks(_train, 4, _cfg(tiny_llama, lora_file, full, max_steps=6, save_steps=3)) == [6] * 4
    out = str(tmp_path / "out")
    _continue_from(full, 3, out)
    cfg = _cfg(tiny_llama, lora_file, out, max_steps=6, gradient_accumulation_steps=4,
               resume_peft_from_checkpoint="latest")
    assert run_ranks(_train, 2, cfg) == [6, 6]
    ref, got = _rows(full), _rows(out)
    for step in (4, 5, 6):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5)
        assert got[step]["lr"] == ref[step]["lr"]
    a, b = _adapter(out, 6), _adapter(full, 6)
    assert a.keys() == b.keys() and max(rel(a[k], b[k]) for k in a) < 1e-5


def _main(argv: list[str]) -> int:
    from merak_lora.finetune import main
    return main(argv)


def _argv(cfg: Config) -> list[str]:
    out = []
    for k, v in cfg.to_dict().items():
        if v not in ("", None, []) and k != "input_names":
            out += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


@pytest.mark.parametrize("change,message", [
    ({"data": 200}, "was trained on other data (the data files hold other records; 253 samples then, 200 now)"),
    ({"seed": 4}, "--seed 3 then, 4 now (it orders the data)"),
    ({"packing": True}, "--packing false then, true now"),
])
def test_other_data_stops_before_any_weight_is_read(tiny_llama, lora_file, tmp_path, dp1_run, change, message):
    out = str(tmp_path / "out")
    _continue_from(dp1_run, 30, out)
    data = SAMPLE
    if "data" in change:
        data = str(tmp_path / "fewer.json")
        with open(SAMPLE, encoding="utf-8") as fh:
            json.dump(json.load(fh)[:change["data"]], open(data, "w", encoding="utf-8"), ensure_ascii=False)
    kw = {k: v for k, v in change.items() if k != "data"}
    cfg = _cfg(tiny_llama, lora_file, out, data_path=data, resume_peft_from_checkpoint="latest", **kw)
    assert run_ranks(_main, 2, _argv(cfg)) == [2, 2]
    log = open(os.path.join(out, "logs", "rank_000.log")).read()
    assert message in log and "Pass --ignore_data_skip true" in log
    assert "MiB of base weights" not in log, "weights were read before the refusal"


def test_ignore_data_skip_starts_the_new_data_at_its_first_sample(tiny_llama, lora_file, tmp_path, dp1_run):
    out = str(tmp_path / "out")
    _continue_from(dp1_run, 30, out)
    data = str(tmp_path / "fewer.json")
    with open(SAMPLE, encoding="utf-8") as fh:
        json.dump(json.load(fh)[:200], open(data, "w", encoding="utf-8"), ensure_ascii=False)
    cfg = _cfg(tiny_llama, lora_file, out, data_path=data, resume_peft_from_checkpoint="latest",
               ignore_data_skip=True)
    assert run_ranks(_train, 2, cfg) == [80, 80]     # 30 steps done, then the 200 new samples' 50 steps
    rows = _rows(out)
    assert rows[31]["epoch"] == pytest.approx(4 / 200) and rows[80]["epoch"] == pytest.approx(1.0)


def test_another_seq_length_keeps_the_position(tiny_llama, lora_file, tmp_path, dp1_run):
    """The same records tokenized with a longer --seq_length: the same samples in the same order."""
    out = str(tmp_path / "out")
    _continue_from(dp1_run, 60, out)
    cfg = _cfg(tiny_llama, lora_file, out, seq_length=96, resume_peft_from_checkpoint="latest")
    assert run_ranks(_train, 2, cfg) == [63, 63]
    assert sorted(_rows(out)) == [61, 62, 63]
    log = open(os.path.join(out, "logs", "rank_000.log")).read()
    assert "the same records tokenized differently" in log
