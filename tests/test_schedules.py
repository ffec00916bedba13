"""Every pipeline schedule trains the same model: interleaved and zero-bubble schedules (several stages per
rank) give the losses and adapter of the one-process reference."""

from __future__ import annotations

import json
import os

import pytest

from dist_helper import run_ranks
from merak_lora.checkpoint import load_adapter_tensors, read_meta
from reference import logged, reference_training, rel
from test_pipeline_equivalence import LORA, _config, _train

STEPS = 3


@pytest.mark.parametrize("schedule", ["gpipe", "interleaved1f1b", "interleaved_zb", "zbv", "dualpipev"])
def test_schedule_matches_reference(tiny_llama, tmp_path, schedule):
    lora_path = tmp_path / "lora.json"
    lora_path.write_text(json.dumps(LORA))
    cfg = _config(tiny_llama, str(tmp_path / "out"), str(lora_path), pp=2, pipeline_schedule=schedule,
                  max_steps=STEPS, save_steps=STEPS)
    run_ranks(_train, 2, cfg)
    meta = read_meta(os.path.join(cfg.output_dir, f"checkpoint-{STEPS}"))
    assert meta["num_stages"] == (2 if schedule == "gpipe" else 4)
    ref_losses, ref_adapters, _ = reference_training(cfg, LORA, 1, STEPS)
    for a, b in zip(logged(cfg.output_dir), ref_losses):
        assert abs(a - b) <= 1e-5 * abs(b)
    got = load_adapter_tensors(os.path.join(cfg.output_dir, f"checkpoint-{STEPS}"), meta)
    assert set(got) == set(ref_adapters[-1])
    worst = max(rel(got[k], v) for k, v in ref_adapters[-1].items())
    assert worst < 1e-5, f"{schedule}: adapter differs by {worst:.2e}"
