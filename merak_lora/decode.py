"""One stage's KV cache for generation, and its one-token step made cheap.

Decoding a token reads every weight once and does little arithmetic, so in eager mode its time goes to Python
and kernel launches (hundreds per layer), not to the GPU. Where the model allows, each stage therefore keeps a
KV cache of fixed size for the request (transformers' StaticCache; only the stage's own layers allocate), takes
an attention mask prepared here over the whole cache, and on CUDA captures its one-token forward as a CUDA graph
once per request and replays it for every further token: the inputs are copied into the graph's buffers and
the cache advances on the device. The cache and its step are kept for the next request of the same shape
(`DecoderPool`), which resets the cache instead of building both again.

"Where the model allows" (`static_decoding`): every layer attends to the whole sequence (no sliding windows,
no linear-attention state) and the model builds its mask with transformers' `create_causal_mask`, which takes a
prepared 4-D mask as it is. Other families keep the growing cache (`StageCache`).
"""

from __future__ import annotations

import inspect
import logging

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from .fused_decode import FusedStep

log = logging.getLogger("merak_lora")


class _OwnedLayers:
    """Questions about "the" sequence length, which a model asks of layer 0 (or its first full-attention layer),
    go to an owned layer of the same kind: a stage's cache fills only its own layers."""

    owned: range

    def _own(self, layer_idx: int) -> int:
        if layer_idx in self.owned:
            return layer_idx
        kinds = self.is_sliding
        want = kinds[layer_idx] if layer_idx < len(kinds) else False
        return next((i for i in self.owned if i < len(kinds) and kinds[i] == want), self.owned.start)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._own(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._own(layer_idx))

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return super().get_query_offset(self._own(layer_idx))


class StageCache(_OwnedLayers, DynamicCache):
    """A growing KV cache for one stage's layers."""

    def __init__(self, config, owned: range):
        DynamicCache.__init__(self, config=config)
        self.owned = owned


class StaticStageCache(_OwnedLayers, StaticCache):
    """A KV cache of `max_len` positions for one stage's layers, allocated as each layer first writes."""

    def __init__(self, config, owned: range, max_len: int):
        StaticCache.__init__(self, config=config, max_cache_len=max_len)
        self.owned = owned

    def lengths(self) -> list[torch.Tensor]:
        """The filled length of each allocated layer (a device tensor each, advanced in place)."""
        return [layer.cumulative_length for layer in self.layers if layer.is_initialized]


# Families that pass the checks below but handle the mask themselves as well (found by the family sweep,
# tests/test_families.py, which compares every family's pipeline generation with transformers' generate()).
OWN_MASK_HANDLING = {"git": "prepends the image tokens' mask to the 2-D mask"}


def static_decoding(lm: torch.nn.Module, text_config) -> bool:
    """Whether this model decodes with a static cache and a prepared 4-D mask (module docstring)."""
    if getattr(lm.config, "model_type", None) in OWN_MASK_HANDLING:
        return False
    kinds = getattr(text_config, "layer_types", None) or []
    if any(k != "full_attention" for k in kinds):
        return False
    if getattr(text_config, "sliding_window", None) and getattr(text_config, "use_sliding_window", True):
        return False
    if getattr(lm.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False  # flash-attention kernels take no 4-D mask
    try:
        layers = StaticCache(config=text_config, max_cache_len=8).layers
        source = inspect.getsource(type(lm.get_decoder()).forward)
    except (AttributeError, TypeError, OSError, ValueError, KeyError):
        return False
    # position biases built from the 2-D mask (ALiBi: Bloom, MPT, Falcon) need that mask itself; some families pick
    # create_causal_mask through a variable where no sliding window is set (Mistral, Mixtral, Phi-3, Qwen3-MoE)
    return (all(type(layer) is StaticLayer for layer in layers) and "create_causal_mask" in source
            and "alibi" not in source.lower())


def attention_bias(key_ok: torch.Tensor, start: int, queries: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask (batch, 1, queries, cache length) for queries at positions start.. of the cache:
    a key is seen if it is not padding (`key_ok`) and not after the query."""
    slots = torch.arange(key_ok.shape[1], device=key_ok.device)
    rows = torch.arange(start, start + queries, device=key_ok.device)[:, None]
    seen = key_ok[:, None, None, :] & (slots[None, :] <= rows)[None, None]
    return torch.zeros(seen.shape, dtype=dtype, device=key_ok.device).masked_fill(~seen, torch.finfo(dtype).min)


class GraphedStep:
    """A stage's one-token forward captured as a CUDA graph; calling it copies the inputs into the graph's
    buffers and replays. Capturing runs the step once first (outside the capture, for lazy initialization),
    then rewinds the cache, so the step is not counted twice."""

    def __init__(self, step, cache: StaticStageCache, *inputs: torch.Tensor):
        self.inputs = [t.clone() for t in inputs]
        lengths = [n.clone() for n in cache.lengths()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        for now, before in zip(cache.lengths(), lengths):  # capturing records the step without running it
            now.copy_(before)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = step(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for buf, t in zip(self.inputs, inputs):
            buf.copy_(t)
        self.graph.replay()
        return self.output


def stage_step(stage, cache, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One forward of a stage over the request's next positions (the last stage: the last position's logits)."""
    out = stage(x, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    return out[:, -1, :] if stage.spec.is_last else out


# The one-token step of a whole stage compiled as one graph: inductor fuses each layer's norms, rotary, residuals
# and activation into a few kernels, which a CUDA graph then replays. Compiling layer by layer would recompile per
# layer (each has its own cache slot and index). Shapes stay static (a dynamic cache length measured 10% slower
# per token): one compile per stage, adapter setting, batch size and cache length, of which `cache_length` keeps
# few.
compiled_stage_step = torch.compile(stage_step, dynamic=False)


def cache_length(needed: int) -> int:
    """A request's cache slots: the next power of two from 256, so requests of similar lengths share shapes (and
    a compiled step); the slots beyond the request are masked and cost one small read each per token."""
    return max(256, 1 << (needed - 1).bit_length())


class StageDecoder:
    """One stage's forward for one request (then for later ones of the same key: `DecoderPool`): eager for the
    prompt, graphed for each further token on CUDA. Each token runs merak-lora's fused step where the stage allows
    it (`options.fused`, fused_decode.py; the first time a stage does not, rank 0's log says why), else the
    transformers layers, compiled as well when the generator asks (`options.compiled`). A step that does not
    compile decodes uncompiled with one warning, and `options.compiled` is turned off for the generator's later
    requests."""

    def __init__(self, stage, cache, options):
        self.stage, self.cache, self.options = stage, cache, options
        self.graphs = options.graphs and isinstance(cache, StaticStageCache)
        self.compiled = options.compiled and isinstance(cache, StaticStageCache)
        self.fused: FusedStep | None | bool = options.fused  # True: not tried yet
        self.graphed: GraphedStep | None = None
        self.tried = False  # whether the compiled step has run once (compiling)

    def _step(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return stage_step(self.stage, self.cache, x, mask, positions)

    def _fused_step(self, x: torch.Tensor) -> FusedStep | None:
        if self.fused is True:
            built = FusedStep.build(self.stage, self.cache, x.shape[0], self.options.act_dtype, self.options.own_4bit)
            if isinstance(built, str):
                if (self.stage.spec.index, built) not in self.options.fused_notes:
                    self.options.fused_notes.add((self.stage.spec.index, built))
                    log.info(f"stage {self.stage.spec.index}: decoding with the transformers layers, not the fused "
                             f"step: {built}")
                built = None
            self.fused = built
        return self.fused or None

    def _one_token(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        fused = self._fused_step(x)
        if fused is not None:
            return fused(x, mask, positions)
        if not self.compiled:
            return self._step(x, mask, positions)
        if self.tried:
            return compiled_stage_step(self.stage, self.cache, x, mask, positions)
        self.tried = True
        lengths = [n.clone() for n in self.cache.lengths()]
        try:
            return compiled_stage_step(self.stage, self.cache, x, mask, positions)
        except Exception as e:  # noqa: BLE001 - whatever the compiler raises, the step itself still runs eagerly
            log.warning(f"stage {self.stage.spec.index}: decoding without compiling "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
            for now, before in zip(self.cache.lengths(), lengths):  # a step that ran partly is run again
                now.copy_(before)
            self.compiled = self.options.compiled = False
            return self._step(x, mask, positions)

    def __call__(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1:
            return self._step(x, mask, positions)
        if not self.graphs:
            return self._one_token(x, mask, positions)
        if self.graphed is None:
            try:
                self.graphed = GraphedStep(self._one_token, self.cache, x, mask, positions)
            except RuntimeError as e:  # an operation that cannot be captured: this stage decodes eagerly
                log.warning(f"stage {self.stage.spec.index}: decoding without CUDA graphs "
                            f"({str(e).splitlines()[0][:160]})")
                self.graphs = False
                return self._one_token(x, mask, positions)
        return self.graphed(x, mask, positions)


class DecoderPool:
    """Stage decoders of ended requests, each with its static cache and what it built at its first token (the fused
    step, which converts every 4-bit weight's quant state; the CUDA graph), for later requests of the same key:
    building them again was 5-7% of a 128-token answer at 8B on an H100. At most `size` are held, the least
    recently used dropped (their GPU memory with them); a request's own decoders count against `size` while it
    runs, so a new shape never holds more caches at once."""

    def __init__(self, size: int):
        self.size = size
        self.entries: list[tuple[tuple, StageDecoder]] = []  # (key, decoder), least recently used first

    def take(self, keys: list[tuple]) -> list[StageDecoder | None]:
        """For each key a decoder kept for it, its cache reset to new (transformers' `reset` zeroes each allocated
        layer's keys, values and length in place: the same tensors, which its graph reads), or None to build."""
        found = []
        for key in keys:
            at = next((i for i in reversed(range(len(self.entries))) if self.entries[i][0] == key), None)
            found.append(None if at is None else self.entries.pop(at)[1])
        del self.entries[:max(0, len(self.entries) + len(keys) - self.size)]
        for decoder in found:
            if decoder is not None:
                decoder.cache.reset()
        return found

    def give(self, entries: list[tuple[tuple, StageDecoder]]) -> None:
        """A request's decoders, once it has ended without raising."""
        self.entries += entries
        del self.entries[:max(0, len(self.entries) - self.size)]

    def clear(self) -> None:
        self.entries.clear()
