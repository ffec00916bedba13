"""The token cache on disk and the memory-mapped view training reads.

    <cache_dir>/dataset-<key>.json           which pieces make the data set, in order, and what reading met
    <cache_dir>/shards/<piece key>/          one piece's tokens:
        ids.npy        int32, every example's token ids back to back
        trained.npy    uint8, 1 where the token is trained
        offsets.npy    int64, example i is [offsets[i], offsets[i+1])
        stats.json     records read, skipped, truncated, dropped in this piece

A piece's key hashes its bytes with everything that decides its tokens (format, template, system prompt,
--seq_length, the tokenizer), so a relaunch reuses every piece a change did not touch. The data set's key hashes
the files' names, sizes and modification times with the same settings, so an unchanged data set is found without
reading it. Every file is written under a temporary name and renamed into place: a crash never leaves a half
shard that looks complete. Arrays are plain .npy files (no code runs when they load), opened memory-mapped.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import numpy as np

from .encode import DataSpec, Example
from .records import Piece, ReadStats

CACHE_VERSION = 2


def tokenizer_fingerprint(tokenizer) -> str:
    """What of the tokenizer decides token ids: its full definition (vocabulary, merges, normalizer) where the
    backend can serialise it, its special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(f"{type(tokenizer).__name__}:{tokenizer.eos_token_id}:{tokenizer.bos_token_id}".encode())
    return h.hexdigest()[:20]


def _settings(spec: DataSpec, tokenizer_fp: str) -> str:
    fields = {k: v for k, v in dataclasses.asdict(spec).items() if k != "path"}
    return json.dumps({**fields, "tokenizer": tokenizer_fp, "v": CACHE_VERSION}, sort_keys=True)


def dataset_key(spec: DataSpec, tokenizer_fp: str, files: list[str], lines_per_piece: int) -> str:
    h = hashlib.sha256(_settings(spec, tokenizer_fp).encode())
    h.update(f"{os.path.abspath(spec.path)}:{lines_per_piece}".encode())
    for path in files:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def piece_content(piece: Piece, text: str | None = None) -> str:
    """A hash of the piece's own bytes (what it holds, not where); `text` is a "stream" piece's decoded file."""
    h = hashlib.sha256()
    if piece.kind == "lines":
        with open(piece.file, "rb") as fh:
            fh.seek(piece.start)
            h.update(fh.read(piece.stop - piece.start))
    else:
        h.update(text[piece.start:piece.stop].encode())
    return h.hexdigest()[:24]


def piece_key(content: str, spec: DataSpec, tokenizer_fp: str) -> str:
    return hashlib.sha256(f"{content}:{_settings(spec, tokenizer_fp)}".encode()).hexdigest()[:24]


def _shard_dir(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, "shards", key)


def has_shard(cache_dir: str, key: str) -> bool:
    return os.path.isfile(os.path.join(_shard_dir(cache_dir, key), "stats.json"))


def write_shard(cache_dir: str, key: str, examples: list[Example], stats: ReadStats) -> int:
    """Write one piece's examples; stats.json goes last, so its presence means the shard is whole. Returns the
    number of examples."""
    final = _shard_dir(cache_dir, key)
    tmp = f"{final}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    lengths = np.fromiter((len(e.ids) for e in examples), dtype=np.int64, count=len(examples))
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for e in examples for t in e.ids), dtype=np.int32, count=int(offsets[-1]))
    trained = np.fromiter((t for e in examples for t in e.trained), dtype=np.uint8, count=int(offsets[-1]))
    for name, arr in (("ids", ids), ("trained", trained), ("offsets", offsets)):
        np.save(os.path.join(tmp, f"{name}.npy"), arr)
    with open(os.path.join(tmp, "stats.json"), "w", encoding="utf-8") as fh:
        json.dump(dataclasses.asdict(stats), fh, ensure_ascii=False)
    try:
        os.replace(tmp, final)
    except OSError:  # another worker wrote the same piece first (same bytes, same tokens): keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not has_shard(cache_dir, key):
            raise
    return len(examples)


def shard_stats(cache_dir: str, key: str) -> tuple[int, ReadStats]:
    d = _shard_dir(cache_dir, key)
    with open(os.path.join(d, "stats.json"), encoding="utf-8") as fh:
        stats = ReadStats(**json.load(fh))
    offsets = np.load(os.path.join(d, "offsets.npy"), mmap_mode="r")
    return len(offsets) - 1, stats


@dataclass
class Manifest:
    """A tokenized data set: its shards in order, with what reading met and two fingerprints: `tokens`
    changes with anything that changes token ids, `records` only with the records themselves."""

    path: str
    cache_dir: str
    shards: list[str]
    counts: list[int]
    stats: ReadStats
    tokens: str
    records: str

    @property
    def examples(self) -> int:
        return sum(self.counts)


def write_manifest(path: str, cache_dir: str, keys: list[str], contents: list[str], counts: list[int],
                   stats: ReadStats) -> Manifest:
    data = {"version": CACHE_VERSION, "shards": keys, "counts": counts, "stats": dataclasses.asdict(stats),
            "tokens": hashlib.sha256("".join(keys).encode()).hexdigest()[:20],
            "records": hashlib.sha256("".join(contents).encode()).hexdigest()[:20]}
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False)
    os.replace(tmp, path)
    return read_manifest(path, cache_dir)


def read_manifest(path: str, cache_dir: str) -> Manifest | None:
    """The manifest, if it exists and every shard it names is still whole."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("version") != CACHE_VERSION or not all(has_shard(cache_dir, k) for k in data["shards"]):
        return None
    return Manifest(path, cache_dir, data["shards"], data["counts"], ReadStats(**data["stats"]), data["tokens"],
                    data["records"])


class TokenStore:
    """Every example of a manifest, read through memory maps: the tokens stay on disk (in the page cache) and
    only what a step touches is read."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self._ids, self._trained, self._offsets = [], [], []
        for key in manifest.shards:
            d = _shard_dir(manifest.cache_dir, key)
            self._ids.append(np.load(os.path.join(d, "ids.npy"), mmap_mode="r"))
            self._trained.append(np.load(os.path.join(d, "trained.npy"), mmap_mode="r"))
            self._offsets.append(np.load(os.path.join(d, "offsets.npy"), mmap_mode="r"))
        self._starts = [0]
        for c in manifest.counts:
            self._starts.append(self._starts[-1] + c)

    def __len__(self) -> int:
        return self._starts[-1]

    def lengths(self) -> np.ndarray:
        """Tokens per example (int32)."""
        if not self._offsets:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate([np.diff(o).astype(np.int32) for o in self._offsets])

    def __getitem__(self, i: int) -> Example:
        s = bisect.bisect_right(self._starts, i) - 1
        j = i - self._starts[s]
        a, b = int(self._offsets[s][j]), int(self._offsets[s][j + 1])
        return Example(self._ids[s][a:b], self._trained[s][a:b])
