"""Several adapters over one base (--adapters): each adapter's losses at every step and its final tensors equal
training it alone (fp32, gloo, CPU), at pp 1, 2 and 3 and dp 2; checkpoints resume together or one adapter
alone; what adapters cannot differ in is refused before any weight is read."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLE
from dist_helper import run_ranks
from merak_lora.adapters import adapter_specs
from merak_lora.config import Config, ConfigError
from reference import rel

# Adapters that differ in rank, alpha, targets, dropout, batch, accumulation, sequence length, learning rate,
# schedule, length and seed. Dropout is exact against a run alone when the adapter's microbatches have the same
# shape in both: `a` pads every step to its full length and has the largest microbatch, so the joint step's shape
# is its own.
LORAS = {
    "a": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    "b": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "init_lora_weights": False,
          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "c": {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["v_proj", "down_proj"]},
}
ENTRIES = {
    "a": {"seq_length": 64, "pad_to_multiple_of": 64, "per_device_train_batch_size": 2,
          "gradient_accumulation_steps": 2, "learning_rate": 5e-3, "seed": 3},
    "b": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 3, "learning_rate": 1e-2, "seed": 5,
          "warmup_steps": 1, "data_path": "half.json", "eval_ratio": 0.1},
    "c": {"seq_length": 32, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
          "learning_rate": 2e-3, "lr_scheduler_type": "constant", "max_steps": 2, "seed": 9},
}
STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> str:
    """adapters.json, the LoRA configs and b's data (every other record), side by side (paths are relative)."""
    d = tmp_path_factory.mktemp("adapters")
    for name, lora in LORAS.items():
        (d / f"{name}.json").write_text(json.dumps(lora))
    (d / "half.json").write_text(json.dumps(json.load(open(SAMPLE))[::2]))
    entries = [{"name": n, "lora_config": f"{n}.json", **e} for n, e in ENTRIES.items()]
    (d / "adapters.json").write_text(json.dumps({"adapters": entries}))
    return str(d)


def _cfg(model: str, out: str, cache: str, **kw) -> Config:
    base = dict(model_path=model, data_path=SAMPLE, output_dir=out, seq_length=48, max_steps=STEPS,
                logging_steps=1, save_steps=STEPS, disable_tqdm=True, report_to="none", device="cpu",
                data_cache_dir=cache)
    base.update(kw)
    return Config(**base)


def _alone(setup: str, name: str, model: str, out: str, cache: str, **kw) -> Config:
    """The command line that trains adapter `name` by itself."""
    entry = {k: (os.path.join(setup, v) if k == "data_path" else v) for k, v in ENTRIES[name].items()}
    return _cfg(model, out, cache, lora_config=os.path.join(setup, f"{name}.json"), **{**entry, **kw})


def _train(cfg: Config) -> None:
    from merak_lora.finetune import run
    run(cfg)


def _losses(out: str, adapter: str = "", split: str = "train") -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    return {r["step"]: r["loss"] for r in rows if r["split"] == split and r.get("adapter", "") == adapter}


def _final(out: str, adapter: str = "") -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "adapter", adapter, "adapter_model.safetensors"))


def _assert_same(got_out: str, got_adapter: str, want_out: str) -> None:
    for split in ("train", "eval"):  # b holds out 10% of its data for an eval loss
        got, want = _losses(got_out, got_adapter, split), _losses(want_out, "", split)
        assert got.keys() == want.keys() and (got or split == "eval"), (got, want)
        for step in want:
            assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (got_adapter, split, step, got, want)
    # fp32 rounding only: a microbatch padded to another adapter's width sums in another order, and AdamW's first
    # steps magnify that in elements whose gradient is near zero
    a, b = _final(got_out, got_adapter), _final(want_out)
    assert a.keys() == b.keys() and a
    for key in b:
        assert rel(a[key], b[key]) < 5e-5, f"{got_adapter}: {key} differs by {rel(a[key], b[key]):.2e}"


@pytest.mark.parametrize("pp,dp", [(1, 1), (2, 1), (3, 1), (2, 2)])
def test_each_adapter_trains_as_it_would_alone(tiny_llama, setup, tmp_path, pp, dp):
    cache = str(tmp_path / "cache")
    joint = _cfg(tiny_llama, str(tmp_path / "joint"), cache, pp=pp, adapters=os.path.join(setup, "adapters.json"))
    run_ranks(_train, pp * dp, joint)
    for name in LORAS:
        alone = _alone(setup, name, tiny_llama, str(tmp_path / name), cache, pp=pp)
        run_ranks(_train, pp * dp, alone)
        _assert_same(joint.output_dir, name, alone.output_dir)
    assert _losses(joint.output_dir, "b", "eval"), "b's eval loss was not logged"
    # c stopped after its 2 steps while a and b went on; each adapter's checkpoint folder is complete
    ckpt = os.path.join(joint.output_dir, f"checkpoint-{STEPS}")
    assert sorted(json.load(open(os.path.join(ckpt, "meta.json")))["adapters"]) == ["a", "b", "c"]
    steps = {n: json.load(open(os.path.join(ckpt, n, "meta.json")))["global_step"] for n in LORAS}
    assert steps == {"a": STEPS, "b": STEPS, "c": 2}
    assert sorted(os.listdir(os.path.join(ckpt, "a"))) == ["meta.json"] + [
        f"mp_rank_00_pp_rank_{s:03d}" for s in range(pp)]
    # the adapters really differ (one rank, target set and learning rate each)
    layers = json.load(open(os.path.join(tiny_llama, "config.json")))["num_hidden_layers"]
    assert len(_final(joint.output_dir, "b")) == 7 * 2 * layers and len(_final(joint.output_dir, "c")) == 2 * 2 * layers


def test_resume_together_and_one_adapter_alone(tiny_llama, setup, tmp_path):
    cache = str(tmp_path / "cache")
    spec = os.path.join(setup, "adapters.json")
    whole = _cfg(tiny_llama, str(tmp_path / "whole"), cache, pp=2, adapters=spec, max_steps=4, save_steps=2,
                 report_to="tensorboard")
    run_ranks(_train, 2, whole)
    # together: from checkpoint-2 (c has finished; a and b go on), to the same adapters as without a stop
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(whole.output_dir, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    with open(os.path.join(resumed, "latest"), "w") as fh:
        fh.write("checkpoint-2\n")
    run_ranks(_train, 2, _cfg(tiny_llama, resumed, cache, pp=2, adapters=spec, max_steps=4, save_steps=2,
                              resume_peft_from_checkpoint="latest"))
    for name in LORAS:
        a, b = _final(resumed, name), _final(whole.output_dir, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # alone: adapter a from its subfolder, by the one-adapter command line
    alone = _alone(setup, "a", tiny_llama, str(tmp_path / "alone"), cache, pp=2, max_steps=4, save_steps=2,
                   resume_peft_from_checkpoint=os.path.join(whole.output_dir, "checkpoint-2", "a"))
    run_ranks(_train, 2, alone)
    a, b = _final(alone.output_dir), _final(whole.output_dir, "a")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # TensorBoard: one set of scalars per adapter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(whole.output_dir, "runs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"a/loss", "b/loss", "c/loss", "a/lr", "b/grad_norm"} <= tags
    assert [e.step for e in events.Scalars("c/loss")] == [1, 2]


def test_adapters_json_is_checked_before_anything_runs(tmp_path, tiny_llama, setup):
    def spec(entries) -> Config:
        (tmp_path / "ad.json").write_text(json.dumps({"adapters": entries}))
        return Config(model_path=tiny_llama, adapters=str(tmp_path / "ad.json"))

    cases = [
        ([{"name": "a", "learnin_rate": 1e-4}], "unknown key 'learnin_rate' (did you mean learning_rate"),
        ([{"name": "a", "pp": 2}], "--pp is shared by every adapter"),
        ([{"name": "a b"}], '"name" must be letters'),
        ([{"name": "a"}, {"name": "a"}], "the name 'a' is used twice"),
        ([{"name": "a", "max_steps": "many"}], "--max_steps takes an integer"),
        ([{"name": "a", "packing": 1}], "'packing' takes bool"),
    ]
    for entries, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
            adapter_specs(spec(entries))
    got = adapter_specs(spec([{"name": "x", "lora_config": "x.json", "learning_rate": "3e-4"}]))
    assert got[0].cfg.lora_config == str(tmp_path / "x.json") and got[0].cfg.learning_rate == 3e-4


@pytest.mark.parametrize("case", ["bias", "one_adapter_checkpoint"])
def test_conflicts_stop_before_weights(tiny_llama, setup, tmp_path, capsys, case):
    from merak_lora.finetune import main
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "all.json").write_text(json.dumps({**LORAS["c"], "bias": "all"}))
    entries = [{"name": "a", "lora_config": os.path.join(setup, "a.json")},
               {"name": "b", "lora_config": str(d / ("all.json" if case == "bias" else "b.json"))}]
    (d / "b.json").write_text(json.dumps(LORAS["b"]))
    (d / "ad.json").write_text(json.dumps({"adapters": entries}))
    out = tmp_path / "out"
    args = ["--model_path", tiny_llama, "--data_path", SAMPLE, "--adapters", str(d / "ad.json"), "--output_dir",
            str(out), "--device", "cpu", "--max_steps", "1", "--report_to", "none"]
    if case == "one_adapter_checkpoint":
        ckpt = out / "checkpoint-1"
        ckpt.mkdir(parents=True)
        (ckpt / "meta.json").write_text(json.dumps({"format": 2}))
        (out / "latest").write_text("checkpoint-1\n")
        args += ["--resume_peft_from_checkpoint", "latest"]
    assert main(args) == 2
    want = {"bias": "adapter 'b': bias 'all' trains the base model's biases, which every adapter of the run shares",
            "one_adapter_checkpoint": "holds one adapter, not the adapters of --adapters"}[case]
    assert want in capsys.readouterr().err


def test_interleaved_schedule_two_stages_per_rank(tiny_llama, setup, tmp_path):
    """interleaved1f1b at pp=2 holds two stages per rank, each with its own dropout stream per adapter."""
    cache = str(tmp_path / "cache")
    entries = [{"name": "a", "lora_config": os.path.join(setup, "a.json"), **ENTRIES["a"]},
               {"name": "b", "lora_config": os.path.join(setup, "b.json"), "gradient_accumulation_steps": 4,
                "per_device_train_batch_size": 2, "learning_rate": 1e-2, "seed": 5}]
    spec = tmp_path / "ad.json"
    spec.write_text(json.dumps({"adapters": entries}))
    flags = dict(pp=2, pipeline_schedule="interleaved1f1b", partition_method="uniform", max_steps=2, save_steps=2)
    joint = _cfg(tiny_llama, str(tmp_path / "joint"), cache, adapters=str(spec), **flags)
    run_ranks(_train, 2, joint)
    for e in entries:
        own = {k: v for k, v in e.items() if k not in ("name", "lora_config")}
        alone = _cfg(tiny_llama, str(tmp_path / e["name"]), cache, lora_config=e["lora_config"], **own, **flags)
        run_ranks(_train, 2, alone)
        _assert_same(joint.output_dir, e["name"], alone.output_dir)
