"""Every check that can run before a weight is read, in one place: the output folder, sizes against the model and
the disk, QLoRA's and FP8's availability, the checkpoint to resume from, and the data against the batch.

(Flag-only checks live with the flags in config.validate; the LoRA config's in lora.read_lora_config; data
records are checked as they are tokenized, data.prepare.)"""

from __future__ import annotations

import logging
import os
import shutil

import torch

from . import quant as quantization
from .checkpoint import Resume, check_compatible, read_meta, resolve, stages_holding
from .config import Config, ConfigError
from .data import DataError, list_files
from .models import text_config
from .plan import Plan, compute_dtype, lora_as_json

log = logging.getLogger("merak_lora")
RUN_ARTIFACTS = ("latest", "metrics.jsonl", "runs", "logs")


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


def checked_quantization(cfg: Config, device: torch.device):
    """The QLoRA or FP8 settings, after making sure they can run on this device (None without either)."""
    quant = quantization.from_flags(cfg, compute_dtype(cfg))
    if quant is not None:
        quantization.check_available(quant, device)
    return quant


def checked_resume(cfg: Config, plan: Plan, stage_ids: list[int], lora_cfg=None, label: str = "") -> Resume | None:
    """The checkpoint to resume from, refused if it belongs to another model or LoRA shape; the training state
    of the saved stages that hold this rank's stages (`stage_ids`) is loaded. With several adapters, `label`
    names the adapter whose subfolder is meant."""
    if not cfg.resume_peft_from_checkpoint:
        return None
    folder = resolve(cfg.resume_peft_from_checkpoint, cfg.output_dir)
    meta = read_meta(folder)
    held = meta.get("adapters")
    if held is not None and not label:
        raise ConfigError(f"checkpoint {folder} holds several adapters ({', '.join(held)}); resume them together "
                          f"with --adapters, or one alone with --resume_peft_from_checkpoint {folder}/<name>")
    if label:
        if held is None:
            raise ConfigError(f"checkpoint {folder} holds one adapter, not the adapters of --adapters; resume it "
                              "without --adapters, or start this run in another --output_dir")
        if label not in held:
            raise ConfigError(f"checkpoint {folder} holds the adapters {', '.join(held)} but not {label!r}; train "
                              f"{label!r} in a run of its own, or resume with the adapters.json it was saved with")
        folder = os.path.join(folder, label)
        meta = read_meta(folder)
    specs = [plan.specs[i] for i in stage_ids]
    needed = stages_holding(meta, [(s.start, s.stop) for s in specs], any(s.is_first for s in specs),
                            any(s.is_last for s in specs))
    return check_compatible(folder, meta, plan.model_config, lora_as_json(lora_cfg or plan.lora_cfg), needed)


def check_shared(specs: list, loras: list) -> None:
    """What adapters of one run cannot hold apart: the base model's biases are one tensor for all of them; LoRA on
    fused expert parameters (target_parameters) is not tested with several adapters, so it is refused."""
    if len(specs) < 2:
        return
    for spec, lora in zip(specs, loras):
        if lora.target_parameters:
            raise ConfigError(f"adapter {spec.label!r}: target_parameters (LoRA on fused expert weights) is not "
                              "supported with --adapters yet; train this adapter in a run of its own")
        if lora.bias != "none":
            raise ConfigError(f"adapter {spec.label!r}: bias {lora.bias!r} trains the base model's biases, which "
                              "every adapter of the run shares; use bias \"none\" with --adapters, or train this "
                              "adapter in a run of its own")


def check_data_files(cfg: Config) -> None:
    """The data paths name files that exist and hold something (records are checked as they are tokenized)."""
    for path in filter(None, (cfg.data_path, cfg.eval_data_path)):
        for f in list_files(path):
            if os.path.getsize(f) == 0:
                raise DataError(f"{f}: the file is empty")


def check_batch(cfg: Config, samples: int, global_batch: int, dp: int, adapter: str = "") -> None:
    if samples < global_batch:
        raise ConfigError(f"{'adapter ' + repr(adapter) + ': ' if adapter else ''}the data has {samples} sequences "
                          f"but one optimizer step takes {global_batch} "
                          f"(--per_device_train_batch_size {cfg.per_device_train_batch_size} x {cfg.microbatches} "
                          f"microbatches x {dp} replicas); lower --gradient_accumulation_steps or "
                          "--per_device_train_batch_size, or add data")


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
    layout.coord.barrier("cleared", "clearing the previous run from --output_dir")
