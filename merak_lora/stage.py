"""One pipeline stage: the model built on the meta device, cut to this stage's layers, only this stage's
tensors read from the safetensors files, LoRA on top.

The stage keeps the model's own forward. Layers it does not own become pass-throughs and weights it does
not own become empty stand-ins; a hook hands the received hidden state to the first owned layer and another
stops the forward after the last owned layer. The model's own code therefore still computes masks, rotary
tables, per-layer attention types and every family quirk, and parameter names stay global
(`model.layers.17...` on whichever stage holds layer 17).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM

from .config import ConfigError
from .lora import ADAPTER, AdapterSwitch, apply_adapters, check_fused, group_gated_mlps, group_shared_inputs
from .models import ModelParts, find_parts
from .fp8 import BlockScaled
from .quant import Fp8, Quantization, quantized_linear, takes
from .partition import layer_ranges, split_layers
from .weights import KeyMap, RandomWeights, WeightIndex

log = logging.getLogger("merak_lora")


@dataclass(frozen=True)
class StageSpec:
    index: int
    num_stages: int
    start: int          # first decoder layer (inclusive)
    stop: int           # last decoder layer (exclusive)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


class StageOutput(Exception):
    """Raised after the stage's last layer to leave the model's forward early with the hidden state (its one
    argument: no __init__ of its own, which torch.compile cannot trace inside a compiled decoding step)."""

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0]


class PassThrough(nn.Module):
    """A decoder layer held by another stage: hands its input on (its output is replaced anyway), shaped as
    the real layer's output, since the model's loop may index into it (`layer_outputs[0]`). It keeps the real
    layer's plain attributes, which some loops read (`layer.block_type`, `layer.attention_type`)."""

    def __init__(self, layer: nn.Module, returns: int):
        super().__init__()
        for key, value in vars(layer).items():
            if not key.startswith("_") and key != "training" and isinstance(value, (str, int, float, bool)):
                setattr(self, key, value)
        self.returns = returns  # 0: a tensor, k: a tuple of k with the hidden state first

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        return (hidden, *[None] * (self.returns - 1)) if self.returns else hidden


class Absent(nn.Module):
    """A weight-holding module held by another stage. Returns zeros of the right shape for embeddings and
    linears, and its input for norms, so surrounding code still runs."""

    def __init__(self, name: str, out_features: int | None, lookup: bool):
        super().__init__()
        self.name, self.out_features, self.lookup = name, out_features, lookup
        # for callers that pass no ids (position embeddings called with sizes, None or hidden states): a zero
        # that adds to anything, on the stage's device (materialize moves buffers there)
        self.register_buffer("zero", torch.zeros(()), persistent=False)

    def forward(self, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return self.zero
        if self.out_features is None:
            return x
        if self.lookup and x.is_floating_point():
            return self.zero  # position embeddings handed (a slice of) the hidden states to size themselves
        shape = (*x.shape, self.out_features) if self.lookup else (*x.shape[:-1], self.out_features)
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        # real zeros, not a broadcast view: some families add to it in place (RoCBert); it is one activation
        return torch.zeros(shape, dtype=dtype, device=x.device)

    def extra_repr(self) -> str:
        return f"{self.name} (held by another stage)"


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device and buffers for real.

    Buffers such as rotary inverse frequencies are computed in the modules' constructors and are not in the
    checkpoint, so they must be real; parameters are read later, one stage's worth."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def load_model_config(path: str, trust_remote_code: bool):
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ConfigError(f"cannot read a model config from {path!r}: {e}") from None
    except ValueError as e:
        text = str(e)
        if "trust_remote_code" in text:
            raise ConfigError(f"the model in {path!r} ships its own Python code; it runs only with "
                              "--trust_remote_code true (read that code first)") from None
        raise ConfigError(f"model config in {path!r}: {text.splitlines()[0]}") from None
    except KeyError as e:
        raise ConfigError(f"model in {path!r} has unknown model_type {e}; this transformers version does not "
                          "know it. Pass --trust_remote_code true if the folder ships modeling code.") from None


def build_skeleton(config, dtype: torch.dtype, trust_remote_code: bool, attn_implementation: str) -> nn.Module:
    """The whole causal LM with every parameter on the meta device (no memory, no init time)."""
    with params_on_meta():
        try:
            lm = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                  attn_implementation=attn_implementation)
        except ValueError as e:
            if "attn_implementation" in str(e) or "does not support" in str(e):
                lm = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                      trust_remote_code=trust_remote_code,
                                                      attn_implementation="eager")
            else:
                raise ConfigError(f"model type {config.model_type!r}: {str(e).splitlines()[0]}") from None
    return lm


def plan_stages(lm: nn.Module, parts: ModelParts, num_stages: int, method: str) -> list[StageSpec]:
    """Stage layer ranges. `parameters` weighs what a stage computes per token: a weight matrix costs in
    proportion to its size (one matmul, forward and backward), so the head counts like that many layer
    parameters, while input embeddings are a lookup and count nothing. After the layers everything is a matmul,
    an embedding there included (OpenELM's head is its input embedding)."""
    if num_stages > 1 and parts.unsplittable:
        raise ConfigError(parts.unsplittable)
    layers = lm.get_submodule(parts.layers)
    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    pre = sum(p.numel() for n in parts.pre if not isinstance(mod := lm.get_submodule(n), nn.Embedding)
              for p in mod.parameters(recurse=False))
    post = sum(p.numel() for n in parts.post for p in lm.get_submodule(n).parameters(recurse=False))
    counts = split_layers(parts.num_layers, num_stages, method, layer_params, pre, post)
    return [StageSpec(i, num_stages, a, b) for i, (a, b) in enumerate(layer_ranges(counts))]


def _checkpointed(forward, switch: AdapterSwitch | None):
    """The layer recomputed in the backward, with the adapter its forward ran (the RNG state torch restores)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        if switch is None:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        name = switch.current

        def again(*a: Any, **k: Any) -> Any:
            with switch.selected(name):
                return forward(*a, **k)
        return checkpoint(again, *args, use_reentrant=False, **kwargs)
    return run


class Stage(nn.Module):
    """The module a PipelineStage runs: input ids (first stage) or hidden states in, hidden states or
    logits (last stage) out.

    With `emit_hidden` set, a last stage whose `loss_head` is not None stops before its head and returns the
    final hidden states: the loss applies the head itself, chunk by chunk (schedule.TokenLoss)."""

    def __init__(self, model: nn.Module, spec: StageSpec, parts: ModelParts, switch: AdapterSwitch | None = None):
        super().__init__()
        self.model = model
        self.spec = spec
        self.parts = parts
        self.adapters = switch
        self.emit_hidden = False
        self._running = False
        self._received: torch.Tensor | None = None
        # Hooks on every layer from the stage's first one on, since a model's loop may skip a layer (Mllama's
        # cross-attention layers without an image): the received hidden state goes into the first layer called
        # from `start` on, and the stage ends as the first layer after its own is called, with that layer's
        # input (the loop's own hand-over between layers).
        layers = self.layers()
        if not spec.is_first:
            for layer in layers[spec.start:]:
                layer.register_forward_pre_hook(self._inject, with_kwargs=True)
        if not spec.is_last:
            for layer in layers[spec.stop:]:
                layer.register_forward_pre_hook(self._stop, with_kwargs=True)
        self.loss_head = self._frozen_plain_head() if spec.is_last else None
        if self.loss_head is not None:
            self.loss_head.register_forward_pre_hook(self._stop_before_head)

    def _frozen_plain_head(self) -> nn.Linear | None:
        """The head, if the loss can apply it in its place: a plain frozen Linear of a family whose logits are
        nothing more than that Linear's output (LoRA on the head or a quantized head keep the full logits)."""
        lm = self.base_lm()
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        if (self.parts.plain_head and type(head) is nn.Linear
                and not any(p.requires_grad for p in head.parameters())):
            return head
        return None

    def layers(self) -> nn.ModuleList:
        return self.base_lm().get_submodule(self.parts.layers)

    def base_lm(self) -> nn.Module:
        """The transformers model inside the PEFT wrapper (or the model itself without LoRA)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _inject(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self._running or self._received is None:
            return None
        received, self._received = self._received, None  # once per forward
        if args:
            return (received, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": received}

    def _stop(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._running:
            raise StageOutput(args[0] if args else kwargs["hidden_states"])

    def _stop_before_head(self, module: nn.Module, args: tuple) -> None:
        if self._running and self.emit_hidden:
            raise StageOutput(args[0])

    def forward(self, x: torch.Tensor, adapter: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """kwargs go to the model's forward: position_ids when packed; attention_mask, past_key_values and
        use_cache when generating. `adapter` (training) holds, per row, the index of the adapter the microbatch
        belongs to (all rows of a microbatch have the same), on the CPU."""
        if adapter is not None and self.adapters is not None:
            with self.adapters.running(int(adapter[0])):
                return self._forward(x, **kwargs)
        return self._forward(x, **kwargs)

    def _forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("use_cache", False)
        # The transformers model itself (PEFT's LoRA layers sit inside it): PEFT's wrapper refuses inputs_embeds
        # for some families (MPT), and adds nothing else for LoRA.
        lm = self.base_lm()
        self._running = True
        try:
            if self.spec.is_first:
                out = lm(input_ids=x, **kwargs)
            else:
                # The model's code before the first layer only sizes masks from inputs_embeds (its result is
                # replaced at the first owned layer) and may change it in place (CTRL scales it): zeros, not x.
                self._received = x
                out = lm(inputs_embeds=torch.zeros_like(x), **kwargs)
            logits = out.logits if hasattr(out, "logits") else out[0]
            return logits.float()  # the loss works in fp32, as transformers' own loss does
        except StageOutput as done:
            return done.hidden
        finally:
            self._running = False
            self._received = None


def _alias_groups(lm: nn.Module) -> dict[str, list[str]]:
    """For every parameter name, all names sharing the same tensor (tied embeddings)."""
    by_id: dict[int, list[str]] = {}
    for name, p in lm.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: names for names in by_id.values() for n in names}


def _source_name(name: str, keys: KeyMap, aliases: list[str]) -> str | None:
    """The checkpoint name for a parameter: its own, or that of a tied alias (a head saved as the embedding)."""
    return next((cand for cand in [name, *aliases] if cand in keys), None)


def prune(lm: nn.Module, parts: ModelParts, spec: StageSpec) -> None:
    """Replace what this stage does not own by pass-throughs and stand-ins."""
    layers = lm.get_submodule(parts.layers)
    for i in range(len(layers)):
        if not spec.start <= i < spec.stop:
            layers[i] = PassThrough(layers[i], parts.layer_returns)
    kept = set(parts.pre if spec.is_first else ()) | set(parts.post if spec.is_last else ())
    replaced: list[str] = []
    for name in sorted((set(parts.pre) | set(parts.post)) - kept, key=lambda n: n.count(".")):  # parents first
        if (any(name.startswith(r + ".") for r in replaced) or any(k.startswith(name + ".") for k in kept)
                or parts.layers.startswith(name + ".")):
            continue  # inside a stand-in already, or holding the layers or a module this stage keeps
        replaced.append(name)
        mod = lm.get_submodule(name)
        if isinstance(mod, nn.Embedding):
            stub = Absent(name, mod.embedding_dim, lookup=True)
        elif isinstance(mod, nn.Linear):
            stub = Absent(name, mod.out_features, lookup=False)
        elif type(mod).__name__ == "Conv1D":
            stub = Absent(name, mod.nf, lookup=False)
        else:
            stub = Absent(name, None, lookup=False)
        parent, _, leaf = name.rpartition(".")
        setattr(lm.get_submodule(parent) if parent else lm, leaf, stub)


def materialize(lm: nn.Module, keys: KeyMap | RandomWeights, device: torch.device, dtype: torch.dtype,
                aliases: dict[str, list[str]], tie: bool = True, quant: Quantization | Fp8 | None = None,
                layers: str = "") -> None:
    """Read this stage's parameters from the checkpoint onto `device`, one decoder layer at a time (host memory
    stays at one layer's worth); move buffers there too. With `quant`, the linears inside the layers become
    bitsandbytes or FP8 layers as they are read; FP8 checkpoint tensors are dequantized where they are not. `aliases` (taken before pruning) lets a tied head find the embedding
    tensor it shares."""
    keep_fp32 = set(getattr(lm, "_keep_in_fp32_modules", None) or [])
    groups: dict[str, list[tuple[str, nn.Module, str, str, str]]] = {}
    missing = []
    for mod_name, mod in lm.named_modules():
        for attr, p in list(mod._parameters.items()):
            if p is None:
                continue
            full = f"{mod_name}.{attr}" if mod_name else attr
            source = _source_name(full, keys, aliases.get(full, []))
            if source is None:
                missing.append(full)
                continue
            group = ".".join(full.split(".")[: layers.count(".") + 2]) if full.startswith(layers + ".") else ""
            groups.setdefault(group, []).append((mod_name, mod, attr, full, source))
    if missing:
        raise ConfigError(f"the weights in {keys.index.folder!r} lack {len(missing)} tensors this stage needs, "
                          f"e.g. {missing[:3]}; is this the right model folder for its config.json?")
    made: dict[tuple[int, str], nn.Parameter] = {}
    quantized: set[int] = set()
    for group, entries in groups.items():
        tensors = keys.read(sorted({e[4] for e in entries}))
        for mod_name, mod, attr, full, source in entries:
            if id(mod) in quantized:  # its bias went into the quantized layer with its weight
                continue
            meta = mod._parameters[attr]
            t = tensors[source]
            if tuple(t.shape) != tuple(meta.shape):
                raise ConfigError(f"{keys.index.folder}: tensor {source} has shape {tuple(t.shape)} but the config "
                                  f"expects {tuple(meta.shape)}; config.json and the weights disagree")
            if (quant is not None and group and isinstance(mod, nn.Linear) and attr == "weight"
                    and takes(quant, tuple(meta.shape))):
                bias = tensors[_source_name(f"{mod_name}.bias", keys, [])] if mod.bias is not None else None
                parent, _, leaf = mod_name.rpartition(".")
                setattr(lm.get_submodule(parent), leaf, quantized_linear(t, bias, quant, device))
                quantized.add(id(mod))
                continue
            share = (id(meta), source) if tie else (id(mod), attr)
            if share not in made:
                target = torch.float32 if any(k in full for k in keep_fp32) else dtype
                if isinstance(t, BlockScaled):  # an FP8 checkpoint trained without --fp8
                    t = t.dequantized(target, device)
                t = t.to(device=device, dtype=target if t.is_floating_point() else t.dtype)
                made[share] = nn.Parameter(t, requires_grad=False)
            mod._parameters[attr] = made[share]
        del tensors
    for mod in lm.modules():
        for attr, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[attr] = b.to(device)


def build_stage(spec: StageSpec, config, index: WeightIndex | None, *, device: torch.device, dtype: torch.dtype,
                lora_config=None, seed: int = 0, trust_remote_code: bool = False, attn_implementation: str = "sdpa",
                gradient_checkpointing: bool = False, tie: bool = True, quant: Quantization | Fp8 | None = None,
                compile: bool = False, adapters: list | None = None) -> Stage:
    """Everything one stage needs, touching only its own weights. `adapters` lists (name, LoraConfig, seed) for
    several adapters over one base; `lora_config` and `seed` are the one-adapter case."""
    if adapters is None:
        adapters = [(ADAPTER, lora_config, seed)] if lora_config is not None else []
    lm = build_skeleton(config, dtype, trust_remote_code, attn_implementation)
    parts = find_parts(lm, config)
    aliases = _alias_groups(lm)
    # from the whole skeleton: the conversion rules know the full model (no index: random weights, benchmarks)
    keys = KeyMap(lm, index) if index is not None else RandomWeights(lm, device)
    prune(lm, parts, spec)
    materialize(lm, keys, device, dtype, aliases, tie=tie, quant=quant, layers=parts.layers)
    model = apply_adapters(lm, adapters) if adapters else lm
    switch = AdapterSwitch(model, [a[0] for a in adapters], device) if adapters else None
    stage = Stage(model, spec, parts, switch)
    layers = stage.layers()
    if compile and adapters:
        check_fused(model, device, dtype)
        group_shared_inputs(model)
        group_gated_mlps(model)
    if compile and len(adapters) > 1:
        # one graph per adapter (and per train/eval mode) for the same layer code; torch's default keeps 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(adapters))
    for i in range(spec.start, spec.stop):
        # Each layer's own forward is compiled (the hooks around it stay eager); every layer of a family has the
        # same code, so one compiled graph serves them all.
        if compile:
            layers[i].forward = torch.compile(layers[i].forward)
        if gradient_checkpointing:
            layers[i].forward = _checkpointed(layers[i].forward, switch)
    return stage
