"""What a model's own forward does around its decoder layers, learned by running it on a meta copy of the model
(no memory, no compute).

Two passes. The first runs up to the first decoder layer: which weights its hidden state is computed from (they
run before the layers, on the first stage), which weights reach the layers some other way (per-layer inputs a
later stage would not have), and what a layer returns (a stand-in must return the same). The second runs the
whole forward with every layer replaced by a relay: which weights run after the layers (the last stage's), and
whether a layer hands the next one more than its hidden state (a second stream no stage boundary passes on).
Autograd records, even on meta, which weights each tensor came from; the trace reads that graph.

Where a pass cannot run (an op without a meta kernel, a check of values), it gives None and `models.find_parts`
falls back to its rules.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

log = logging.getLogger("merak_lora")

TOKENS = 8  # the traced input: one sequence of this many tokens


@dataclass(frozen=True)
class Trace:
    hidden_from: frozenset[str]         # weight-holding modules the first layer's hidden state is computed from
    side_from: frozenset[str]           # ... that reach the layers through another argument (per-layer inputs)
    after: frozenset[str] | None        # ... that run after the last layer; None: the second pass did not run
    hidden_shape: tuple[int, ...]       # the first layer's hidden state for one sequence of TOKENS tokens
    output_shape: tuple[int, ...] | None  # the hidden state a layer returns for it; None: none ran on meta
    returns: int | None                 # a layer's output: 0 a tensor, k a tuple of k; None: none ran on meta
    carried: bool                       # a layer receives more from the layers before it than the hidden state


class _Reached(Exception):
    """Ends the first pass at the first decoder layer."""


def trace_forward(lm: nn.Module, layers_name: str) -> Trace | None:
    """Both passes over a meta copy of `lm`; None when the first cannot run."""
    twin = _meta_twin(lm)
    owner = {id(p): name for name, mod in twin.named_modules() for p in mod.parameters(recurse=False)}
    outside = [(name, mod) for name, mod in twin.named_modules()
               if any(True for _ in mod.parameters(recurse=False)) and not name.startswith(layers_name + ".")]
    alive: list[torch.Tensor] = []  # tensors whose ids `owner` holds must outlive the trace (ids are reused)
    for name, mod in outside:
        mod.register_forward_hook(partial(_traced_output, name=name, owner=owner, alive=alive))
    layers = twin.get_submodule(layers_name)
    first = _first_layer(twin, layers, owner)
    if first is None:
        return None
    hidden, side, (pattern, output_shape) = first
    after, carried = None, False
    # A layer that cannot run on meta (MoE routing) leaves its output structure to be found here: the first
    # structure with which the whole forward runs, hidden states keeping their shape from relay to relay.
    for candidate in [pattern] if pattern is not None else [(), (True, True), (True, True, True), (True,)]:
        around = _around_layers(twin, layers, outside, candidate, alive)
        if around is not None:
            (after, carried), pattern = around, candidate
            break
    return Trace(frozenset(_sources(hidden, owner)), frozenset(set().union(*(_sources(t, owner) for t in side))),
                 after, tuple(hidden.shape), output_shape, None if pattern is None else len(pattern), carried)


def _meta_twin(lm: nn.Module) -> nn.Module:
    """A copy of the model with everything on meta, eager attention (sdpa's mask reads the padding mask's
    values) and every parameter recording autograd."""
    twin = copy.deepcopy(lm).to("meta")
    if hasattr(twin, "set_attn_implementation"):
        with contextlib.suppress(Exception):
            twin.set_attn_implementation("eager")
    for p in twin.parameters():
        p.requires_grad_(True)
    return twin


def _first_layer(twin: nn.Module, layers: nn.ModuleList, owner: dict[int, str]) -> tuple | None:
    """The first layer's hidden state, its other tensor inputs, and what a layer returns."""
    seen: dict[str, Any] = {}

    def at_first_layer(layer: nn.Module, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs.get("hidden_states")
        seen["hidden"] = hidden
        seen["side"] = [v for v in (*args[1:], *kwargs.values()) if isinstance(v, torch.Tensor) and v is not hidden]
        # the first layer that runs on meta tells (a MoE or Mamba layer may not; the loop treats all alike)
        seen["output"] = next((r for r in (_output(each, args, kwargs) for each in layers) if r is not None),
                              (None, None))
        raise _Reached

    handle = layers[0].register_forward_pre_hook(at_first_layer, with_kwargs=True)
    try:
        ran = _run(twin, stop=_Reached)
    finally:
        handle.remove()
    if not ran or not isinstance(seen.get("hidden"), torch.Tensor):
        return None
    return seen["hidden"], seen["side"], seen["output"]


def _around_layers(twin: nn.Module, layers: nn.ModuleList, outside: list[tuple[str, nn.Module]],
                   pattern: tuple[bool, ...], alive: list[torch.Tensor]) -> tuple[frozenset[str], bool] | None:
    """With every layer a relay returning like `pattern`: the weight-holding modules called after the last
    relay, and whether a relay received anything computed from an earlier relay's extra outputs. None when the
    forward does not run so."""
    events: list[str | None] = []  # module names in call order; None marks a relay
    markers: dict[int, str] = {}
    received: list[tuple] = []
    for i in range(len(layers)):
        layers[i] = _Relay(pattern, markers, received, events, alive)
    handles = [mod.register_forward_pre_hook(lambda *_, name=name: events.append(name)) for name, mod in outside]
    try:
        if not _run(twin, stop=None):
            return None
    finally:
        for handle in handles:
            handle.remove()
    last = max((i for i, e in enumerate(events) if e is None), default=-1)
    after = frozenset(e for e in events[last + 1:] if e is not None)
    carried = any(_sources(t, markers) for args in received for t in args)
    return after, carried


class _Relay(nn.Module):
    """A decoder layer in the second pass: hands its hidden state on, with fresh marked tensors where the layer
    returns other tensors (None where it returns None), and keeps what it receives."""

    def __init__(self, pattern: tuple[bool, ...], markers: dict[int, str], received: list[tuple], events: list,
                 alive: list[torch.Tensor]):
        super().__init__()
        self.pattern, self.markers, self.received, self.events, self.alive = pattern, markers, received, events, alive

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.events.append(None)
        hidden = args[0] if args else kwargs.get("hidden_states")
        if self.received and hidden.shape != self.received[0][0].shape:
            raise ValueError("the hidden state changed shape between layers: the loop unpacked another structure")
        self.received.append((hidden, *(v for v in (*args[1:], *kwargs.values()) if isinstance(v, torch.Tensor))))
        if not self.pattern:
            return hidden
        extra = [torch.empty_like(hidden).requires_grad_(True) if tensor else None for tensor in self.pattern[1:]]
        self.markers.update({id(m): "extra output" for m in extra if m is not None})
        self.alive += [m for m in extra if m is not None]
        return (hidden, *extra)


def _run(twin: nn.Module, stop: type[Exception] | None) -> bool:
    """The twin's forward on TOKENS tokens: True when it ran (to the end, or until `stop` was raised). Fake
    tensors first: transformers skips its checks of values (padding, packed sequences) for them, as when
    compiling; plain meta tensors where a family's own code still asks a fake tensor for a value."""
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # it logs every op a layer cannot run on meta; _output expects some
    try:
        for fake in (True, False):
            try:
                with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
                    twin(input_ids=torch.zeros(1, TOKENS, dtype=torch.long, device="meta"), use_cache=False)
                return True
            except Exception as e:  # noqa: BLE001 - an op without a meta kernel: the rules take over
                if stop is not None and isinstance(e, stop):
                    return True
                log.debug(f"{type(twin).__name__}: forward not traceable ({'fake' if fake else 'meta'} tensors, "
                          f"{type(e).__name__}: {e})")
        return False
    finally:
        quiet.setLevel(level)


def _output(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple[bool, ...], tuple[int, ...]] | None:
    """The layer's output structure (() a tensor, else for each item of its tuple whether it is a tensor) and
    the shape of the hidden state it returns; None if the layer cannot run on meta (data-dependent ops such as
    MoE routing)."""
    try:
        out = layer.forward(*args, **kwargs)
    except Exception:  # noqa: BLE001
        return None
    if isinstance(out, (tuple, list)):
        return tuple(isinstance(o, torch.Tensor) for o in out), tuple(out[0].shape)
    return (), tuple(out.shape)


def _traced_output(module: nn.Module, args: tuple, output: Any, *, name: str, owner: dict[int, str],
                   alive: list[torch.Tensor]) -> Any:
    """An output computed without autograd (sinusoidal position tables under no_grad) made a leaf of its own,
    owned by its module, so what it feeds is traced too."""
    if isinstance(output, torch.Tensor) and output.is_floating_point() and output.grad_fn is None:
        output = output.detach().requires_grad_(True)
        owner[id(output)] = name
        alive.append(output)
        return output
    return None


def _sources(t: torch.Tensor, owner: dict[int, str]) -> set[str]:
    """The owners (modules, markers) of the autograd leaves `t` was computed from."""
    found: set[str] = set()
    if id(t) in owner:
        found.add(owner[id(t)])
    seen: set = set()
    stack: list[Callable | None] = [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and id(var) in owner:
            found.add(owner[id(var)])
        stack += [nxt for nxt, _ in fn.next_functions]
    return found
