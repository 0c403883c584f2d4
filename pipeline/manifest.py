"""A preprocess output's manifest.json, read in one place (trainer, evaluation, inspect, pretrained loading).

    raw = read_manifest("out/preprocess")              # the dict, format and version checked; DataError if not
    manifest = Manifest.load("out/preprocess")         # the shards of each split, with their row indexes
    for index, image_id, tokens in split_image_tokens("out/preprocess", raw, "validation", [0, 1, 2]): ...

Format: schemas/README.md; the format constants and the shard reader are pipeline/shards.py's.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from jpeglm.errors import UserError
from pipeline import storage

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"


class DataError(UserError, ValueError):
    """The data (manifest, shards) cannot be used as asked; the message says why."""


def manifest_root(uri: str | os.PathLike) -> str:
    """The output folder of `uri`, which is the folder or its manifest.json."""
    uri = os.fspath(uri)
    return uri[: -len(MANIFEST_NAME)].rstrip("/") if uri.endswith(MANIFEST_NAME) else uri.rstrip("/")


def read_manifest(uri: str | os.PathLike) -> dict:
    """manifest.json of a preprocess output (the folder or the file itself, local or s3://), its format and version
    checked. DataError when it is missing (an unfinished output says so) or of another format."""
    from pipeline.shards import manifest_format_problem

    root = manifest_root(uri)
    path = storage.join(root, MANIFEST_NAME)
    try:
        manifest = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        unfinished = storage.exists(storage.join(root, "_work"))
        raise DataError(f"no {MANIFEST_NAME} under {root}: not a finished `jpeglm preprocess` output"
                        + (" (unfinished: rerun the same jpeglm preprocess command)" if unfinished else "")) from None
    except ValueError as e:
        raise DataError(f"{path}: not JSON ({e})") from None
    problem = manifest_format_problem(manifest)
    if problem:
        raise DataError(f"{path}: {problem}")
    return manifest


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
        root = manifest_root(uri)
        path = storage.join(root, MANIFEST_NAME)
        raw = read_manifest(root)
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


def split_image_tokens(uri: str, manifest: dict, split: str, wanted: list[int] | None = None
                       ) -> Iterator[tuple[int, str, np.ndarray]]:
    """(index in the split, image id, body tokens without BOS/EOS) for the wanted images of a split (all when
    None), in stream order; reading stops after the last wanted image."""
    from pipeline.shards import read_samples

    wanted_set = set(wanted) if wanted is not None else None
    last = max(wanted) if wanted else None
    index, image_id, pieces = -1, None, None
    for shard in sorted((s for s in manifest["shards"] if s["split"] == split), key=lambda s: s["first_row"]):
        for _, tokens, meta in read_samples(storage.join(uri, shard["path"])):
            for span in meta["images"]:
                if span["bos"]:
                    index += 1
                    image_id = span["id"]
                    pieces = [] if wanted_set is None or index in wanted_set else None
                    if pieces is None and last is not None and index > last:
                        return
                if pieces is None:
                    continue
                pieces.append(tokens[span["start"] : span["end"]])
                if span["eos"]:
                    joined = np.concatenate(pieces)
                    yield index, image_id, joined[1:-1]
                    pieces = None
                    if index == last:
                        return
