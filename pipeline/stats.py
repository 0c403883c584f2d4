"""Per-image stats (OUTPUT/stats/*.parquet) and the job summary.

Schema documented in schemas/image_stats.md. One row per image met in the inputs, whatever happened to it: nothing
is dropped silently. `bucket-NNNNNN.parquet` holds a shuffle bucket's `ok` and `duplicate` images in stream order
(its `ok` rows, per split, are the bucket's images in the packed stream, in order); `unit-NNNNNN.parquet` holds the
images of work unit NNNNNN that could not be used (read or codec failures).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

OK = "ok"
READ_ERROR = "read_error"  # the source object could not be read (missing, forbidden, unreadable tar or parquet)
INTERNAL_ERROR = "internal_error"  # the codec raised something other than CodecError (a bug; logged, not fatal)
DUPLICATE = "duplicate"  # the same canonical body as an earlier image (duplicate_of): packed once (--dedup exact)
NEAR_DUPLICATE = "near_duplicate"  # pHash within --near-radius of the kept image of its group (duplicate_of)
EXCLUDED = "excluded"  # pHash within --near-radius of an --exclude image (excluded_by): in neither split
# Not failures: the image was fine, another copy (or the evaluation set) has it.
DROPPED = (DUPLICATE, NEAR_DUPLICATE, EXCLUDED)
# Reasons that say the environment is broken rather than the input (a codec this build lacks, storage that cannot
# be read, a bug): compared to --max-failed-fraction. Every other reason is about the input's quality.
ENVIRONMENT_REASONS = ("unsupported", READ_ERROR, INTERNAL_ERROR)

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # stable image id (schemas/image_stats.md)
        pa.field("source", pa.string(), nullable=False),  # where the bytes came from: URI, URI#member, URI#row
        pa.field("status", pa.string(), nullable=False),  # "ok", a codec reason, "read_error", "internal_error"
        pa.field("message", pa.string(), nullable=False),  # why, when status != ok; "" otherwise
        pa.field("source_bytes", pa.int64()),  # size of the source object (null if unreadable)
        pa.field("source_format", pa.string()),  # Pillow format name (null if not decodable)
        pa.field("source_width", pa.int32()),
        pa.field("source_height", pa.int32()),
        pa.field("jpeg_bytes", pa.int32()),  # canonical JPEG body (tables stripped): the bytes the model sees
        pa.field("tokens", pa.int32()),  # BPE tokens of that body, without BOS/EOS
        pa.field("split", pa.string()),  # "train" / "validation" for ok images, null otherwise
        pa.field("body_sha256", pa.string()),  # hex sha256 of the canonical body (ok and duplicate images)
        pa.field("duplicate_of", pa.string()),  # the id of the packed image it copies (duplicate, near_duplicate)
        pa.field("phash", pa.uint64()),  # 64-bit DCT hash of the canonical image (pipeline/phash.py); null: failed
        pa.field("excluded_by", pa.string()),  # the id of the --exclude image it matched (excluded images)
    ]
)


@dataclass
class ImageStat:
    id: str
    source: str
    status: str
    message: str = ""
    source_bytes: int | None = None
    source_format: str | None = None
    source_width: int | None = None
    source_height: int | None = None
    jpeg_bytes: int | None = None
    tokens: int | None = None
    split: str | None = None
    body_sha256: str | None = None
    duplicate_of: str | None = None
    phash: int | None = None
    excluded_by: str | None = None


assert [f.name for f in fields(ImageStat)] == SCHEMA.names


def to_parquet_bytes(stats: Iterable[ImageStat]) -> bytes:
    rows = [vars(s) for s in stats]  # a shallow dict: dataclasses.asdict deep-copies, ~5x slower here
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write(uri: str, stats: Iterable[ImageStat]) -> None:
    storage.write_bytes(uri, to_parquet_bytes(stats))


# Rows per row group of a file written by StatsWriter: what its writer holds (~1-2 KB of Python objects a row).
WRITER_ROW_GROUP_ROWS = 8192


class StatsWriter:
    """Stats rows streamed into an open binary file as Parquet, in row groups of exactly `row_group_rows` rows (the
    last one shorter) whatever batches the caller adds them in: the bytes depend only on the rows, and the memory on
    one row group. `counts` is complete after close() (or the end of a `with` block)."""

    def __init__(self, f, row_group_rows: int = 0):
        self.row_group_rows = row_group_rows or WRITER_ROW_GROUP_ROWS
        self._writer = pq.ParquetWriter(f, SCHEMA, compression="zstd")
        self._pending: list[ImageStat] = []
        self._groups = 0
        self.counts = Counts()

    def add(self, stat: ImageStat) -> None:
        self._pending.append(stat)
        if len(self._pending) == self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        table = pa.Table.from_pylist([vars(s) for s in self._pending], schema=SCHEMA)
        self._writer.write_table(table, row_group_size=self.row_group_rows)
        self.counts += Counts.of(self._pending)
        self._pending, self._groups = [], self._groups + 1

    def close(self) -> None:
        if self._pending or not self._groups:  # an empty file still holds one (empty) row group, as write() does
            self._flush()
        self._writer.close()

    def __enter__(self) -> "StatsWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:  # the file is being discarded: end the writer without another row group
            self._writer.close()


def read(uri: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns, schema=SCHEMA)


@dataclass
class Counts:
    """What a work unit (or the whole job) did, aggregated from its stats."""

    images: int = 0
    ok: int = 0
    status: dict = field(default_factory=dict)  # status -> count, for every status met
    source_bytes: int = 0
    jpeg_bytes: int = 0  # sum over ok images
    body_tokens: int = 0  # sum over ok images, without BOS/EOS
    split_images: dict = field(default_factory=dict)  # split -> ok images
    split_tokens: dict = field(default_factory=dict)  # split -> stream tokens (with BOS/EOS)

    @classmethod
    def of(cls, stats: Iterable[ImageStat]) -> "Counts":
        status, split_images, split_tokens = Counter(), Counter(), Counter()
        c = cls()
        for s in stats:
            c.images += 1
            status[s.status] += 1
            c.source_bytes += s.source_bytes or 0
            if s.status == OK:
                c.ok += 1
                c.jpeg_bytes += s.jpeg_bytes
                c.body_tokens += s.tokens
                split_images[s.split] += 1
                split_tokens[s.split] += s.tokens + 2
        c.status, c.split_images, c.split_tokens = dict(sorted(status.items())), dict(split_images), dict(split_tokens)
        return c

    @classmethod
    def from_json(cls, d: dict) -> "Counts":
        return cls(**d)

    def to_json(self) -> dict:
        return asdict(self)

    def __add__(self, other: "Counts") -> "Counts":
        def merge(a, b):
            out = Counter(a)
            out.update(b)
            return dict(sorted(out.items()))

        return Counts(
            images=self.images + other.images,
            ok=self.ok + other.ok,
            status=merge(self.status, other.status),
            source_bytes=self.source_bytes + other.source_bytes,
            jpeg_bytes=self.jpeg_bytes + other.jpeg_bytes,
            body_tokens=self.body_tokens + other.body_tokens,
            split_images=merge(self.split_images, other.split_images),
            split_tokens=merge(self.split_tokens, other.split_tokens),
        )


def plural(n: int, noun: str, plural_noun: str | None = None) -> str:
    """'1 shard', '2 shards', '1,000 work units' (plural_noun when adding 's' is wrong)."""
    return f"{n:,} {noun if n == 1 else plural_noun or noun + 's'}"


def failures(counts: Counts) -> dict:
    """status -> count for the images that could not be used (not ok, not a duplicate, not excluded)."""
    return {k: v for k, v in counts.status.items() if k != OK and k not in DROPPED}


def summarize(counts: Counts, *, rows: dict, shards: dict, shard_bytes: int, padding_tokens: int, dropped_tokens: int,
              wall_s: float, images_this_run: int, cpus: float, retries: dict | None = None) -> dict:
    """The job summary (printed and saved as OUTPUT/summary.json)."""
    failed = failures(counts)
    throughput = images_this_run / wall_s if wall_s > 0 else 0.0
    return {
        "images": counts.images,
        "images_ok": counts.ok,
        "images_duplicate": counts.status.get(DUPLICATE, 0),
        "images_near_duplicate": counts.status.get(NEAR_DUPLICATE, 0),
        "images_excluded": counts.status.get(EXCLUDED, 0),
        "images_failed": sum(failed.values()),
        "failed_by_reason": failed,
        "images_by_split": counts.split_images,
        "tokens": counts.body_tokens + 2 * counts.ok,
        "padding_tokens": padding_tokens,
        "dropped_tokens": dropped_tokens,
        "rows": rows,
        "shards": shards,
        "shard_bytes": shard_bytes,
        "source_bytes": counts.source_bytes,
        "jpeg_bytes": counts.jpeg_bytes,
        "bytes_per_token": round(counts.jpeg_bytes / counts.body_tokens, 4) if counts.body_tokens else None,
        "tokens_per_image": round((counts.body_tokens + 2 * counts.ok) / counts.ok, 1) if counts.ok else None,
        "wall_time_s": round(wall_s, 2),
        "images_this_run": images_this_run,
        "images_per_s": round(throughput, 1),
        "cpus": cpus,
        "images_per_s_per_cpu": round(throughput / cpus, 1) if cpus else None,
        "storage_retries": dict(sorted((retries or {}).items())),
    }


# What describes the run that printed the summary rather than the output: left out when a rerun of a finished job
# shows the saved summary (the figures would claim work that this run did not do).
THIS_RUN_KEYS = ("wall_time_s", "images_this_run", "images_per_s", "cpus", "images_per_s_per_cpu", "phase_seconds",
                 "storage_retries", "task_retries")


def format_summary(summary: dict, this_run: bool = True) -> str:
    """A readable block for the terminal; this_run=False leaves out the figures of the run (THIS_RUN_KEYS)."""

    def fmt(v):
        if isinstance(v, dict):
            return ", ".join(f"{k} {fmt(x)}" for k, x in v.items()) or "-"
        if isinstance(v, float):
            return f"{v:,.2f}"
        if isinstance(v, int):
            return f"{v:,}"
        return "-" if v is None else str(v)

    labels = [
        ("image_size", "image size (px)"), ("images", "images"), ("images_ok", "  ok"), ("images_duplicate", "  duplicate (packed once)"),
        ("images_near_duplicate", "  near-duplicate (dropped)"), ("images_excluded", "  excluded (--exclude)"),
        ("near_duplicates", "near-duplicate groups"), ("exclude", "exclude"),
        ("images_failed", "  failed"), ("failed_by_reason", "  failed by reason"),
        ("images_by_split", "  ok by split"), ("tokens", "tokens (with BOS/EOS)"), ("padding_tokens", "padding tokens"),
        ("dropped_tokens", "dropped tokens"), ("rows", "rows"), ("shards", "shards"), ("shard_bytes", "shard bytes"),
        ("bytes_per_token", "JPEG bytes per token"), ("tokens_per_image", "tokens per image"),
        ("wall_time_s", "wall time (s)"), ("images_this_run", "images processed this run"),
        ("images_per_s", "images/s"),
        ("cpus", "CPUs"), ("images_per_s_per_cpu", "images/s per CPU"), ("phase_seconds", "seconds by phase"),
        ("storage_retries", "storage retries"), ("task_retries", "task retries"),
    ]
    labels = [(k, label) for k, label in labels if k in summary and (this_run or k not in THIS_RUN_KEYS)]
    width = max(len(label) for _, label in labels)
    return "\n".join(f"{label:<{width}}  {fmt(summary.get(key))}" for key, label in labels)
