"""Generation and export from a checkpoint of several adapters: each adapter answers, token for token, as its own
subfolder checkpoint does through the one-adapter path, at two pipeline stages and in one process; the batch file
holds every adapter's answer; export writes one PEFT folder per adapter; a name the checkpoint lacks is refused."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from transformers import AutoTokenizer

from conftest import SAMPLE
from dist_helper import run_ranks
from merak_lora.config import Config

# Large learning rates and B initialised at random in one of them, so two steps change the greedy answers.
LORAS = {"a": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
         "b": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "init_lora_weights": False,
               "target_modules": ["k_proj", "o_proj", "gate_proj", "down_proj"]}}
LEARNING_RATES = {"a": 5e-2, "b": 2e-2}
PROMPTS = ["What is your signature tea?", "你是谁？", "When does the teahouse open?"]
MAX_NEW = 12


def _train(cfg: Config) -> None:
    from merak_lora.finetune import run
    run(cfg)


@pytest.fixture(scope="module")
def two(tiny_llama, tmp_path_factory) -> str:
    """checkpoint-2 of a run of adapters a and b (other rank, targets and learning rate each)."""
    d = tmp_path_factory.mktemp("two")
    for name, lora in LORAS.items():
        (d / f"{name}.json").write_text(json.dumps(lora))
    entries = [{"name": n, "lora_config": f"{n}.json", "learning_rate": LEARNING_RATES[n]} for n in LORAS]
    (d / "adapters.json").write_text(json.dumps({"adapters": entries}))
    cfg = Config(model_path=tiny_llama, data_path=SAMPLE, adapters=str(d / "adapters.json"), output_dir=str(d / "out"),
                 seq_length=48, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                 save_steps=2, disable_tqdm=True, report_to="none", device="cpu")
    run_ranks(_train, 1, cfg)
    return os.path.join(cfg.output_dir, "checkpoint-2")


def _prompts(model: str) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _answers(model: str, ckpt: str, prompts: list[list[int]], names: str = "", compare_base: bool = True):
    """Greedy answers by adapter (the one-adapter path's under True, the base model's under False) on every rank
    of a pipeline (rank 0's are returned), or in one process; and whether the adapter was merged. The batch, then
    its first prompt alone: at two stages one decodes as groups in flight, the other in lockstep."""
    from merak_lora.chat import GenConfig, build_generator
    from merak_lora.generate import Sampling
    cfg = GenConfig(model_path=model, resume_peft_from_checkpoint=ckpt, adapter_names=names, device="cpu",
                    compare_base=compare_base)
    gen, _, layout = build_generator(cfg)
    if layout is not None and layout.rank != 0:
        gen.serve()
        return None
    asked = ([False] if compare_base else []) + (gen.adapters or [True])
    sampling = Sampling(max_new_tokens=MAX_NEW)
    out = {a: gen.generate(prompts, sampling, a) + gen.generate(prompts[:1], sampling, a) for a in asked}
    gen.close()
    return out, getattr(gen, "merged", False)


def _check_each_as_alone(joint: dict, alone: dict) -> None:
    assert set(joint) == {False, "a", "b"}
    for name in ("a", "b"):
        assert joint[name] == alone[name][True], f"adapter {name} answers otherwise beside the other one"
        assert joint[False] == alone[name][False]
        assert joint[name] != joint[False], f"adapter {name} changed no token: the comparison would prove little"
    assert joint["a"] != joint["b"]


def test_two_stages_answer_with_each_adapter_as_alone(tiny_llama, two):
    prompts = _prompts(tiny_llama)
    joint, merged = run_ranks(_answers, 2, tiny_llama, two, prompts)[0]
    assert not merged
    alone = {n: run_ranks(_answers, 2, tiny_llama, os.path.join(two, n), prompts)[0][0] for n in ("a", "b")}
    _check_each_as_alone(joint, alone)
    # one adapter picked by name and no --compare_base: folded into the base, as a one-adapter checkpoint is
    picked, merged = run_ranks(_answers, 2, tiny_llama, two, prompts, "b", False)[0]
    assert merged and picked == {"b": joint["b"]}


def test_one_process_answers_with_each_adapter_as_alone(tiny_llama, two):
    prompts = _prompts(tiny_llama)
    joint, _ = _answers(tiny_llama, two, prompts)
    _check_each_as_alone(joint, {n: _answers(tiny_llama, os.path.join(two, n), prompts)[0] for n in ("a", "b")})


def test_batch_file_holds_every_adapters_answer(tiny_llama, two, tmp_path):
    """--prompts with --compare_base: each row has every adapter's answer under its name and the base model's;
    each adapter's is the one its subfolder checkpoint gives ("answer", the one-adapter format)."""
    from merak_lora.chat import main
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS), encoding="utf-8")

    def rows(name: str, ckpt: str, *flags: str) -> list[dict]:
        out = tmp_path / f"{name}.jsonl"
        assert main(["--model_path", tiny_llama, "--resume_peft_from_checkpoint", ckpt, "--prompts", str(prompts),
                     "--output_file", str(out), "--max_new_tokens", str(MAX_NEW), "--device", "cpu", *flags]) == 0
        return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]

    joint = rows("joint", two, "--compare_base", "true")
    assert [r["prompt"] for r in joint] == PROMPTS
    assert all(set(r) == {"prompt", "answers", "base_answer"} and list(r["answers"]) == ["a", "b"] for r in joint)
    for name in ("a", "b"):
        alone = rows(name, os.path.join(two, name))
        assert all(set(r) == {"prompt", "answer"} for r in alone)
        assert [r["answers"][name] for r in joint] == [r["answer"] for r in alone]
    assert any(r["answers"]["a"] != r["base_answer"] for r in joint)
    only_b = rows("only_b", two, "--adapter_names", "b")
    assert [r["answers"] for r in only_b] == [{"b": r["answers"]["b"]} for r in joint]


def test_unknown_adapter_name_is_refused(tiny_llama, two, tmp_path, capsys):
    from merak_lora.chat import main as chat
    from merak_lora.export import main as export
    assert chat(["--model_path", tiny_llama, "--resume_peft_from_checkpoint", two, "--adapter_names", "a,c",
                 "--prompt", "hi"]) == 2
    assert export(["--checkpoint", two, "--out", str(tmp_path / "x"), "--adapter_names", "c"]) == 2
    # the run's end-of-training folder of several adapters, given where one PEFT adapter is expected
    adapters = os.path.join(os.path.dirname(two), "adapter")
    assert chat(["--model_path", tiny_llama, "--adapter_path", adapters, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: --adapter_names a,c: checkpoint {two} holds no adapter 'c'; it holds a, b",
                   f"error: --adapter_names c: checkpoint {two} holds no adapter 'c'; it holds a, b",
                   f"error: --adapter_path {adapters}: no adapter_config.json there; it holds the adapters a, b of "
                   f"a run with --adapters: pass --adapter_path {os.path.join(adapters, 'a')}"]
    assert not os.path.exists(tmp_path / "x")
    # the library calls that take one adapter's checkpoint, given the root of several
    from merak_lora.config import ConfigError
    from merak_lora.export import export_adapter, merge
    for call in (lambda: export_adapter(two, str(tmp_path / "y")), lambda: merge(two, str(tmp_path / "y"))):
        with pytest.raises(ConfigError, match=f"holds several adapters \\(a, b\\): pass one of its subfolders, "
                                              f"e.g. {re.escape(os.path.join(two, 'a'))}"):
            call()
    assert not os.path.exists(tmp_path / "y")


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_export_writes_one_peft_folder_per_adapter(tiny_llama, two, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from merak_lora.chat import GenConfig, _local_generator
    from merak_lora.checkpoint import read_meta
    from merak_lora.export import main

    out = tmp_path / "adapters"
    assert main(["--checkpoint", two, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["a", "b"]
    ids = _prompts(tiny_llama)[0]
    gen = _local_generator(GenConfig(model_path=tiny_llama, device="cpu"), AutoTokenizer.from_pretrained(tiny_llama),
                           two, read_meta(two))
    for name in ("a", "b"):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        exported = PeftModel.from_pretrained(base, str(out / name)).eval()
        with gen.switches[0].selected(name):
            want = _logits(gen.model, ids)
        assert torch.allclose(_logits(exported, ids), want, atol=1e-5), name
        targets = set(json.load(open(out / name / "adapter_config.json"))["target_modules"])
        assert targets == set(LORAS[name]["target_modules"])
    with gen.model.disable_adapter():
        assert not torch.allclose(_logits(gen.model, ids), want, atol=1e-3), "adapter b changed nothing"
    # --merge writes one model: from several adapters it asks for one, and merges the one named
    assert main(["--checkpoint", two, "--out", str(tmp_path / "m"), "--merge"]) == 2
    assert (f"holds 2 adapters (a, b) and --merge writes one model (a whole copy of the base): pick one with "
            f"--adapter_names a, or pass --checkpoint {os.path.join(two, 'a')}") in capsys.readouterr().err
    assert main(["--checkpoint", two, "--out", str(tmp_path / "m"), "--merge", "--adapter_names", "b"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    assert torch.allclose(_logits(merged, ids), want, atol=1e-4)
