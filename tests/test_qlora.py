"""QLoRA: a 2-stage pipeline over a 4-bit (NF4) base gives the loss and LoRA gradients of a one-process PEFT model
quantized the same way by transformers (within 1e-4), and the loss falls as it trains."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("bitsandbytes")

from conftest import LORA_CONFIG, SAMPLE  # noqa: E402
from dist_helper import run_ranks  # noqa: E402
from family_check import LORA, batch  # noqa: E402
from reference import logged, rel  # noqa: E402

QUANT = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
             bnb_4bit_compute_dtype="float32")


def _pipeline(model_dir: str, b):
    from merak_lora.chat import GenConfig
    from merak_lora.finetune import build_stages, make_plan
    from merak_lora.layout import init_distributed
    from merak_lora.lora import adapter_params
    from merak_lora.schedule import Pipeline, TokenLoss

    cfg = GenConfig(model_path=model_dir, pp=2, device="cpu", seed=3, **QUANT)
    plan = make_plan(cfg, 2, LORA)
    layout = init_distributed(2, 1, False, "cpu")
    from merak_lora.finetune import checked_quantization
    stages = build_stages(cfg, plan, layout, checked_quantization(cfg, layout.device))
    kinds = {type(m).__name__ for s in stages for m in s.modules()}
    pipe = Pipeline(stages, layout, "1f1b", 4, TokenLoss(), plan.hidden_size, plan.vocab_size, torch.float32)
    pipe.loss_fn.normalizer = b.targets_count
    loss = pipe.step(b)
    grads = {n: p.grad.detach().clone() for s in stages for n, p in adapter_params(s.model).items()}
    torch.distributed.destroy_process_group()
    return (None if loss is None else loss.item()), grads, kinds


def _reference(model_dir: str, b):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from merak_lora.lora import adapter_params, init_adapter
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, device_map="cpu",
                                                dtype=torch.float32)
    for m in base.modules():  # AVX512-BF16 CPUs would repack the eval-mode base (scales in bf16): not the same math
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    model = get_peft_model(base, LoraConfig(**{**LORA, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj"]}))
    init_adapter(model, 3, False)
    total = 0.0
    for ids, tgt in zip(b.input_ids.chunk(4), b.targets.chunk(4)):
        logits = model(input_ids=ids).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                               reduction="sum") / b.targets_count
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.detach().clone() for n, p in adapter_params(model).items()}


def test_four_bit_pipeline_matches_four_bit_peft(tiny_llama):
    b = batch(tiny_llama)
    results = run_ranks(_pipeline, 2, tiny_llama, b)
    loss = next(r[0] for r in results if r[0] is not None)
    grads = {k: v for r in results for k, v in r[1].items()}
    assert all("Linear4bit" in r[2] for r in results), "the base linears were not quantized"
    ref_loss, ref_grads = _reference(tiny_llama, b)
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    assert max(rel(grads[k], ref_grads[k]) for k in grads) < 1e-4


def _train(cfg) -> None:
    from merak_lora.finetune import run
    run(cfg)


def test_four_bit_training_falls_saves_and_exports(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from merak_lora.config import Config
    from merak_lora.export import export_adapter
    cfg = Config(model_path=tiny_llama, data_path=SAMPLE, lora_config=LORA_CONFIG, output_dir=str(tmp_path / "o"),
                 pp=2, max_steps=30, save_steps=15, logging_steps=5, per_device_train_batch_size=4,
                 gradient_accumulation_steps=2, seq_length=64, learning_rate=5e-3, disable_tqdm=True,
                 report_to="none", device="cpu", optim="paged_adamw_32bit", **QUANT)
    run_ranks(_train, 2, cfg)
    losses = logged(cfg.output_dir)
    assert losses[-1] < losses[0] - 0.5, losses
    # resume continues from the 4-bit run's optimizer state; the export loads on the 16-bit base
    resumed = Config(**{**cfg.__dict__, "max_steps": 32, "resume_peft_from_checkpoint": "latest"})
    run_ranks(_train, 2, resumed)
    adapter = export_adapter(os.path.join(cfg.output_dir, "checkpoint-32"), str(tmp_path / "adapter"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter)
    assert json.load(open(os.path.join(adapter, "adapter_config.json")))["r"] == 8
    assert sum(p.abs().sum() for n, p in model.named_parameters() if "lora_B" in n) > 0


def test_missing_bitsandbytes_is_named_with_the_install_command(tiny_llama, tmp_path, monkeypatch, capsys):
    import sys

    from merak_lora.finetune import main
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    code = main(["--model_path", tiny_llama, "--data_path", SAMPLE, "--output_dir", str(tmp_path / "o"),
                 "--lora_config", LORA_CONFIG, "--load_in_4bit", "true", "--max_steps", "1", "--seq_length", "64"])
    assert code == 2 and "needs bitsandbytes, which is not installed: pip install bitsandbytes" in \
        capsys.readouterr().err
