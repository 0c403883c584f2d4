"""A preprocess output as the trainer sees it: manifest.json -> the shards of each split, with their row indexes.

Format: schemas/README.md (pipeline/shards.py holds the format constants). format_version 2 names each shard's row
index (`index`), which lets a rank fetch just its rows; a version 1 output (no index) still loads, read the old way
(whole shards), with one warning.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from jpeglm.errors import UserError
from pipeline import storage
from pipeline.shards import manifest_format_problem

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"


class DataError(UserError, ValueError):
    """The data (manifest, shards) cannot be used as asked; the message says why."""


@dataclass(frozen=True)
class ShardRef:
    uri: str
    path: str  # as in the manifest, relative to it
    split: str
    rows: int
    first_row: int  # index (within its split) of the shard's first row
    index_uri: str | None = None  # the row index (pipeline.shards.read_index); None in a format_version 1 output
    bytes: int = 0  # the tar's size, from the manifest


@dataclass
class Manifest:
    root: str
    raw: dict
    seq_len: int
    shards: list[ShardRef]

    @classmethod
    def load(cls, uri: str | os.PathLike) -> "Manifest":
        """`uri` is a preprocess output folder (local or s3://) or its manifest.json."""
        uri = os.fspath(uri)
        root = uri[: -len(MANIFEST_NAME)].rstrip("/") if uri.endswith(MANIFEST_NAME) else uri.rstrip("/")
        path = storage.join(root, MANIFEST_NAME)
        try:
            raw = json.loads(storage.read_bytes(path))
        except FileNotFoundError:
            raise DataError(f"no {MANIFEST_NAME} under {root}: not a finished `jpeglm preprocess` output") from None
        problem = manifest_format_problem(raw)
        if problem:
            raise DataError(f"{path}: {problem}")
        if raw.get("token_dtype", "uint16") != "uint16":
            raise DataError(f"{path}: token_dtype {raw.get('token_dtype')!r} is not uint16")
        shards, next_row = [], {}
        for entry in raw["shards"]:
            split = entry["split"]
            first = next_row.get(split, 0)
            if entry.get("first_row", first) != first:
                raise DataError(f"{path}: shard {entry['path']} says first_row {entry['first_row']}, but the shards "
                                f"listed before it hold {first} {split} rows")
            index = storage.join(root, entry["index"]) if entry.get("index") else None
            shards.append(ShardRef(storage.join(root, entry["path"]), entry["path"], split, int(entry["rows"]), first,
                                   index, int(entry.get("bytes", 0))))
            next_row[split] = first + int(entry["rows"])
        unindexed = sum(s.index_uri is None for s in shards)
        if unindexed:
            log.warning("%s: %d of %d shards have no row index (an output of an older jpeglm): every rank reads "
                        "those shards whole and keeps its rows (more I/O and host memory); re-run `jpeglm "
                        "preprocess` into a new folder to get per-rank range reads", root, unindexed, len(shards))
        return cls(root=root, raw=raw, seq_len=int(raw["seq_len"]), shards=shards)

    def split(self, name: str) -> list[ShardRef]:
        return [s for s in self.shards if s.split == name and s.rows > 0]

    @property
    def tokenizer(self) -> dict:
        return self.raw["tokenizer"]

    @property
    def fingerprint(self) -> str:
        """The tokenizer fingerprint: data made with another tokenizer is another language to the model."""
        return self.raw["tokenizer"]["fingerprint"]

    @property
    def tokenizer_uri(self) -> str:
        return storage.join(self.root, self.raw["tokenizer"].get("path", "tokenizer.model"))


def windows_per_row(row_len: int, seq_len: int) -> int:
    if seq_len > row_len or row_len % seq_len:
        raise DataError(
            f"train.seq_len={seq_len} must divide the data's row length {row_len} (the manifest's seq_len): "
            f"rows are cut into equal windows. Use e.g. train.seq_len={_divisor_hint(row_len, seq_len)}"
        )
    return row_len // seq_len


def _divisor_hint(n: int, near: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - near))
