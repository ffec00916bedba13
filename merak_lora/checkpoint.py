"""The checkpoint format: one folder per stage, tensors keyed by global names, visible only when complete.

    <output_dir>/latest                              -> "checkpoint-120"
    <output_dir>/checkpoint-120/meta.json            layout, base-config hash, versions, step
    <output_dir>/checkpoint-120/mp_rank_00_pp_rank_000/
        lora_config.json                             the LoRA config (PEFT field names)
        adapter_model.safetensors                    this stage's LoRA tensors, PEFT key names
        lora_partial_model_optim.pt                  AdamW state by tensor name, scheduler, step,
                                                     data position, RNG of every rank of this stage

Because every tensor carries its global name, any stage count can find its own tensors (and their optimizer
state) in any other stage count's checkpoint. Saves go to checkpoint-N.partial/ and are renamed into place by
rank 0 once every rank has reported success; `latest` moves after that, so a crash or a full disk mid-save
leaves the previous checkpoint as the one resume picks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError

log = logging.getLogger("merak_lora")
META = "meta.json"
ADAPTER_FILE = "adapter_model.safetensors"
STATE_FILE = "lora_partial_model_optim.pt"
LORA_FILE = "lora_config.json"
LATEST = "latest"
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
                         "_attn_implementation", "_attn_implementation_autoset", "architectures",
                         "output_attentions", "output_hidden_states", "return_dict"}


def stage_dir_name(stage: int) -> str:
    return f"mp_rank_00_pp_rank_{stage:03d}"


def config_hash(model_config) -> str:
    """Hash of what defines the base model's shape and maths (not its path, dtype or library version)."""
    d = {k: v for k, v in model_config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    import peft
    import transformers

    from . import __version__
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "merak_lora": __version__}


@dataclass
class TrainState:
    """The scalars that travel with a checkpoint."""

    global_step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    scaler: dict = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "python" in state:
        random.setstate((3, tuple(state["python"]), None))


# ---------------------------------------------------------------------------------------------------------
# saving

def _fsync_write(path: str, write) -> None:
    tmp = f"{path}.tmp"
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_json(path: str, data: Any) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False)
    _fsync_write(path, w)


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]) -> dict:
    out = {}
    for name, p in params.items():
        st = optimizer.state.get(p)
        if st:
            out[name] = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
    return out


def _all_ok(error: str | None, group=None) -> list[str]:
    """Every rank's error text (empty when fine), so all ranks agree whether a save succeeded."""
    if not dist.is_initialized():
        return [error] if error else []
    errors: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    return [e for e in errors if e]


@dataclass
class SavedAdapter:
    """What one adapter writes into a checkpoint: into the checkpoint folder itself (`folder` ""), or with several
    adapters into its own subfolder, each a complete one-adapter checkpoint."""

    folder: str
    stage_params: dict[int, dict[str, torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler_state: dict
    state: TrainState
    lora_raw: dict
    meta: dict
    streams: dict[int, torch.Tensor | None]   # stage -> this rank's dropout stream for the adapter


def save_checkpoint(output_dir: str, step: int, *, layout, adapters: list[SavedAdapter], joint: dict | None = None,
                    save_total_limit: int = 0) -> str:
    """Write checkpoint-<step> from every rank; returns its path once it is complete and named in `latest`.
    `joint` is the meta.json of a checkpoint of several adapters (each subfolder has its own)."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = final + ".partial"
    error = None
    if layout.rank == 0:
        try:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        except OSError as e:
            error = f"rank 0: {e}"
    _barrier()
    errors = _all_ok(error)
    if not errors:
        try:
            _save_rank(partial, layout, adapters)
        except OSError as e:
            error = f"rank {layout.rank}: {e.strerror or e} ({getattr(e, 'filename', '') or partial})"
        errors = _all_ok(error)
    if not errors and layout.rank == 0:
        try:
            for a in adapters:
                os.makedirs(os.path.join(partial, a.folder), exist_ok=True)
                _write_json(os.path.join(partial, a.folder, META), {
                    **a.meta, "global_step": a.state.global_step, "consumed_samples": a.state.consumed_samples})
            if joint is not None:
                _write_json(os.path.join(partial, META), {**joint, "global_step": step})
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(partial, final)
            _write_text(os.path.join(output_dir, LATEST), os.path.basename(final))
            if save_total_limit:
                _prune(output_dir, save_total_limit)
        except OSError as e:
            error = f"rank 0: {e}"
    errors = _all_ok(error) if not errors else errors
    if errors:
        if layout.rank == 0:  # the half-written folder is never used; give its space back
            shutil.rmtree(partial, ignore_errors=True)
        previous = read_latest(output_dir)
        raise CheckpointError(f"saving checkpoint-{step} failed ({'; '.join(errors)}); "
                              f"the previous checkpoint ({previous or 'none'}) is intact")
    return final


class CheckpointError(RuntimeError):
    pass


def gather_adapter(layout, stage_params: dict[int, dict[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Every stage's adapter tensors on rank 0 (an empty dict elsewhere), sent over the process group, so the
    final adapter needs no file system shared between nodes."""
    mine = {name: p.detach().cpu() for ps in stage_params.values() for name, p in ps.items()} \
        if layout.dp_rank == 0 else {}
    if not dist.is_initialized():
        return mine
    parts: list[Any] | None = [None] * layout.world if layout.rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return {k: v for part in parts for k, v in part.items()} if parts else {}


def _write_text(path: str, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    _fsync_write(path, w)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _save_rank(folder: str, layout, adapters: list[SavedAdapter]) -> None:
    mine = (rng_state(), [a.streams for a in adapters])
    both: list[Any] = [mine]
    if layout.dp > 1:  # every replica's RNG and dropout streams, in one collective
        both = [None] * layout.dp
        dist.all_gather_object(both, mine, group=layout.dp_group)
    rngs, streams = [r for r, _ in both], [s_ for _, s_ in both]
    if layout.dp_rank != 0:
        return
    for k, a in enumerate(adapters):
        for stage, params in a.stage_params.items():
            d = os.path.join(folder, a.folder, stage_dir_name(stage))
            os.makedirs(d, exist_ok=True)
            _write_json(os.path.join(d, LORA_FILE), a.lora_raw)
            tensors = {name: p.detach().cpu().contiguous() for name, p in params.items()}
            _fsync_write(os.path.join(d, ADAPTER_FILE),
                         lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
            payload = {
                "optimizer": optimizer_state_by_name(a.optimizer, params),
                "param_groups": [{k_: v for k_, v in g.items() if k_ != "params"} for g in a.optimizer.param_groups],
                "scheduler": a.scheduler_state,
                "global_step": a.state.global_step,
                "consumed_samples": a.state.consumed_samples,
                "skipped_steps": a.state.skipped_steps,
                "scaler": a.state.scaler,
                # RNG of every rank holding this stage, by global rank, for exact resume on the same layout
                "rng": {layout.global_rank_of(layout.pp_rank, d_): r for d_, r in enumerate(rngs)},
                # the adapter's dropout stream on this stage, by data-parallel rank (lora.AdapterSwitch)
                "streams": {d_: s[k][stage] for d_, s in enumerate(streams) if s[k].get(stage) is not None},
            }
            _fsync_write(os.path.join(d, STATE_FILE), lambda tmp: torch.save(payload, tmp))


def _prune(output_dir: str, keep: int) -> None:
    found = sorted((int(m.group(1)), n) for n in os.listdir(output_dir)
                   if (m := re.fullmatch(r"checkpoint-(\d+)", n)))
    for _, name in found[:-keep]:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# finding and checking

def read_latest(output_dir: str) -> str | None:
    path = os.path.join(output_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        name = fh.read().strip()
    full = os.path.join(output_dir, name)
    return full if os.path.isfile(os.path.join(full, META)) else None


def resolve(spec: str, output_dir: str) -> str:
    """A checkpoint folder from `latest`, an output folder (its latest), or a checkpoint folder."""
    if spec == "latest":
        found = read_latest(output_dir)
        if not found:
            raise ConfigError(f"--resume_peft_from_checkpoint latest: {output_dir!r} holds no complete "
                              "checkpoint yet (no 'latest' file naming one with meta.json)")
        return found
    if not os.path.isdir(spec):
        raise ConfigError(f"--resume_peft_from_checkpoint {spec!r}: no such folder")
    if os.path.isfile(os.path.join(spec, META)):
        return spec
    found = read_latest(spec)
    if found:
        return found
    raise ConfigError(f"{spec!r} is not a complete checkpoint: it has no {META} (an interrupted save leaves a "
                      "checkpoint-N.partial folder, which is never used)")


def read_meta(ckpt: str) -> dict:
    try:
        with open(os.path.join(ckpt, META), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint {ckpt}: cannot read {META} ({e})") from None


@dataclass
class Resume:
    """A checkpoint to continue from, checked before any weight is read; the training-state files of the stages
    this rank needs are already loaded (each file is read once)."""

    folder: str
    meta: dict
    states: dict[int, dict]          # saved stage -> lora_partial_model_optim.pt payload


def stages_holding(meta: dict, ranges: list[tuple[int, int]], first: bool, last: bool) -> list[int]:
    """The saved stages whose tensors a rank with these layer ranges needs: those whose layers overlap them, and
    the saved first/last stage for what sits before/after the layers (embeddings, head)."""
    split = [tuple(r) for r in meta["layer_split"]]
    out = {s for s, (a, b) in enumerate(split) for c, d in ranges if a < d and c < b}
    if first:
        out.add(0)
    if last:
        out.add(len(split) - 1)
    return sorted(out)


def check_compatible(ckpt: str, meta: dict, model_config, lora_raw: dict, stages: list[int] | None = None) -> Resume:
    """Refuse a checkpoint of another base model or LoRA shape before any weight is touched; load the training
    state of `stages` (all when None)."""
    want = config_hash(model_config)
    if meta.get("base_config_hash") != want:
        raise ConfigError(
            f"checkpoint {ckpt} was trained on another base model (config hash {meta.get('base_config_hash')}, "
            f"model {meta.get('model_path')!r}); this model's config hashes to {want}. Point --model_path at the "
            "model the adapter was trained on.")
    old = meta.get("lora", {})
    for key in ("r", "target_modules", "use_dora", "bias", "target_parameters"):
        a, b = old.get(key), lora_raw.get(key)
        norm = lambda v: sorted(v) if isinstance(v, list) else v  # noqa: E731
        if key == "target_modules" and a is not None and b is None:
            continue  # the default mapping resolved it; meta stores the resolved list
        if norm(a) != norm(b) and not (key in ("use_dora",) and not a and not b):
            raise ConfigError(f"checkpoint {ckpt} has LoRA {key}={a!r} but --lora_config says {b!r}; use the "
                              "LoRA config the checkpoint was trained with (it is saved as lora_config.json "
                              "in each stage folder)")
    for s in range(int(meta["num_stages"])):
        d = os.path.join(ckpt, stage_dir_name(s))
        for f in (ADAPTER_FILE, STATE_FILE, LORA_FILE):
            if not os.path.isfile(os.path.join(d, f)):
                raise ConfigError(f"checkpoint {ckpt} is incomplete: {os.path.join(stage_dir_name(s), f)} is "
                                  "missing; copy the whole checkpoint folder or resume from an earlier one")
        _adapter_keys(os.path.join(d, ADAPTER_FILE))  # headers only: a truncated copy fails here
    wanted = range(int(meta["num_stages"])) if stages is None else stages
    return Resume(ckpt, meta, dict(zip(wanted, load_states(ckpt, meta, list(wanted)))))


def _adapter_keys(path: str) -> list[str]:
    try:
        with safe_open(path, framework="pt") as fh:
            return list(fh.keys())
    except Exception as e:  # safetensors raises SafetensorError / OSError on damaged files
        raise ConfigError(f"checkpoint file {path} is unreadable ({e}); it may be truncated. Resume from an "
                          "earlier checkpoint.") from None


def load_adapter_tensors(ckpt: str, meta: dict, names: set[str] | None = None,
                         device: torch.device | str = "cpu",
                         stages: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors by global name from every stage folder, or from `stages` (only `names` when given)."""
    out: dict[str, torch.Tensor] = {}
    for s in range(int(meta["num_stages"])) if stages is None else stages:
        path = os.path.join(ckpt, stage_dir_name(s), ADAPTER_FILE)
        try:
            with safe_open(path, framework="pt", device=str(device)) as fh:
                for key in fh.keys():
                    if names is None or key in names:
                        out[key] = fh.get_tensor(key)
        except Exception as e:  # safetensors raises SafetensorError / OSError on damaged files
            raise ConfigError(f"checkpoint file {path} is unreadable ({e}); it may be truncated. Resume from an "
                              "earlier checkpoint.") from None
    return out


def load_states(ckpt: str, meta: dict, stages: list[int] | None = None) -> list[dict]:
    """The lora_partial_model_optim.pt payloads (never unpickling code: weights_only)."""
    out = []
    for s in range(int(meta["num_stages"])) if stages is None else stages:
        path = os.path.join(ckpt, stage_dir_name(s), STATE_FILE)
        try:
            out.append(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:  # pickle refusals and truncation both land here
            raise ConfigError(f"checkpoint file {path} cannot be loaded safely ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); it is damaged or not a merak-lora file") from None
    return out


def load_adapter(ckpt: str, meta: dict, stage_params: dict[int, dict[str, torch.nn.Parameter]],
                 stages: list[int] | None = None) -> dict[str, torch.nn.Parameter]:
    """Copy the checkpoint's adapter tensors into this rank's parameters, found by global name (in the saved
    `stages` only, when given)."""
    params = {name: p for ps in stage_params.values() for name, p in ps.items()}
    tensors = load_adapter_tensors(ckpt, meta, set(params), stages=stages)
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ConfigError(f"checkpoint {ckpt} lacks {len(missing)} adapter tensors this stage needs "
                          f"(e.g. {missing[0]}); was it trained with another target_modules?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.dtype))
    return params


def restore(resume: Resume, stage_params: dict[int, dict[str, torch.nn.Parameter]],
            optimizer: torch.optim.Optimizer, layout, seed: int, switches: dict | None = None,
            adapter: str = "default", split: list | None = None) -> TrainState:
    """Load adapter and optimizer state by tensor name (any saved stage count), plus step, data position and the
    dropout streams (`switches`, by stage: lora.AdapterSwitch) where the stages and data-parallel width are
    unchanged; on the same layout every rank's RNG too."""
    meta = resume.meta
    params = load_adapter(resume.folder, meta, stage_params, sorted(resume.states))
    by_name = {name: st for payload in resume.states.values() for name, st in payload["optimizer"].items()}
    fused = bool(optimizer.defaults.get("fused"))  # a fused AdamW keeps its step counts on the GPU too
    for name, p in params.items():
        if name in by_name:
            optimizer.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and (v.dim() > 0 or fused) else v)
                                  for k, v in by_name[name].items()}
    first = next(iter(resume.states.values()))
    state = TrainState(global_step=int(first["global_step"]), consumed_samples=int(first["consumed_samples"]),
                       skipped_steps=int(first.get("skipped_steps", 0)), scaler=first.get("scaler") or {})
    same = (int(meta["pp"]), int(meta["dp"]), int(meta["num_stages"])) == (layout.pp, layout.dp, layout.num_stages)
    own = resume.states[layout.stage_ids()[0]]["rng"].get(layout.rank) if same else None
    if own is not None:
        set_rng_state(own)
    else:
        torch.manual_seed(seed + 1000 * layout.rank + state.global_step)
    switches = switches or {}
    kept = ([list(r) for r in meta["layer_split"]] == [list(r) for r in split or []] and int(meta["dp"]) == layout.dp
            and all(layout.dp_rank in resume.states.get(i, {}).get("streams", {}) for i in switches))
    for i, switch in switches.items():
        if kept:
            switch.streams[adapter] = resume.states[i]["streams"][layout.dp_rank]
        else:
            switch.seed({adapter: seed}, i, layout.dp_rank, state.global_step)
    if switches and not kept:
        log.info(f"resuming on other stages or data-parallel width (saved pp={meta['pp']} dp={meta['dp']} split "
                 f"{meta['layer_split']}, now pp={layout.pp} dp={layout.dp}): adapter and optimizer follow their "
                 "tensors, dropout is re-seeded")
    return state
