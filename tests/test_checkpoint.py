"""Checkpoints resume exactly, load into other stage counts, refuse mismatches, survive a killed save, and export
to a standard PEFT adapter and a merged model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch

from conftest import LORA_CONFIG, SAMPLE
from dist_helper import _ctx, free_port, run_ranks
from merak_lora.checkpoint import load_adapter_tensors, read_latest, read_meta
from merak_lora.config import Config, ConfigError
from reference import logged, rel


def _cfg(model: str, out: str, **kw) -> Config:
    base = dict(model_path=model, data_path=SAMPLE, lora_config=LORA_CONFIG, output_dir=out, seq_length=128,
                per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=6, logging_steps=1,
                save_steps=3, learning_rate=5e-3, seed=3, disable_tqdm=True, report_to="none", device="cpu")
    base.update(kw)
    return Config(**base)


def _train(cfg: Config) -> int:
    from merak_lora.finetune import run
    return run(cfg)[0].global_step


def _copy_checkpoint(src_out: str, step: int, dst_out: str) -> None:
    os.makedirs(dst_out)
    shutil.copytree(os.path.join(src_out, f"checkpoint-{step}"), os.path.join(dst_out, f"checkpoint-{step}"))
    with open(os.path.join(dst_out, "latest"), "w") as fh:
        fh.write(f"checkpoint-{step}\n")


def test_resume_reproduces_the_uninterrupted_run_bitwise(tiny_llama, tmp_path):
    # lora_dropout 0.1 (the shipped config): the resumed run must also restore every rank's RNG
    full = _cfg(tiny_llama, str(tmp_path / "full"), pp=2)
    run_ranks(_train, 2, full)
    _copy_checkpoint(full.output_dir, 3, str(tmp_path / "resumed"))
    resumed = _cfg(tiny_llama, str(tmp_path / "resumed"), pp=2, resume_peft_from_checkpoint="latest")
    steps = run_ranks(_train, 2, resumed)
    assert steps == [6, 6]
    assert logged(resumed.output_dir) == logged(full.output_dir)[3:]
    a = load_adapter_tensors(os.path.join(full.output_dir, "checkpoint-6"), read_meta(full.output_dir +
                                                                                       "/checkpoint-6"))
    b = load_adapter_tensors(os.path.join(resumed.output_dir, "checkpoint-6"), read_meta(resumed.output_dir +
                                                                                          "/checkpoint-6"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def pp4_run(tiny_llama, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pp4") / "out")
    run_ranks(_train, 4, _cfg(tiny_llama, out, pp=4, max_steps=3))
    return os.path.join(out, "checkpoint-3")


def test_pp4_checkpoint_continues_training_at_pp2(tiny_llama, tmp_path, pp4_run):
    _copy_checkpoint(os.path.dirname(pp4_run), 3, str(tmp_path / "out"))
    cfg = _cfg(tiny_llama, str(tmp_path / "out"), pp=2, max_steps=5, resume_peft_from_checkpoint="latest")
    assert run_ranks(_train, 2, cfg) == [5, 5]
    meta = read_meta(os.path.join(cfg.output_dir, "checkpoint-5"))
    assert (meta["pp"], meta["num_stages"], meta["global_step"]) == (2, 2, 5)
    losses = logged(cfg.output_dir)
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    before = load_adapter_tensors(pp4_run, read_meta(pp4_run))
    after = load_adapter_tensors(os.path.join(cfg.output_dir, "checkpoint-5"), meta)
    assert before.keys() == after.keys()
    assert all(0 < rel(after[k], before[k]) < 0.5 for k in before)  # continued from it, not from scratch


def _pipeline_logits(model: str, ckpt: str, ids: torch.Tensor, pp: int):
    from merak_lora.checkpoint import load_adapter
    from merak_lora.finetune import build_stages, make_plan
    from merak_lora.layout import init_distributed
    from merak_lora.lora import adapter_params
    from merak_lora.schedule import Pipeline, TokenLoss

    meta = read_meta(ckpt)
    cfg = Config(model_path=model, pp=pp, device="cpu")
    plan = make_plan(cfg, pp, meta["lora"])
    layout = init_distributed(pp, 1, False, "cpu")
    stages = build_stages(cfg, plan, layout)
    load_adapter(ckpt, meta, {s.spec.index: adapter_params(s.model) for s in stages})
    for s in stages:
        s.eval()
    pipe = Pipeline(stages, layout, "1f1b", ids.shape[0], TokenLoss(), plan.hidden_size,
                    plan.vocab_size, torch.float32)
    out = pipe.logits(ids)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return out


def _batch() -> torch.Tensor:
    return torch.randint(3, 1000, (4, 24), generator=torch.Generator().manual_seed(0))


def test_pp4_checkpoint_gives_the_same_logits_at_pp1_and_through_peft(tiny_llama, tmp_path, pp4_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from merak_lora.export import export_adapter, merge

    ids = _batch()
    at_pp4 = run_ranks(_pipeline_logits, 4, tiny_llama, pp4_run, ids, 4)[-1]
    at_pp1 = _pipeline_logits(tiny_llama, pp4_run, ids, 1)
    assert rel(at_pp1, at_pp4) < 1e-5

    adapter_dir = export_adapter(pp4_run, str(tmp_path / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with _no_key_warnings():
        peft_model = PeftModel.from_pretrained(base, adapter_dir)
    peft_model.eval()
    with torch.no_grad():
        via_peft = peft_model(input_ids=ids).logits.float()
    assert rel(via_peft, at_pp4) < 1e-5

    merged_dir = merge(pp4_run, str(tmp_path / "merged"))
    assert sorted(f for f in os.listdir(merged_dir) if f.endswith(".safetensors")) == \
        sorted(f for f in os.listdir(tiny_llama) if f.endswith(".safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    with torch.no_grad():
        via_merged = merged(input_ids=ids).logits.float()
    assert rel(via_merged, at_pp4) < 1e-5
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(input_ids=ids).logits
    assert rel(plain, at_pp4) > 1e-4, "the adapter changed nothing: the comparison would prove nothing"


class _no_key_warnings:
    """PEFT reports missing or unexpected adapter keys as warnings; loading the export must raise none."""

    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings(record=True)
        self.records = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        bad = [str(w.message) for w in self.records if "key" in str(w.message).lower()]
        assert not bad, bad
        return False


def _mismatch_cases(tmp_path, good_ckpt, tiny_tied):
    def clone(name):
        out = tmp_path / name
        _copy_checkpoint(os.path.dirname(good_ckpt), 3, str(out))
        return out, out / "checkpoint-3"

    cases = []
    out, _ = clone("other_model")
    cases.append(({"model_path": tiny_tied, "output_dir": str(out)}, "trained on another base model"))
    out, _ = clone("other_r")
    lora = tmp_path / "r16.json"
    lora.write_text(json.dumps({**json.loads(open(LORA_CONFIG).read()), "r": 16}))
    cases.append(({"output_dir": str(out), "lora_config": str(lora)}, "has LoRA r=8 but --lora_config says 16"))
    out, _ = clone("other_targets")
    lora = tmp_path / "qv.json"
    lora.write_text(json.dumps({**json.loads(open(LORA_CONFIG).read()), "target_modules": ["q_proj", "v_proj"]}))
    cases.append(({"output_dir": str(out), "lora_config": str(lora)}, "has LoRA target_modules="))
    out, ck = clone("missing_stage")
    shutil.rmtree(ck / "mp_rank_00_pp_rank_002")
    cases.append(({"output_dir": str(out)}, "mp_rank_00_pp_rank_002/adapter_model.safetensors is missing"))
    out, ck = clone("truncated")
    f = ck / "mp_rank_00_pp_rank_001" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cases.append(({"output_dir": str(out)}, "it may be truncated"))
    out, ck = clone("truncated_state")
    f = ck / "mp_rank_00_pp_rank_000" / "lora_partial_model_optim.pt"
    f.write_bytes(f.read_bytes()[:100])
    cases.append(({"output_dir": str(out)}, "cannot be loaded safely"))
    return cases


def test_mismatched_checkpoints_are_refused_before_training(tiny_llama, tiny_tied, tmp_path, pp4_run):
    from merak_lora.finetune import run
    for overrides, message in _mismatch_cases(tmp_path, pp4_run, tiny_tied):
        cfg = _cfg(tiny_llama, "", resume_peft_from_checkpoint="latest", **{"output_dir": "", **overrides})
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            run(cfg)


def _train_slow_save(cfg: Config, rank: int, world: int, port: int, marker_dir: str, slow_step: int) -> None:
    """One rank of a job whose rank 1 stalls inside the save of checkpoint-<slow_step> (so the test can kill it)."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    import merak_lora.checkpoint as ck
    real = ck.save_file

    def stalling_save(tensors, path, metadata=None):
        if rank == 1 and f"checkpoint-{slow_step}.partial" in path:
            open(os.path.join(marker_dir, "saving"), "w").close()
            time.sleep(300)
        return real(tensors, path, metadata=metadata)

    ck.save_file = stalling_save
    from merak_lora.finetune import run
    run(cfg)


def test_rank_killed_while_saving_leaves_the_previous_checkpoint(tiny_llama, tmp_path):
    cfg = _cfg(tiny_llama, str(tmp_path / "out"), pp=2, max_steps=4, save_steps=1, dist_timeout=60)
    port = free_port()
    procs = [_ctx.Process(target=_train_slow_save, args=(cfg, r, 2, port, str(tmp_path), 2)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.time() + 240
    while not (tmp_path / "saving").exists():
        assert time.time() < deadline and all(p.is_alive() for p in procs), "the save never started"
        time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGKILL)
    t0 = time.time()
    procs[0].join(timeout=120)
    assert not procs[0].is_alive(), "rank 0 hung after its peer died"
    assert procs[0].exitcode != 0 and time.time() - t0 < 120
    procs[1].join()

    out = cfg.output_dir
    assert (tmp_path / "out" / "checkpoint-2.partial").is_dir()      # the half-written save is there …
    assert not (tmp_path / "out" / "checkpoint-2").exists()
    assert read_latest(out) == os.path.join(out, "checkpoint-1")     # … and resume ignores it

    resumed = _cfg(tiny_llama, out, pp=2, max_steps=4, save_steps=1, resume_peft_from_checkpoint="latest")
    assert run_ranks(_train, 2, resumed) == [4, 4]
    assert read_latest(out) == os.path.join(out, "checkpoint-4")
    assert [json.loads(l)["step"] for l in open(os.path.join(out, "metrics.jsonl"))][-3:] == [2, 3, 4]


def test_save_total_limit_keeps_the_newest(tmp_path):
    from merak_lora.checkpoint import SavedAdapter, TrainState, save_checkpoint
    from merak_lora.layout import Layout

    layout = Layout(rank=0, world=1, local_rank=0, pp=1, chunks=1, v_shape=False, device=torch.device("cpu"))
    p = torch.nn.Parameter(torch.randn(4, 2))
    opt = torch.optim.AdamW([p])
    for step in (10, 20, 30, 40):
        saved = SavedAdapter("", {0: {"x.lora_A.weight": p}}, opt, {"step": step}, TrainState(global_step=step),
                             {"r": 2}, {"num_stages": 1, "pp": 1, "dp": 1}, {0: None})
        save_checkpoint(str(tmp_path), step, layout=layout, adapters=[saved], save_total_limit=2)
    assert sorted(d.name for d in tmp_path.iterdir()) == ["checkpoint-30", "checkpoint-40", "latest"]
    assert read_latest(str(tmp_path)).endswith("checkpoint-40")
    assert read_meta(str(tmp_path / "checkpoint-40"))["global_step"] == 40


def test_a_resume_reads_only_the_saved_stages_it_needs_and_each_tensor_once(tiny_llama, tmp_path, pp4_run,
                                                                             monkeypatch):
    """pp=4 checkpoint, resumed by rank 1 of pp=2 (layers 3-4 and the head): it checks every file's header but
    reads the tensors and optimizer state of saved stage 3 only, each once."""
    import merak_lora.checkpoint as ck
    from merak_lora.checks import checked_resume
    from merak_lora.layout import Layout
    from merak_lora.lora import adapter_params, read_lora_config
    from merak_lora.optim import make_optimizer
    from merak_lora.plan import build_stages, make_plan

    tensors, states = [], []
    real_open, real_load = ck.safe_open, torch.load

    class Counting:
        def __init__(self, path, **kw):
            self.path, self.inner = path, real_open(path, **kw)

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, key):
            tensors.append((os.path.basename(os.path.dirname(self.path)), key))
            return self.file.get_tensor(key)

    monkeypatch.setattr(ck, "safe_open", Counting)
    monkeypatch.setattr(torch, "load", lambda path, **kw: states.append(path) or real_load(path, **kw))
    cfg = Config(model_path=tiny_llama, pp=2, device="cpu", lora_config=LORA_CONFIG, output_dir=str(tmp_path),
                 resume_peft_from_checkpoint=pp4_run)
    plan = make_plan(cfg, 2, read_lora_config(LORA_CONFIG))
    layout = Layout(rank=1, world=2, local_rank=1, pp=2, chunks=1, v_shape=False, device=torch.device("cpu"))
    assert [(s.start, s.stop) for s in plan.specs] == [(0, 3), (3, 4)]
    resume = checked_resume(cfg, plan, layout.stage_ids())
    assert sorted(resume.states) == [3] and [os.path.basename(os.path.dirname(p)) for p in states] == \
        ["mp_rank_00_pp_rank_003"]
    assert tensors == [], "checking the checkpoint read tensors"
    stages = build_stages(cfg, plan, layout)
    params = {s.spec.index: adapter_params(s.model) for s in stages}
    state = ck.restore(resume, params, make_optimizer("adamw_torch", [p for ps in params.values()
                                                                      for p in ps.values()], 1e-3, (0.9, 0.999),
                                                      1e-8, 0.0), layout, 0)
    assert state.global_step == 3
    own = sorted(params[1])
    assert sorted(k for _, k in tensors) == own and {d for d, _ in tensors} == {"mp_rank_00_pp_rank_003"}
    assert len(states) == 1, "the training state was read twice"


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> str:
    from merak_lora.tiny import make_tiny_model
    return make_tiny_model(str(tmp_path_factory.mktemp("qwen2")), "qwen2", num_layers=4, shards=2)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_reach_the_merged_model(tiny_qwen2, tmp_path, bias):
    """Qwen2 has q/k/v biases: trained with bias "all" or "lora_only", the merged model's logits equal
    PeftModel(base, adapter)'s."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from merak_lora.export import export_adapter, merge

    lora = tmp_path / "lora.json"
    lora.write_text(json.dumps({"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "bias": bias,
                                "target_modules": ["q_proj", "v_proj", "o_proj"]}))
    out = str(tmp_path / "out")
    run_ranks(_train, 2, _cfg(tiny_qwen2, out, pp=2, lora_config=str(lora), max_steps=3, learning_rate=3e-2))
    ckpt = os.path.join(out, "checkpoint-3")
    trained = {k: v for k, v in load_adapter_tensors(ckpt, read_meta(ckpt)).items() if k.endswith(".bias")}
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    names = {"all": ("q_proj", "k_proj", "v_proj"), "lora_only": ("q_proj", "v_proj")}[bias]
    assert trained and {k.split(".")[-3 if ".base_layer." in k else -2] for k in trained} == set(names)
    k_name = next(iter(trained)).removeprefix("base_model.model.").replace(".base_layer.", ".")
    assert not torch.equal(trained[next(iter(trained))], base.state_dict()[k_name]), "the bias did not train"

    ids = _batch()
    with _no_key_warnings():
        peft_model = PeftModel.from_pretrained(base, export_adapter(ckpt, str(tmp_path / "adapter"))).eval()
    with torch.no_grad():
        via_peft = peft_model(input_ids=ids).logits.float()
        merged = AutoModelForCausalLM.from_pretrained(merge(ckpt, str(tmp_path / "merged")), dtype=torch.float32)
        via_merged = merged(input_ids=ids).logits.float()
    assert (via_merged - via_peft).abs().max().item() <= 1e-5 * via_peft.abs().max().item()


def test_the_run_ends_with_a_peft_adapter_and_says_where(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "out")
    run_ranks(_train, 2, _cfg(tiny_llama, out, pp=2, max_steps=4, save_steps=100))
    adapter = os.path.join(out, "adapter")
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    ckpt = os.path.join(out, "checkpoint-4")
    from safetensors.torch import load_file
    written = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    saved = load_adapter_tensors(ckpt, read_meta(ckpt))
    assert written.keys() == saved.keys() and all(torch.equal(written[k], saved[k]) for k in saved)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = _batch()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    with _no_key_warnings():
        tuned = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        assert rel(tuned(input_ids=ids).logits, plain) > 1e-4, "the adapter changed nothing"
    last = open(os.path.join(out, "logs", "rank_000.log")).read().strip().splitlines()[-1]
    assert f"adapter (PEFT): {adapter}" in last and f"last checkpoint: {ckpt}" in last and "done: 4 steps" in last
