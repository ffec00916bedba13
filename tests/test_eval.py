"""--eval_ratio holds records out; the eval loss logged every --eval_steps is the one-process loss of the
current adapter on exactly those records."""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from conftest import LORA_CONFIG, SAMPLE
from dist_helper import run_ranks
from merak_lora.config import Config


def _train(cfg: Config) -> None:
    from merak_lora.finetune import run
    run(cfg)


def test_eval_loss_matches_one_process_on_the_held_out_records(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merak_lora.data import IGNORE, DataSpec, collate, split_eval, tokenize_records
    from merak_lora.export import export_adapter

    cfg = Config(model_path=tiny_llama, data_path=SAMPLE, lora_config=LORA_CONFIG, output_dir=str(tmp_path / "o"),
                 pp=2, eval_ratio=0.05, eval_steps=2, max_steps=4, save_steps=4, logging_steps=2,
                 per_device_train_batch_size=2, gradient_accumulation_steps=2, seq_length=128, learning_rate=5e-3,
                 disable_tqdm=True, device="cpu")
    run_ranks(_train, 2, cfg)
    rows = [json.loads(l) for l in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(cfg.output_dir, "runs"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    examples = tokenize_records(DataSpec(SAMPLE, seq_length=128), tok).examples
    _, held_idx = split_eval(len(examples), 0.05, cfg.seed)
    held = [examples[i] for i in held_idx]
    assert len(held) == 12
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                      export_adapter(os.path.join(cfg.output_dir, "checkpoint-4"),
                                                     str(tmp_path / "adapter"))).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in held:
            b = collate([[ex]], tok.pad_token_id, 1, 128)
            logits = model(input_ids=b.input_ids).logits.float()
            total += F.cross_entropy(logits[0], b.targets[0], ignore_index=IGNORE, reduction="sum").item()
            count += b.targets_count
    assert abs(evals[-1]["loss"] - total / count) <= 1e-5 * total / count
