"""Conversations -> token ids and the mask of trained tokens.

Each assistant turn is found by rendering the conversation up to it with and without the answer; the prompt is
tokenized exactly as generation will tokenize it, and only the answer (up to and including EOS) is trained.

Truncation rule (when a record is longer than --seq_length): whole earliest exchanges are dropped first (the
system prompt stays); if one exchange is still too long, the answer keeps its start and gets at least half of
the budget, and the prompt keeps its end (the question's end and the assistant header), with the leading BOS
kept. A record left with no answer token is dropped. Both counts are logged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Sequence

from ..config import ConfigError
from ..templates import Formatter
from .records import (FORMATS, SKIP_HINT, BadRecord, DataError, Piece, PlainText, ReadStats, StreamTexts, list_files,
                      parse_field_map, plan_pieces, read_piece, to_conversation)

BATCH = 4096          # records whose texts go to the tokenizer in one call
LINES_PER_PIECE = 10_000


@dataclass(frozen=True)
class DataSpec:
    """Everything that decides how records become tokens (and so keys the cache)."""

    path: str
    data_format: str = "auto"
    field_map: str = ""
    template: str = ""
    system: str = ""
    seq_length: int = 1024
    skip_bad_records: bool = False


@dataclass
class Example:
    ids: Sequence[int]
    trained: Sequence[bool]          # True where the token is a target (assistant answer + end token)


def batch_tokenizer(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """Token ids of many texts in one call. A fast tokenizer's Rust backend is called directly once it is seen
    to give the same ids as the tokenizer itself: the Python conversion of every encoding it skips was a third
    of the tokenizing time."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    state: dict[str, bool] = {}

    def slow(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def encode(texts: list[str]) -> list[list[int]]:
        if backend is None or state.get("backend") is False or not texts:
            return slow(texts)
        fast = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        if "backend" not in state:
            state["backend"] = fast[:256] == slow(texts[:256])
            if not state["backend"]:
                return slow(texts)
        return fast

    return encode


class Encoder:
    """Tokenizes conversations; the prompt of each turn is tokenized as inference will see it."""

    def __init__(self, tokenizer, formatter: Formatter, seq_length: int):
        self.tok = tokenizer
        self.fmt = formatter
        self.seq_length = seq_length
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ConfigError("the tokenizer has no eos_token; set one in tokenizer_config.json")
        self.bos = tokenizer.bos_token_id
        self.batch_ids = batch_tokenizer(tokenizer)
        # plain text starts as the tokenizer starts any text: with its BOS where it adds one
        adds_bos = self.bos is not None and tokenizer("a")["input_ids"][:1] == [self.bos]
        self.bos_text = tokenizer.bos_token if adds_bos else ""

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def texts(self, conv: list[dict] | PlainText, where: str) -> list[tuple[str, str]]:
        """(prompt text, answer text) per assistant turn, each prompt starting where the last answer ended."""
        if isinstance(conv, PlainText):
            return [(self.bos_text + conv.prompt, conv.completion)]
        out: list[tuple[str, str]] = []
        done = ""
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            prompt = self.fmt.render(conv[:i], add_generation_prompt=True)
            full = self.fmt.render(conv[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise DataError(f"{where}: the {self.fmt.name} template does not render this conversation "
                                "incrementally, so the answer tokens cannot be found; pass --template NAME")
            out.append((prompt[len(done):], full[len(prompt):]))
            done = full
        return out

    def from_ids(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
        """[(prompt ids, answer ids)]: each answer ends with exactly one EOS, and what the template writes
        after it (a newline) opens the next prompt."""
        out, carry = [], []
        for prompt, answer in pairs:
            if self.eos in answer:
                cut = answer.index(self.eos) + 1
                answer, tail = answer[:cut], answer[cut:]
            else:
                answer, tail = answer + [self.eos], []
            out.append((carry + prompt, answer))
            carry = tail
        return out

    def exchanges(self, conv: list[dict], where: str) -> list[tuple[list[int], list[int]]]:
        return self.from_ids([(self._ids(p), self._ids(a)) for p, a in self.texts(conv, where)])

    def encode(self, conv: list[dict] | PlainText, where: str, stats: ReadStats,
               exchanges: list[tuple[list[int], list[int]]] | None = None) -> Example | None:
        """The example for one conversation (its exchanges may come already tokenized, in bulk)."""
        if exchanges is None:
            exchanges = self.exchanges(conv, where)
        if sum(len(p) + len(a) for p, a in exchanges) > self.seq_length:
            stats.truncated += 1
            exchanges = self._truncate(conv, exchanges, where)
            if exchanges is None:
                stats.dropped += 1
                return None
        ids = [t for p, a in exchanges for t in p + a]
        trained = [flag for p, a in exchanges for flag in [False] * len(p) + [True] * len(a)]
        return Example(ids, trained)

    def _truncate(self, conv: list[dict] | PlainText, exchanges: list[tuple[list[int], list[int]]], where: str):
        budget = self.seq_length
        if not isinstance(conv, PlainText):
            system = conv[:1] if conv[0]["role"] == "system" else []
            turns = conv[len(system):]
            # Drop whole earliest exchanges (user + assistant), keeping the system prompt.
            while len(turns) > 2 and sum(len(p) + len(a) for p, a in exchanges) > budget:
                turns = turns[2:]
                exchanges = self.exchanges(system + turns, where)
        if sum(len(p) + len(a) for p, a in exchanges) <= budget:
            return exchanges
        # One exchange left and still too long: the answer keeps its start with at least half the budget,
        # the prompt keeps its end (and a leading BOS).
        prompt, answer = exchanges[-1]
        answer_budget = min(len(answer), max(budget - len(prompt), budget // 2))
        prompt_budget = budget - answer_budget
        if answer_budget < 1 or prompt_budget < 1:
            return None
        if len(prompt) > prompt_budget:
            lead = prompt[:1] if self.bos is not None and prompt[:1] == [self.bos] else []
            prompt = lead + prompt[len(prompt) - (prompt_budget - len(lead)):]
        return [(prompt, answer[:answer_budget])]


def make_encoder(spec: DataSpec, tokenizer) -> Encoder:
    if spec.data_format not in FORMATS:
        raise ConfigError(f"--data_format {spec.data_format!r} is not one of {', '.join(FORMATS)}")
    return Encoder(tokenizer, Formatter(tokenizer, spec.template), spec.seq_length)


def encode_piece(piece: Piece, spec: DataSpec, encoder: Encoder, stats: ReadStats,
                 progress: Callable[[int], None] = lambda n: None, text: str | None = None) -> Iterator[Example]:
    """The examples of one piece, in record order. Templates are rendered per record; the texts of BATCH records
    go to the tokenizer in one call. `progress(n)` is told how many lines or records were just handled."""
    fmap = parse_field_map(spec.field_map)
    pending: list[tuple[list[dict], str, list[tuple[str, str]]]] = []
    seen = 0

    def flush() -> Iterator[Example]:
        nonlocal seen
        ids = iter(encoder.batch_ids([t for _, _, pairs in pending for pair in pairs for t in pair]))
        for conv, where, pairs in pending:
            ex = encoder.encode(conv, where, stats, encoder.from_ids([(next(ids), next(ids)) for _ in pairs]))
            if ex is not None:
                yield ex
        pending.clear()
        progress(seen)
        seen = 0

    for rec, where in read_piece(piece, spec.skip_bad_records, stats, text):
        stats.records += 1
        seen += 1
        try:
            conv = to_conversation(rec, where, spec.data_format, fmap, spec.system)
            pending.append((conv, where, encoder.texts(conv, where)))
        except DataError as e:
            if not spec.skip_bad_records:
                raise BadRecord(f"{e}{SKIP_HINT}") from None
            stats.note_bad(str(e))
        if len(pending) >= BATCH:
            yield from flush()
    yield from flush()


@dataclass
class TokenizedData:
    """A whole data set in memory (tests, small data); training reads the cache instead (data.store)."""

    examples: list[Example]
    stats: ReadStats

    def __len__(self) -> int:
        return len(self.examples)


def tokenize_records(spec: DataSpec, tokenizer, lines_per_piece: int = LINES_PER_PIECE) -> TokenizedData:
    """Every record of the data path as an example, in one process."""
    encoder = make_encoder(spec, tokenizer)
    stats = ReadStats()
    examples: list[Example] = []
    texts = StreamTexts()
    for piece in plan_pieces(list_files(spec.path), lines_per_piece):
        examples += encode_piece(piece, spec, encoder, stats, text=texts.of(piece))
    check_usable(spec, len(examples), stats)
    return TokenizedData(examples, stats)


def check_usable(spec: DataSpec, examples: int, stats: ReadStats) -> None:
    if not examples:
        raise DataError(f"{spec.path}: no usable records ({stats.records} read, {stats.skipped_bad} bad, "
                        f"{stats.dropped} too long for --seq_length {spec.seq_length})")
