"""Generation across the pipeline: the same tokens as transformers' generate() on the same model and adapter,
interactive chat through a pipe, and --compare_base showing what fine-tuning changed."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import weakref
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoTokenizer

from conftest import LORA_CONFIG, SAMPLE
from dist_helper import run_ranks
from merak_lora.config import Config
from test_cli import torchrun

PROMPTS = ["What is your signature tea?", "你是谁？", "Translate the following word into Chinese.\nmoon",
           "When does the teahouse open?"]


def _train(cfg: Config) -> None:
    from merak_lora.finetune import run
    run(cfg)


@pytest.fixture(scope="module")
def memorised(tiny_llama, tmp_path_factory):
    """An adapter trained until it repeats four training answers (so it visibly changes the model)."""
    tmp = tmp_path_factory.mktemp("memorised")
    records = [r for r in json.load(open(SAMPLE, encoding="utf-8"))
               if r["instruction"] in ("What is your signature tea?", "When does the teahouse open?",
                                       "你们有什么招牌茶？", "Who owns the teahouse?")]
    data = tmp / "four.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    cfg = Config(model_path=tiny_llama, data_path=str(data), lora_config=LORA_CONFIG, output_dir=str(tmp / "out"),
                 pp=2, max_steps=60, per_device_train_batch_size=2, gradient_accumulation_steps=2, seq_length=128,
                 learning_rate=1e-2, logging_steps=20, save_steps=60, disable_tqdm=True, report_to="none",
                 device="cpu")
    run_ranks(_train, 2, cfg)
    return os.path.join(cfg.output_dir, "checkpoint-60"), records


def _encode(model: str, prompts: list[str]) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model)
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                    tokenize=False) for p in prompts], tok


def _pipeline_generate(model: str, ckpt: str, prompts: list[list[int]], max_new: int, sampling: dict,
                       adapters: tuple = (True, False)):
    """The answers with each of `adapters` in turn (by default the tuned ones, then the base's)."""
    from merak_lora.chat import GenConfig, build_generator
    cfg = GenConfig(model_path=model, resume_peft_from_checkpoint=ckpt, max_new_tokens=max_new, device="cpu",
                    compare_base=True, **sampling)
    gen, _, layout = build_generator(cfg)
    if layout is not None and layout.rank != 0:
        gen.serve()
        return None
    answers = tuple(gen.generate(prompts, cfg.sampling(), adapter=a) for a in adapters)
    gen.close()
    return answers


@contextlib.contextmanager
def _counting_caches() -> Iterator[list]:
    """Counts the static caches generation makes meanwhile (each rank its own)."""
    from merak_lora import generate
    made, real = [], generate.StaticStageCache

    def counted(*args):
        made.append(1)
        return real(*args)
    generate.StaticStageCache = counted
    try:
        yield made
    finally:
        generate.StaticStageCache = real


def _ids(model: str) -> list[list[int]]:
    texts, tok = _encode(model, PROMPTS)
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _hf_generate(model: str, ckpt: str, prompts: list[list[int]], max_new: int, quantization=None) -> list[list[int]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from merak_lora.export import export_adapter
    from merak_lora.generate import left_pad

    tok = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, quantization_config=quantization)
    peft_model = PeftModel.from_pretrained(base, export_adapter(ckpt, ckpt + "-peft")).eval()
    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        rows.append(row[:cut])
    return rows


@pytest.mark.parametrize("pp", [2, 3, 4])
def test_pipeline_greedy_equals_transformers_generate(tiny_llama, memorised, pp):
    ckpt, _ = memorised
    prompts = _ids(tiny_llama)
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths exercise the left padding"
    tuned, base = run_ranks(_pipeline_generate, pp, tiny_llama, ckpt, prompts, 24, {})[0]
    reference = _hf_generate(tiny_llama, ckpt, prompts, 24)
    assert tuned == reference
    assert tuned != base, "the adapter changed no token, so the comparison would prove little"


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_four_bit_pipeline_greedy_equals_transformers_generate(tiny_llama, memorised):
    """Two stages on a 4-bit base (q, k, v and gate, up joined: shared_products.py) answer as transformers'
    generate() with PEFT on the same NF4 base, double-quantized scales included."""
    from transformers import BitsAndBytesConfig
    ckpt, _ = memorised
    prompts = _ids(tiny_llama)
    flags = dict(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="float32")
    tuned, base = run_ranks(_pipeline_generate, 2, tiny_llama, ckpt, prompts, 24, flags)[0]
    reference = _hf_generate(tiny_llama, ckpt, prompts, 24, BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    assert tuned == reference
    assert tuned != base, "the adapter changed no token, so the comparison would prove little"


def test_sampling_is_the_same_on_one_and_two_stages(tiny_llama, memorised):
    ckpt, _ = memorised
    prompts = _ids(tiny_llama)
    sampling = dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=11)
    two = run_ranks(_pipeline_generate, 2, tiny_llama, ckpt, prompts, 16, sampling)[0]
    # one process through the same stage machinery (pp=1), not transformers' generate
    from merak_lora.chat import GenConfig, _pipeline_generator
    cfg = GenConfig(model_path=tiny_llama, resume_peft_from_checkpoint=ckpt, max_new_tokens=16, device="cpu",
                    compare_base=True, **sampling)
    from merak_lora.checkpoint import read_meta
    gen, _, _ = _pipeline_generator(cfg, AutoTokenizer.from_pretrained(tiny_llama), ckpt, read_meta(ckpt), 1)
    one = gen.generate(prompts, cfg.sampling(), adapter=True)
    assert one == two[0]
    greedy = run_ranks(_pipeline_generate, 2, tiny_llama, ckpt, prompts, 16, {})[0][0]
    assert one != greedy, "sampling settings had no effect"


def test_compare_base_shows_the_fine_tuned_answer(tiny_llama, memorised, tmp_path):
    ckpt, records = memorised
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": r["instruction"]}, ensure_ascii=False)
                                 for r in records[:2]), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    proc = torchrun(2, "gen_text.py", "--model_path", tiny_llama, "--resume_peft_from_checkpoint", ckpt,
                    "--prompts", str(prompts), "--output_file", str(out), "--compare_base", "true",
                    "--max_new_tokens", "80", "--return_logits", "true", "--text_generation", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == [r["instruction"] for r in records[:2]]
    for row, rec in zip(rows, records):
        assert row["answer"] == rec["output"]          # the fine-tuned model gives the training answer
        assert row["base_answer"] != row["answer"]     # the base model does not


def test_one_process_from_exported_adapter_and_merged_model(tiny_llama, memorised, tmp_path):
    """No torchrun: the exported PEFT adapter, and the merged model, answer as the pipeline does."""
    from merak_lora.chat import main
    from merak_lora.export import export_adapter, merge

    ckpt, records = memorised
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(r["instruction"] for r in records), encoding="utf-8")
    adapter = export_adapter(ckpt, str(tmp_path / "adapter"))
    merged = merge(ckpt, str(tmp_path / "merged"))
    answers = {}
    for name, flags in {"adapter": ["--model_path", tiny_llama, "--adapter_path", adapter],
                        "merged": ["--model_path", merged],
                        "stop": ["--model_path", merged, "--stop", "Longjing", "morning"]}.items():
        out = tmp_path / f"{name}.jsonl"
        assert main([*flags, "--prompts", str(prompts), "--output_file", str(out), "--max_new_tokens", "80"]) == 0
        answers[name] = [json.loads(l)["answer"] for l in out.read_text(encoding="utf-8").splitlines()]
    assert answers["adapter"] == answers["merged"] == [r["output"] for r in records]
    assert answers["stop"][0] == "We open at eight in the"  # cut before the first stop string
    assert answers["stop"][2] == records[2]["output"]          # no stop string in this one


def test_interactive_chat_through_a_pipe(tiny_llama, memorised):
    import subprocess
    import sys

    from conftest import ROOT
    ckpt, records = memorised
    typed = f"{records[0]['instruction']}\n/reset\n{records[1]['instruction']}\n/exit\nnever read\n"
    cmd_flags = ["--model_path", tiny_llama, "--resume_peft_from_checkpoint", ckpt, "--max_new_tokens", "80"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(ROOT, "launch", "gen_text.py"), *cmd_flags], input=typed,
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count(">>> ") == 4          # question, /reset, question, /exit; the line after /exit is not read
    assert records[0]["output"] in out and records[1]["output"] in out
    assert "(conversation cleared)" in out
    assert re.search(r"\(\d+ tokens, first after \d+\.\d\d s, \d+\.\d tokens/s\)", out), out[-500:]


def _interrupted_at_third_token(model: str, ckpt: str, prompt: list[int]):
    """Rank 0 answers in full, then again with a real SIGINT sent to both ranks (as Ctrl-C reaches a job's
    process group) when its third token arrives, then in full once more; every rank counts the caches it made."""
    import signal

    import torch.distributed as dist

    from merak_lora.chat import GenConfig, build_generator
    cfg = GenConfig(model_path=model, resume_peft_from_checkpoint=ckpt, max_new_tokens=24, device="cpu",
                    compare_base=True)
    gen, _, layout = build_generator(cfg)
    pids = [None, None]
    dist.all_gather_object(pids, os.getpid())
    with _counting_caches() as made:
        if layout.rank != 0:
            gen.serve()
            return len(made)
        full = gen.generate([prompt], cfg.sampling(), adapter=False)[0]
        seen = []

        def on_token(tokens, done):
            seen.append(tokens[0])
            if len(seen) == 3:
                for pid in pids:
                    os.kill(pid, signal.SIGINT)
        cut = gen.generate([prompt], cfg.sampling(), adapter=False, on_token=on_token)[0]
        interrupted = gen.interrupted
        again = gen.generate([prompt], cfg.sampling(), adapter=False)[0]
        gen.close()
    return full, cut, interrupted, again, seen, len(made)


def test_ctrl_c_cuts_an_answer_short_on_every_rank(tiny_llama, memorised):
    """The host reads each step's tokens while the next step runs (generate.py); Ctrl-C still stops both
    ranks at one token, the answer is what was shown so far, and the next request answers in full from the
    cache the cut one left half filled (each rank made one cache for the three requests of one shape)."""
    ckpt, _ = memorised
    (full, cut, interrupted, again, seen, made), made_last = run_ranks(_interrupted_at_third_token, 2, tiny_llama,
                                                                       ckpt, _ids(tiny_llama)[0])
    assert len(full) == 24, "the base's answer ran to the length limit"
    assert interrupted and 3 <= len(cut) < len(full) and cut == full[:len(cut)] == seen
    assert again == full
    assert made == made_last == 1


def test_a_request_of_the_same_shape_takes_the_last_ones_cache(tiny_llama, memorised):
    """A request of the same rows, cache length and model takes the cache (and step) an earlier one left, reset,
    and answers as a fresh generator does; another model or shape makes its own, the least recently used of the
    two kept is dropped and freed, a request that raised leaves nothing behind, and close() frees them all."""
    from merak_lora.chat import GenConfig, _pipeline_generator
    from merak_lora.checkpoint import read_meta
    ckpt, _ = memorised
    cfg = GenConfig(model_path=tiny_llama, resume_peft_from_checkpoint=ckpt, max_new_tokens=12, device="cpu",
                    compare_base=True)
    gen, _, _ = _pipeline_generator(cfg, AutoTokenizer.from_pretrained(tiny_llama), ckpt, read_meta(ckpt), 1)
    batches = {"these": _ids(tiny_llama)}
    batches["reversed"] = batches["these"][::-1]  # the same shape, another prompt in every row

    def answer(batch: str, adapter: bool = True, **kw) -> list[list[int]]:
        return gen.generate(batches[batch], cfg.sampling(), adapter=adapter, **kw)

    def kept() -> list:
        return [d.cache for _, d in gen.pool.entries]
    fresh = {}
    for batch in batches:
        for adapter in (True, False):
            gen.pool.clear()
            fresh[batch, adapter] = answer(batch, adapter)
    assert fresh["these", True] != fresh["reversed", True] != fresh["reversed", False]
    gen.pool.clear()
    assert answer("these") == fresh["these", True]
    (tuned,) = kept()
    assert answer("reversed") == fresh["reversed", True]
    assert len(kept()) == 1 and kept()[0] is tuned
    assert answer("reversed", False) == fresh["reversed", False]
    assert len(kept()) == 2 and kept()[0] is tuned and kept()[1] is not tuned
    base = weakref.ref(kept()[1])
    assert answer("these") == fresh["these", True] and kept()[0] is base() and kept()[1] is tuned
    gen.generate(batches["these"][:3], cfg.sampling())  # another shape: the base's cache, used least recently, goes
    assert base() is None and len(kept()) == 2 and kept()[0] is tuned

    def fails(tokens, done):
        raise RuntimeError("the caller's callback failed")
    with pytest.raises(RuntimeError, match="callback failed"):
        answer("reversed", on_token=fails)
    assert len(kept()) == 1 and kept()[0] is not tuned
    assert answer("reversed") == fresh["reversed", True]
    gen.close()
    assert kept() == []


def test_a_kept_cache_is_reset_in_place():
    """Taken from the pool, a cache is as new (keys, values and lengths zero; layers it does not own still
    unallocated) in the same tensors, which a captured graph reads; the least recently given goes first."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from merak_lora.decode import DecoderPool, StaticStageCache
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)
    cache = StaticStageCache(config, range(1, 3), 16)
    for layer in (1, 2):
        cache.update(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), layer)
    tensors = [(layer.keys, layer.values, layer.cumulative_length) for layer in cache.layers[1:3]]
    assert all(n.item() == 5 for n in cache.lengths())
    pool = DecoderPool(2)
    pool.give([("a", SimpleNamespace(cache=cache)), ("b", SimpleNamespace(cache=None))])
    taken, missing = pool.take(["a", "c"])
    assert taken.cache is cache and missing is None
    assert [key for key, _ in pool.entries] == [], "b went to leave room for a and c"
    assert not cache.layers[0].is_initialized and not cache.layers[3].is_initialized
    for layer, (keys, values, length) in zip(cache.layers[1:3], tensors):
        assert layer.keys is keys and layer.values is values and layer.cumulative_length is length
        assert not keys.any() and not values.any() and length.item() == 0
    pool.give([("a", taken), ("c", SimpleNamespace(cache=None)), ("d", SimpleNamespace(cache=None))])
    assert [key for key, _ in pool.entries] == ["c", "d"]


def test_a_family_that_cannot_generate_across_stages_is_refused_before_loading(tmp_path):
    """openai-gpt trains at any stage count but keeps no KV cache: gen.sh at two stages says to use one process."""
    from transformers import AutoTokenizer

    from merak_lora.chat import GenConfig, _pipeline_generator
    from merak_lora.config import ConfigError
    from merak_lora.tiny import make_tiny_model

    model = make_tiny_model(str(tmp_path / "gpt"), "openai-gpt", num_layers=4)
    cfg = GenConfig(model_path=model, pp=2, device="cpu")
    with pytest.raises(ConfigError, match="'openai-gpt' cannot generate across pipeline stages yet.*python "
                                          "launch/gen_text.py"):
        _pipeline_generator(cfg, AutoTokenizer.from_pretrained(model), None, None, 2)


def test_static_cache_decodes_like_the_growing_cache(tiny_llama, memorised):
    """The fixed-size cache with masks prepared over it (and, on a GPU, CUDA graphs) gives the tokens the growing
    cache gives, greedy and sampled, with left padding."""
    from merak_lora.chat import GenConfig, _pipeline_generator
    from merak_lora.checkpoint import read_meta
    ckpt, _ = memorised
    prompts = _ids(tiny_llama)
    cfg = GenConfig(model_path=tiny_llama, resume_peft_from_checkpoint=ckpt, max_new_tokens=20, device="cpu",
                    compare_base=True)
    gen, _, _ = _pipeline_generator(cfg, AutoTokenizer.from_pretrained(tiny_llama), ckpt, read_meta(ckpt), 1)
    assert gen.static, "a Llama decodes with the static cache"
    settings = [cfg.sampling(), GenConfig(temperature=0.8, top_k=20, seed=3, max_new_tokens=20).sampling()]
    static = [gen.generate(prompts, s, adapter=a) for s in settings for a in (True, False)]
    gen.static = False
    growing = [gen.generate(prompts, s, adapter=a) for s in settings for a in (True, False)]
    assert static == growing
    assert static[0] != static[2], "sampling changed nothing"


def _answers_compiled(model: str, ckpt: str, prompts: list[list[int]], samplings: list[dict]):
    """Each sampling's answers with the adapter and without, from a generator that compiles its one-token step,
    and how many graphs this rank compiled."""
    from torch._dynamo.utils import counters

    from merak_lora.chat import GenConfig, build_generator
    gen, _, layout = build_generator(GenConfig(model_path=model, resume_peft_from_checkpoint=ckpt, device="cpu",
                                               compare_base=True, compile=True))
    graphs = counters["stats"]["unique_graphs"]
    if layout.rank != 0:
        gen.serve()
        return None, counters["stats"]["unique_graphs"] - graphs
    assert gen.compiled and gen.in_flight
    out = [gen.generate(prompts, GenConfig(max_new_tokens=16, **s).sampling(), adapter=a)
           for s in samplings for a in (True, False)]
    gen.close()
    return out, counters["stats"]["unique_graphs"] - graphs


def test_compiled_step_decodes_like_the_eager_step(tiny_llama, memorised):
    """--compile true compiles each stage's one-token step as a whole, once per adapter setting: on two stages
    with groups in flight, with the adapter and without, greedy and sampled, the tokens of one process that does
    not compile."""
    from merak_lora.chat import GenConfig, _pipeline_generator
    from merak_lora.checkpoint import read_meta
    ckpt, _ = memorised
    prompts = _ids(tiny_llama)
    samplings = [{}, dict(temperature=0.8, top_k=20, seed=3)]
    (compiled, graphs), (_, graphs_last) = run_ranks(_answers_compiled, 2, tiny_llama, ckpt, prompts, samplings)
    # each stage's step compiled whole (the first stage's early exit traced, not a graph break that compiles
    # layer by layer), once with the adapter and once without: switching back compiles nothing again
    assert graphs == graphs_last == 2
    cfg = GenConfig(model_path=tiny_llama, resume_peft_from_checkpoint=ckpt, device="cpu", compare_base=True)
    gen, _, _ = _pipeline_generator(cfg, AutoTokenizer.from_pretrained(tiny_llama), ckpt, read_meta(ckpt), 1)
    assert not gen.compiled
    eager = [gen.generate(prompts, GenConfig(max_new_tokens=16, **s).sampling(), adapter=a)
             for s in samplings for a in (True, False)]
    assert compiled == eager
    assert eager[0] != eager[1] and eager[0] != eager[2], "the adapter and sampling change the answers"


def test_a_step_that_does_not_compile_decodes_uncompiled(tiny_llama, memorised, monkeypatch, caplog):
    """A compiler failure in the one-token step (here after the step has already written the cache) costs one
    warning: the step is rewound and run uncompiled, the answers are the uncompiled ones, and the generator stops
    compiling for later requests."""
    from merak_lora import decode
    from merak_lora.chat import GenConfig, _pipeline_generator
    from merak_lora.checkpoint import read_meta
    ckpt, _ = memorised
    prompts = _ids(tiny_llama)
    cfg = GenConfig(model_path=tiny_llama, resume_peft_from_checkpoint=ckpt, max_new_tokens=12, device="cpu",
                    compare_base=True)
    gen, _, _ = _pipeline_generator(cfg, AutoTokenizer.from_pretrained(tiny_llama), ckpt, read_meta(ckpt), 1)
    want = gen.generate(prompts, cfg.sampling())
    calls = []

    def breaks(*args):
        calls.append(1)
        decode.stage_step(*args)  # the cache is written, then the "compiler" fails
        raise RuntimeError("inductor: unsupported operation\nmore detail")
    monkeypatch.setattr(decode, "compiled_stage_step", breaks)
    gen.compiled = True
    with caplog.at_level("WARNING", logger="merak_lora"):
        assert gen.generate(prompts, cfg.sampling()) == want
    assert len(calls) == 1 and not gen.compiled
    assert [r.getMessage() for r in caplog.records] == [
        "stage 0: decoding without compiling (RuntimeError: inductor: unsupported operation)"]
    assert gen.generate(prompts, cfg.sampling()) == want and len(calls) == 1


def test_adapter_held_in_the_activation_dtype_computes_the_same():
    """Generation keeps an unmerged adapter in the activations' dtype (`lora.adapters_in_dtype`): the LoRA
    forward cast it to that dtype at every call anyway, so bf16 logits stay bit for bit the same."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig
    from merak_lora.lora import adapters_in_dtype, apply_lora
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16)
    model = apply_lora(lm, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", init_lora_weights=False),
                       seed=1).eval()
    ids = torch.randint(0, 128, (2, 12))
    kept = [p.dtype for n, p in model.named_parameters() if ".lora_" in n]
    assert set(kept) == {torch.float32}, "PEFT keeps the adapter in fp32"
    with torch.no_grad():
        before = model(input_ids=ids).logits
        adapters_in_dtype(model, torch.bfloat16)
        after = model(input_ids=ids).logits
    assert {p.dtype for n, p in model.named_parameters() if ".lora_" in n} == {torch.bfloat16}
    assert torch.equal(before, after)
    with torch.no_grad(), model.disable_adapter():
        assert not torch.equal(after, model(input_ids=ids).logits), "the adapter changes the logits"


def test_adapter_merged_for_generation_answers_as_unmerged(tiny_llama, memorised):
    """Without --compare_base the adapter is folded into the base weights: the same greedy tokens as the
    unmerged adapter, and asking the merged generator for the base model is refused, not answered wrongly."""
    from merak_lora.chat import GenConfig, _pipeline_generator
    from merak_lora.checkpoint import read_meta
    from merak_lora.generate import Sampling
    ckpt, _ = memorised
    prompts = _ids(tiny_llama)
    answers = {}
    for compare_base in (True, False):
        cfg = GenConfig(model_path=tiny_llama, resume_peft_from_checkpoint=ckpt, device="cpu",
                        compare_base=compare_base)
        gen, _, _ = _pipeline_generator(cfg, AutoTokenizer.from_pretrained(tiny_llama), ckpt, read_meta(ckpt), 1)
        assert gen.merged is not compare_base
        answers[compare_base] = gen.generate(prompts, Sampling(max_new_tokens=24))
    assert answers[False] == answers[True]
    with pytest.raises(ValueError, match="the adapter is merged"):
        gen.generate(prompts, Sampling(max_new_tokens=2), adapter=False)


def _counting_in_flight(model: str, ckpt: str, prompts: list[list[int]], sampling: dict):
    """_pipeline_generate on every rank, tuned, base and tuned again, counting the requests decoded as groups in
    flight and the caches made."""
    from merak_lora.generate import PipelineGenerator
    calls = []
    original = PipelineGenerator._run_in_flight

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)
    PipelineGenerator._run_in_flight = counted
    try:
        with _counting_caches() as made:
            return _pipeline_generate(model, ckpt, prompts, 20, sampling, (True, False, True)), len(calls), len(made)
    finally:
        PipelineGenerator._run_in_flight = original


@pytest.mark.parametrize("sampling", [{}, dict(temperature=0.9, top_k=40, seed=5)], ids=["greedy", "sampled"])
def test_groups_in_flight_answer_as_the_whole_batch(tiny_llama, memorised, sampling):
    """Three stages, five prompts: groups of 1, 2 and 2 rows in the pipeline at once give every row the tokens
    one process gives the undivided batch, rows finishing at different steps. Asked again, every rank's groups
    take the caches the first request left (three per request and model) and answer the same."""
    from merak_lora.chat import GenConfig, _pipeline_generator
    from merak_lora.checkpoint import read_meta
    ckpt, _ = memorised
    prompts = _ids(tiny_llama) + _ids(tiny_llama)[:1]
    out = run_ranks(_counting_in_flight, 3, tiny_llama, ckpt, prompts, sampling)
    (tuned, base, again), calls, _ = out[0]
    assert calls == 3 and all(c == 3 for _, c, _ in out[1:]), "every rank decoded every request in groups"
    assert again == tuned and [made for _, _, made in out] == [6, 6, 6]
    cfg = GenConfig(model_path=tiny_llama, resume_peft_from_checkpoint=ckpt, max_new_tokens=20, device="cpu",
                    compare_base=True, **sampling)
    gen, _, _ = _pipeline_generator(cfg, AutoTokenizer.from_pretrained(tiny_llama), ckpt, read_meta(ckpt), 1)
    assert tuned == gen.generate(prompts, cfg.sampling(), adapter=True)
    assert base == gen.generate(prompts, cfg.sampling(), adapter=False)
    if not sampling:  # greedy answers end at their memorised ends, so groups finish at different ticks
        assert len({len(a) for a in tuned}) > 1, "rows finished at different steps"
