"""Text generation across the pipeline, and in one process for users without a cluster.

Pipeline mode: prefill, then one token at a time. Each stage keeps its own KV cache for its own layers (of fixed
size, with each token's step replayed as a CUDA graph where the model allows: decode.py; both kept for the next
request of the same shape and model); hidden states go stage
to stage with point-to-point sends, and the next tokens go from the last stage to every rank of
the pipeline, so all ranks know when to stop. Rank 0 drives: it sends each request (prompts, sampling settings,
and which adapter answers: none, the one loaded, or one of several by name) to the other ranks, which serve
requests until told to stop.

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

from .decode import (DecoderPool, StageCache, StageDecoder, StaticStageCache, attention_bias, cache_length,
                     static_decoding)
from .decode_kernels import runs_on
from .layout import Layout, rank_of_stage
from .lora import AdapterSwitch, adapters_off
from .shared_products import SharedProducts
from .stage import Stage

TokenCallback = Callable[[list[int], list[bool]], None]


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

    def take(self, rows, tokens: list[int], generated: list[list[int]], on_token: TokenCallback | None) -> list[bool]:
        """The new tokens of `rows` (the whole batch, or a group of it): appended to the answers of rows not
        finished before, handed to `on_token` (-1 for every other row); returns the finished rows."""
        was_done = list(self.done)
        row_tokens = dict(zip(rows, tokens))
        for i, t in row_tokens.items():
            if not was_done[i]:
                generated[i].append(t)
        done = self.update(generated)
        if on_token is not None:
            on_token([row_tokens[i] if i in row_tokens and not was_done[i] else -1 for i in range(len(done))], done)
        return done


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


Adapter = bool | str  # which model answers: False the base, True the adapter loaded, or one of several by name


@contextlib.contextmanager
def adapter_used(models: list[torch.nn.Module], switches: list[AdapterSwitch], adapter: Adapter) -> Iterator[None]:
    """Run the given PEFT models as the base model (adapter False), with their adapter (True), or with the named
    one of the several the switches choose from."""
    with contextlib.ExitStack() as stack:
        if adapter is False:
            for m in models:
                stack.enter_context(adapters_off(m))
        elif isinstance(adapter, str):
            for switch in switches:
                stack.enter_context(switch.selected(adapter))
        yield


def check_adapter(adapter: Adapter, names: list[str]) -> None:
    """A request names one of the adapters loaded (a ValueError names them)."""
    if isinstance(adapter, str) and adapter not in names:
        raise ValueError(f"no adapter {adapter!r} is loaded; loaded: {', '.join(names) or 'none by name'}")


class PipelineGenerator:
    """Generation across this rank's stages; rank 0 calls generate(), the others serve()."""

    def __init__(self, stages: list[Stage], layout: Layout, tokenizer, model_config, hidden_size: int,
                 act_dtype: torch.dtype, adapters: list[str] = ()):
        self.stages = sorted(stages, key=lambda s: s.spec.index)
        self.adapters = list(adapters)  # adapters loaded by name (from a checkpoint of several): requests pick one
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
        self.static = static_decoding(self.stages[0].base_lm(), text)  # a fixed-size cache and prepared masks
        self.graphs = self.static and layout.device.type == "cuda"
        self.merged = False  # the adapter folded into the base weights (lora.merge_for_generation)
        self.compiled = False  # the one-token step of each stage compiled (decode.compiled_stage_step)
        self.fused = runs_on(layout.device)  # merak-lora's own one-token step where a stage allows (fused_decode.py)
        self.fused_notes: set = set()  # (stage, reason) already logged for stages that keep the transformers step
        self.own_4bit = True  # the fused step's 4-bit products are merak-lora's CUDA ones where they build
        self.ahead = True  # the host reads a step's tokens while the next runs (_run; bench/decode.py compares)
        # one stage per rank: a batch of at least as many prompts as stages decodes as that many groups at once;
        # not for models that keep decoding state in their own modules (transformers marks them `_is_stateful`:
        # RecurrentGemma), which one group would overwrite for another
        self.in_flight = (self.num_stages > 1 and layout.chunks == 1 and not layout.v_shape
                          and not getattr(self.stages[0].base_lm(), "_is_stateful", False))
        self.joined: list[SharedProducts] = []  # the stages' joined linears (chat.py makes them once this is built)
        # the decoders of ended requests (decode.DecoderPool), enough for a request of each model a comparison asks
        # in turn (chat.py answers every prompt with the base and each adapter), or of two shapes of one model; each
        # holds its KV cache, so more would keep GPU memory for shapes seldom asked again
        per_request = self.num_stages if self.in_flight else len(self.stages)
        self.pool = DecoderPool((1 + max(1, len(self.adapters))) * per_request)

    def _global(self, pp_rank: int) -> int:
        return self.layout.global_rank_of(pp_rank)

    def _broadcast(self, obj: object, src: int) -> object:
        if self.layout.pp == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.layout.pp_group)
        return box[0]

    # rank 0 ----------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: Sampling, adapter: Adapter = True,
                 on_token: TokenCallback | None = None) -> list[list[int]]:
        """The answers; Ctrl-C meanwhile cuts them short (`interrupted` is set) instead of raising mid-pipeline."""
        if self.merged and adapter is False:
            raise ValueError("the adapter is merged into the base weights, so the base model cannot answer; "
                             "build the generator with --compare_base true to keep them apart")
        check_adapter(adapter, self.adapters)
        self._ctrl_c = False
        with _on_ctrl_c(self._note_ctrl_c):
            self._broadcast(("generate", prompts, sampling, adapter), self.driver)
            return self._run(prompts, sampling, adapter, on_token)

    def close(self) -> None:
        self._broadcast(("exit", None, None, None), self.driver)
        self.pool.clear()

    # the other ranks ----------------------------------------------------------------------------------------
    def serve(self) -> None:
        """Answer rank 0's requests until it says exit. Ctrl-C reaches every rank; rank 0 decides what it
        means, so here it is ignored between answers (and during one, only the last stage acts on it)."""
        with _on_ctrl_c(signal.SIG_IGN):
            while True:
                cmd, prompts, sampling, adapter = self._broadcast(None, self.driver)
                if cmd == "exit":
                    self.pool.clear()
                    return
                self._ctrl_c = False
                with _on_ctrl_c(self._note_ctrl_c):
                    self._run(prompts, sampling, adapter, None)

    def _note_ctrl_c(self, signum, frame) -> None:
        self._ctrl_c = True

    # every rank --------------------------------------------------------------------------------------------
    def _answering(self, stages: list[Stage], adapter: Adapter):
        return adapter_used([s.model for s in stages], [s.adapters for s in stages if s.adapters is not None],
                            adapter)

    def _key(self, stage: Stage, rows: int, length: int, adapter: Adapter) -> tuple:
        """What a stage's decoder is built for, as its cache and one-token step depend on it: the cache's shape and
        dtype, the model answering (the adapter folded into the base or apart from it), and the settings its step
        was made under (bench/decode.py changes them between requests)."""
        return (stage.spec.index, rows, length, self.act_dtype, adapter, self.merged, self.graphs, self.compiled,
                self.fused, self.own_4bit, tuple(g.on for g in self.joined))

    @contextlib.contextmanager
    def _decoders(self, stages: list[Stage], groups: list[list[int]], length: int,
                  adapter: Adapter) -> Iterator[list[dict[int, StageDecoder]]]:
        """Each group's decoders for `stages`: kept ones where the key matches, else new. They are kept only when
        the request ends without raising (Ctrl-C's stop is an ordinary end; its half-filled caches are reset when
        taken), as an exception may leave a cache or a capture half done. A growing cache is not kept."""
        keys = [(s, self._key(s, len(rows), length, adapter)) for rows in groups for s in stages]
        kept = self.pool.take([k for _, k in keys]) if self.static else [None] * len(keys)
        made = [StageDecoder(s, self._cache(s, length), self) if d is None else d for (s, _), d in zip(keys, kept)]
        n = len(stages)
        yield [{s.spec.index: d for s, d in zip(stages, made[i:i + n])} for i in range(0, len(made), n)]
        if self.static:  # not reached when the request raised
            self.pool.give([(k, d) for (_, k), d in zip(keys, made)])

    def _cache(self, stage: Stage, length: int) -> StageCache | StaticStageCache:
        owned = range(stage.spec.start, stage.spec.stop)
        return StaticStageCache(self.model_config, owned, length) if self.static \
            else StageCache(self.model_config, owned)

    @torch.no_grad()
    def _run(self, prompts: list[list[int]], sampling: Sampling, adapter: Adapter,
             on_token: TokenCallback | None) -> list[list[int]]:
        """The whole batch in lockstep. The host reads a step's tokens (stop checks, streaming) only once the next
        step is queued, so the GPU does not wait on the host between tokens; when they finish every answer, the
        step queued after them is dropped. The first token is read at once, before the one-token step is built
        (graph capture, compiling), so it shows as soon as the prompt is through."""
        if self.in_flight and len(prompts) >= self.num_stages:
            return self._run_in_flight(prompts, sampling, adapter, on_token)
        device = self.layout.device
        ids, mask = left_pad(prompts, self.pad_id, device)
        length = cache_length(ids.shape[1] + sampling.max_new_tokens)
        rows = list(range(len(prompts)))
        generated: list[list[int]] = [[] for _ in prompts]
        stopper = StopChecker(self.tokenizer, self.eos_ids, sampling.stop, len(prompts))
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # as the host last saw them
        self.interrupted = False

        def take(tokens: _HostTokens) -> bool:
            """Record a step's tokens; whether the answers are over (all finished, or Ctrl-C)."""
            nonlocal finished
            *values, interrupted = tokens.tolist()
            if interrupted:
                self.interrupted = True
                return True
            before = list(stopper.done)
            done = stopper.take(rows, values, generated, on_token)
            if done != before:
                finished = torch.tensor(done, device=device)
            return all(done)

        unread: list[_HostTokens] = []  # queued steps whose tokens the host has not read (at most one)
        with self._decoders(self.stages, [rows], length, adapter) as (decoders,), \
                self._answering(self.stages, adapter):
            req = _Request(self, rows, ids, mask, sampling, device, decoders, length)
            for step in range(sampling.max_new_tokens):
                q = req.step_ids.shape[1]
                logits = self._forward(req.step_ids, req.seen(q), req.positions, req.decoders)
                req.advance(q)
                # the next tokens and, last, whether Ctrl-C stops the answers (the last stage decides, so every
                # rank stops at the same token; the flag stays out of the ids the queued step embeds)
                sent = torch.empty(len(prompts) + 1, dtype=torch.long, device=device)
                if logits is not None:
                    tokens = next_tokens(req.processors(req.history, logits.float()), sampling.greedy, req.rngs)
                    torch.cat([tokens.masked_fill(finished, self.pad_id), tokens.new_full((1,), self._ctrl_c)],
                              out=sent)
                if self.layout.pp > 1:
                    dist.broadcast(sent, src=self.last_rank, group=self.layout.pp_group)
                tokens = sent[:-1]
                req.history = torch.cat([req.history, tokens[:, None]], dim=1)
                req.step_ids = tokens[:, None]
                unread.append(_HostTokens(sent))
                if (step == 0 or not self.ahead or len(unread) > 1) and take(unread.pop(0)):
                    return generated
            for tokens in unread:
                take(tokens)
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


    @torch.no_grad()
    def _run_in_flight(self, prompts: list[list[int]], sampling: Sampling, adapter: Adapter,
                       on_token: TokenCallback | None) -> list[list[int]]:
        """The batch as one group per stage, all in the pipeline at once: at tick t the rank of stage r runs group
        (t - r) mod P, so every stage works on every tick instead of one in P. The last stage samples a group's
        next tokens and sends them to the first; the first stage decides when a group is finished (end of text,
        stop strings, length, Ctrl-C) and tells the stages behind it with a header ahead of the hidden state.
        Groups keep the whole batch's padded width and each row its own random generator, so the answers are
        the ones the undivided batch gives. Sends do not wait (the ring of sends would otherwise deadlock)."""
        device, stage = self.layout.device, self.stages[0]
        r, p = stage.spec.index, self.num_stages
        first, last = r == 0, r == p - 1
        prev, nxt = self._global((r - 1) % p), self._global((r + 1) % p)
        ids, mask = left_pad(prompts, self.pad_id, device)
        length = cache_length(ids.shape[1] + sampling.max_new_tokens)
        splits = _split(len(prompts), p)
        generated: list[list[int]] = [[] for _ in prompts]
        stopper = StopChecker(self.tokenizer, self.eos_ids, sampling.stop, len(prompts))
        sends: list = []  # (work, tensor): a tensor stays referenced until its send completes

        def send(t: torch.Tensor, dst: int) -> None:
            sends.append((dist.isend(t, dst=dst, group=self.layout.pp_group), t))
        self.interrupted = False
        tick = -1
        with self._decoders([stage], splits, length, adapter) as decoders, self._answering([stage], adapter):
            groups = [_Request(self, rows, ids[rows], mask[rows], sampling, device, d, length)
                      for rows, d in zip(splits, decoders)]
            while any(g.alive for g in groups):
                tick += 1
                g = groups[(tick - r) % p]
                if tick < r or not g.alive:
                    continue
                if first:
                    if g.started:
                        tokens = torch.empty(len(g.rows), dtype=torch.long, device=device)
                        dist.recv(tokens, src=self._global(p - 1), group=self.layout.pp_group)
                        if self._take(g, tokens, generated, stopper, sampling, on_token):
                            send(torch.zeros(1, dtype=torch.long, device=device), nxt)
                            continue
                        g.step_ids = tokens[:, None]
                    x = g.step_ids
                    send(torch.ones(1, dtype=torch.long, device=device), nxt)
                else:
                    header = torch.empty(1, dtype=torch.long, device=device)
                    dist.recv(header, src=prev, group=self.layout.pp_group)
                    if header.item() == 0:
                        g.alive = False
                        if not last:
                            send(header, nxt)
                        continue
                    x = torch.empty(len(g.rows), g.step_ids.shape[1], self.hidden_size, dtype=self.act_dtype,
                                    device=device)
                    dist.recv(x, src=prev, group=self.layout.pp_group)
                out = g.forward(x)
                if last:
                    tokens = next_tokens(g.processors(g.history, out.float()), sampling.greedy, g.rngs)
                    g.history = torch.cat([g.history, tokens[:, None]], dim=1)
                    send(tokens, self._global(0))
                    g.step_ids = tokens[:, None]
                else:
                    if not first:
                        send(header, nxt)
                    send(out.to(self.act_dtype).clone(), nxt)
                    if not first:
                        g.step_ids = g.step_ids[:, -1:]  # only its width matters here: one token from now on
            for work, _ in sends:
                work.wait()
        return generated

    def _take(self, g: "_Request", tokens: torch.Tensor, generated: list[list[int]], stopper: StopChecker,
              sampling: Sampling, on_token: TokenCallback | None) -> bool:
        """Rank 0: record a group's new tokens; whether the group is finished (then it is marked so)."""
        done = stopper.take(g.rows, tokens.tolist(), generated, on_token)
        g.steps += 1
        if self._ctrl_c:
            self.interrupted = True
        if self._ctrl_c or g.steps >= sampling.max_new_tokens or all(done[i] for i in g.rows):
            g.alive = False
        return not g.alive


class _HostTokens:
    """A step's tokens copied to the host as the GPU reaches them, read without waiting for the work queued
    after them (a plain `.tolist()` waits for the whole stream)."""

    def __init__(self, tokens: torch.Tensor):
        self.event = None
        if tokens.device.type == "cuda":
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tokens

    def tolist(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class _Request:
    """Rows of a batch going through the pipeline together (the whole batch in lockstep, or one group of it in
    flight): their ids, mask and positions, this rank's cache and step for each of its stages (kept from an
    earlier request or new: `PipelineGenerator._decoders`), and (on the last stage) what sampling needs, which is
    the request's own."""

    def __init__(self, gen: PipelineGenerator, rows: list[int], ids: torch.Tensor, mask: torch.Tensor,
                 sampling: Sampling, device: torch.device, decoders: dict[int, StageDecoder], length: int):
        self.rows, self.mask, self.static, self.act_dtype = rows, mask, gen.static, gen.act_dtype
        self.positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        if gen.static:  # `length` cache slots: the prompt's, the answer's, and the masked rest
            used = ids.shape[1] + sampling.max_new_tokens
            self.key_ok = torch.cat([mask.bool(), mask.new_ones(len(rows), sampling.max_new_tokens, dtype=torch.bool),
                                     mask.new_zeros(len(rows), length - used, dtype=torch.bool)], dim=1)
        self.decoders = decoders
        self.step_ids, self.history = ids, ids
        self.processors = sampling.processors()
        self.rngs = row_generators(sampling.seed, rows, device)
        self.filled, self.steps, self.started, self.alive = 0, 0, False, True

    def seen(self, q: int) -> torch.Tensor:
        """The mask for the next q positions: over the whole static cache, or the growing 2-D one."""
        return attention_bias(self.key_ok, self.filled, q, self.act_dtype) if self.static else self.mask

    def advance(self, q: int) -> None:
        """q positions went through every stage of this rank."""
        self.filled += q
        self.positions = self.positions[:, -1:] + 1
        if not self.static:  # the static path's masks come from key_ok
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.started = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In flight: this rank's one stage on the group's next positions (the prompt first, then one token)."""
        q = x.shape[1]
        (step,) = self.decoders.values()
        out = step(x, self.seen(q), self.positions)
        self.advance(q)
        return out


def _split(n: int, parts: int) -> list[list[int]]:
    """Rows 0..n-1 in `parts` contiguous groups of sizes differing by at most one."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts)]


def row_generators(seed: int, rows, device) -> list[torch.Generator]:
    """One random generator per row of the batch, seeded by (seed, row): a row samples the same tokens whether
    it is decoded with the whole batch or in a group."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + row) for row in rows]


def next_tokens(scores: torch.Tensor, greedy: bool, rngs: list[torch.Generator]) -> torch.Tensor:
    if greedy:
        return scores.argmax(-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g).view(1) for i, g in enumerate(rngs)])


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
    """One process, the whole model: transformers' generate() on a PEFT model (one adapter, or several chosen by
    name per request) or a merged model."""

    interrupted = False  # Ctrl-C here raises KeyboardInterrupt out of generate(); chat.py ends the session

    def __init__(self, model: torch.nn.Module, tokenizer, model_config, adapters: list[str] = ()):
        self.model = model
        self.adapters = list(adapters)
        device = next(model.parameters()).device
        self.switches = [AdapterSwitch(model, self.adapters, device)] if self.adapters else []
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = eos_ids_of(tokenizer, model_config)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling, adapter: Adapter = True,
                 on_token: TokenCallback | None = None) -> list[list[int]]:
        check_adapter(adapter, self.adapters)
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
        with adapter_used([self.model], self.switches, adapter):
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
        self.stopper.take(range(len(tokens)), tokens, self.generated, self.on_token)

    def end(self) -> None:
        pass
