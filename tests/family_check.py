"""Loss, LoRA gradients and greedy tokens of one model, through the pipeline and through one PEFT process."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from conftest import SAMPLE
from dist_helper import run_ranks
from reference import rel

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "task_type": "CAUSAL_LM", "init_lora_weights": False}


def check(model_dir: str, lora: dict, trust: bool = False, stages: tuple[int, ...] = (2, 3),
          idle: tuple[str, ...] = (), generation: bool = True) -> None:
    """At each stage count the loss and every LoRA gradient equal one-process PEFT's within 1e-5 relative, and
    at the first one (unless `generation` is off) greedy tokens equal transformers' generate(). idle: module
    names whose adapters get no gradient from this input in PEFT either (Doge's dt_proj without an attention
    mask); every other one must."""
    b = batch(model_dir)
    ref_loss, ref_grads, ref_tokens = reference(model_dir, lora, b, 4, trust, generation)
    moving = [g for k, g in ref_grads.items() if not any(f".{name}.lora_" in k for name in idle)]
    assert moving and all(g.abs().sum() > 0 for g in moving)
    for pp in stages:
        generating = generation and pp == stages[0]
        results = run_ranks(pipeline_run, pp, model_dir, pp, lora, b, generating, trust)
        loss = next(r[0] for r in results if r[0] is not None)
        grads = {k: v for r in results for k, v in r[1].items()}
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), f"pp={pp}: loss {loss} vs {ref_loss}"
        assert grads.keys() == ref_grads.keys(), f"pp={pp}: LoRA tensors differ"
        worst = max(rel(grads[k], ref_grads[k]) for k in ref_grads)
        assert worst < 1e-5, f"pp={pp}: a LoRA gradient differs by {worst:.2e}"
        assert len({r[3][0] for r in results}) == 1 and len(results[0][3]) == pp
        if generating:
            assert results[0][2] == ref_tokens, "greedy tokens differ from transformers' generate()"


def batch(model_dir: str, rows: int = 4, seq: int = 48):
    """Real records of different lengths (padded on the right), as training sees them."""
    from transformers import AutoTokenizer

    from merak_lora.data import DataSpec, collate, tokenize_records
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    examples = tokenize_records(DataSpec(SAMPLE, seq_length=seq), tok).examples[:rows]
    return collate([[e] for e in examples], tok.pad_token_id, 8, seq)


def prompts(model_dir: str) -> list[list[int]]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    texts = ["你是谁？", "What is 12 + 30?", "Translate the following word into Chinese.\nmoon"]
    return [tok(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                        tokenize=False), add_special_tokens=False)["input_ids"] for t in texts]


def pipeline_run(model_dir: str, pp: int, lora: dict, b, with_generation: bool, trust: bool = False):
    """On every rank: one training step's loss and gradients, and greedy tokens; results from the ranks that
    hold them (loss and tokens on the last stage's rank, gradients everywhere)."""
    from merak_lora.chat import GenConfig
    from merak_lora.finetune import build_stages, make_plan
    from merak_lora.generate import PipelineGenerator, Sampling
    from merak_lora.layout import init_distributed
    from merak_lora.lora import adapter_params
    from merak_lora.schedule import Pipeline, TokenLoss

    cfg = GenConfig(model_path=model_dir, pp=pp, device="cpu", trust_remote_code=trust, seed=3)
    plan = make_plan(cfg, pp, lora)
    layout = init_distributed(pp, 1, False, "cpu")
    stages = build_stages(cfg, plan, layout)
    # 16 tokens' logits at a time, so families with a plain head run the chunked loss over several chunks
    pipe = Pipeline(stages, layout, "1f1b", b.input_ids.shape[0], TokenLoss(chunk_elements=16 * plan.vocab_size),
                    plan.hidden_size, plan.vocab_size, torch.float32)
    pipe.loss_fn.normalizer = b.targets_count
    for s in stages:
        s.train()
    loss = pipe.step(b)
    grads = {n: p.grad.detach().clone() for s in stages for n, p in adapter_params(s.model).items()
             if p.grad is not None}
    tokens = None
    if with_generation:
        from transformers import AutoTokenizer
        for s in stages:
            s.eval()
        gen = PipelineGenerator(stages, layout, AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True),
                                plan.model_config,
                                plan.hidden_size, torch.float32)
        if layout.rank == 0:
            tokens = gen.generate(prompts(model_dir), Sampling(max_new_tokens=10), adapter=True)
            gen.close()
        else:
            gen.serve()
    if torch.distributed.is_initialized():  # one stage runs without a process group
        torch.distributed.destroy_process_group()
    return (None if loss is None else loss.item()), grads, tokens, [(s.start, s.stop) for s in plan.specs]


def reference(model_dir: str, lora: dict, b, microbatches: int, trust: bool = False, generation: bool = True):
    """One process: transformers + PEFT on the whole model, same adapter start, same microbatches, on one
    thread as the ranks run (more threads sum matmuls in another order; post-norm encoders with this test's
    wide random weights turn that into gradients 2e-5 apart). Greedy tokens only with `generation`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference(model_dir, lora, b, microbatches, trust, generation)
    finally:
        torch.set_num_threads(threads)


def _reference(model_dir: str, lora: dict, b, microbatches: int, trust: bool, generation: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from merak_lora.lora import adapter_params, build_lora_config, init_adapter
    from merak_lora.models import find_parts, linear_names

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust)
    names = [n for n, m in base.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
             or type(m).__name__ == "Conv1D"]
    resolved = build_lora_config(lora, base.config.model_type, names,
                                 linear_names(base, find_parts(base, base.config)),
                                 param_names=[n for n, _ in base.named_parameters()])
    model = get_peft_model(base, LoraConfig(**{k: getattr(resolved, k) for k in
                                               ("r", "lora_alpha", "lora_dropout", "target_modules",
                                                "target_parameters", "init_lora_weights", "task_type")}))
    init_adapter(model, 3, lora.get("init_lora_weights", True))
    model.train()
    total = 0.0
    for ids, tgt in zip(b.input_ids.chunk(microbatches), b.targets.chunk(microbatches)):
        logits = model(input_ids=ids, use_cache=False).logits.float()  # as training runs, no cache
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                               reduction="sum") / b.targets_count
        loss.backward()
        total += loss.item()
    # adapters on modules this input never reaches (a vision tower's q_proj) get no gradient, here or staged
    grads = {n: p.grad.detach().clone() for n, p in adapter_params(model).items() if p.grad is not None}
    return total, grads, _greedy(model, model_dir) if generation else None


def _greedy(model, model_dir: str) -> list[list[int]]:
    """transformers' generate() on the prompts, up to and including EOS."""
    from transformers import AutoTokenizer

    from merak_lora.generate import left_pad
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    ids, mask = left_pad(prompts(model_dir), tok.pad_token_id, "cpu")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    tokens = []
    for row in out[:, ids.shape[1]:].tolist():
        tokens.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return tokens


def make_custom(kind: str, out: str) -> str:
    """A model folder the way trust_remote_code models ship: config with auto_map, the modeling files, weights,
    tokenizer."""
    import os
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from merak_lora.tiny import make_tokenizer

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "custom_models", kind)
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(here):
        if f.endswith(".py"):
            shutil.copy(os.path.join(here, f), out)
    tok = make_tokenizer()
    names = {"openelm": "OpenELM", "index": "Index"}[kind]
    config = {"model_type": kind, "architectures": [f"{names}ForCausalLM"], "vocab_size": len(tok),
              "auto_map": {"AutoConfig": f"configuration_{kind}.{names}Config",
                           "AutoModelForCausalLM": f"modeling_{kind}.{names}ForCausalLM"},
              "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.pad_token_id}
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(config, fh)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out, trust_remote_code=True),
                                             trust_remote_code=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
