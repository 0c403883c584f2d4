"""Inputs: stream the listing of every --input into deterministic work units, and read a unit's image bytes.

Three kinds of input, each a local path or an s3:// URI, given as a folder/prefix (walked recursively, in sorted
order) or as a single file:
- image files (any extension Pillow opens, plus common web formats this Pillow build may lack, which then fail
  visibly in the codec instead of being skipped);
- WebDataset / img2dataset tar shards (`.tar`, `.tar.gz`, `.tgz`): every image member;
- Parquet files (`.parquet`) with an image column: Hugging Face `image` struct {bytes, path}, a binary column, or a
  path/URL column of local or S3 objects (relative paths are relative to the Parquet file's folder). A Parquet file
  next to a tar of the same name is img2dataset's metadata for that tar and is skipped (counted in the plan).

Work units are JSON-able dicts, numbered in listing order; a unit's content is a pure function of the sorted
listing and --images-per-unit, so reruns and any number of workers see the same units:
- {"kind": "files", "entries": [[id, uri], ...]}: up to images_per_unit consecutive image files;
- {"kind": "tar", "id": ..., "uri": ...}: one whole tar (its members are only known by reading it; img2dataset
  tars hold ~10k images, a natural unit size);
- {"kind": "parquet", "id", "uri", "column", "mode", "rows": [start, end)}: a row range of one Parquet file.

Stable image ids: the path relative to the input (`photos/cat.jpg`), `<tar relative path>/<member name>`, or
`<parquet relative path>#<row>`; with several inputs, prefixed by the input's base name (made unique with its
position when two inputs share one).
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from jpeglm.errors import UserError
from pipeline import storage

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
# Web formats a Pillow build may lack: listed so such files are counted as failed images, not silently skipped.
EXTRA_IMAGE_SUFFIXES = (".webp", ".avif", ".heic", ".heif", ".jxl")
# Column names tried, in order, when --image-column is not given.
BYTES_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes", "bytes", "content")
PATH_COLUMNS = ("path", "image_path", "file", "file_path", "filename", "url", "image_url", "uri")


class InputError(UserError, ValueError):
    """An input that cannot be planned (missing, empty, unusable Parquet schema): the message says what to fix."""


def image_suffixes() -> frozenset[str]:
    from PIL import Image

    Image.init()
    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return frozenset(readable | set(EXTRA_IMAGE_SUFFIXES))


def kind_of(name: str, suffixes: frozenset[str]) -> str | None:
    lower = name.lower()
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if os.path.splitext(lower)[1] in suffixes:
        return "image"
    return None


@dataclass(frozen=True)
class Input:
    uri: str
    id_prefix: str  # "" for a single input, else "<base name>/"


def resolve_inputs(uris: list[str]) -> list[Input]:
    """Normalize input URIs and give each its id prefix."""
    if not uris:
        raise InputError("no --input given")
    cleaned = [u.rstrip("/") if storage.is_remote(u) else os.path.abspath(u) for u in uris]
    if len(set(cleaned)) != len(cleaned):
        raise InputError("the same --input is given twice")
    if len(cleaned) == 1:
        return [Input(cleaned[0], "")]
    bases = [os.path.basename(u) or u for u in cleaned]
    counts = Counter(bases)
    return [Input(u, f"{b}/" if counts[b] == 1 else f"{i}-{b}/") for i, (u, b) in enumerate(zip(cleaned, bases))]


def _is_file(uri: str) -> bool:
    fs, path = storage.filesystem(uri)
    return storage.retry(lambda: fs.isfile(path), f"stat {uri}")


def _walk(inp: Input) -> Iterator[tuple[str, str]]:
    """(uri, path relative to the input) of every file of an input, in sorted order."""
    if _is_file(inp.uri):
        yield inp.uri, os.path.basename(inp.uri)
        return
    if not storage.exists(inp.uri):
        raise InputError(f"input {inp.uri} does not exist")
    root = inp.uri.rstrip("/") + "/"
    for uri in storage.walk_files(inp.uri):
        # walk_files returns s3:// URIs for S3 and absolute paths locally, both below root
        yield uri, uri[len(root) :] if uri.startswith(root) else os.path.basename(uri)


@dataclass
class PlanCounts:
    units: int = 0
    image_files: int = 0
    tars: int = 0
    parquet_files: int = 0
    parquet_rows: int = 0
    skipped_files: int = 0  # neither image, tar nor parquet (e.g. img2dataset .json/.txt sidecars)
    skipped_img2dataset_parquet: int = 0


def plan_units(inputs: list[Input], images_per_unit: int, image_column: str | None = None,
               counts: PlanCounts | None = None) -> Iterator[dict]:
    """Stream work units (dicts without their index) over all inputs, in order. Never holds more than one unit's
    names. `counts`, if given, is filled in as the listing goes."""
    if images_per_unit < 1:
        raise InputError("--images-per-unit must be >= 1")
    counts = counts if counts is not None else PlanCounts()
    suffixes = image_suffixes()
    for inp in inputs:
        batch: list[list[str]] = []
        found = 0
        for uri, rel in _walk(inp):
            kind = kind_of(rel, suffixes)
            image_id = inp.id_prefix + rel
            if kind == "image":
                counts.image_files += 1
                batch.append([image_id, uri])
                if len(batch) == images_per_unit:
                    yield {"kind": "files", "entries": batch}
                    batch = []
            elif kind == "tar":
                counts.tars += 1
                yield {"kind": "tar", "id": image_id, "uri": uri}
            elif kind == "parquet":
                if _is_img2dataset_metadata(uri):
                    counts.skipped_img2dataset_parquet += 1
                    continue
                counts.parquet_files += 1
                rows, column, mode = parquet_layout(uri, image_column)
                counts.parquet_rows += rows
                for start in range(0, rows, images_per_unit):
                    yield {"kind": "parquet", "id": image_id, "uri": uri, "column": column, "mode": mode,
                           "rows": [start, min(start + images_per_unit, rows)]}
            else:
                counts.skipped_files += 1
                continue
            found += 1
        if batch:
            yield {"kind": "files", "entries": batch}
        if found == 0:
            raise InputError(f"input {inp.uri} holds no images, tars or Parquet files")


def _is_img2dataset_metadata(parquet_uri: str) -> bool:
    stem = parquet_uri[: -len(".parquet")]
    return storage.exists(stem + ".tar")


def parquet_layout(uri: str, image_column: str | None) -> tuple[int, str, str]:
    """(rows, column, mode) of a Parquet input, from its footer only. mode: "struct" (a Hugging Face image struct
    {bytes, path}), "bytes" (a binary column) or "path" (a string column of paths/URIs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with storage.open_read(uri) as f:
        meta = pq.ParquetFile(f)
        schema, rows = meta.schema_arrow, meta.metadata.num_rows

    def mode_of(field: pa.Field) -> str | None:
        t = field.type
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return "struct"
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return "bytes"
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "path"
        return None

    names = schema.names
    if image_column is not None:
        if image_column not in names:
            raise InputError(f"{uri}: no column {image_column!r} (columns: {names})")
        mode = mode_of(schema.field(image_column))
        if mode is None:
            raise InputError(f"{uri}: column {image_column!r} has type {schema.field(image_column).type}; "
                             "it must be an image struct {bytes, path}, binary, or a string of paths/URIs")
        return rows, image_column, mode
    for name in names:  # a Hugging Face Image feature, whatever its column name
        if mode_of(schema.field(name)) == "struct":
            return rows, name, "struct"
    for name in BYTES_COLUMNS:
        if name in names and mode_of(schema.field(name)) == "bytes":
            return rows, name, "bytes"
    for name in PATH_COLUMNS:
        if name in names and mode_of(schema.field(name)) == "path":
            return rows, name, "path"
    raise InputError(f"{uri}: found no image column (columns: {names}); pass --image-column NAME")


@dataclass(frozen=True)
class SourceImage:
    """One image of a unit: its bytes, or why they could not be read (`error`, data None)."""

    id: str
    source: str
    data: bytes | None
    error: str = ""


# Permanent read failures: the image is counted as read_error. Anything else (a transient I/O error that outlived
# storage.retry) propagates, so the task fails and Ray retries it: a flaky store never changes the output.
PERMANENT_READ_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _read_object(image_id: str, uri: str) -> SourceImage:
    try:
        return SourceImage(image_id, uri, storage.read_bytes(uri))
    except PERMANENT_READ_ERRORS as e:
        return SourceImage(image_id, uri, None, f"{type(e).__name__}: {e}")


def read_unit(unit: dict) -> Iterator[SourceImage]:
    """Every image of a work unit, in order, with its bytes or its read error."""
    kind = unit["kind"]
    if kind == "files":
        for image_id, uri in unit["entries"]:
            yield _read_object(image_id, uri)
    elif kind == "tar":
        yield from _read_tar(unit["id"], unit["uri"])
    elif kind == "parquet":
        yield from _read_parquet(unit)
    else:
        raise ValueError(f"unknown unit kind {kind!r}")


def _read_tar(tar_id: str, uri: str) -> Iterator[SourceImage]:
    suffixes = image_suffixes()
    members = 0
    fs, path = storage.filesystem(uri)
    try:
        size = storage.retry(lambda: fs.size(path), f"stat {uri}")
        f = storage.open_read(uri)
    except PERMANENT_READ_ERRORS as e:
        yield SourceImage(tar_id, uri, None, f"{type(e).__name__}: {e}")
        return
    problem = ""
    with f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile() or kind_of(member.name, suffixes) != "image":
                        continue
                    data = tar.extractfile(member).read()
                    members += 1
                    yield SourceImage(f"{tar_id}/{member.name}", f"{uri}#{member.name}", data)
                # tarfile ends quietly at a truncated header; an intact tar has its end-of-archive zero blocks
                # after the last member (compressed tars are checked by the decompressor instead).
                if not uri.lower().endswith((".gz", ".tgz")) and size - tar.offset < tarfile.BLOCKSIZE:
                    problem = f"truncated: no end-of-archive marker after byte {tar.offset} of {size}"
        except (tarfile.TarError, EOFError) as e:
            problem = f"{type(e).__name__}: {e}"
    if problem:
        # The images before the damage are kept; the rest of the tar is one visible failure.
        yield SourceImage(f"{tar_id}#error", uri, None, f"unreadable tar after {members} images: {problem}")


def _read_parquet(unit: dict) -> Iterator[SourceImage]:
    import pyarrow.parquet as pq

    uri, column, mode = unit["uri"], unit["column"], unit["mode"]
    start, end = unit["rows"]
    base = uri.rsplit("/", 1)[0]
    try:
        f = storage.open_read(uri)
    except PERMANENT_READ_ERRORS as e:
        for row in range(start, end):
            yield SourceImage(f"{unit['id']}#{row}", f"{uri}#{row}", None, f"{type(e).__name__}: {e}")
        return
    with f:
        pf = pq.ParquetFile(f)
        group_start = 0
        for g in range(pf.metadata.num_row_groups):
            group_rows = pf.metadata.row_group(g).num_rows
            lo, hi = max(start, group_start), min(end, group_start + group_rows)
            if lo < hi:
                values = pf.read_row_group(g, columns=[column]).column(0).slice(lo - group_start, hi - lo).to_pylist()
                for row, value in zip(range(lo, hi), values):
                    yield _parquet_value(f"{unit['id']}#{row}", f"{uri}#{row}", value, mode, base)
            group_start += group_rows
            if group_start >= end:
                break


def _parquet_value(image_id: str, source: str, value, mode: str, base: str) -> SourceImage:
    if mode == "struct":
        value = value or {}
        if value.get("bytes") is not None:
            return SourceImage(image_id, source, value["bytes"])
        value = value.get("path")  # a Hugging Face image stored by path only
    elif mode == "bytes":
        if value is None:
            return SourceImage(image_id, source, None, "null image bytes")
        return SourceImage(image_id, source, value)
    if not value:
        return SourceImage(image_id, source, None, "null image path")
    target = value if ("://" in value or os.path.isabs(value)) else storage.join(base, value)
    img = _read_object(image_id, target)
    return SourceImage(image_id, f"{source} -> {target}", img.data, img.error)
