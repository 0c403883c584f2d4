"""WebDataset tar shards of packed rows (format: schemas/README.md, schemas/sample.schema.json).

One sample per row: `KEY.tokens.npy` (uint16 .npy of seq_len tokens) and `KEY.json` (split, row, valid_tokens,
image spans). Tar headers are fixed (mtime 0, uid/gid 0, no user names, mode 0644, ustar) and JSON is written with
sorted keys, so the same rows always give the same bytes. A shard appears under its final name only when complete
(storage.atomic_writer: temp file + rename locally, a completed upload on S3).

Row index: beside `NAME.tar` the writer puts `NAME.index.npy`, a little-endian uint64 .npy of rows + 1 byte offsets:
where each sample's first tar header starts, and last the end of the last sample's data. Row i of the shard is tar
bytes [off[i], off[i+1]) (its two members, headers and padding included), so a reader fetches any run of rows with
one ranged read (`read_row_range`) instead of streaming the whole shard.
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

from jpeglm.errors import UserError
from pipeline import storage
from pipeline.packing import TOKEN_DTYPE, Row

TOKENS_MEMBER = "tokens.npy"
JSON_MEMBER = "json"
INDEX_SUFFIX = ".index.npy"
INDEX_DTYPE = np.dtype("<u8")
# manifest.json of a preprocess output (schemas/README.md); readers refuse other formats and versions.
MANIFEST_FORMAT = "jpeglm-shards"
MANIFEST_FORMAT_VERSION = 2  # 2: shard entries name their row index ("index"); 1: no index (whole-shard reads)
READABLE_MANIFEST_VERSIONS = (1, 2)


class ShardError(UserError, ValueError):
    """A shard or its row index does not hold what its name, index or manifest says; the message says where."""


def sample_key(split: str, row: int) -> str:
    return f"{split}-{row:09d}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_name(shard: str | os.PathLike) -> str:
    """The row index beside a shard: `.../NAME.tar` -> `.../NAME.index.npy` (a file name, path or URI)."""
    return os.fspath(shard).removesuffix(".tar") + INDEX_SUFFIX


def sample_json(split: str, row: Row) -> dict:
    return {"split": split, "row": row.index, "valid_tokens": row.valid_tokens,
            "images": [s.to_json() for s in row.spans]}


def npy_bytes(array: np.ndarray, dtype=TOKEN_DTYPE) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array, dtype=dtype), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class ShardInfo:
    rows: int
    bytes: int
    sha256: str
    index: str  # file name of the row index beside the shard (the manifest entry's "index" is "shards/" + this)


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


def write_tar(f: IO[bytes], split: str, rows: Iterable[Row]) -> np.ndarray:
    """Write rows as a WebDataset tar to an open binary file; returns the row index (rows + 1 byte offsets)."""
    offsets = []
    with tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for row in rows:
            offsets.append(tar.offset)  # the archive position, whatever the stream buffers
            key = sample_key(split, row.index)
            _add(tar, f"{key}.{TOKENS_MEMBER}", npy_bytes(row.tokens))
            meta = json.dumps(sample_json(split, row), sort_keys=True, separators=(",", ":"))
            _add(tar, f"{key}.{JSON_MEMBER}", meta.encode())
        offsets.append(tar.offset)  # end of the last sample's data (the end-of-archive blocks follow)
    return np.array(offsets, dtype=INDEX_DTYPE)


def write_shard(uri: str | os.PathLike, split: str, rows: Iterable[Row]) -> ShardInfo:
    """Write a shard and then its row index, each atomically (nothing visible unless complete); returns the shard's
    rows, size, sha256 and index file name. A crash between the two leaves a shard without index, which the
    preprocess shard task (done-marker written after this returns) writes again."""
    uri = os.fspath(uri)
    if not storage.is_remote(uri):
        remove_stale_temporaries(uri)
    with storage.atomic_writer(uri) as f:
        w = _HashingWriter(f)
        offsets = write_tar(w, split, rows)
    storage.write_bytes(index_name(uri), npy_bytes(offsets, INDEX_DTYPE))
    return ShardInfo(rows=len(offsets) - 1, bytes=w.size, sha256=w.sha256.hexdigest(),
                     index=os.path.basename(index_name(uri)))


def remove_stale_temporaries(uri: str | os.PathLike) -> None:
    """Delete temporaries left by a writer of this local shard or its index that died mid-write
    (storage.atomic_writer names them `.NAME.XXXXXXXX.tmp`); they are never visible, this just reclaims the space."""
    directory, name = os.path.split(os.path.abspath(uri))
    prefixes = (f".{name}.", f".{os.path.basename(index_name(name))}.")
    if os.path.isdir(directory):
        for entry in os.listdir(directory):
            if entry.startswith(prefixes) and entry.endswith(".tmp"):
                os.unlink(os.path.join(directory, entry))


def read_samples(uri: str | os.PathLike) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(key, tokens, json) for each sample of a shard, in order, streaming (no webdataset needed)."""
    uri = os.fspath(uri)
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


def read_index(uri: str | os.PathLike, rows: int) -> np.ndarray:
    """A shard's row index (`index_name(shard)`), checked: uint64, rows + 1 offsets, from 0, increasing."""
    uri = os.fspath(uri)
    try:
        offsets = np.load(io.BytesIO(storage.read_range(uri, 0)), allow_pickle=False)
    except FileNotFoundError:
        raise ShardError(f"{uri} is missing: the row index of a listed shard (re-run preprocess)") from None
    except ValueError as e:
        raise ShardError(f"{uri}: not a .npy row index ({e})") from None
    if offsets.dtype != INDEX_DTYPE or offsets.shape != (rows + 1,):
        raise ShardError(f"{uri}: row index is {offsets.dtype}{offsets.shape}, expected uint64 ({rows + 1},) for the "
                         f"{rows} rows the manifest lists")
    if offsets[0] != 0 or (rows and not (np.diff(offsets.astype(np.int64)) > 0).all()):
        raise ShardError(f"{uri}: row index offsets must start at 0 and increase")
    return offsets


def read_row_range(uri: str | os.PathLike, offsets: np.ndarray, split: str, first_row: int, a: int,
                   b: int) -> list[tuple[str, np.ndarray, dict]]:
    """(key, tokens, json) of rows [a, b) of a shard (shard-local numbers; `first_row` is the split row of the
    shard's row 0), fetched with one ranged read of tar bytes [offsets[a], offsets[b]) and checked: each row is
    exactly its two members, named by its key, ending where the index says; its json names the same row."""
    uri = os.fspath(uri)
    start, end = int(offsets[a]), int(offsets[b])
    buf = storage.read_range(uri, start, end)
    if len(buf) != end - start:
        raise ShardError(f"{uri}: {len(buf)} bytes at {start}, the row index says {end - start}: truncated shard")
    out, pos = [], 0
    for i in range(a, b):
        key = sample_key(split, first_row + i)
        members = {}
        for ext in (TOKENS_MEMBER, JSON_MEMBER):
            pos, members[ext] = _member(buf, pos, f"{key}.{ext}", uri, start)
        if pos != int(offsets[i + 1]) - start:
            raise ShardError(f"{uri}: sample {key} ends at byte {start + pos}, the row index says {offsets[i + 1]}")
        meta = json.loads(members[JSON_MEMBER])
        if meta.get("row") != first_row + i or meta.get("split") != split:
            raise ShardError(f"{uri}: sample {key} says it is {meta.get('split')} row {meta.get('row')}")
        out.append((key, np.load(io.BytesIO(members[TOKENS_MEMBER]), allow_pickle=False), meta))
    return out


def _member(buf: bytes, pos: int, name: str, uri: str, base: int) -> tuple[int, bytes]:
    """(position after the member, its data) of the tar member that must start at `pos` and be called `name`."""
    try:
        info = tarfile.TarInfo.frombuf(buf[pos : pos + tarfile.BLOCKSIZE], tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as e:
        raise ShardError(f"{uri}: no tar header at byte {base + pos} where {name} should start ({e})") from None
    data_start = pos + tarfile.BLOCKSIZE
    data_end = data_start + info.size
    if info.name != name or data_end > len(buf):
        raise ShardError(f"{uri}: byte {base + pos} holds {info.name!r} ({info.size} bytes), expected {name!r} "
                         "within the row's index range")
    padded = data_start + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return padded, buf[data_start:data_end]


def manifest_format_problem(manifest: dict) -> str | None:
    """Why this jpeglm cannot read `manifest` (another format or version), or None when it can."""
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"format {manifest.get('format')!r} is not {MANIFEST_FORMAT!r}"
    if manifest.get("format_version") not in READABLE_MANIFEST_VERSIONS:
        return (f"format_version {manifest.get('format_version')!r} is not supported (this jpeglm reads "
                f"{', '.join(map(str, READABLE_MANIFEST_VERSIONS))}); update jpeglm or re-run preprocess")
    return None
