"""Fine-tuning, assembled: flags -> checks -> data -> stages -> pipeline -> trainer.

Everything that can fail on user input (flags, LoRA config, model folder, partition, data) is checked before
a single weight is read, and a data error found by rank 0 is shared so every rank stops with the same message.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import sys
from enum import Enum
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from . import failures, slurm
from . import quant as quantization
from .checkpoint import (CheckpointError, TrainState, check_compatible, config_hash, read_latest, read_meta, resolve,
                         restore, versions)
from .config import Config, ConfigError, help_text, parse_args, validate
from .data import Batches, DataSpec, TokenizedData, load_cache, pack, prepare, split_eval
from .layout import env_ranks, init_distributed, pick_device
from .lora import adapter_numel, adapter_params, build_lora_config, read_lora_config
from .metrics import Metrics, add_log_file, setup_logging
from .models import DEFAULT_TARGETS, find_parts, is_adaptable, is_linear, linear_names, text_config
from .optim import make_optimizer
from .schedule import Pipeline, TokenLoss
from .stage import build_skeleton, build_stage, load_model_config, plan_stages
from .trainer import Trainer, TrainingStopped
from .weights import WeightIndex

log = logging.getLogger("merak_lora")
RUN_ARTIFACTS = ("latest", "metrics.jsonl", "runs", "logs")


def compute_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32


def lora_as_json(lora_cfg) -> dict:
    """The resolved LoRA config in PEFT's field names, JSON-ready (sets sorted, enums as values)."""
    out = {}
    for f in dataclasses.fields(lora_cfg):
        v = getattr(lora_cfg, f.name)
        if isinstance(v, set):
            v = sorted(v)
        elif isinstance(v, Enum):
            v = v.value
        if isinstance(v, (str, int, float, bool, list, dict, type(None))):
            out[f.name] = v
    return out


@dataclasses.dataclass
class Plan:
    """What the checks produced: the model's config, its stage cuts, the resolved LoRA config."""

    model_config: Any
    specs: list
    lora_cfg: Any
    index: WeightIndex | None     # None with --random_weights
    hidden_size: int          # width of the activations passed between stages
    vocab_size: int
    adapter_numel: int = 0


def make_plan(cfg: Config, num_stages: int, lora_raw: dict | None) -> Plan:
    """Model config, weight index, stage cuts and resolved LoRA config (None: no adapter), from config alone."""
    model_config = load_model_config(cfg.model_path or cfg.weights_path, cfg.trust_remote_code)
    if getattr(model_config, "output_router_logits", False):
        # The router's load-balancing loss mixes every layer's routing statistics, which live on different
        # stages; the router itself is frozen under LoRA, so the pipeline trains on the language-model loss.
        log.warning("config.json sets output_router_logits: training without the MoE auxiliary loss")
        model_config.output_router_logits = False
    index = None if cfg.random_weights else WeightIndex(cfg.weights_path)
    skeleton = build_skeleton(model_config, compute_dtype(cfg), cfg.trust_remote_code, cfg.attn_implementation)
    parts = find_parts(skeleton, model_config)
    module_names = [n for n, m in skeleton.named_modules() if is_adaptable(m)]
    lora_cfg = None if lora_raw is None else build_lora_config(
        lora_raw, model_config.model_type, module_names, linear_names(skeleton, parts), source=cfg.lora_config,
        param_names=[n for n, _ in skeleton.named_parameters()])
    specs = plan_stages(skeleton, parts, num_stages, cfg.partition_method)
    numel = adapter_numel(lora_cfg, skeleton) if lora_cfg is not None else 0
    embed = skeleton.get_input_embeddings()
    head = skeleton.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else embed.num_embeddings
    text = text_config(model_config)
    # the layers' width (OPT projects its narrower embeddings up to it); remote code may only have the embedding
    hidden = getattr(text, "hidden_size", None) or embed.embedding_dim
    return Plan(model_config, specs, lora_cfg, index, hidden, vocab, numel)


def checked_quantization(cfg: Config, device: torch.device):
    """The QLoRA settings, after making sure bitsandbytes can run them here (None without QLoRA)."""
    quant = quantization.from_flags(cfg, compute_dtype(cfg))
    if quant is not None:
        quantization.check_available(quant, device)
    return quant


def build_stages(cfg: Config, plan: Plan, layout, quant=None) -> list:
    """This rank's stages, each holding only its own weights (and LoRA when the plan has a config)."""
    return [build_stage(plan.specs[i], plan.model_config, plan.index, device=layout.device,
                        dtype=compute_dtype(cfg), lora_config=plan.lora_cfg, seed=cfg.seed,
                        trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation,
                        gradient_checkpointing=cfg.gradient_checkpointing, tie=not cfg.no_tie_modules, quant=quant,
                        compile=cfg.compile)
            for i in layout.stage_ids()]


def check_fits(cfg: Config, plan: Plan) -> None:
    """Sizes that cannot work: sequences longer than the model's positions, checkpoints the disk cannot hold."""
    text = text_config(plan.model_config)
    max_pos = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if max_pos and cfg.seq_length > max_pos:
        raise ConfigError(f"--seq_length {cfg.seq_length} is longer than the model's {max_pos} positions "
                          f"(max_position_embeddings); use --seq_length {max_pos} or less")
    if cfg.save:
        need = plan.adapter_numel * 12 + 2**20  # fp32 adapter + two AdamW moments, plus small files
        os.makedirs(cfg.output_dir, exist_ok=True)
        free = shutil.disk_usage(cfg.output_dir).free
        if free < 2 * need:
            raise ConfigError(f"--output_dir {cfg.output_dir!r} has {free / 2**20:.0f} MiB free but each "
                              f"checkpoint needs about {need / 2**20:.0f} MiB (and a save needs room for two); "
                              "free space or point --output_dir elsewhere")


def check_batch(cfg: Config, batches: Batches) -> None:
    if len(batches.samples) < batches.global_batch:
        raise ConfigError(f"the data has {len(batches.samples)} sequences but one optimizer step takes "
                          f"{batches.global_batch} (--per_device_train_batch_size {cfg.per_device_train_batch_size}"
                          f" x {cfg.microbatches} microbatches x {batches.dp} replicas); lower "
                          "--gradient_accumulation_steps or --per_device_train_batch_size, or add data")


def previous_run(cfg: Config) -> list[str]:
    """The earlier run's entries in output_dir that this run would mix with; refuses unless resuming or
    overwriting (decided before any rank writes, so every rank decides the same)."""
    d = cfg.output_dir
    ours = [n for n in os.listdir(d) if n.startswith("checkpoint-") or n in RUN_ARTIFACTS] \
        if os.path.isdir(d) else []
    if ours and not cfg.resume_peft_from_checkpoint and not cfg.overwrite_output_dir:
        raise ConfigError(f"--output_dir {d!r} already holds a run ({', '.join(sorted(ours)[:4])}); pass "
                          "--resume_peft_from_checkpoint latest to continue it, --overwrite_output_dir true to "
                          "replace it, or choose another --output_dir")
    return ours if cfg.overwrite_output_dir and not cfg.resume_peft_from_checkpoint else []


def clear_previous_run(cfg: Config, entries: list[str], layout) -> None:
    if layout.rank == 0 and entries:
        for name in entries:
            path = os.path.join(cfg.output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        log.info(f"--overwrite_output_dir: removed the previous run's {len(entries)} entries from {cfg.output_dir}")
    if dist.is_initialized():
        dist.barrier()


def on_rank0_then_share(layout, fn: Callable[[], Any]) -> Any:
    """Run fn on rank 0 and give its result (or its error) to every rank."""
    box: list[Any] = [None]
    if layout.rank == 0:
        try:
            box[0] = ("ok", fn())
        except ConfigError as e:
            box[0] = ("error", str(e))
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    status, payload = box[0]
    if status == "error":
        raise ConfigError(payload)
    return payload


def _tokenized(cfg: Config, path: str, tokenizer, layout, what: str) -> TokenizedData:
    """Tokenize on rank 0 (or find the cache), then every other rank reads the cache rank 0 wrote."""
    spec = DataSpec(path, cfg.data_format, cfg.field_map, cfg.template, cfg.system, cfg.seq_length,
                    cfg.skip_bad_records, cfg.packing)
    cache_dir = cfg.data_cache_dir or os.path.join(cfg.output_dir, "data_cache")
    mine: list[TokenizedData] = []

    def tokenize() -> str:
        data, hit, cache = prepare(spec, tokenizer, cache_dir, progress=not cfg.disable_tqdm)
        s = data.stats
        log.info(f"{what}: {len(data)} examples from {s.records} records ({'cached' if hit else 'tokenized'}); "
                 f"{s.truncated} truncated to --seq_length {cfg.seq_length}, {s.dropped} dropped, "
                 f"{s.skipped_bad} bad records skipped")
        for example in s.bad_examples[:5]:
            log.warning(f"skipped: {example}")
        mine.append(data)
        return cache

    cache = on_rank0_then_share(layout, tokenize)
    return mine[0] if mine else load_cache(cache)


def build_data(cfg: Config, tokenizer, layout) -> tuple[Batches, Batches | None]:
    """The training stream and, when asked for, the eval set."""
    train = _tokenized(cfg, cfg.data_path, tokenizer, layout, "data").examples
    held: list = []
    if cfg.eval_data_path:
        held = _tokenized(cfg, cfg.eval_data_path, tokenizer, layout, "eval data").examples
    elif cfg.eval_ratio:
        train, held = split_eval(train, cfg.eval_ratio, cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def batches(examples: list) -> Batches:
        samples = pack(examples, cfg.seq_length, cfg.seed) if cfg.packing else [[e] for e in examples]
        return Batches(samples, cfg.per_device_train_batch_size, cfg.microbatches, layout.dp, cfg.seed, pad,
                       cfg.pad_to_multiple_of, cfg.seq_length)

    return batches(train), (batches(held) if held else None)


class Preempted(RuntimeError):
    """Stopped by a preemption or time-limit signal after saving a checkpoint (exit code 75: try again)."""


def run(cfg: Config) -> TrainState:
    rank, world, _ = env_ranks()
    validate(cfg, world)
    setup_logging(rank)
    if slurm.restart_count() and not cfg.resume_peft_from_checkpoint and read_latest(cfg.output_dir):
        log.info(f"Slurm restart {slurm.restart_count()} of this job: resuming from the latest checkpoint")
        cfg = dataclasses.replace(cfg, resume_peft_from_checkpoint="latest")
    stale = previous_run(cfg)
    chunks = cfg.chunks_per_rank()
    pp = cfg.pp or world
    plan = make_plan(cfg, pp * chunks, read_lora_config(cfg.lora_config))
    check_fits(cfg, plan)
    quant = checked_quantization(cfg, pick_device(cfg.device, env_ranks()[2]))
    resume_dir = None
    if cfg.resume_peft_from_checkpoint:
        resume_dir = resolve(cfg.resume_peft_from_checkpoint, cfg.output_dir)
        resume_meta = read_meta(resume_dir)
        check_compatible(resume_dir, resume_meta, plan.model_config, lora_as_json(plan.lora_cfg))

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path or cfg.weights_path,
                                              trust_remote_code=cfg.trust_remote_code)
    layout = init_distributed(pp, chunks, cfg.pipeline_schedule in ("zbv", "dualpipev"), cfg.device,
                              cfg.dist_timeout)
    clear_previous_run(cfg, stale, layout)
    add_log_file(layout.rank, os.path.join(cfg.output_dir, "logs"))
    failures.register(cfg.output_dir, layout.rank)
    torch.manual_seed(cfg.seed + 1000 * layout.rank)
    log.info(f"{world} ranks: {layout.dp} pipeline replica(s) x {layout.pp} ranks x {chunks} stage(s) per rank, "
             f"schedule {cfg.pipeline_schedule}, device {layout.device.type}; layer split "
             f"{[(s.start, s.stop) for s in plan.specs]}")
    batches, eval_batches = build_data(cfg, tokenizer, layout)
    check_batch(cfg, batches)

    dtype = compute_dtype(cfg)
    stages = build_stages(cfg, plan, layout, quant)
    for s in stages:
        s.train()
    if plan.index is not None:
        log.info(f"rank {layout.rank}: read {plan.index.report.bytes / 2**20:.1f} MiB of base weights "
                 f"({len(plan.index.report.keys)} tensors) for stages {layout.stage_ids()}")
    stage_params = {s.spec.index: adapter_params(s.model) for s in stages}
    params = [p for ps in stage_params.values() for p in ps.values()]
    optimizer = make_optimizer(cfg.optim, params, cfg.learning_rate, (cfg.adam_beta1, cfg.adam_beta2),
                               cfg.adam_epsilon, cfg.weight_decay)
    state = TrainState()
    if resume_dir:
        state = restore(resume_dir, resume_meta, stage_params, optimizer, layout, cfg.seed)
        log.info(f"resumed from {resume_dir} at step {state.global_step}")

    pipeline = Pipeline(stages, layout, cfg.pipeline_schedule, cfg.microbatches, TokenLoss(), plan.hidden_size,
                        plan.vocab_size, dtype)
    total = cfg.max_steps if cfg.max_steps > 0 else batches.steps_for_epochs(cfg.num_train_epochs)
    lora_saved = {**lora_as_json(plan.lora_cfg), "base_model_name_or_path": os.path.abspath(cfg.weights_path)}
    meta = {"format": 1, "pp": layout.pp, "dp": layout.dp, "num_stages": layout.num_stages,
            "stages_per_rank": chunks, "schedule": cfg.pipeline_schedule,
            "layer_split": [[s.start, s.stop] for s in plan.specs], "model_path": os.path.abspath(cfg.weights_path),
            "model_type": plan.model_config.model_type, "base_config_hash": config_hash(plan.model_config),
            "lora": lora_saved, "versions": versions(), "seed": cfg.seed}
    metrics = Metrics(cfg.output_dir, layout.rank == 0, total, state.global_step, cfg.report_to == "tensorboard",
                      progress=not cfg.disable_tqdm)
    trainer = Trainer(cfg, layout, pipeline, batches, optimizer, stage_params, total, state, meta, lora_saved,
                      metrics, eval_batches)
    log.info(f"training {total} steps of {batches.global_batch} sequences "
             f"({cfg.per_device_train_batch_size} per microbatch x {cfg.microbatches} microbatches x "
             f"{layout.dp} replicas); {sum(p.numel() for p in params)} trainable parameters on this rank")
    try:
        state = trainer.train()
    finally:
        metrics.close()
    if trainer.stopped_by_signal:
        requeued = slurm.requeue() if layout.rank == 0 else False
        raise Preempted(f"stopped by a signal at step {state.global_step}; the checkpoint is saved"
                        + (" and the job requeued" if requeued else ""))
    return state


def list_target_modules(cfg: Config) -> str:
    """The linear modules of a model, from its config alone (built on the meta device), for lora_config.json."""
    config = load_model_config(cfg.model_path or cfg.weights_path, cfg.trust_remote_code)
    lm = build_skeleton(config, torch.float32, cfg.trust_remote_code, cfg.attn_implementation)
    parts = find_parts(lm, config)
    found: dict[str, list[str]] = {}
    for name, mod in lm.named_modules():
        if name.startswith(parts.layers + ".") and is_linear(mod):
            found.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    lines = [f"{config.model_type}: linear modules in the {parts.num_layers} decoder layers (\"target_modules\"):"]
    for leaf, names in sorted(found.items()):
        w = lm.get_submodule(names[0]).weight
        lines.append(f"  {leaf:<24} x{len(names):<4} e.g. {names[0]}  {tuple(w.shape)}")
    fused = sorted({re.sub(rf"^{re.escape(parts.layers)}\.\d+\.", "", n) for n, p in lm.named_parameters()
                    if p.dim() == 3})
    if fused:
        lines.append(f"fused 3-D parameters (\"target_parameters\"): {', '.join(fused)}")
    outside = [n for n in parts.pre + parts.post if isinstance(lm.get_submodule(n), torch.nn.Linear)]
    if outside:
        lines.append(f"outside the layers: {', '.join(outside)}")
    lines.append(f"default target_modules: {list(DEFAULT_TARGETS.get(config.model_type, ())) or 'none (set them)'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input, 3 stopped (non-finite steps, failed save), 4 another rank failed,
    75 preempted after a checkpoint (requeued under Slurm), 1 this rank failed."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print("usage: torchrun ... launch/finetune.py --flag value ...\n\n" + help_text())
        return 0
    rank, world, _ = env_ranks()
    setup_logging(rank)
    cfg = None
    try:
        cfg = parse_args(argv, warn=lambda m: rank == 0 and print(m, file=sys.stderr))
        if cfg.list_target_modules:
            if rank == 0:
                print(list_target_modules(cfg))
            return 0
        run(cfg)
    except Preempted as e:
        log.warning(str(e))
        return 75
    except (ConfigError, TrainingStopped, CheckpointError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        log.error(str(e))
        return 2 if isinstance(e, ConfigError) else 3
    except Exception as e:  # noqa: BLE001 - every failure gets a named cause before the process ends
        out = cfg.output_dir if cfg else "."
        if world > 1 and failures.is_peer_failure(e):
            failures.record(out, rank, e, victim=True)
            reason = failures.explain(out, world, rank)
            log.error(f"stopping: {reason} ({type(e).__name__} here on rank {rank})")
            if rank == 0:
                print(f"error: {reason}", file=sys.stderr)
            return 4
        failures.record(out, rank, e)
        log.exception(f"rank {rank} failed")
        return 1
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
