"""Where data becomes tokens: files -> records (records.py) -> token ids and trained flags (encode.py), tokenized
once by all ranks together (prepare.py) into a memory-mapped cache (store.py) -> samples and microbatches
(batches.py)."""

from .batches import IGNORE, Batch, Batches, SampleSet, collate, interleave, pack, split_eval
from .encode import DataSpec, Example, TokenizedData, tokenize_records
from .records import BadRecord, DataError, ReadStats, list_files, parse_field_map
from .store import Manifest, TokenStore

__all__ = ["IGNORE", "Batch", "Batches", "SampleSet", "collate", "interleave", "pack", "split_eval", "DataSpec",
           "Example", "TokenizedData", "tokenize_records", "BadRecord", "DataError", "ReadStats", "list_files",
           "parse_field_map", "Manifest", "TokenStore"]
