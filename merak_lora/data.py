"""Where data becomes tokens: files -> records -> conversations -> token ids and labels -> microbatches.

Records come as a JSON array, JSON lines, or JSON objects written one after another; in alpaca
(instruction/input/output, optional system and history), sharegpt (conversations with from/value) or
messages (role/content) shape. Every record becomes a conversation, the conversation becomes text through the
template, and only the assistant turns (with their end-of-turn token) are trained.

Truncation rule (when a record is longer than --seq_length): whole earliest exchanges are dropped first (the
system prompt stays); if one exchange is still too long, the answer keeps its start and gets at least half of
the budget, and the prompt keeps its end (the question's end and the assistant header), with the leading BOS
kept. A record left with no answer token is dropped. Both counts are logged.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError
from .templates import Formatter

log = logging.getLogger("merak_lora")
IGNORE = -100
FORMATS = ("auto", "alpaca", "sharegpt", "messages")
_ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
            "model": "assistant", "system": "system", "chatgpt": "assistant"}
CACHE_VERSION = 1


class DataError(ConfigError):
    """A bad file or record; the message names the file, the line or record, and the field."""


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
    packing: bool = False


@dataclass
class Example:
    ids: list[int]
    trained: list[bool]              # True where the token is a target (assistant answer + end token)
    source: str = ""


@dataclass
class TokenStats:
    records: int = 0
    skipped_bad: int = 0
    truncated: int = 0
    dropped: int = 0
    bad_examples: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# files -> raw records

def list_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith((".json", ".jsonl")) and not f.startswith("."))
        if not files:
            raise DataError(f"{path}: the folder holds no .json or .jsonl files")
        return files
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file or folder (check --data_path)")
    return [path]


def read_file(path: str, skip_bad: bool, stats: TokenStats) -> Iterator[tuple[Any, str]]:
    """Yield (record, where) from a JSON array, JSON lines, or back-to-back JSON objects."""
    try:
        with open(path, encoding="utf-8-sig") as fh:  # -sig: a UTF-8 BOM is dropped
            text = fh.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    name = os.path.basename(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    line, counted = 1, 0  # line number of `pos`, counted incrementally (files hold 100k+ records)

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    if text[pos] == "[":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        for i, item in enumerate(items):
            yield item, f"{name}, record {i + 1}"
        return
    while pos < len(text):
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            bad_line = line_at(e.pos)
            if not skip_bad:
                raise DataError(f"{path}: invalid JSON at line {bad_line}: {e.msg} "
                                "(or pass --skip_bad_records true to skip such records)") from None
            stats.skipped_bad += 1
            stats.bad_examples.append(f"{name}, line {bad_line}: invalid JSON")
            nxt = text.find("\n{", e.pos)  # resynchronise at the next object that starts a line
            if nxt < 0:
                return
            pos = nxt + 1
            continue
        yield item, f"{name}, line {line_at(pos)}"
        pos = end
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1


# ---------------------------------------------------------------------------------------------------------
# raw record -> conversation

def parse_field_map(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ConfigError(f"--field_map entry {part!r} is not name=key (e.g. instruction=en_instruction)")
        out[key.strip()] = value.strip()
    return out


def _text(rec: dict, key: str, where: str, required: bool) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return ""
    value = rec[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} should be text, got {type(value).__name__}")
    return value


def detect_format(rec: dict, fmap: dict[str, str]) -> str:
    if fmap.get("messages", "messages") in rec:
        return "messages"
    if fmap.get("conversations", "conversations") in rec:
        return "sharegpt"
    return "alpaca"


def to_conversation(rec: Any, where: str, fmt: str, fmap: dict[str, str], default_system: str) -> list[dict]:
    """A record in any supported shape as [system?, user, assistant, user, assistant, ...]."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    fmt = detect_format(rec, fmap) if fmt == "auto" else fmt
    k = lambda name: fmap.get(name, name)  # noqa: E731
    system = _text(rec, k("system"), where, False) or default_system
    msgs: list[dict] = []
    if fmt == "alpaca":
        instruction = _text(rec, k("instruction"), where, True)
        extra = _text(rec, k("input"), where, False)
        output = _text(rec, k("output"), where, True)
        history = rec.get(k("history")) or []
        if not isinstance(history, list) or not all(
                isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
            raise DataError(f"{where}: field {k('history')!r} should be a list of [question, answer] pairs")
        for q, a in history:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        prompt = f"{instruction}\n{extra}" if extra else instruction
        if not prompt.strip():
            raise DataError(f"{where}: field {k('instruction')!r} is empty")
        if not output.strip():
            raise DataError(f"{where}: field {k('output')!r} is empty; nothing to train on")
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    else:
        key = k("messages") if fmt == "messages" else k("conversations")
        role_key, text_key = (k("role"), k("content")) if fmt == "messages" else (k("from"), k("value"))
        turns = rec.get(key)
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: field {key!r} should be a non-empty list of turns")
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise DataError(f"{where}: {key}[{i}] should be an object with {role_key!r} and {text_key!r}")
            role = _ROLE_OF.get(str(turn.get(role_key, "")).lower())
            if role is None:
                raise DataError(f"{where}: {key}[{i}] has role {turn.get(role_key)!r}; expected user/human, "
                                "assistant/gpt or system")
            content = _text(turn, text_key, f"{where}, {key}[{i}]", True)
            if role == "system":
                if msgs:
                    raise DataError(f"{where}: {key}[{i}] is a system turn after the conversation started")
                system = content
            else:
                msgs.append({"role": role, "content": content})
        if not msgs or msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the conversation must end with an assistant turn (nothing to train on)")
        for i, m in enumerate(msgs):
            if m["role"] != ("user" if i % 2 == 0 else "assistant"):
                raise DataError(f"{where}: turns must alternate user, assistant, user, ... (turn {i + 1} is "
                                f"{m['role']})")
    return ([{"role": "system", "content": system}] if system else []) + msgs


# ---------------------------------------------------------------------------------------------------------
# conversation -> token ids and trained mask

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

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def texts(self, conv: list[dict], where: str) -> list[tuple[str, str]]:
        """(prompt text, answer text) per assistant turn, each prompt starting where the last answer ended."""
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

    def encode(self, conv: list[dict], where: str, stats: TokenStats,
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
        return Example(ids, trained, where)

    def _truncate(self, conv: list[dict], exchanges: list[tuple[list[int], list[int]]], where: str):
        budget = self.seq_length
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


# ---------------------------------------------------------------------------------------------------------
# the whole data set, tokenized once and cached

@dataclass
class TokenizedData:
    examples: list[Example]
    stats: TokenStats

    def __len__(self) -> int:
        return len(self.examples)


def tokenize_records(spec: DataSpec, tokenizer, progress: bool = False, chunk: int = 4096) -> TokenizedData:
    """Every record of the data path as an example. Templates are rendered per record; the texts of `chunk`
    records go to the (Rust, multi-threaded) tokenizer in one call."""
    formatter = Formatter(tokenizer, spec.template)
    encoder = Encoder(tokenizer, formatter, spec.seq_length)
    fmap = parse_field_map(spec.field_map)
    if spec.data_format not in FORMATS:
        raise ConfigError(f"--data_format {spec.data_format!r} is not one of {', '.join(FORMATS)}")
    stats = TokenStats()
    examples: list[Example] = []
    pending: list[tuple[list[dict], str, list[tuple[str, str]]]] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc="tokenizing", unit="rec", mininterval=2.0)

    def flush() -> None:
        flat = [t for _, _, pairs in pending for pair in pairs for t in pair]
        ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
        for conv, where, pairs in pending:
            exchanges = encoder.from_ids([(next(ids), next(ids)) for _ in pairs])
            ex = encoder.encode(conv, where, stats, exchanges)
            if ex is not None:
                examples.append(ex)
        if bar is not None:
            bar.update(len(pending))
        pending.clear()

    for path in list_files(spec.path):
        for rec, where in read_file(path, spec.skip_bad_records, stats):
            stats.records += 1
            try:
                conv = to_conversation(rec, where, spec.data_format, fmap, spec.system)
                pending.append((conv, where, encoder.texts(conv, where)))
            except DataError as e:
                if not spec.skip_bad_records:
                    raise DataError(f"{e} (or pass --skip_bad_records true to skip such records)") from None
                stats.skipped_bad += 1
                stats.bad_examples.append(str(e))
            if len(pending) >= chunk:
                flush()
    flush()
    if bar is not None:
        bar.close()
    if not examples:
        raise DataError(f"{spec.path}: no usable records ({stats.records} read, {stats.skipped_bad} bad, "
                        f"{stats.dropped} too long for --seq_length {spec.seq_length})")
    return TokenizedData(examples, stats)


def cache_key(spec: DataSpec, tokenizer) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({**dataclasses.asdict(spec), "path": os.path.abspath(spec.path),
                         "v": CACHE_VERSION}, sort_keys=True).encode())
    for path in list_files(spec.path):
        st = os.stat(path)
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(f"{tokenizer.eos_token_id}:{tokenizer.bos_token_id}".encode())
    return h.hexdigest()[:20]


def save_cache(path: str, data: TokenizedData) -> None:
    """Tokens as flat int32/uint8 tensors in safetensors (fast to load, nothing executable), written atomically."""
    lengths = [len(e.ids) for e in data.examples]
    offsets = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)
    ids = torch.tensor([t for e in data.examples for t in e.ids], dtype=torch.int32)
    trained = torch.tensor([t for e in data.examples for t in e.trained], dtype=torch.uint8)
    meta = {"stats": json.dumps(dataclasses.asdict(data.stats), ensure_ascii=False),
            "sources": json.dumps([e.source for e in data.examples], ensure_ascii=False)}
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file({"ids": ids, "trained": trained, "offsets": offsets}, tmp, metadata=meta)
    os.replace(tmp, path)


def load_cache(path: str) -> TokenizedData:
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()
        ids, trained, offsets = (fh.get_tensor(k) for k in ("ids", "trained", "offsets"))
    ids_list, trained_list, bounds = ids.tolist(), trained.bool().tolist(), offsets.tolist()
    sources = json.loads(meta["sources"])
    examples = [Example(ids_list[a:b], trained_list[a:b], src) for a, b, src in zip(bounds, bounds[1:], sources)]
    return TokenizedData(examples, TokenStats(**json.loads(meta["stats"])))


def prepare(spec: DataSpec, tokenizer, cache_dir: str, progress: bool = False) -> tuple[TokenizedData, bool, str]:
    """Tokenized data and its cache file, read from the cache when one matches (and whether it did)."""
    path = os.path.join(cache_dir, f"tokens-{cache_key(spec, tokenizer)}.safetensors")
    if os.path.isfile(path):
        return load_cache(path), True, path
    data = tokenize_records(spec, tokenizer, progress)
    os.makedirs(cache_dir, exist_ok=True)
    save_cache(path, data)
    return data, False, path


# ---------------------------------------------------------------------------------------------------------
# tokens -> microbatches

def split_eval(examples: list[Example], ratio: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded hold-out of `ratio` of the examples (at least one) for the eval loss."""
    order = list(range(len(examples)))
    random.Random(seed + 1).shuffle(order)
    n_eval = max(1, int(len(examples) * ratio))
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def pack(examples: list[Example], seq_length: int, seed: int) -> list[list[Example]]:
    """Best-fit packing of examples (in a seeded order) into sequences of at most seq_length tokens."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    bins: list[list[Example]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin index), kept sorted
    for i in order:
        ex = examples[i]
        at = bisect.bisect_left(rooms, (len(ex.ids), -1))
        if at < len(rooms):
            room, b = rooms.pop(at)
            bins[b].append(ex)
            bisect.insort(rooms, (room - len(ex.ids), b))
        else:
            bins.append([ex])
            bisect.insort(rooms, (seq_length - len(ex.ids), len(bins) - 1))
    return bins


@dataclass
class Batch:
    """One pipeline replica's microbatches for one optimizer step, stacked on dim 0."""

    input_ids: torch.Tensor          # [microbatches * mbs, S]
    targets: torch.Tensor            # next-token labels, IGNORE where not trained or padded
    position_ids: torch.Tensor | None  # set when sequences are packed (positions restart per record)
    tokens: int                      # real (non-pad) tokens
    targets_count: int               # trained tokens


def collate(samples: list[list[Example]], pad_id: int, multiple: int, seq_length: int) -> Batch:
    """Pad every sample to the longest in the step (rounded up to `multiple`), shift labels."""
    lengths = [sum(len(e.ids) for e in s) for s in samples]
    width = min(seq_length, -(-max(max(lengths), 1) // multiple) * multiple)
    n = len(samples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    targets = torch.full((n, width), IGNORE, dtype=torch.long)
    packed = any(len(s) > 1 for s in samples)
    pos = torch.zeros((n, width), dtype=torch.long) if packed else None
    for row, sample in enumerate(samples):
        at = 0
        for ex in sample:
            L = len(ex.ids)
            t = torch.tensor(ex.ids, dtype=torch.long)
            ids[row, at:at + L] = t
            # target of position j is token j+1 when that token is trained (within the same record)
            mask = torch.tensor(ex.trained[1:], dtype=torch.bool)
            targets[row, at:at + L - 1] = torch.where(mask, t[1:], torch.full_like(t[1:], IGNORE))
            if pos is not None:
                pos[row, at:at + L] = torch.arange(L)
            at += L
        if pos is not None and at < width:  # padding continues the last record's positions
            pos[row, at:] = torch.arange(width - at) + (pos[row, at - 1] + 1 if at else 0)
    return Batch(ids, targets, pos, sum(lengths), int((targets != IGNORE).sum()))


class Batches:
    """The deterministic sample stream: per epoch a seeded permutation, consumed a global batch at a time.

    Position in the stream is a single number (samples consumed), so resuming, even with another data-parallel
    width, continues exactly where the last checkpoint stopped."""

    def __init__(self, samples: list[list[Example]], mbs: int, microbatches: int, dp: int, seed: int,
                 pad_id: int, multiple: int, seq_length: int):
        self.samples = samples
        self.mbs, self.microbatches, self.dp, self.seed = mbs, microbatches, dp, seed
        self.pad_id, self.multiple, self.seq_length = pad_id, multiple, seq_length
        self._perm: dict[int, list[int]] = {}

    @property
    def per_replica(self) -> int:
        return self.mbs * self.microbatches

    @property
    def global_batch(self) -> int:
        return self.per_replica * self.dp

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, int(epochs * len(self.samples) / self.global_batch))

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._perm:
            order = list(range(len(self.samples)))
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            self._perm = {epoch: order}
        return self._perm[epoch]

    def indices(self, consumed: int, count: int) -> list[int]:
        n = len(self.samples)
        out = []
        for pos in range(consumed, consumed + count):
            out.append(self._order(pos // n)[pos % n])
        return out

    def step_samples(self, consumed: int, dp_rank: int) -> list[list[Example]]:
        idx = self.indices(consumed + dp_rank * self.per_replica, self.per_replica)
        return [self.samples[i] for i in idx]

    def batch(self, consumed: int, dp_rank: int) -> Batch:
        return collate(self.step_samples(consumed, dp_rank), self.pad_id, self.multiple, self.seq_length)

    def sequential(self, dp_rank: int) -> Iterator[Batch]:
        """Every sample once, in order, a global batch at a time (an eval pass); rows past the end are empty
        (all padding, no targets) so every replica runs the same number of full-shaped steps."""
        for start in range(0, len(self.samples), self.global_batch):
            first = start + dp_rank * self.per_replica
            rows = [self.samples[i] if i < len(self.samples) else [] for i in range(first, first + self.per_replica)]
            yield collate(rows, self.pad_id, self.multiple, self.seq_length)

    def epoch_of(self, consumed: int) -> float:
        return consumed / len(self.samples)
