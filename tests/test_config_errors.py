"""Invalid configurations and command lines: each stops before any weight is read, with a message that names
the fix, and no traceback from inside torch or merak_lora."""

from __future__ import annotations

import json
import os
import shutil


from conftest import LORA_CONFIG, SAMPLE


def _custom_model(tmp_path, tiny_llama):
    """A model folder that ships its own code (as trust_remote_code models do); importing it leaves a marker."""
    d = tmp_path / "custom"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    cfg["model_type"] = "evil"
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "configuration_evil.py").write_text(
        f"open({str(tmp_path / 'code_ran')!r}, 'w').close()\n"
        "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    return str(d)


def cases(tmp_path, tiny_llama):
    base = ["--model_path", tiny_llama, "--data_path", SAMPLE, "--lora_config", LORA_CONFIG,
            "--output_dir", str(tmp_path / "out"), "--max_steps", "2"]
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_llama, f), no_weights / f)
    bad_json = tmp_path / "bad_lora.json"
    bad_json.write_text('{"r": 8,, }')
    wrong_targets = tmp_path / "wrong_targets.json"
    wrong_targets.write_text(json.dumps({"r": 8, "target_modules": ["q_proj", "query_key_value"]}))
    unknown_field = tmp_path / "unknown_field.json"
    unknown_field.write_text(json.dumps({"r": 8, "lora_rank": 4}))
    used = tmp_path / "used"
    (used / "checkpoint-5").mkdir(parents=True)
    tiny_data = tmp_path / "two.json"
    tiny_data.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]))
    w4 = {"WORLD_SIZE": "4", "RANK": "0"}
    return [
        ("unknown flag", base + ["--per_device_batch_size", "2"], {},
         "unknown flag --per_device_batch_size (did you mean --per_device_train_batch_size"),
        ("bool flag value", base + ["--bf16", "maybe"], {}, "--bf16 takes true or false, got 'maybe'"),
        ("int flag value", base + ["--seq_length", "long"], {}, "--seq_length takes an integer, got 'long'"),
        ("bf16 and fp16", base + ["--bf16", "true", "--fp16", "true"], {}, "--bf16 and --fp16 are both true"),
        ("no model", base[2:], {}, "no model: pass --model_path DIR"),
        ("no data", base[:2] + base[4:], {}, "no data: pass --data_path"),
        ("world not divisible by pp", base + ["--pp", "3"], w4, "world size 4 is not divisible by --pp 3"),
        ("interleaved multiple", base + ["--pp", "2", "--pipeline_schedule", "interleaved1f1b",
                                         "--gradient_accumulation_steps", "5"], w4, "must be a multiple of --pp 2"),
        ("stages_per_rank without interleaving", base + ["--stages_per_rank", "2"], {},
         "--stages_per_rank 2 needs an interleaved schedule"),
        ("partition list length", base + ["--partition_method", "2,2"], w4,
         "--partition_method lists 2 stages but the pipeline has 4"),
        ("partition list sum", base + ["--partition_method", "1,1,1,2", "--gradient_accumulation_steps", "4"], w4,
         "sums to 5 layers but the model has 4"),
        ("more stages than layers", base + ["--gradient_accumulation_steps", "8"], {"WORLD_SIZE": "8", "RANK": "0"},
         "has 8 stages but the model has only 4 decoder layers"),
        ("unknown schedule", base + ["--pipeline_schedule", "chimera"], {}, "--pipeline_schedule 'chimera' is not"),
        ("compile with zero bubble", base + ["--pp", "2", "--pipeline_schedule", "zbv", "--compile", "true",
                                             "--gradient_accumulation_steps", "4"], w4,
         "--compile true cannot run with --pipeline_schedule zbv"),
        ("unknown lr scheduler", base + ["--lr_scheduler_type", "cosine_annealing"], {},
         "--lr_scheduler_type 'cosine_annealing' is not one of linear, cosine"),
        ("scheduler that follows the loss", base + ["--lr_scheduler_type", "reduce_lr_on_plateau"], {},
         "--lr_scheduler_type reduce_lr_on_plateau is not supported: it follows the eval loss"),
        ("scheduler arguments missing", base + ["--lr_scheduler_type", "cosine_with_min_lr"], {},
         "--lr_scheduler_type cosine_with_min_lr: "),
        ("merak split method", base + ["--split_method", "farthest_min_deps"], {},
         "use --split_method layer_split"),
        ("report to a service", base + ["--report_to", "wandb"], {}, "use --report_to tensorboard or none"),
        ("interleaved with too few microbatches", base + ["--pp", "2", "--pipeline_schedule", "interleaved1f1b",
                                                          "--gradient_accumulation_steps", "1"], w4,
         "raise --gradient_accumulation_steps to 2 or more"),
        ("model folder missing", ["--model_path", str(tmp_path / "nope")] + base[2:], {},
         "does not exist"),
        ("no safetensors", ["--model_path", str(no_weights)] + base[2:], {}, "has no safetensors weights"),
        ("lora config missing", base + ["--lora_config", str(tmp_path / "none.json")], {}, "not found"),
        ("lora config bad JSON", base + ["--lora_config", str(bad_json)], {}, "invalid JSON at line 1"),
        ("target module not in model", base + ["--lora_config", str(wrong_targets)], {},
         "target_modules ['query_key_value'] match no module of this llama model; its linear modules are: "
         "down_proj, gate_proj"),
        ("lora unknown field", base + ["--lora_config", str(unknown_field)], {}, "unknown field 'lora_rank'"),
        ("output_dir holds a run", base[:-4] + ["--output_dir", str(used), "--max_steps", "2"], {},
         "already holds a run (checkpoint-5); pass --resume_peft_from_checkpoint latest"),
        ("resume with nothing", base + ["--resume_peft_from_checkpoint", "latest"], {},
         "holds no complete checkpoint yet"),
        ("sequence longer than the model", base + ["--seq_length", "4096"], {},
         "--seq_length 4096 is longer than the model's 2048 positions"),
        ("global batch larger than the data", ["--model_path", tiny_llama, "--data_path", str(tiny_data)] + base[4:]
         + ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4"], {},
         "the data has 2 sequences but one optimizer step takes 8"),
        ("eval twice", base + ["--eval_ratio", "0.1", "--eval_data_path", SAMPLE], {},
         "give --eval_data_path or --eval_ratio, not both"),
        ("custom code without the flag", ["--model_path", _custom_model(tmp_path, tiny_llama)] + base[2:], {},
         "ships its own Python code; it runs only with --trust_remote_code true"),
        ("config file missing", base + ["--config", str(tmp_path / "flags.json")], {}, "no such file"),
    ]


def test_at_least_twenty_invalid_inputs_each_with_its_message(tiny_llama, tmp_path, monkeypatch, capsys):
    from merak_lora.finetune import main
    table = cases(tmp_path, tiny_llama)
    assert len(table) >= 20
    for i, (name, argv, env, message) in enumerate(table):
        argv = [str(tmp_path / f"out{i}") if a == str(tmp_path / "out") else a for a in argv]
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, f"{name}: exit {code}\n{err}"
        assert message in err, f"{name}: expected {message!r} in\n{err}"
        assert "Traceback" not in err, f"{name}: a traceback reached the user\n{err}"
    assert not (tmp_path / "code_ran").exists(), "the model folder's code ran without --trust_remote_code"


def test_checkpoint_space_is_checked_before_training(tiny_llama, tmp_path, monkeypatch, capsys):
    import merak_lora.checks as checks
    import merak_lora.finetune as ft

    class Full:
        free = 10 * 2**20
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda path: Full())
    big_lora = tmp_path / "r64.json"
    big_lora.write_text(json.dumps({"r": 512}))
    code = ft.main(["--model_path", tiny_llama, "--data_path", SAMPLE, "--lora_config", str(big_lora),
                    "--output_dir", str(tmp_path / "out"), "--max_steps", "2"])
    assert code == 2 and "has 10 MiB free but each checkpoint needs about" in capsys.readouterr().err
