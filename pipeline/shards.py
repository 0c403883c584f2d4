"""WebDataset tar shards of packed rows (format: schemas/README.md, schemas/sample.schema.json).

One sample per row: `KEY.tokens.npy` (uint16 .npy of seq_len tokens) and `KEY.json` (split, row, valid_tokens,
image spans). Tar headers are fixed (mtime 0, uid/gid 0, no user names, mode 0644, ustar) and JSON is written with
sorted keys, so the same rows always give the same bytes. A shard appears under its final name only when complete
(storage.atomic_writer: temp file + rename locally, a completed upload on S3).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import IO, Iterable, Iterator

import numpy as np

from pipeline import storage
from pipeline.packing import TOKEN_DTYPE, Row

TOKENS_MEMBER = "tokens.npy"
JSON_MEMBER = "json"
# manifest.json of a preprocess output (schemas/README.md); readers refuse other formats and versions.
MANIFEST_FORMAT = "jpeglm-shards"
MANIFEST_FORMAT_VERSION = 1


def sample_key(split: str, row: int) -> str:
    return f"{split}-{row:09d}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_json(split: str, row: Row) -> dict:
    return {"split": split, "row": row.index, "valid_tokens": row.valid_tokens,
            "images": [s.to_json() for s in row.spans]}


def npy_bytes(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class ShardInfo:
    rows: int
    bytes: int
    sha256: str


class _HashingWriter(io.RawIOBase):
    """Counts and hashes what passes through to the underlying file (tarfile writes sequentially)."""

    def __init__(self, f: IO[bytes]):
        self._f, self.sha256, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        b = bytes(b)
        self._f.write(b)
        self.sha256.update(b)
        self.size += len(b)
        return len(b)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_tar(f: IO[bytes], split: str, rows: Iterable[Row]) -> int:
    """Write rows as a WebDataset tar to an open binary file; returns the number of rows."""
    n = 0
    with tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for row in rows:
            key = sample_key(split, row.index)
            _add(tar, f"{key}.{TOKENS_MEMBER}", npy_bytes(row.tokens))
            meta = json.dumps(sample_json(split, row), sort_keys=True, separators=(",", ":"))
            _add(tar, f"{key}.{JSON_MEMBER}", meta.encode())
            n += 1
    return n


def write_shard(uri: str, split: str, rows: Iterable[Row]) -> ShardInfo:
    """Write a shard atomically (nothing visible under `uri` unless complete); returns its size and sha256."""
    if not storage.is_remote(uri):
        remove_stale_temporaries(uri)
    with storage.atomic_writer(uri) as f:
        w = _HashingWriter(f)
        n = write_tar(w, split, rows)
    return ShardInfo(rows=n, bytes=w.size, sha256=w.sha256.hexdigest())


def remove_stale_temporaries(uri: str) -> None:
    """Delete temporaries left by a writer of this local shard that died mid-write (storage.atomic_writer names
    them `.NAME.XXXXXXXX.tmp`); they are never visible as shards, this just reclaims the space."""
    directory, name = os.path.split(os.path.abspath(uri))
    if os.path.isdir(directory):
        for entry in os.listdir(directory):
            if entry.startswith(f".{name}.") and entry.endswith(".tmp"):
                os.unlink(os.path.join(directory, entry))


def read_samples(uri: str) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(key, tokens, json) for each sample of a shard, in order, streaming (no webdataset needed)."""
    with storage.open_read(uri) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        pending: dict[str, dict] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            entry = pending.setdefault(key, {})
            entry[ext] = data
            if TOKENS_MEMBER in entry and JSON_MEMBER in entry:
                del pending[key]
                yield key, np.load(io.BytesIO(entry[TOKENS_MEMBER]), allow_pickle=False), json.loads(entry[JSON_MEMBER])
        if pending:
            raise ValueError(f"{uri}: incomplete samples {sorted(pending)[:3]}")


def manifest_format_problem(manifest: dict) -> str | None:
    """Why this jpeglm cannot read `manifest` (another format or version), or None when it can."""
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"format {manifest.get('format')!r} is not {MANIFEST_FORMAT!r}"
    if manifest.get("format_version") != MANIFEST_FORMAT_VERSION:
        return (f"format_version {manifest.get('format_version')!r} is not supported (this jpeglm reads "
                f"{MANIFEST_FORMAT_VERSION}); update jpeglm or re-run preprocess")
    return None
