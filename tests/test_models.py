"""Every family the users fine-tune splits into stages correctly: at 2 and 3 stages the loss and every LoRA
gradient equal the one-process PEFT model's (fp32, gloo), and greedy generation gives the same tokens as
transformers' generate(). Custom-code models ship as modeling files in their folder, as on the hub."""

from __future__ import annotations

import pytest

from dist_helper import run_ranks
from family_check import LORA, batch, make_custom, pipeline_run, reference
from reference import rel

HF_FAMILIES = ["llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "gemma", "gemma2", "gemma3_text",
               "phi", "phi3", "gpt2", "gpt_neox", "falcon", "opt", "deepseek_v2"]
CUSTOM = ["index", "openelm"]


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    made = {}

    def get(kind: str) -> str:
        if kind not in made:
            out = str(tmp_path_factory.mktemp(kind))
            if kind in CUSTOM:
                made[kind] = make_custom(kind, out)
            else:
                from merak_lora.tiny import make_tiny_model
                made[kind] = make_tiny_model(out, kind, num_layers=4, shards=2)
        return made[kind]
    return get


def check(model_dir: str, lora: dict, trust: bool = False) -> None:
    b = batch(model_dir)
    ref_loss, ref_grads, ref_tokens = reference(model_dir, lora, b, 4, trust)
    assert ref_grads and all(g.abs().sum() > 0 for g in ref_grads.values())
    for pp in (2, 3):
        results = run_ranks(pipeline_run, pp, model_dir, pp, lora, b, pp == 2, trust)
        loss = next(r[0] for r in results if r[0] is not None)
        grads = {k: v for r in results for k, v in r[1].items()}
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), f"pp={pp}: loss {loss} vs {ref_loss}"
        assert grads.keys() == ref_grads.keys(), f"pp={pp}: LoRA tensors differ"
        worst = max(rel(grads[k], ref_grads[k]) for k in ref_grads)
        assert worst < 1e-5, f"pp={pp}: a LoRA gradient differs by {worst:.2e}"
        assert len({r[3][0] for r in results}) == 1 and len(results[0][3]) == pp
        if pp == 2:
            assert results[0][2] == ref_tokens, "greedy tokens differ from transformers' generate()"


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_family_splits_exactly(family_dir, family):
    check(family_dir(family), LORA)


@pytest.mark.parametrize("family", CUSTOM)
def test_custom_code_family_splits_exactly(family_dir, family):
    check(family_dir(family), LORA, trust=True)


@pytest.mark.parametrize("family,params", [("mixtral", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
                                           ("deepseek_v2", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])])
def test_lora_on_fused_moe_experts(family_dir, family, params):
    """Recent transformers keeps experts as fused 3-D parameters; LoRA reaches them through target_parameters."""
    check(family_dir(family), {**LORA, "target_modules": ["q_proj", "o_proj"], "target_parameters": params})


def test_unknown_target_lists_the_model_names(family_dir):
    from merak_lora.config import ConfigError
    from merak_lora.lora import build_lora_config
    with pytest.raises(ConfigError, match="its linear modules are: c_attn, c_fc, c_proj"):
        build_lora_config({"target_modules": ["q_proj"]}, "gpt2", ["transformer.h.0.attn.c_attn"],
                          ["c_attn", "c_fc", "c_proj"])


def test_list_target_modules_from_the_config_alone(family_dir, tmp_path, capsys):
    """Only config.json is needed (the model is built on the meta device)."""
    import shutil

    from merak_lora.finetune import main
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(f"{family_dir('deepseek_v2')}/config.json", folder)
    assert main(["--model_path", str(folder), "--list_target_modules", "true"]) == 0
    out = capsys.readouterr().out
    for name in ("kv_a_proj_with_mqa", "kv_b_proj", "q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in out
    assert "mlp.experts.gate_up_proj" in out  # fused expert parameters, for target_parameters
