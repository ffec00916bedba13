"""The one-process reference: plain transformers + PEFT on the whole model, same data, same hyper-parameters.

The pipeline must reproduce its losses, gradients and adapter tensors; only the initial adapter is shared (it
is a function of seed and tensor name, see merak_lora.lora.init_adapter)."""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from merak_lora.config import Config
import numpy as np

from merak_lora.data import IGNORE, Batches, DataSpec, SampleSet, tokenize_records
from merak_lora.lora import adapter_params, init_adapter


def reference_model(cfg: Config, lora: dict):
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    init_adapter(peft_model, cfg.seed, lora.get("init_lora_weights", True))
    return peft_model


def reference_batches(cfg: Config, dp: int) -> Batches:
    tok = AutoTokenizer.from_pretrained(cfg.model_path)
    examples = tokenize_records(DataSpec(cfg.data_path, seq_length=cfg.seq_length), tok).examples
    return Batches(SampleSet(examples, np.arange(len(examples))), cfg.per_device_train_batch_size,
                   cfg.gradient_accumulation_steps, dp, cfg.seed, tok.pad_token_id, cfg.pad_to_multiple_of,
                   cfg.seq_length)


def loss_and_grads(model, batches: Batches, consumed: int, microbatches: int) -> float:
    """Backward of the global token-mean loss of one step (all replicas' microbatches); returns the loss."""
    replicas = [batches.batch(consumed, r) for r in range(batches.dp)]
    normalizer = sum(b.targets_count for b in replicas)
    total = 0.0
    for b in replicas:
        for ids, tgt in zip(b.input_ids.chunk(microbatches), b.targets.chunk(microbatches)):
            logits = model(input_ids=ids).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE,
                                   reduction="sum") / normalizer
            loss.backward()
            total += loss.item()
    return total


def reference_training(cfg: Config, lora: dict, dp: int, steps: int):
    """Losses per step, the adapter (PEFT key names) after each step, and each step's gradient norm before
    clipping."""
    model = reference_model(cfg, lora)
    model.train()
    params = adapter_params(model)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_scheduler_type, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
    batches = reference_batches(cfg, dp)
    losses, adapters, norms = [], [], []
    for step in range(steps):
        losses.append(loss_and_grads(model, batches, step * batches.global_batch, cfg.gradient_accumulation_steps))
        norms.append(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm).item())
        opt.step()
        sched.step()
        opt.zero_grad()
        adapters.append({k: v.detach().clone() for k, v in params.items()})
    return losses, adapters, norms


def logged(output_dir: str, key: str = "loss") -> list[float]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [r[key] for r in rows if r.get("split") == "train"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
