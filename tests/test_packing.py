"""Packed sequences keep attention within each record: across two pipeline stages the packed loss equals the
loss of the same records run one per row."""

from __future__ import annotations

import dataclasses

import torch

from conftest import SAMPLE
from dist_helper import run_ranks


def _losses(model: str, pp: int) -> tuple[float, float, float] | None:
    from transformers import AutoTokenizer

    from merak_lora.config import Config
    import numpy as np

    from merak_lora.data import DataSpec, SampleSet, collate, pack, tokenize_records
    from merak_lora.finetune import build_stages, make_plan
    from merak_lora.layout import init_distributed
    from merak_lora.schedule import Pipeline, TokenLoss

    cfg = Config(model_path=model, pp=pp, device="cpu")
    plan = make_plan(cfg, pp, None)
    layout = init_distributed(pp, 1, False, "cpu")
    stages = build_stages(cfg, plan, layout)
    for s in stages:
        s.eval()
    tok = AutoTokenizer.from_pretrained(model)
    examples = tokenize_records(DataSpec(SAMPLE, seq_length=128), tok).examples
    samples = SampleSet(examples, *pack(np.array([len(e.ids) for e in examples]), np.arange(len(examples)), 128, 0))
    bins = [b for b in (samples[s] for s in range(len(samples))) if len(b) >= 3][:2]
    records = [e for b in bins for e in b]

    def loss(samples, drop_positions=False):
        batch = collate(samples, tok.pad_token_id, 8, 128)
        if drop_positions:
            batch = dataclasses.replace(batch, position_ids=None)
        pipe = Pipeline(stages, layout, "1f1b", len(samples), TokenLoss(), plan.hidden_size,
                        plan.vocab_size, torch.float32)
        out = pipe.evaluate(batch)
        return None if out is None else out.item() / batch.targets_count

    packed = loss(bins)
    unpacked = loss([[e] for e in records])
    leaking = loss(bins, drop_positions=True)  # one causal mask and one position run over the whole row
    torch.distributed.destroy_process_group()
    return None if packed is None else (packed, unpacked, leaking)


def test_packed_loss_equals_unpacked_loss_across_stages(tiny_llama):
    packed, unpacked, leaking = run_ranks(_losses, 2, tiny_llama, 2)[-1]
    assert abs(packed - unpacked) <= 1e-5 * abs(unpacked)
    assert abs(leaking - unpacked) > 1e-4, "without per-record positions attention crosses records"
