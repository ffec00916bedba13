"""Each rank builds only its own stage: the model starts on the meta device and only the stage's tensors are
read from the safetensors files."""

from __future__ import annotations

import re

import pytest
import torch

from merak_lora.finetune import make_plan
from merak_lora.config import Config
from merak_lora.stage import build_stage
from merak_lora.weights import WeightIndex
from conftest import LORA_CONFIG
from merak_lora.lora import read_lora_config


def _stage_keys(keys, start, stop, first, last, tied):
    want = set()
    for k in keys:
        m = re.match(r"model\.layers\.(\d+)\.", k)
        if m:
            if start <= int(m.group(1)) < stop:
                want.add(k)
        elif k == "model.embed_tokens.weight":
            if first or (last and tied):
                want.add(k)
        elif last:
            want.add(k)
    return want


@pytest.mark.parametrize("fixture,tied", [("tiny_llama", False), ("tiny_tied", True)])
def test_each_stage_reads_only_its_own_tensors(request, fixture, tied):
    model = request.getfixturevalue(fixture)
    cfg = Config(model_path=model, data_path="unused", lora_config=LORA_CONFIG)
    plan = make_plan(cfg, 4, read_lora_config(LORA_CONFIG))
    all_keys = WeightIndex(model).keys()
    total = WeightIndex(model).total_bytes()
    read_bytes = 0
    for spec in plan.specs:
        index = WeightIndex(model)  # a fresh index per stage, as each rank has its own
        stage = build_stage(spec, plan.model_config, index, device=torch.device("cpu"), dtype=torch.float32,
                            lora_config=plan.lora_cfg)
        want = _stage_keys(all_keys, spec.start, spec.stop, spec.is_first, spec.is_last, tied)
        assert set(index.report.keys) == want
        assert len(index.report.keys) == len(want), "a tensor was read twice"
        read_bytes += index.report.bytes
        # nothing the stage does not own is materialised: every real parameter is its own or LoRA
        names = {n for n, p in stage.named_parameters()}
        assert all(p.device.type == "cpu" for p in stage.parameters())
        assert not any(f"layers.{i}." in n for n in names for i in range(4) if not spec.start <= i < spec.stop)
        assert index.report.bytes < 0.6 * total
    # together the stages read the model once (plus the tied embedding a second time for the head)
    embed = 1024 * 64 * 4
    assert read_bytes == total + (embed if tied else 0)
