"""Text generation across the pipeline, and in one process for users without a cluster.

Pipeline mode: prefill, then one token at a time. Each stage keeps its own KV cache for its own layers (of fixed
size, with each token's step replayed as a CUDA graph where the model allows: decode.py); hidden states go stage
to stage with point-to-point sends, and the next tokens go from the last stage to every rank of
the pipeline, so all ranks know when to stop. Rank 0 drives: it sends each request (prompts, sampling settings,
adapter on or off) to the other ranks, which serve requests until told to stop.

Sampling uses transformers' own logits processors, so greedy and seeded sampling match `model.generate`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from transformers.generation import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                     TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from .decode import StageCache, StageDecoder, StaticStageCache, attention_bias, static_decoding
from .layout import Layout, rank_of_stage
from .stage import Stage

TokenCallback = Callable[[list[int], list[bool]], None]
INTERRUPTED = -2  # sent in place of the next tokens when Ctrl-C stops an answer


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0          # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if not self.greedy:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


class StopChecker:
    """Finished rows: EOS produced, a stop string appeared in the decoded answer, or the length ran out."""

    def __init__(self, tokenizer, eos_ids: set[int], stop: list[str], batch: int):
        self.tokenizer, self.eos_ids, self.stop = tokenizer, eos_ids, stop
        self.done = [False] * batch

    def update(self, generated: list[list[int]]) -> list[bool]:
        for i, toks in enumerate(generated):
            if self.done[i]:
                continue
            if toks and toks[-1] in self.eos_ids:
                self.done[i] = True
            elif self.stop:
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                self.done[i] = any(s in text for s in self.stop)
        return self.done


def eos_ids_of(tokenizer, model_config) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model_config, "generation_config", None), "eos_token_id", None)
    extra = getattr(model_config, "eos_token_id", None)
    for e in (gen_eos, extra):
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(e)
    return ids


@contextlib.contextmanager
def adapter_enabled(models: list[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """Run with the LoRA adapter on (fine-tuned) or off (the base model), on every given PEFT model."""
    with contextlib.ExitStack() as stack:
        if not enabled:
            for m in models:
                if hasattr(m, "disable_adapter"):
                    stack.enter_context(m.disable_adapter())
        yield


class PipelineGenerator:
    """Generation across this rank's stages; rank 0 calls generate(), the others serve()."""

    def __init__(self, stages: list[Stage], layout: Layout, tokenizer, model_config, hidden_size: int,
                 act_dtype: torch.dtype, static: bool | None = None):
        self.stages = sorted(stages, key=lambda s: s.spec.index)
        self.layout = layout
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.hidden_size = hidden_size
        self.act_dtype = act_dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_ids_of(tokenizer, model_config)
        self.num_stages = self.stages[0].spec.num_stages
        self.last_rank = self._global(rank_of_stage(self.num_stages - 1, layout.pp, layout.v_shape))
        self.driver = self._global(0)
        self.interrupted = False         # the last answer was cut short by Ctrl-C
        self._ctrl_c = False
        text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
        # a static cache and prepared masks where the model allows (`static` forces the choice, for tests)
        self.static = static_decoding(self.stages[0].base_lm(), text) if static is None else static
        self.graphs = self.static and layout.device.type == "cuda"
        self.merged = False  # the adapter folded into the base weights (lora.merge_for_generation)

    def _global(self, pp_rank: int) -> int:
        return self.layout.global_rank_of(pp_rank)

    def _broadcast(self, obj: object, src: int) -> object:
        if self.layout.pp == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.layout.pp_group)
        return box[0]

    # rank 0 ----------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: Sampling, adapter: bool = True,
                 on_token: TokenCallback | None = None) -> list[list[int]]:
        """The answers; Ctrl-C meanwhile cuts them short (`interrupted` is set) instead of raising mid-pipeline."""
        if self.merged and not adapter:
            raise ValueError("the adapter is merged into the base weights, so the base model cannot answer; "
                             "build the generator with --compare_base true to keep them apart")
        self._ctrl_c = False
        with _on_ctrl_c(self._note_ctrl_c):
            self._broadcast(("generate", prompts, sampling, adapter), self.driver)
            return self._run(prompts, sampling, adapter, on_token)

    def close(self) -> None:
        self._broadcast(("exit", None, None, None), self.driver)

    # the other ranks ----------------------------------------------------------------------------------------
    def serve(self) -> None:
        """Answer rank 0's requests until it says exit. Ctrl-C reaches every rank; rank 0 decides what it
        means, so here it is ignored between answers (and during one, only the last stage acts on it)."""
        with _on_ctrl_c(signal.SIG_IGN):
            while True:
                cmd, prompts, sampling, adapter = self._broadcast(None, self.driver)
                if cmd == "exit":
                    return
                self._ctrl_c = False
                with _on_ctrl_c(self._note_ctrl_c):
                    self._run(prompts, sampling, adapter, None)

    def _note_ctrl_c(self, signum, frame) -> None:
        self._ctrl_c = True

    # every rank --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _run(self, prompts: list[list[int]], sampling: Sampling, adapter: bool,
             on_token: TokenCallback | None) -> list[list[int]]:
        device = self.layout.device
        ids, mask = left_pad(prompts, self.pad_id, device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        if self.static:
            max_len = ids.shape[1] + sampling.max_new_tokens
            caches = {s.spec.index: StaticStageCache(self.model_config, range(s.spec.start, s.spec.stop), max_len)
                      for s in self.stages}
            key_ok = torch.cat([mask.bool(), mask.new_ones(len(prompts), sampling.max_new_tokens, dtype=torch.bool)],
                               dim=1)
        else:
            caches = {s.spec.index: StageCache(self.model_config, range(s.spec.start, s.spec.stop))
                      for s in self.stages}
        decoders = {s.spec.index: StageDecoder(s, caches[s.spec.index], self.graphs) for s in self.stages}
        filled = 0
        generated: list[list[int]] = [[] for _ in prompts]
        stopper = StopChecker(self.tokenizer, self.eos_ids, sampling.stop, len(prompts))
        processors = sampling.processors()
        gen = torch.Generator(device=device).manual_seed(sampling.seed)
        history = ids
        step_ids = ids
        self.interrupted = False
        with adapter_enabled([s.model for s in self.stages], adapter):
            for _ in range(sampling.max_new_tokens):
                seen = attention_bias(key_ok, filled, step_ids.shape[1], self.act_dtype) if self.static else mask
                logits = self._forward(step_ids, seen, positions, decoders)
                filled += step_ids.shape[1]
                tokens = torch.empty(len(prompts), dtype=torch.long, device=device)
                if logits is not None:
                    scores = processors(history, logits.float())
                    if sampling.greedy:
                        tokens = scores.argmax(-1)
                    else:
                        probs = torch.softmax(scores, dim=-1)
                        tokens = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                    finished = torch.tensor(stopper.done, device=device)
                    tokens = tokens.masked_fill(finished, self.pad_id)
                    if self._ctrl_c:  # the last stage decides, so every rank stops at the same token
                        tokens.fill_(INTERRUPTED)
                if self.layout.pp > 1:
                    dist.broadcast(tokens, src=self.last_rank, group=self.layout.pp_group)
                if tokens[0].item() == INTERRUPTED:
                    self.interrupted = True
                    break
                was_done = list(stopper.done)
                for i, t in enumerate(tokens.tolist()):
                    if not was_done[i]:
                        generated[i].append(t)
                done = stopper.update(generated)
                if on_token is not None:
                    on_token([t if not was_done[i] else -1 for i, t in enumerate(tokens.tolist())], done)
                if all(done):
                    break
                history = torch.cat([history, tokens[:, None]], dim=1)
                step_ids = tokens[:, None]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions[:, -1:] + 1
        return generated

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 decoders: dict[int, StageDecoder]) -> torch.Tensor | None:
        """One forward through the whole pipeline; the last position's logits on the last stage's rank."""
        x: torch.Tensor | None = None
        b, q = ids.shape
        for stage in self.stages:
            s = stage.spec.index
            prev_rank = None if s == 0 else rank_of_stage(s - 1, self.layout.pp, self.layout.v_shape)
            if s == 0:
                x = ids
            elif prev_rank != self.layout.pp_rank:
                x = torch.empty(b, q, self.hidden_size, dtype=self.act_dtype, device=ids.device)
                dist.recv(x, src=self._global(prev_rank), group=self.layout.pp_group)
            out = decoders[s](x, mask, positions)
            if stage.spec.is_last:
                return out
            nxt = rank_of_stage(s + 1, self.layout.pp, self.layout.v_shape)
            if nxt != self.layout.pp_rank:
                dist.send(out.to(self.act_dtype).contiguous(), dst=self._global(nxt), group=self.layout.pp_group)
            x = out
        return None


@contextlib.contextmanager
def _on_ctrl_c(handler) -> Iterator[None]:
    """SIGINT goes to `handler` for the duration (only the main thread may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class LocalGenerator:
    """One process, the whole model: transformers' generate() on a PEFT model or a merged model."""

    interrupted = False  # Ctrl-C here raises KeyboardInterrupt out of generate(); chat.py ends the session

    def __init__(self, model: torch.nn.Module, tokenizer, model_config):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_ids_of(tokenizer, model_config)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling, adapter: bool = True,
                 on_token: TokenCallback | None = None) -> list[list[int]]:
        device = next(self.model.parameters()).device
        ids, mask = left_pad(prompts, self.pad_id, device)
        stopper = StopChecker(self.tokenizer, self.eos_ids, sampling.stop, len(prompts))
        streamer = _Streamer(on_token, stopper, len(prompts)) if (on_token or sampling.stop) else None
        torch.manual_seed(sampling.seed)
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
                      pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids), streamer=streamer,
                      logits_processor=sampling.processors(), temperature=None, top_k=None, top_p=None)
        if sampling.stop:
            kwargs.update(stop_strings=sampling.stop, tokenizer=self.tokenizer)
        with adapter_enabled([self.model], adapter):
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        generated = []
        for row in out[:, ids.shape[1]:].tolist():
            toks = []
            for t in row:
                toks.append(t)
                if t in self.eos_ids:
                    break
            generated.append(toks)
        return generated

    def close(self) -> None:
        pass


class _Streamer:
    """Adapts transformers' streamer protocol to the per-step token callback."""

    def __init__(self, on_token: TokenCallback | None, stopper: StopChecker, batch: int):
        self.on_token, self.stopper = on_token, stopper
        self.generated: list[list[int]] = [[] for _ in range(batch)]
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # the prompt comes first
            self.first = False
            return
        tokens = value.reshape(-1).tolist()
        was_done = list(self.stopper.done)
        for i, t in enumerate(tokens):
            if not was_done[i]:
                self.generated[i].append(t)
        done = self.stopper.update(self.generated)
        if self.on_token:
            self.on_token([t if not was_done[i] else -1 for i, t in enumerate(tokens)], done)

    def end(self) -> None:
        pass
