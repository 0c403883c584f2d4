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
- {"kind": "parquet", "id", "uri", "column", "mode", "rows": [start, end), "source_bytes"}: a row range of one
  Parquet file; when its row groups are larger than a unit, also "pages": the byte spans of the pages holding those
  rows (see pipeline/parquet_pages.py), so that a unit reads about its share of the file. "source_bytes" estimates
  (from the footer) the column bytes its reader holds at once: the encode task declares that memory.

Reading (`read_unit`) fetches objects (image files, tar chunks, the objects a Parquet path column names) ahead of
the caller on a few threads, in order, with a bounded number in flight: one request per image, memory O(window)
whatever the unit's size. A Parquet column of image bytes is the exception: its values come with the unit's pages
(or whole row groups), so its reader holds the unit's images (its "source_bytes": 0.1-0.5 GB for 1,000 web
images), not a window.

Stable image ids: the path relative to the input (`photos/cat.jpg`), `<tar relative path>/<member name>`, or
`<parquet relative path>#<row>`; with several inputs, prefixed by the input's base name (made unique with its
position when two inputs share one).
"""

from __future__ import annotations

import itertools
import logging
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Iterator, TypeVar

from jpeglm.errors import UserError
from pipeline import prefetch, storage

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

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


def resolve_inputs(uris: Iterable[str | os.PathLike]) -> list[Input]:
    """Normalize input URIs (str or os.PathLike) and give each its id prefix."""
    uris = [os.fspath(u) for u in uris]
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
                layout = _parquet_layout(uri, image_column)
                counts.parquet_rows += layout.rows
                yield from _parquet_units(image_id, uri, layout, images_per_unit)
            else:
                counts.skipped_files += 1
                continue
            found += 1
        if batch:
            yield {"kind": "files", "entries": batch}
        if found == 0:
            raise InputError(f"input {inp.uri} holds no images, tars or Parquet files")


def check_holds_images(inp: Input, image_column: str | None = None) -> None:
    """Raise InputError unless the input holds an image file, a tar, or a Parquet file with rows and a usable image
    column: walks only to the first one and reads only a Parquet footer (planning indexes the pages later)."""
    suffixes = image_suffixes()
    for uri, rel in _walk(inp):
        kind = kind_of(rel, suffixes)
        if kind in ("image", "tar"):
            return
        if kind == "parquet" and not _is_img2dataset_metadata(uri) and _parquet_layout(uri, image_column).rows:
            return
    raise InputError(f"input {inp.uri} holds no images, tars or Parquet files with rows")


def _is_img2dataset_metadata(parquet_uri: str) -> bool:
    stem = parquet_uri[: -len(".parquet")]
    return storage.exists(stem + ".tar")


@dataclass(frozen=True)
class ParquetLayout:
    rows: int
    column: str
    mode: str  # "struct" (a Hugging Face image struct {bytes, path}), "bytes" (binary) or "path" (string)
    group_rows: list[int]  # rows of each row group
    leaves: list[str]  # the leaf columns read: [column] or [column.bytes, column.path]
    group_bytes: list[int]  # uncompressed bytes of the leaves' column chunks in each row group (from the footer)


def _parquet_layout(uri: str, image_column: str | None) -> ParquetLayout:
    import pyarrow.parquet as pq

    with storage.open_read(uri) as f:
        pf = pq.ParquetFile(f)
        schema, meta = pf.schema_arrow, pf.metadata
    groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
    column, mode = _image_column(uri, schema, image_column)
    leaves = [column]
    if mode == "struct":
        names = [schema.field(column).type.field(i).name for i in range(schema.field(column).type.num_fields)]
        leaves = [f"{column}.bytes"] + ([f"{column}.path"] if "path" in names else [])
    group_bytes = [sum(c.total_uncompressed_size for c in (g.column(i) for i in range(g.num_columns))
                       if c.path_in_schema in leaves) for g in groups]
    return ParquetLayout(meta.num_rows, column, mode, [g.num_rows for g in groups], leaves, group_bytes)


def _image_column(uri: str, schema, image_column: str | None) -> tuple[str, str]:
    import pyarrow as pa

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
        return image_column, mode
    for name in names:  # a Hugging Face Image feature, whatever its column name
        if mode_of(schema.field(name)) == "struct":
            return name, "struct"
    for name in BYTES_COLUMNS:
        if name in names and mode_of(schema.field(name)) == "bytes":
            return name, "bytes"
    for name in PATH_COLUMNS:
        if name in names and mode_of(schema.field(name)) == "path":
            return name, "path"
    raise InputError(f"{uri}: found no image column (columns: {names}); pass --image-column NAME")


def _parquet_units(image_id: str, uri: str, layout: ParquetLayout, images_per_unit: int) -> Iterator[dict]:
    """A Parquet file's units: row ranges of images_per_unit rows. When a row group is larger than a unit, each
    unit also carries the byte spans of the pages holding its rows (parquet_pages), so that it reads about its
    share of the file instead of whole row groups."""
    pages = None
    if max(layout.group_rows, default=0) > images_per_unit:
        from pipeline import parquet_pages

        try:
            pages = parquet_pages.index_pages(uri, layout.leaves, list(range(len(layout.group_rows))))
        except (ValueError, EOFError, KeyError, IndexError) as e:  # a file pyarrow reads but the page walk cannot
            log.warning("%s: cannot index its pages (%s: %s)", uri, type(e).__name__, e)
        if pages is None:
            log.warning("%s: row groups of up to %d rows, larger than a unit, are read whole by each unit that "
                        "needs them (encrypted, a repeated column, or pages that could not be indexed)", uri,
                        max(layout.group_rows))
    group_starts = [0, *itertools.accumulate(layout.group_rows)][:-1]
    for start in range(0, layout.rows, images_per_unit):
        end = min(start + images_per_unit, layout.rows)
        unit = {"kind": "parquet", "id": image_id, "uri": uri, "column": layout.column, "mode": layout.mode,
                "rows": [start, end], "source_bytes": _parquet_held_bytes(layout, start, end, pages is not None)}
        if pages is not None:
            footer, chunks = pages
            segments = []
            for g, (g0, n) in enumerate(zip(group_starts, layout.group_rows)):
                lo, hi = max(start, g0) - g0, min(end, g0 + n) - g0
                if lo < hi:
                    columns = [parquet_pages.select(chunks[(g, i)], lo, hi) for i in range(len(layout.leaves))]
                    segments.append({"row_group": g, "rows": [lo, hi], "columns": columns})
            unit["pages"] = {"footer": [footer.offset, footer.length], "segments": segments}
        yield unit


def _parquet_held_bytes(layout: ParquetLayout, start: int, end: int, by_pages: bool) -> int:
    """An estimate, from the footer, of the column bytes the reader of rows [start, end) holds at once: by pages,
    its values and the column they were sliced from (~2x its share of the column chunks); by row groups, the
    largest row group's column it reads whole plus its values."""
    share, largest = 0, 0
    for g0, n, size in zip(itertools.accumulate([0, *layout.group_rows]), layout.group_rows, layout.group_bytes):
        overlap = min(end, g0 + n) - max(start, g0)
        if overlap > 0:
            share += size * overlap // n
            largest = max(largest, size)
    return 2 * share if by_pages else largest + share


@dataclass(frozen=True)
class SourceImage:
    """One image of a unit: its bytes, or why they could not be read (`error`, data None)."""

    id: str
    source: str
    data: bytes | None
    error: str = ""


# Permanent read failures: the image is counted as read_error. Anything else (a transient I/O error that outlived
# storage's retries) propagates, so the task fails and Ray retries it: a flaky store never changes the output.
PERMANENT_READ_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# Objects read ahead of the consumer: enough S3 requests in flight to hide ~50 ms of latency behind ~3 ms of CPU per
# image, and a bounded memory (READ_WINDOW images) whatever the unit's size.
READ_WINDOW = 32
# Local files: LOCAL_READERS threads reading LOCAL_BATCH files each (the same 32 in flight). A page-cache hit costs
# ~50 us, less than a thread hand-off, so batches amortize it; a network filesystem's per-file latency still overlaps.
LOCAL_READERS, LOCAL_BATCH = 4, 8
# Remote tars are read by a background thread this far ahead of the tar parser.
TAR_CHUNK = 8 << 20
TAR_CHUNKS_AHEAD = 2


def _read_object(image_id: str, uri: str) -> SourceImage:
    try:
        return SourceImage(image_id, uri, storage.read_bytes(uri))
    except PERMANENT_READ_ERRORS as e:
        return SourceImage(image_id, uri, None, f"{type(e).__name__}: {e}")


def read_unit(unit: dict, positions: Collection[int] | None = None) -> Iterator[SourceImage]:
    """Every image of a work unit, in order, with its bytes or its read error; with `positions` (indexes in the
    unit's order, e.g. a set), only those images, and only those are read (the objects of a file list or of a
    Parquet path column; a tar is read up to its last wanted member).

    Objects are fetched READ_WINDOW at a time by a thread pool while the caller works on earlier ones: one request
    per image, memory O(READ_WINDOW images), never the whole unit; except a Parquet column of image bytes, read
    with the unit's pages or row groups: about the unit's "source_bytes" (see the module docstring)."""
    kind = unit["kind"]
    if kind == "files":
        entries = unit["entries"]
        if positions is not None:
            entries = [e for i, e in enumerate(entries) if i in positions]
        yield from _read_ahead(lambda e: _read_object(e[0], e[1]), entries, entries[0][1] if entries else "")
    elif kind == "tar":
        yield from _read_tar(unit["id"], unit["uri"], positions)
    elif kind == "parquet":
        yield from _read_parquet(unit, positions)
    else:
        raise ValueError(f"unknown unit kind {kind!r}")


def _read_ahead(fn: Callable[[T], R], items: Iterable[T], uri: str) -> Iterator[R]:
    """prefetch.ordered with the window for where `uri` lives (READ_WINDOW is read at call time: benchmarks set it)."""
    if storage.is_remote(uri):
        return prefetch.ordered(fn, items, READ_WINDOW)
    return prefetch.ordered(fn, items, min(LOCAL_READERS, READ_WINDOW), LOCAL_BATCH if READ_WINDOW > 1 else 1)


def _read_tar(tar_id: str, uri: str, positions: Collection[int] | None = None) -> Iterator[SourceImage]:
    suffixes = image_suffixes()
    last_wanted = max(positions, default=-1) if positions is not None else None
    members = 0
    fs, path = storage.filesystem(uri)
    try:
        size = storage.retry(lambda: fs.size(path), f"stat {uri}")
        f = storage.open_read(uri)
    except PERMANENT_READ_ERRORS as e:
        yield SourceImage(tar_id, uri, None, f"{type(e).__name__}: {e}")
        return
    stream = f
    if storage.is_remote(uri):  # a failed read leaves the file's position unchanged: retrying it is safe
        stream = prefetch.ReadAhead(lambda n: storage.retry(lambda: f.read(n), f"read {uri}"), TAR_CHUNK,
                                    TAR_CHUNKS_AHEAD)
    problem = ""
    with f, stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if last_wanted is not None and members > last_wanted:
                        return  # the rest is not wanted (and not checked)
                    if not member.isfile() or kind_of(member.name, suffixes) != "image":
                        continue
                    data = tar.extractfile(member).read()
                    members += 1
                    if positions is None or members - 1 in positions:
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


def _read_parquet(unit: dict, positions: Collection[int] | None) -> Iterator[SourceImage]:
    uri, mode = unit["uri"], unit["mode"]
    start, end = unit["rows"]
    base = uri.rsplit("/", 1)[0]
    values = _parquet_rows_by_pages(unit) if "pages" in unit else _parquet_rows_by_groups(unit)
    rows = ((row, value) for row, value in zip(range(start, end), values)
            if positions is None or row - start in positions)

    def image(item: tuple[int, object]) -> tuple[int, SourceImage]:
        row, value = item
        return row, _parquet_value(f"{unit['id']}#{row}", f"{uri}#{row}", value, mode, base)

    # Path values name objects: fetch them ahead, in order (only the wanted rows'). Bytes are at hand.
    images = map(image, rows) if mode == "bytes" else _read_ahead(image, rows, uri)
    next_row = start
    try:
        for row, img in images:
            next_row = row + 1
            yield img
    except PERMANENT_READ_ERRORS as e:  # the Parquet file itself is missing or unreadable
        for row in range(next_row, end):
            if positions is None or row - start in positions:
                yield SourceImage(f"{unit['id']}#{row}", f"{uri}#{row}", None, f"{type(e).__name__}: {e}")


def _parquet_rows_by_groups(unit: dict) -> Iterator:
    """The unit's values of its column, reading the row groups that overlap its rows (one at a time)."""
    import pyarrow.parquet as pq

    start, end = unit["rows"]
    with storage.open_read(unit["uri"]) as f:
        pf = pq.ParquetFile(f)
        group_start = 0
        for g in range(pf.metadata.num_row_groups):
            group_rows = pf.metadata.row_group(g).num_rows
            lo, hi = max(start, group_start), min(end, group_start + group_rows)
            if lo < hi:
                column = pf.read_row_group(g, columns=[unit["column"]]).column(0)
                yield from column.slice(lo - group_start, hi - lo).to_pylist()
            group_start += group_rows
            if group_start >= end:
                break


def _parquet_rows_by_pages(unit: dict) -> Iterator:
    """The unit's values of its column, reading only the pages that hold its rows (see parquet_pages). Held for the
    whole unit (memory O(unit), as its pages are); a file the page reader cannot handle falls back to row groups."""
    import pyarrow as pa

    from pipeline import parquet_pages

    uri, pages = unit["uri"], unit["pages"]
    try:
        footer = parquet_pages.read_footer(uri, pages["footer"])
        values: list = []
        for segment in pages["segments"]:
            lo, hi = segment["rows"]  # within the row group
            leaves = []
            for span in segment["columns"]:
                column = parquet_pages.read_column(uri, footer, segment["row_group"], span)
                leaves.append(column.slice(lo - span["first_row"], hi - lo).to_pylist())
            if unit["mode"] == "struct":  # leaves: the struct's bytes and (if present) path fields
                paths = leaves[1] if len(leaves) > 1 else [None] * len(leaves[0])
                values += [{"bytes": b, "path": p} for b, p in zip(leaves[0], paths)]
            else:
                values += leaves[0]
    except (ValueError, EOFError, KeyError, IndexError, pa.ArrowException) as e:  # not I/O errors: those propagate
        log.warning("%s rows %s: reading by pages failed (%s: %s); reading whole row groups", uri, unit["rows"],
                    type(e).__name__, e)
        yield from _parquet_rows_by_groups(unit)
        return
    yield from values


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


# ---------------------------------------------------------------------------------------------------------------
# what this build can decode

# Common web formats, with the Pillow feature that decodes each when it is optional.
_WEB_FORMATS = (("JPEG", None), ("PNG", None), ("WEBP", "webp"), ("GIF", None), ("BMP", None), ("TIFF", None),
                ("AVIF", "avif"), ("HEIF", None), ("JXL", None))


def readable_formats() -> tuple[list[str], list[str]]:
    """(common web formats this Pillow build decodes, those it does not): images of the latter are counted
    `unsupported`."""
    from PIL import Image, features

    Image.init()
    yes, no = [], []
    for fmt, feature in _WEB_FORMATS:
        ok = fmt in Image.OPEN and (feature is None or features.check(feature) is True)
        (yes if ok else no).append(fmt)
    return yes, no


def readable_formats_line() -> str:
    """One line for the job's start, e.g. "reads JPEG, PNG, WEBP, GIF, BMP, TIFF (Pillow 12.1.1.post0); not AVIF,
    HEIF, JXL: such images are counted unsupported"."""
    import PIL

    yes, no = readable_formats()
    line = f"reads {', '.join(yes)} (Pillow {PIL.__version__})"
    if no:
        line += f"; not {', '.join(no)}: such images are counted unsupported"
    return line
