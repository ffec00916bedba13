"""LoRA through PEFT on one stage: read the user's config, wrap only the stage's own linears, and name the
adapter tensors by the model's global names so every stage count writes and finds the same keys.

The initial adapter is a function of (seed, tensor name) alone, so pp=1, 2 or 4 start from identical weights
and a one-process PEFT run can be set to the same start for comparison.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import types
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch.utils.checkpoint import checkpoint

from . import fp8_mlp, fused_lora
from .config import ConfigError
from .models import default_targets, is_adaptable, is_linear

log = logging.getLogger("merak_lora")
ADAPTER = "default"
# The fields a lora_config.json may hold; the first seven are the ones Merak users write.
SUPPORTED_FIELDS = {
    "r": int, "lora_alpha": (int, float), "lora_dropout": (int, float), "target_modules": (list, str, type(None)),
    "bias": str, "task_type": (str, type(None)), "inference_mode": bool,
    "use_rslora": bool, "use_dora": bool, "exclude_modules": (list, str, type(None)),
    "layers_to_transform": (list, int, type(None)), "layers_pattern": (list, str, type(None)),
    "rank_pattern": dict, "alpha_pattern": dict, "init_lora_weights": (bool, str), "fan_in_fan_out": bool,
    "target_parameters": (list, type(None)),
    # written by PEFT itself into adapter_config.json; harmless on the way back in
    "peft_type": str, "base_model_name_or_path": (str, type(None)), "revision": (str, type(None)),
    "auto_mapping": (dict, type(None)), "peft_version": (str, type(None)), "megatron_core": (str, type(None)),
    "qalora_group_size": int,
}
UNSUPPORTED_FIELDS = {
    "modules_to_save": "base weights stay frozen on every stage; train them with LoRA target_modules instead",
    "loftq_config": "LoftQ initialisation needs the whole model at once",
    "layer_replication": "layer replication changes the layer count the stages were cut by",
    "ensure_weight_tying": "tied adapters would span the first and last stage",
    "trainable_token_indices": "token training would span the first and last stage",
}


def read_lora_config(path: str) -> dict:
    """The raw JSON, checked for field names and types with messages that name the file."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"LoRA config {path!r} not found; pass --lora_config FILE "
                          "(see configs/lora_config.json for the fields)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"LoRA config {path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"LoRA config {path}: expected a JSON object with r, lora_alpha, target_modules, ...")
    known = {f.name: f for f in dataclasses.fields(LoraConfig)}
    for key, value in raw.items():
        if key in UNSUPPORTED_FIELDS:
            if value not in (None, False, [], {}):
                raise ConfigError(f"LoRA config {path}: {key!r} is not supported: {UNSUPPORTED_FIELDS[key]}")
            continue
        if key not in known:
            raise ConfigError(f"LoRA config {path}: unknown field {key!r}; the usual fields are r, lora_alpha, "
                              "lora_dropout, target_modules, bias, task_type, inference_mode")
        if key in SUPPORTED_FIELDS:
            if not isinstance(value, SUPPORTED_FIELDS[key]) or (isinstance(value, bool) and key in ("r", "lora_alpha")):
                raise ConfigError(f"LoRA config {path}: {key!r} has the wrong type "
                                  f"({type(value).__name__}: {value!r})")
        elif value != _default_of(known[key]):
            # PEFT writes every field into adapter_config.json; only the ones merak-lora implements may be set.
            raise ConfigError(f"LoRA config {path}: {key!r} = {value!r} is a PEFT option merak-lora does not "
                              "support; remove it")
    r = raw.get("r", 8)
    if r < 1:
        raise ConfigError(f"LoRA config {path}: r must be a positive integer, got {r}")
    if not 0 <= raw.get("lora_dropout", 0.0) < 1:
        raise ConfigError(f"LoRA config {path}: lora_dropout must be in [0, 1)")
    if raw.get("bias", "none") not in ("none", "all", "lora_only"):
        raise ConfigError(f"LoRA config {path}: bias must be none, all or lora_only")
    task = raw.get("task_type", "CAUSAL_LM")
    if task is not None and str(task).upper().replace(" ", "_").replace("-", "_") != "CAUSAL_LM":
        raise ConfigError(f"LoRA config {path}: task_type must be CAUSAL_LM (merak-lora trains causal LMs), "
                          f"got {task!r}")
    if task is not None:
        raw = {**raw, "task_type": "CAUSAL_LM"}  # PEFT's spelling; Merak writes "CAUSAL LM"
    init = raw.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise ConfigError(f"LoRA config {path}: init_lora_weights {init!r} is not supported here; "
                          "use true (PEFT's default) or \"gaussian\"")
    return raw


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def build_lora_config(raw: dict, model_type: str, module_names: list[str], linear_leaf_names: list[str],
                      *, source: str = "lora_config.json", param_names: list[str] = ()) -> LoraConfig:
    """The whole-model LoraConfig: default targets by model type (`models.default_targets`), every target
    checked against the model.

    module_names are the full names of the model's adaptable modules (linears, embeddings); linear_leaf_names
    the leaf names of the linears inside the decoder layers."""
    fields = {k: v for k, v in raw.items() if k in SUPPORTED_FIELDS and k not in
              ("peft_type", "auto_mapping", "peft_version", "revision")}
    fields.setdefault("task_type", "CAUSAL_LM")
    targets = fields.get("target_modules")
    if targets is None and not fields.get("target_parameters"):
        targets = default_targets(model_type, linear_leaf_names, module_names).modules
    if isinstance(targets, list):
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]
        if missing:
            raise ConfigError(
                f"{source}: target_modules {missing} match no module of this {model_type} model; "
                f"its linear modules are: {', '.join(linear_leaf_names)}")
    elif isinstance(targets, str) and targets != "all-linear":
        if not any(re.fullmatch(targets, n) for n in module_names):
            raise ConfigError(f"{source}: the target_modules pattern {targets!r} matches no module; "
                              f"linear modules are: {', '.join(linear_leaf_names)}")
    fields["target_modules"] = targets
    for param in fields.get("target_parameters") or []:
        if not any(n == param or n.endswith("." + param) for n in param_names):
            raise ConfigError(f"{source}: target_parameters entry {param!r} matches no parameter of this "
                              f"{model_type} model (`--list_target_modules true` lists the fused ones)")
    return LoraConfig(**fields)


def stage_targets(user: LoraConfig, lm: nn.Module) -> list[str]:
    """Full names of the modules this stage owns that the user's config targets."""
    names = []
    for name, mod in lm.named_modules():
        if not is_adaptable(mod):
            continue
        if user.target_modules == "all-linear":
            hit = is_linear(mod) and mod is not _output_layer(lm)
        else:
            hit = check_target_module_exists(user, name)
        if hit and type(hit).__name__ != "_ExcludedModule":
            names.append(name)
    return names


def adapter_numel(user: LoraConfig, lm: nn.Module) -> int:
    """How many LoRA parameters the whole model gets (for sizing checkpoints before training)."""
    total = 0
    for name in stage_targets(user, lm):
        mod = lm.get_submodule(name)
        w = mod.weight
        total += user.r * (w.shape[0] + w.shape[1])
    return total


def _output_layer(lm: nn.Module) -> nn.Module | None:
    return lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None


def apply_lora(lm: nn.Module, user: LoraConfig, seed: int) -> nn.Module:
    """Wrap the stage's targeted modules with one LoRA adapter (or return the model unchanged if it owns none)."""
    return apply_adapters(lm, [(ADAPTER, user, seed)])


def apply_adapters(lm: nn.Module, adapters: list[tuple[str, LoraConfig, int]]) -> nn.Module:
    """Wrap the stage's targeted modules with every (name, config, seed) adapter, each initialised as it would be
    alone (PEFT's multi-adapter model: one base layer, an entry per adapter in lora_A/lora_B). Every adapter's
    tensors train; which one a forward uses is chosen per microbatch (AdapterSwitch)."""
    targets = [stage_targets(user, lm) for _, user, _ in adapters]  # before wrapping renames the modules
    for p in lm.parameters():
        p.requires_grad_(False)
    model = lm
    for (name, user, seed), mine in zip(adapters, targets):
        if not mine and not user.target_parameters:
            continue
        # init_lora_weights=False skips PEFT's own random init; init_adapter below sets every tensor.
        cfg = dataclasses.replace(user, target_modules=mine, inference_mode=False, init_lora_weights=False)
        with warnings.catch_warnings():  # a short adapter name inside PEFT's "lora_" prefix only matters to
            warnings.simplefilter("ignore")  # PEFT's own loader; names are stripped from the saved keys here
            if model is lm:
                model = get_peft_model(lm, cfg, adapter_name=name, autocast_adapter_dtype=True)
            else:
                model.add_adapter(name, cfg, autocast_adapter_dtype=True)
        init_adapter(model, seed, user.init_lora_weights, name)
    if model is lm:
        return lm
    for n, p in model.named_parameters():  # PEFT leaves only the active adapter trainable
        if ".lora_" in n:
            p.requires_grad_(True)
    for mod in model.modules():
        if type(mod) is LoraLinear:
            mod.forward = types.MethodType(_lora_linear_forward, mod)
    return model


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The model runs as its base while inside: each LoRA layer's switch flipped off, then back. PEFT's
    disable_adapter() does the same, but switching back marks the adapter trainable and turns the active
    adapter's name into a list; a compiled decoding step guards on both and would compile again each time."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer._disable_adapters = was


class AdapterSwitch:
    """Which of a stage's adapters runs, chosen per microbatch, and each adapter's own dropout stream.

    A stream is a generator state per (adapter, stage, data-parallel rank), swapped in for that adapter's forwards
    only, so an adapter's dropout masks do not depend on which other adapters share the pipeline, nor on how the
    stages are placed on ranks. Recomputation (gradient checkpointing) restores the state torch saved at the
    forward, and `selected` puts the adapter back for it."""

    def __init__(self, model: nn.Module, names: list[str], device: torch.device):
        self.names = names
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        for layer in self.layers:  # a layer PEFT made for a later adapter starts with that one active
            layer._active_adapter = names[0]
        self.current = names[0]
        self.generator = torch.cuda.default_generators[device.index or 0] if device.type == "cuda" \
            else torch.default_generator
        self.streams: dict[str, torch.Tensor] = {}

    def seed(self, seeds: dict[str, int], stage: int, dp_rank: int, step: int = 0) -> None:
        for name, seed in seeds.items():
            g = torch.Generator(self.generator.device)
            g.manual_seed((seed * 1_000_003 + stage * 10_007 + dp_rank * 101 + step) % (2**63))
            self.streams[name] = g.get_state()

    def _select(self, name: str) -> None:
        if name != self.current:
            for layer in self.layers:
                layer._active_adapter = name
            self.current = name

    @contextlib.contextmanager
    def selected(self, name: str) -> Iterator[None]:
        before = self.current
        self._select(name)
        try:
            yield
        finally:
            self._select(before)

    @contextlib.contextmanager
    def running(self, index: int) -> Iterator[None]:
        """The forward of one microbatch of adapter `index`: its LoRA tensors and its dropout stream."""
        name = self.names[index]
        outer = self.generator.get_state()
        if name in self.streams:
            self.generator.set_state(self.streams[name])
        try:
            with self.selected(name):
                yield
        finally:
            if name in self.streams:
                self.streams[name] = self.generator.get_state()
            self.generator.set_state(outer)


def _lora_linear_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's LoRA linear, computed in the activations' dtype: the fp32 adapter weights are cast (they are
    tiny) instead of the activations (PEFT casts x to fp32, an extra copy of every input in bf16 training), and
    the low-rank product is added to the base output in one pass. Anything unusual goes to PEFT's own forward.

    Compiled and training, where Triton runs (and the stage's `check_fused` found its kernels agree with torch),
    `fused_lora` does both halves: the down projection draws its dropout mask inside the product and again in its
    backward from a saved seed, and the up projection is added to the base output in one pass whose backward reads
    the output gradient once for B's gradient and the low-rank one (cuBLAS's addmm and its two thin products ran
    at a third of the copy rate); targets that read one input share one down-projection kernel (SharedInput), and
    a gated MLP's down projection keeps gate's and up's outputs for its backward instead of its input (GatedMlp).
    Compiled elsewhere, the partitioner recomputes the dropout (replaying its RNG state) rather than keeping each
    target's dropped copy and mask: x itself is shared by the projections reading it (q,k,v; gate,up), each
    dropout's output is its own, and with seven targets those made up 40% of what a Llama decoder layer kept.
    Eager mode keeps them: there a checkpoint per linear costs ~1 ms of host time, and the fused ops' Python
    dispatch made an eager H100 step 30% slower (bench/RESULTS.md)."""
    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    if args or kwargs or self.disable_adapters or self.merged or name is None or not _plain(self, name):
        return LoraLinear.forward(self, x, *args, **kwargs)
    gated = getattr(self, "gated_mlp", None)
    fp8_down = gated is not None and gated[0].fp8_down(name)
    handed = gated[0].take() if gated is not None and gated[1] == "down" else None
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    drop = self.lora_dropout[name]
    if fp8_down and gated[1] == "down":
        if handed is None or len(handed) != 3:
            raise RuntimeError(f"{type(self).__name__}: gate's and up's outputs were not handed to down, whose "
                               "backward must give their base products' input gradient")
        result, low = fp8_mlp.gated_down(*handed, a, fused_lora.new_seed(x.device), drop.p, self.base_layer,
                                         *(m.base_layer for m in gated[0].members[:2]))
        return fused_lora.added_up(result, low, b, self.scaling[name])
    result = self.base_layer(x.detach() if fp8_down else x)  # down's fp8_mlp.gated_down gives its gradient
    compiled_training = torch.compiler.is_compiling() and torch.is_grad_enabled()
    fused = compiled_training and getattr(self, "fused_kernels", True) and fused_lora.usable(x)
    if compiled_training and isinstance(drop, nn.Dropout) and drop.training and drop.p > 0:
        if fused:
            shared = getattr(self, "shared_input", None)
            low = shared[0].low(shared[1], x, name, drop.p) if shared is not None else None
            if low is None and handed is not None and all(t.shape == x.shape for t in handed):
                low = fused_lora.gated_dropped_down(x, *handed, a, fused_lora.new_seed(x.device), drop.p)
            if low is None:
                low = fused_lora.dropped_down(x, a, fused_lora.new_seed(x.device), drop.p)
        else:
            low = checkpoint(_dropped_low_rank, x, a, drop.p, use_reentrant=False)
    else:
        low = F.linear(drop(x), a.to(x.dtype))
    out = (fused_lora.added_up if fused else added_up_by_cublas)(result, low, b, self.scaling[name])
    if fused and gated is not None and gated[1] != "down":
        gated[0].hand(gated[1], out, x if fp8_down else None)
    return out


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("query", "key", "value"))


class SharedInput:
    """LoRA linears of one module that its forward gives the same input (attention's q, k, v; the MLP's gate, up).
    In a compiled training forward with the fused kernels, the first of them to run computes the down projections
    of all in one kernel (x read once, each target's own mask; its backward writes one summed input gradient), and
    the others take theirs. The input is matched by identity: a model that feeds them different tensors, or
    adapters of different ranks or dropout, gets one kernel per target as before."""

    def __init__(self, members: list[LoraLinear]) -> None:
        self.members = members
        self.x: torch.Tensor | None = None
        self.lows: list[torch.Tensor | None] = [None] * len(members)

    def low(self, i: int, x: torch.Tensor, name: str, p: float) -> torch.Tensor | None:
        """Member i's dropout(x) @ A.T, or None when it must compute it alone."""
        if self.x is not x or self.lows[i] is None:
            if not self._shareable(name, p):
                return None
            a = torch.cat([m.lora_A[name].weight for m in self.members])
            low = fused_lora.dropped_down(x, a, fused_lora.new_seed(x.device, len(self.members)), p)
            self.x, self.lows = x, list(low.split(a.shape[0] // len(self.members), dim=-1))
        low, self.lows[i] = self.lows[i], None
        if all(other is None for other in self.lows):
            self.x = None  # all taken: hold nothing past this layer
        return low

    def _shareable(self, name: str, p: float) -> bool:
        drops = [m.lora_dropout[name] if _plain(m, name) else None for m in self.members]
        return (all(isinstance(d, nn.Dropout) and d.p == p and d.training for d in drops)
                and len({m.r[name] for m in self.members}) == 1
                and all(getattr(m, "fused_kernels", True) and not m.disable_adapters and not m.merged
                        and m.active_adapters == [name] for m in self.members))


def group_shared_inputs(model: nn.Module) -> None:
    """Give the LoRA linears of each module whose names say they read one input (SHARED_INPUTS) a SharedInput."""
    for parent in model.modules():
        for names in SHARED_INPUTS:
            members = [m for m in (getattr(parent, n, None) for n in names) if type(m) is LoraLinear]
            if len(members) > 1:
                group = SharedInput(members)
                for i, m in enumerate(members):
                    m.shared_input = (group, i)


class GatedMlp:
    """An MLP whose forward is transformers' LlamaMLP one, down(silu(gate(x)) * up(x)), with LoRA on all three.
    In a compiled training forward on the fused path, gate and up hand their outputs to down, whose LoRA down
    projection then keeps those for its backward (the activation's own backward keeps them anyway) instead of its
    input silu(gate) * up, the widest tensor of a layer, and computes the input again from them as it reads them
    (`fused_lora.gated_dropped_down`): 5.25 GiB less at 8B shapes, microbatch 3 (bench/PERF_NOTES.md).

    On an FP8 base (`fp8_down`) down goes further: it computes the activation itself from what gate and up hand it
    (their outputs and x), and its backward takes the activation's gradient on to gate and up inside its LoRA
    kernel and gives x the gradient of gate's and up's base products, which then run without a graph
    (`fp8_mlp`)."""

    def __init__(self, members: list[LoraLinear]) -> None:
        self.members = members
        self.outputs: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def hand(self, role: str, out: torch.Tensor, x: torch.Tensor | None) -> None:
        self.outputs[role] = (out, x)

    def take(self) -> tuple[torch.Tensor, ...] | None:
        """gate's and up's outputs of this forward, and their input if it was handed and is one tensor, if both
        were handed; holds nothing afterwards."""
        gate, up = self.outputs.pop("gate", None), self.outputs.pop("up", None)
        if gate is None or up is None:
            return None
        return (gate[0], up[0]) if gate[1] is None or gate[1] is not up[1] else (gate[0], up[0], gate[1])

    def fp8_down(self, name: str) -> bool:
        """Whether this forward of adapter `name` runs down through `fp8_mlp.gated_down`: compiled training on the
        fused kernels, FP8 bases without bias, plain adapters, and down's LoRA with dropout (its gated kernel).
        The same answer for all three members, which each ask it."""
        if not (torch.compiler.is_compiling() and torch.is_grad_enabled()):
            return False
        down = self.members[2]
        drop = down.lora_dropout[name] if name in down.lora_dropout else None
        return (fp8_mlp.serves(*(m.base_layer for m in self.members))
                and isinstance(drop, nn.Dropout) and drop.training and drop.p > 0
                and fused_lora.runs_on(down.base_layer.weight.device)
                and all(m.in_features % fused_lora.GROUP == 0 and getattr(m, "fused_kernels", True)
                        and not m.disable_adapters and not m.merged and m.active_adapters == [name] and _plain(m, name)
                        for m in self.members))


def _computes_gated_silu(mlp: nn.Module) -> bool:
    """Whether mlp's forward is LlamaMLP's (same code and names; most families copy it) with a SiLU activation."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    code, ref = getattr(type(mlp).forward, "__code__", None), LlamaMLP.forward.__code__
    return (code is not None and (code.co_code, code.co_names) == (ref.co_code, ref.co_names)
            and isinstance(getattr(mlp, "act_fn", None), (nn.SiLU, SiLUActivation)))


def group_gated_mlps(model: nn.Module) -> None:
    """Give the LoRA linears of each gated SiLU MLP (`_computes_gated_silu`) a GatedMlp."""
    for parent in model.modules():
        members = [getattr(parent, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if all(type(m) is LoraLinear for m in members) and _computes_gated_silu(parent):
            group = GatedMlp(members)
            for m, role in zip(members, ("gate", "up", "down")):
                m.gated_mlp = (group, role)


def added_up_by_cublas(result: torch.Tensor, low: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """result + scale * low @ b.T as one addmm, b cast to the activations' dtype: `fused_lora.added_up` where Triton
    does not run."""
    out = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]), b.to(low.dtype).t(),
                      alpha=scale)
    return out.view_as(result)


def check_fused(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Before a compiled stage trains: run the fused LoRA kernels once per adapter rank against torch
    (`fused_lora.disagreement`) and, where they disagree or fail, leave this stage's LoRA linears to the compiler
    and cuBLAS with one warning: slower, never wrong."""
    if not fused_lora.runs_on(device):
        return
    layers: dict[int, list[LoraLinear]] = {}
    for mod in model.modules():
        if type(mod) is LoraLinear:
            for name in mod.lora_A:
                if _plain(mod, name):
                    layers.setdefault(mod.r[name], []).append(mod)
    for rank, mods in sorted(layers.items()):
        why = fused_lora.disagreement(device, dtype, rank)
        if why is not None:
            log.warning(f"fused LoRA kernels (rank {rank}) turned off on {device}: {why}; the compiler's dropout "
                        "and cuBLAS's products run instead (slower; the dropout masks come from another draw)")
            for mod in mods:
                mod.fused_kernels = False


def _plain(mod: LoraLinear, name: str) -> bool:
    """Whether adapter `name` of this LoRA linear is a plain A, B pair that `_lora_linear_forward` computes itself
    (not DoRA or another PEFT variant, no bias on B)."""
    return name in mod.lora_A and name not in mod.lora_variant and mod.lora_B[name].bias is None


def _dropped_low_rank(x: torch.Tensor, a: torch.Tensor, p: float) -> torch.Tensor:
    return F.linear(F.dropout(x, p, training=True), a.to(x.dtype))


@torch.no_grad()
def merge_for_generation(model: nn.Module) -> int:
    """Fold each LoRA linear's scaled B·A into its base weight (PEFT's own merge), for generation that never
    asks for the base model: a token then costs the base model's kernels alone, not three more per target.
    Quantized bases (bitsandbytes, FP8) stay unmerged. Returns how many linears were merged."""
    merged = 0
    for mod in model.modules():
        if isinstance(mod, LoraLinear) and type(mod.get_base_layer()) is nn.Linear and not mod.merged:
            mod.merge()
            merged += 1
    return merged


@torch.no_grad()
def adapters_in_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Hold the adapter tensors in the activations' dtype for generation, where `_lora_linear_forward` computes
    them: it casts them to that dtype at every call (in decoding, two more kernels per target for every token),
    so results stay the same. PEFT's own layers (quantized bases, DoRA) cast the activations to the adapter's
    dtype instead, and keep theirs."""
    for mod in model.modules():
        if type(mod) is LoraLinear:
            for name in [n for n in mod.lora_A if _plain(mod, n)]:
                for t in (mod.lora_A[name].weight, mod.lora_B[name].weight):
                    t.data = t.data.to(dtype)


@torch.no_grad()
def init_adapter(model: nn.Module, seed: int, how: bool | str = True, adapter: str = ADAPTER) -> None:
    """Initialise every LoRA tensor of `adapter` from (seed, its global name), whatever the stage layout.

    `how` is PEFT's init_lora_weights: True (A uniform, B zero), "gaussian", or False (B random too,
    so the adapter is not the identity at step 0; useful to make every gradient non-zero in tests)."""
    for name, p in model.named_parameters():
        if not _of_adapter(name, adapter):
            continue
        key = canonical_name(name, adapter)
        kind = re.search(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.|$)", key)
        if kind is None:  # e.g. DoRA's magnitude vector, which PEFT derives from the base weight
            continue
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
        w = torch.zeros(p.shape, dtype=torch.float32)
        which = kind.group(1)
        if which == "lora_A" and how == "gaussian":
            w.normal_(0.0, 1.0 / w.shape[0], generator=g)
        elif which == "lora_A" or (which == "lora_B" and how is False):
            bound = 1.0 / math.sqrt(w.shape[1])  # nn.Linear's own init (kaiming_uniform, a=sqrt(5))
            w.uniform_(-bound, bound, generator=g)
        elif which == "lora_embedding_B" or (which == "lora_embedding_A" and how is False):
            w.normal_(0.0, 1.0, generator=g)
        # PEFT's default leaves lora_B and lora_embedding_A at zero, so training starts from the base model.
        p.copy_(w)


def _of_adapter(param_name: str, adapter: str) -> bool:
    return re.search(rf"\.lora_\w+\.{re.escape(adapter)}(\.|$)", param_name) is not None


def canonical_name(param_name: str, adapter: str = ADAPTER) -> str:
    """PEFT's saved key for a parameter: `base_model.model.<module path>.lora_A.weight` (no adapter name)."""
    return re.sub(rf"(\.lora_\w+)\.{re.escape(adapter)}(?=\.|$)", r"\1", param_name)


def adapter_params(model: nn.Module, adapter: str = ADAPTER) -> dict[str, nn.Parameter]:
    """One adapter's parameters on a stage (its LoRA tensors, and the biases when bias training is on), keyed by
    their canonical (global PEFT) names; frozen ones too, as in inference mode."""
    return {canonical_name(n, adapter): p for n, p in model.named_parameters()
            if _of_adapter(n, adapter) or (p.requires_grad and ".lora_" not in n)}
