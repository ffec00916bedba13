"""Talking to the model: interactive chat on rank 0's terminal, a one-shot --prompt, or --prompts FILE batches,
with the base model's answer beside the fine-tuned one under --compare_base, and from a checkpoint of several
adapters every adapter's answer (or those of --adapter_names), each under its name.

Under torchrun every rank loads only its stage and generation runs across the pipeline; in a single process the
whole model runs through transformers' generate() (from a checkpoint, an exported adapter or a merged model).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import replace
from typing import IO, Any

import torch
import torch.distributed as dist

from .config import NOT_APPLICABLE_HERE, ConfigError, GenConfig, parse_args
from .entry import env_ranks
from .generate import Adapter, LocalGenerator, PipelineGenerator
from .templates import Formatter

log = logging.getLogger("merak_lora")


def read_prompts(path: str) -> list[str]:
    """One prompt per line, or JSON lines with "prompt", "instruction" (+ "input") or "text"."""
    prompts = []
    with open(path, encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
                text = rec.get("prompt") or rec.get("text") or rec.get("instruction")
                if not isinstance(text, str):
                    raise ConfigError(f"{path}: line {n} has no \"prompt\", \"instruction\" or \"text\" field")
                if rec.get("input"):
                    text = f"{text}\n{rec['input']}"
                prompts.append(text)
            else:
                prompts.append(line)
    if not prompts:
        raise ConfigError(f"{path}: no prompts in the file")
    return prompts


class Chat:
    """Conversation state and prompt formatting around a generator (pipeline or local)."""

    def __init__(self, generator, tokenizer, cfg: GenConfig):
        self.gen = generator
        self.tok = tokenizer
        self.cfg = cfg
        self.formatter = Formatter(tokenizer, cfg.template)
        self.sampling = cfg.sampling()
        # (label, adapter) of each answer a prompt gets, in order
        self.variants: list[tuple[str, Adapter]] = \
            ([("base", False)] if cfg.compare_base else []) + \
            ([(n, n) for n in generator.adapters] or [("fine-tuned" if cfg.compare_base else "", True)])
        # each adapter continues its own conversation; the base model answers within the first adapter's
        first = (generator.adapters or [True])[0]
        self.conversation = {a: first if a is False else a for _, a in self.variants}
        self.history: dict[Adapter, list[dict]] = {}

    def encode(self, messages: list[dict]) -> list[int]:
        system = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        text = self.formatter.render(system + messages, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        """The answer text, cut before the first stop string."""
        text = self.tok.decode(ids, skip_special_tokens=True)
        for stop in self.sampling.stop:
            text = text.split(stop, 1)[0]
        return text.strip()

    def answer_batch(self, questions: list[str], adapter: Adapter = True) -> list[str]:
        prompts = [self.encode([{"role": "user", "content": q}]) for q in questions]
        return [self.decode(g) for g in self.gen.generate(prompts, self.sampling, adapter)]

    def turn(self, question: str, out: IO[str]) -> None:
        """One interactive turn: stream each answer under its label, keep the fine-tuned ones in the history."""
        said = {}
        for label, adapter in self.variants:
            messages = self.history.get(self.conversation[adapter], []) + [{"role": "user", "content": question}]
            if label:
                out.write(f"[{label}] ")
            stream = _TextStream(self.tok, out)
            ids = self.gen.generate([self.encode(messages)], self.sampling, adapter, stream.on_token)[0]
            out.write(f"\n{stream.timing()}\n")
            out.flush()
            if self.gen.interrupted:
                return
            if adapter is not False:
                said[adapter] = messages + [{"role": "assistant", "content": self.decode(ids)}]
        self.history.update(said)

    def interactive(self, inp: IO[str], out: IO[str]) -> None:
        """Questions from `inp` until end of input, /exit or Ctrl-C (at the prompt or during an answer)."""
        out.write("merak-lora chat: type a message; /reset clears the conversation, /exit or Ctrl-C quits.\n")
        out.flush()
        try:
            while True:
                out.write(">>> ")
                out.flush()
                line = inp.readline()
                if not line:  # end of input
                    break
                text = line.strip()
                if not text:
                    continue
                if text == "/exit":
                    break
                if text == "/reset":
                    self.history = {}
                    out.write("(conversation cleared)\n")
                    continue
                self.turn(text, out)
                if self.gen.interrupted:
                    break
        except KeyboardInterrupt:
            out.write("\n")
        out.flush()

    def batch(self, questions: list[str], out_path: str) -> None:
        """JSON lines: {"prompt", "answer"}, or {"prompt", "answers": {name: answer}} with several adapters, and
        "base_answer" under --compare_base."""
        rows = []
        size = max(1, self.cfg.gen_batch_size)
        for i in range(0, len(questions), size):
            chunk = questions[i:i + size]
            answers = {adapter: self.answer_batch(chunk, adapter) for _, adapter in self.variants}
            if self.gen.interrupted:
                log.warning("interrupted by Ctrl-C: the answers so far are written")
                break
            for j, q in enumerate(chunk):
                row: dict[str, Any] = {"prompt": q}
                if self.gen.adapters:
                    row["answers"] = {n: answers[n][j] for n in self.gen.adapters}
                else:
                    row["answer"] = answers[True][j]
                if False in answers:
                    row["base_answer"] = answers[False][j]
                rows.append(row)
            log.info(f"generated {min(i + size, len(questions))}/{len(questions)}")
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        log.info(f"wrote {len(rows)} answers to {out_path}")


class _TextStream:
    """Prints the decoded answer as tokens arrive (holding back incomplete multi-byte characters)."""

    def __init__(self, tokenizer, out: IO[str]):
        self.tok, self.out = tokenizer, out
        self.ids: list[int] = []
        self.shown = 0
        self.start = time.perf_counter()
        self.first: float | None = None  # when the first token arrived

    def on_token(self, tokens: list[int], done: list[bool]) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        if tokens[0] >= 0:
            self.ids.append(tokens[0])
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not done[0]:
            return
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)

    def timing(self) -> str:
        """Time to the first token (the prompt's pass through every stage) and the decode rate after it."""
        if self.first is None:
            return "(no tokens)"
        rest = time.perf_counter() - self.first
        rate = f", {(len(self.ids) - 1) / rest:.1f} tokens/s" if len(self.ids) > 1 and rest > 0 else ""
        return f"({len(self.ids)} tokens, first after {self.first - self.start:.2f} s{rate})"


# ---------------------------------------------------------------------------------------------------------
# assembly

def build_generator(cfg: GenConfig):
    """(generator, tokenizer, layout or None): pipeline under torchrun, one process otherwise."""
    from transformers import AutoTokenizer

    from .checkpoint import read_meta, resolve

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path or cfg.weights_path,
                                              trust_remote_code=cfg.trust_remote_code)
    ckpt = resolve(cfg.resume_peft_from_checkpoint, cfg.output_dir) if cfg.resume_peft_from_checkpoint else None
    meta = read_meta(ckpt) if ckpt else None
    if cfg.adapter_path and ckpt:
        raise ConfigError("give either --adapter_path (an exported PEFT adapter) or --resume_peft_from_checkpoint")
    if cfg.adapter_path and not os.path.isfile(os.path.join(cfg.adapter_path, "adapter_config.json")):
        inside = sorted(n for n in os.listdir(cfg.adapter_path)
                        if os.path.isfile(os.path.join(cfg.adapter_path, n, "adapter_config.json"))) \
            if os.path.isdir(cfg.adapter_path) else []
        raise ConfigError(f"--adapter_path {cfg.adapter_path}: no adapter_config.json there"
                          + (f"; it holds the adapters {', '.join(inside)} of a run with --adapters: pass "
                             f"--adapter_path {os.path.join(cfg.adapter_path, inside[0])}" if inside else
                             " (a PEFT adapter folder: adapter_config.json + adapter_model.safetensors)"))
    _, world, _ = env_ranks()
    if world == 1:
        return _local_generator(cfg, tokenizer, ckpt, meta), tokenizer, None
    if cfg.adapter_path:
        raise ConfigError("--adapter_path is for one-process generation; under torchrun pass "
                          "--resume_peft_from_checkpoint with the training checkpoint")
    return _pipeline_generator(cfg, tokenizer, ckpt, meta, world)


def _checkpoint_adapters(cfg: GenConfig, ckpt: str | None, meta: dict | None) -> tuple[list, list[str]]:
    """What to load: (PEFT adapter name, folder, meta) per adapter, and the names requests choose from. A
    checkpoint of one adapter gives PEFT's "default" and no names; one of several gives each adapter that
    --adapter_names picks (all by default) from its own subfolder, a complete one-adapter checkpoint. A meta
    without a checkpoint (the benchmarks) gives a fresh adapter of its LoRA config, initialised from the seed."""
    from .checkpoint import read_meta
    from .export import pick_adapters
    from .lora import ADAPTER

    if not ckpt:
        if cfg.adapter_names:
            raise ConfigError("--adapter_names picks adapters of a checkpoint of several; pass it with "
                              "--resume_peft_from_checkpoint")
        return ([(ADAPTER, None, meta)] if meta else []), []
    names = pick_adapters(ckpt, meta, cfg.adapter_names)
    if not names:
        return [(ADAPTER, ckpt, meta)], []
    return [(n, os.path.join(ckpt, n), read_meta(os.path.join(ckpt, n))) for n in names], names


def _lora_raw(meta: dict) -> dict:
    return {k: v for k, v in meta["lora"].items() if k != "base_model_name_or_path"}


def _local_generator(cfg: GenConfig, tokenizer, ckpt: str | None, meta: dict | None) -> LocalGenerator:
    import warnings

    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from .checkpoint import check_compatible, load_adapter
    from .export import peft_config
    from .layout import pick_device
    from .plan import compute_dtype
    from .lora import adapter_params

    loaded, names = _checkpoint_adapters(cfg, ckpt, meta)
    device = pick_device(cfg.device, 0)
    model = AutoModelForCausalLM.from_pretrained(cfg.weights_path, dtype=compute_dtype(cfg),
                                                 trust_remote_code=cfg.trust_remote_code).to(device)
    if cfg.adapter_path:
        model = PeftModel.from_pretrained(model, cfg.adapter_path)
    for name, folder, m in loaded:
        if folder:
            check_compatible(folder, m, model.config, m["lora"], stages=[])
        with warnings.catch_warnings():  # PEFT warns of short names inside its "lora_" prefix: harmless here
            warnings.simplefilter("ignore")
            if isinstance(model, PeftModel):
                model.add_adapter(name, peft_config(m))
            else:
                model = get_peft_model(model, peft_config(m), adapter_name=name)
        if folder:
            load_adapter(folder, m, {0: adapter_params(model, name)})
    model.eval()
    return LocalGenerator(model, tokenizer, model.config, names)


def _pipeline_generator(cfg: GenConfig, tokenizer, ckpt, meta, world: int):
    from .checkpoint import check_compatible, load_adapter
    from .checks import checked_quantization
    from .layout import init_distributed
    from .lora import adapter_params, adapters_in_dtype, merge_for_generation
    from .models import NO_PIPELINE_GENERATION
    from .plan import build_stages, compute_dtype, make_plan
    from .shared_products import group_for_generation

    pp = cfg.pp or world
    chunks = cfg.chunks_per_rank()
    loaded, names = _checkpoint_adapters(cfg, ckpt, meta)
    plan = make_plan(cfg, pp * chunks, _lora_raw(loaded[0][2]) if loaded else None)
    model_type = plan.model_config.model_type
    if pp * chunks > 1 and model_type in NO_PIPELINE_GENERATION:
        raise ConfigError(f"model type {model_type!r} cannot generate across pipeline stages yet "
                          f"({NO_PIPELINE_GENERATION[model_type]}); generate in one process instead: python "
                          "launch/gen_text.py with the same flags (transformers' generate on the whole model)")
    loras = [plan.lora_cfg] + [plan.resolve_lora(_lora_raw(m), folder) for _, folder, m in loaded[1:]]
    for _, folder, m in loaded:
        if folder:
            check_compatible(folder, m, plan.model_config, m["lora"], stages=[])
    layout = init_distributed(pp, chunks, cfg.pipeline_schedule in ("zbv", "dualpipev"), cfg.device, cfg.dist_timeout)
    if layout.dp > 1:
        raise ConfigError(f"generation runs one pipeline: launch {pp} ranks or pass --pp {world}")
    # --compile compiles each stage's one-token step as a whole (decode.py), not its layers one by one
    stages = build_stages(replace(cfg, compile=False), plan, layout,
                          checked_quantization(cfg, layout.device),
                          [(name, lora, cfg.seed) for (name, _, _), lora in zip(loaded, loras)])
    for name, folder, m in loaded:
        if folder:  # a fresh adapter (the benchmarks') has nothing to load
            load_adapter(folder, m, {s.spec.index: adapter_params(s.model, name) for s in stages})
    for s in stages:
        s.eval()
        for p in s.parameters():
            p.requires_grad_(False)
    gen = PipelineGenerator(stages, layout, tokenizer, plan.model_config, plan.hidden_size, compute_dtype(cfg),
                            names)
    gen.compiled = cfg.compile
    gen.fused = gen.fused and cfg.fused_decode
    if cfg.compile:  # a compiled step per adapter setting, batch size and cache length (decode.py)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        log.info("--compile: each stage's one-token step compiles during the first answer of each new shape "
                 "(about a minute at 8B; later answers of that shape reuse it)")
    if len(loaded) == 1 and not cfg.compare_base:  # the base is never asked for: decode with the adapter folded in
        gen.merged = sum(merge_for_generation(s.model) for s in stages) > 0
    if not gen.merged:
        for s in stages:
            adapters_in_dtype(s.model, compute_dtype(cfg))
    for s in stages:
        gen.joined += group_for_generation(s.model)
    return gen, tokenizer, layout


def run(cfg: GenConfig, inp: IO[str] = sys.stdin, out: IO[str] = sys.stdout) -> None:
    from .metrics import setup_logging

    rank = env_ranks()[0]
    setup_logging(rank)
    if not (cfg.model_path or cfg.resume_from_checkpoint):
        raise ConfigError("no model: pass --model_path DIR")
    gen, tokenizer, layout = build_generator(cfg)
    if rank != 0:
        gen.serve()
        return
    chat = Chat(gen, tokenizer, cfg)
    try:
        if cfg.prompts:
            chat.batch(read_prompts(cfg.prompts), cfg.output_file or os.path.join(cfg.output_dir,
                                                                                 "generations.jsonl"))
        elif cfg.prompt:
            chat.turn(cfg.prompt, out)
        else:
            chat.interactive(inp, out)
    finally:
        gen.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rank = env_ranks()[0]
    try:
        cfg: Any = parse_args(argv, config_cls=GenConfig, warn=lambda m: rank == 0 and print(m, file=sys.stderr),
                              not_applicable=NOT_APPLICABLE_HERE)
        run(cfg)
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while loading, before the chat began
        if rank == 0:
            print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
