"""The pipeline trains the same model as one process: losses, gradient norms and LoRA tensors after every
optimizer step match plain transformers + PEFT (fp32, gloo, CPU) within 1e-5 relative."""

from __future__ import annotations

import os

import pytest

from dist_helper import run_ranks
from merak_lora.checkpoint import load_adapter_tensors, read_meta
from merak_lora.config import Config
from reference import logged, reference_training, rel
from conftest import SAMPLE

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "task_type": "CAUSAL_LM", "init_lora_weights": False,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
STEPS = 4


def _train(cfg: Config) -> None:
    from merak_lora.finetune import run
    run(cfg)


def _config(model: str, out: str, lora_path: str, **kw) -> Config:
    base = dict(model_path=model, data_path=SAMPLE, lora_config=lora_path, output_dir=out, seq_length=128,
                per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=STEPS, logging_steps=1,
                save_steps=1, learning_rate=1e-2, warmup_steps=1, max_grad_norm=1.0, seed=7, disable_tqdm=True,
                report_to="none", device="cpu")
    base.update(kw)
    return Config(**base)


@pytest.mark.parametrize("model_fixture,pp,dp", [
    ("tiny_llama", 1, 1), ("tiny_llama", 1, 2), ("tiny_llama", 2, 1), ("tiny_llama", 4, 1), ("tiny_tied", 2, 1),
    ("tiny_tied", 4, 1), ("tiny_llama", 2, 2),
])
def test_pipeline_matches_one_process_peft(request, tmp_path, model_fixture, pp, dp):
    model = request.getfixturevalue(model_fixture)
    lora_path = tmp_path / "lora.json"
    lora_path.write_text(__import__("json").dumps(LORA))
    cfg = _config(model, str(tmp_path / "out"), str(lora_path), pp=pp)
    run_ranks(_train, pp * dp, cfg)

    ref_losses, ref_adapters, ref_norms = reference_training(cfg, LORA, dp, STEPS)
    losses = logged(cfg.output_dir)
    assert len(losses) == STEPS
    for step, (a, b) in enumerate(zip(losses, ref_losses), 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: pipeline loss {a} vs reference {b}"
    # the norm that clipping divides by: every step clips here (norms ~10 against max_grad_norm 1), and AdamW
    # would not show a constant factor's error in it
    for step, (a, b) in enumerate(zip(logged(cfg.output_dir, "grad_norm"), ref_norms), 1):
        assert abs(a - b) <= 1e-5 * b, f"step {step}: pipeline gradient norm {a} vs reference {b}"
    for step in range(1, STEPS + 1):
        ckpt = os.path.join(cfg.output_dir, f"checkpoint-{step}")
        meta = read_meta(ckpt)
        assert meta["pp"] == pp and meta["dp"] == dp
        got = load_adapter_tensors(ckpt, meta)
        want = ref_adapters[step - 1]
        assert set(got) == set(want), "checkpoint keys differ from PEFT's parameter names"
        for name, tensor in want.items():
            assert rel(got[name], tensor) < 1e-5, f"step {step}: {name} differs by {rel(got[name], tensor):.2e}"
    # the adapter actually moved: the comparison is not between two untouched initialisations
    first = load_adapter_tensors(os.path.join(cfg.output_dir, "checkpoint-1"), meta)
    last = load_adapter_tensors(os.path.join(cfg.output_dir, f"checkpoint-{STEPS}"), meta)
    assert max(rel(last[k], first[k]) for k in first) > 1e-3
