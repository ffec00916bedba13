"""Every family the users fine-tune splits into stages correctly: at 2 and 3 stages the loss and every LoRA
gradient equal the one-process PEFT model's (fp32, gloo), and greedy generation gives the same tokens as
transformers' generate(). Custom-code models ship as modeling files in their folder, as on the hub."""

from __future__ import annotations

import pytest

from family_check import LORA, check, make_custom

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
    """Only config.json is needed (the model is built on the meta device), and no other flag: the entrypoint's
    early checks let it through to the listing."""
    import shutil

    from merak_lora.entry import answer_early
    from merak_lora.finetune import main
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(f"{family_dir('deepseek_v2')}/config.json", folder)
    argv = ["--model_path", str(folder), "--list_target_modules", "true"]
    assert answer_early(argv, "launch/finetune.py") is None
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("kv_a_proj_with_mqa", "kv_b_proj", "q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in out
    assert "mlp.experts.gate_up_proj" in out  # fused expert parameters, for target_parameters
