"""Files -> records -> conversations.

A data set is cut into pieces before anything is parsed, so several processes can tokenize it at once and the
cache can keep each piece on its own: a JSON-lines file is cut every `lines_per_piece` lines (found by counting
newlines, without parsing), a JSON array or a file of JSON objects written one after another is parsed once and
cut every `lines_per_piece` records. Cutting by line count keeps pieces that a fix elsewhere in the file did not
touch byte-for-byte the same, so their cached tokens are reused.

Records are alpaca (instruction/input/output, optional system and history), sharegpt (conversations with
from/value), messages (role/content), TRL's prompt-completion (prompt and completion, each text or messages) or
text (continued pre-training). Chat records become [system?, user, assistant, user, ...] for the chat template;
text, and prompt-completion given as plain strings, go to the tokenizer as they are (TRL's "standard" format).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterator

from ..config import ConfigError

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text")
SHAPES = ("alpaca (instruction, input, output), sharegpt (conversations), messages (messages), prompt-completion "
          "(prompt, completion) or text (text)")
_ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
            "model": "assistant", "system": "system", "chatgpt": "assistant"}
_BOM = b"\xef\xbb\xbf"
_READ = 1 << 24  # bytes read at a time while cutting a JSON-lines file


class DataError(ConfigError):
    """A bad file or record; the message names the file, the line or record, and the field."""


class BadRecord(DataError):
    """One record is unusable (the rest of the data may be fine): skippable with --skip_bad_records."""


SKIP_HINT = " (or pass --skip_bad_records true to skip such records)"


@dataclass
class ReadStats:
    """What reading and tokenizing met: records seen, skipped as bad, truncated, dropped as too long."""

    records: int = 0
    skipped_bad: int = 0
    truncated: int = 0
    dropped: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def add(self, other: ReadStats) -> None:
        self.records += other.records
        self.skipped_bad += other.skipped_bad
        self.truncated += other.truncated
        self.dropped += other.dropped
        self.bad_examples += other.bad_examples[: max(0, 20 - len(self.bad_examples))]

    def note_bad(self, text: str) -> None:
        self.skipped_bad += 1
        if len(self.bad_examples) < 20:
            self.bad_examples.append(text)


@dataclass(frozen=True)
class Piece:
    """A run of consecutive records of one file: the unit one worker tokenizes and the cache keeps.

    kind "lines": one JSON value per line, start/stop are byte offsets; kind "stream": a JSON array or JSON
    objects one after another, start/stop are character offsets into the decoded text."""

    file: str
    kind: str
    start: int
    stop: int
    first_line: int      # 1-based line of `start`
    first_record: int    # 0-based index of the piece's first record in its file ("stream" files)
    lines: int           # lines ("lines") or records ("stream") in the piece: the unit of progress


# ---------------------------------------------------------------------------------------------------------
# cutting files into pieces

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


def plan_pieces(files: list[str], lines_per_piece: int) -> list[Piece]:
    """Every file's pieces, in data-set order (the same on every rank: it depends on the bytes alone)."""
    pieces: list[Piece] = []
    for path in files:
        pieces += _lines_pieces(path, lines_per_piece) if _is_json_lines(path) else \
            _stream_pieces(path, lines_per_piece)
    return pieces


def _is_json_lines(path: str) -> bool:
    """One JSON value per line: the first line alone is a complete JSON object."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    if not head.strip(b" \t\r\n\xef\xbb\xbf"):
        raise DataError(f"{path}: the file is empty")
    first = head.removeprefix(_BOM).lstrip().split(b"\n", 1)[0]
    if not first.startswith(b"{"):
        return False
    try:
        return isinstance(json.loads(first), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _lines_pieces(path: str, per: int) -> list[Piece]:
    """Cut at every `per`-th newline, reading the file in large blocks and only counting newlines."""
    size = os.path.getsize(path)
    cuts = [0]           # byte offsets where pieces start
    lines_before = 0     # newlines before the current block
    with open(path, "rb") as fh:
        offset = 0
        while offset < size:
            block = fh.read(_READ)
            count = block.count(b"\n")
            # the next cut falls after newline number (len(cuts) * per) of the file
            while lines_before + count >= len(cuts) * per:
                need = len(cuts) * per - lines_before
                pos = -1
                for _ in range(need):
                    pos = block.find(b"\n", pos + 1)
                if offset + pos + 1 >= size:
                    break
                cuts.append(offset + pos + 1)
            lines_before += count
            offset += len(block)
    total_lines = lines_before + (0 if size and _last_byte(path) == b"\n" else 1)
    bounds = cuts + [size]
    return [Piece(path, "lines", a, b, 1 + i * per, 0, min(per, total_lines - i * per))
            for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def _last_byte(path: str) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as fh:  # -sig: a UTF-8 BOM is dropped
            return fh.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None


def _stream_pieces(path: str, per: int) -> list[Piece]:
    """Parse a JSON array or back-to-back objects once, cutting every `per` records."""
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    starts: list[tuple[int, int]] = []   # (character offset, line) of each piece's first record
    count = 0
    for count, (pos, line, _) in enumerate(_values(path, text, skip_bad=True, parse=False)):
        if count % per == 0:
            starts.append((pos, line))
    total = count + 1 if starts else 0
    bounds = starts + [(len(text), 0)]
    return [Piece(path, "stream", a, b, line, i * per, min(per, total - i * per))
            for i, ((a, line), (b, _)) in enumerate(zip(bounds, bounds[1:]))]


def _values(path: str, text: str, skip_bad: bool, parse: bool = True, start: int | None = None,
            stop: int | None = None, first_line: int = 1,
            stats: ReadStats | None = None) -> Iterator[tuple[int, int, Any]]:
    """(character offset, line, value) of each JSON value of an array or of back-to-back objects."""
    decoder = json.JSONDecoder()
    name = os.path.basename(path)
    array = text.lstrip()[:1] == "["
    if start is None:
        start = len(text) - len(text.lstrip()) + (1 if array else 0)
    stop = len(text) if stop is None else stop
    pos, line, counted = start, first_line, start

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    while True:
        while pos < stop and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= stop or (array and text[pos] == "]"):
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            bad_line = line_at(e.pos)
            column = e.pos - text.rfind("\n", 0, e.pos)
            if array or not skip_bad:
                # inside an array nothing after the error can be found again: the whole file is unreadable
                kind = DataError if array else BadRecord
                raise kind(f"{path}: invalid JSON at line {bad_line}, column {column}: {e.msg}"
                           + ("" if array else SKIP_HINT)) from None
            if stats is not None:
                stats.records += 1
                stats.note_bad(f"{name}, line {bad_line}: invalid JSON")
            nxt = text.find("\n{", e.pos)  # resynchronise at the next object that starts a line
            if nxt < 0 or nxt >= stop:
                return
            pos = nxt + 1
            continue
        yield pos, line_at(pos), value if parse else None
        pos = end


# ---------------------------------------------------------------------------------------------------------
# reading a piece

class StreamTexts:
    """The decoded text of the last JSON-array (or back-to-back objects) file read, so that consecutive pieces of
    one file decode it once."""

    def __init__(self) -> None:
        self.path, self.text = "", ""

    def of(self, piece: Piece) -> str | None:
        if piece.kind != "stream":
            return None
        if piece.file != self.path:
            self.path, self.text = piece.file, _read_text(piece.file)
        return self.text


def read_piece(piece: Piece, skip_bad: bool, stats: ReadStats, text: str | None = None) -> Iterator[tuple[Any, str]]:
    """(record, where) for every record of the piece; bad JSON raises DataError or is counted when skipping.
    `text` is the decoded file of a "stream" piece (StreamTexts)."""
    if piece.kind == "lines":
        yield from _read_lines(piece, skip_bad, stats)
        return
    name = os.path.basename(piece.file)
    text = _read_text(piece.file) if text is None else text
    for i, (_, line, value) in enumerate(_values(piece.file, text, skip_bad, True, piece.start, piece.stop,
                                                 piece.first_line, stats)):
        yield value, f"{name}, line {line}, record {piece.first_record + i + 1}"


def _read_lines(piece: Piece, skip_bad: bool, stats: ReadStats) -> Iterator[tuple[Any, str]]:
    name = os.path.basename(piece.file)
    with open(piece.file, "rb") as fh:
        fh.seek(piece.start)
        raw = fh.read(piece.stop - piece.start)
    if piece.start == 0:
        raw = raw.removeprefix(_BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{piece.file}: not UTF-8 text (byte {piece.start + e.start}); save the file as "
                        "UTF-8") from None
    decoder = json.JSONDecoder()
    for n, line in enumerate(text.split("\n"), piece.first_line):
        pos, end = 0, len(line)
        while True:  # usually one value per line; objects written back to back on one line are read too
            while pos < end and line[pos] in " \t\r,":
                pos += 1
            if pos >= end:
                break
            try:
                value, pos = decoder.raw_decode(line, pos)
            except json.JSONDecodeError as e:
                if not skip_bad:
                    raise BadRecord(f"{piece.file}: invalid JSON at line {n}, column {e.colno}: {e.msg}"
                                    f"{SKIP_HINT}") from None
                stats.records += 1
                stats.note_bad(f"{name}, line {n}: invalid JSON")
                break
            yield value, f"{name}, line {n}"


# ---------------------------------------------------------------------------------------------------------
# record -> conversation

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


@dataclass(frozen=True)
class PlainText:
    """A record that is tokenized as it stands, with no chat template: `prompt` is masked, `completion` trained
    (a text record is all completion)."""

    prompt: str
    completion: str


def detect_format(rec: dict, fmap: dict[str, str], where: str) -> str:
    has = lambda name: fmap.get(name, name) in rec  # noqa: E731
    if has("messages"):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("prompt") and has("completion"):
        return "prompt_completion"
    if has("instruction") or has("output"):
        return "alpaca"
    if has("text"):
        return "text"
    keys = ", ".join(list(rec)[:8]) or "none"
    raise DataError(f"{where}: a record of unknown shape (keys: {keys}); the shapes read are {SHAPES}. Name "
                    "other keys with --field_map, e.g. --field_map instruction=question,output=answer")


def to_conversation(rec: Any, where: str, fmt: str, fmap: dict[str, str],
                    default_system: str) -> list[dict] | PlainText:
    """A record in any supported shape: a chat [system?, user, assistant, user, assistant, ...] for the chat
    template, or PlainText for the tokenizer alone."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    fmt = detect_format(rec, fmap, where) if fmt == "auto" else fmt
    k = lambda name: fmap.get(name, name)  # noqa: E731
    if fmt == "text":
        text = _text(rec, k("text"), where, True)
        if not text.strip():
            raise DataError(f"{where}: field {k('text')!r} is empty; nothing to train on")
        return PlainText("", text)
    system = _text(rec, k("system"), where, False) or default_system
    msgs: list[dict] = []
    if fmt == "prompt_completion":
        prompt, completion = rec.get(k("prompt")), rec.get(k("completion"))
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion.strip():
                raise DataError(f"{where}: field {k('completion')!r} is empty; nothing to train on")
            return PlainText(prompt, completion)
        turns = _turns(prompt, k("prompt"), where, "role", "content", allow_text=True) + \
            _turns(completion, k("completion"), where, "role", "content", allow_text=True, role="assistant")
        system, msgs = _split_system(turns, system, where, k("prompt"))
        _check_alternation(msgs, where)
    elif fmt == "alpaca":
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
        system, msgs = _split_system(_turns(rec.get(key), key, where, role_key, text_key), system, where, key)
        _check_alternation(msgs, where)
    return ([{"role": "system", "content": system}] if system else []) + msgs


def _turns(value: Any, key: str, where: str, role_key: str, text_key: str, allow_text: bool = False,
           role: str = "user") -> list[tuple[str, str, int]]:
    """(role, content, index) of a list of turns (a plain string is one turn of `role` where allowed)."""
    if allow_text and isinstance(value, str):
        return [(role, value, 0)]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {key!r} should be a non-empty list of turns")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {key}[{i}] should be an object with {role_key!r} and {text_key!r}")
        r = _ROLE_OF.get(str(turn.get(role_key, "")).lower())
        if r is None:
            raise DataError(f"{where}: {key}[{i}] has role {turn.get(role_key)!r}; expected user/human, "
                            "assistant/gpt or system")
        out.append((r, _text(turn, text_key, f"{where}, {key}[{i}]", True), i))
    return out


def _split_system(turns: list[tuple[str, str, int]], system: str, where: str, key: str) -> tuple[str, list[dict]]:
    msgs: list[dict] = []
    for role, content, i in turns:
        if role == "system":
            if msgs:
                raise DataError(f"{where}: {key}[{i}] is a system turn after the conversation started")
            system = content
        else:
            msgs.append({"role": role, "content": content})
    return system, msgs


def _check_alternation(msgs: list[dict], where: str) -> None:
    if not msgs or msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn (nothing to train on)")
    for i, m in enumerate(msgs):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise DataError(f"{where}: turns must alternate user, assistant, user, ... (turn {i + 1} is "
                            f"{m['role']})")
