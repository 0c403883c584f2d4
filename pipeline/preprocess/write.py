"""The shard phase: cut each split's token stream into shards (planning), and the task that writes one shard.

A split's stream is the buckets' streams of that split in bucket order (shuffle.py); rows of seq_len tokens are cut
from it as in the paper, and each shard task reads only the slices of the bucket streams its rows need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.preprocess.faults import maybe_fault
from pipeline.preprocess.layout import Layout
from pipeline.preprocess.ranged import read_range
from pipeline.preprocess.results import retry_counts, write_record


@dataclass(frozen=True)
class ShardSpec:
    split: str
    index: int
    first_row: int
    num_rows: int
    total_tokens: int  # valid tokens of the whole split stream
    pieces: tuple[tuple[int, int, int], ...]  # (bucket, offset of its stream in the split stream, its tokens)

    @property
    def name(self) -> str:
        from pipeline.shards import shard_name

        return shard_name(self.split, self.index)


def plan_shards(split: str, bucket_tokens: list[tuple[int, int]], seq_len: int, rows_per_shard: int,
                last_row: str) -> tuple[list[ShardSpec], int, int, int]:
    """Cut a split's stream (the buckets' streams in bucket order: (bucket, tokens)) into shards of rows_per_shard
    rows. Returns (specs, rows, padding_tokens, dropped_tokens)."""
    from pipeline.packing import count_rows

    offsets, pos = [], 0
    for bucket, n in bucket_tokens:
        if n:
            offsets.append((bucket, pos, n))
            pos += n
    total = pos
    rows, padding, dropped = count_rows(total, seq_len, last_row)
    specs = []
    for k, first in enumerate(range(0, rows, rows_per_shard)):
        num = min(rows_per_shard, rows - first)
        lo, hi = first * seq_len, min((first + num) * seq_len, total)
        pieces = tuple(p for p in offsets if p[1] < hi and p[1] + p[2] > lo)
        specs.append(ShardSpec(split, k, first, num, total, pieces))
    return specs, rows, padding, dropped


def estimated_row_bytes(seq_len: int) -> int:
    """Tar bytes per sample: two 512-byte headers, the .npy (128-byte header + 2 bytes/token) and the .json
    (typically well under 1 KB), each padded to 512 bytes."""
    return 512 + 512 * math.ceil((128 + 2 * seq_len) / 512) + 512 + 1024


def shard_memory(shard_size: int) -> int:
    """Data a shard task holds: its rows' tokens, the span tables of its buckets, upload buffers: ~2x a shard."""
    return 2 * shard_size


def write_shard_task(output: str, task: int, spec: ShardSpec, seq_len: int, pad_id: int) -> dict:
    """Write one shard from the stream slices and stats of the buckets it covers; then its done record (its
    manifest entry)."""
    from pipeline import shards, stats
    from pipeline.packing import TOKEN_DTYPE, ImageRef, rows_in_range

    layout = Layout(output)
    retry_counts()  # drop what an earlier task of this worker process left uncounted
    lo = spec.first_row * seq_len
    hi = min((spec.first_row + spec.num_rows) * seq_len, spec.total_tokens)
    parts, images = [], []
    for bucket, offset, n in spec.pieces:
        a, b = max(lo, offset) - offset, min(hi, offset + n) - offset
        parts.append(np.frombuffer(read_range(layout.bucket_stream(bucket, spec.split), 2 * a, 2 * b),
                                   dtype=TOKEN_DTYPE))
        table = stats.read(layout.bucket_stats(bucket), columns=["id", "status", "split", "tokens"]).to_pylist()
        pos = offset
        for rec in table:
            if rec["status"] == stats.OK and rec["split"] == spec.split:
                length = rec["tokens"] + 2
                if pos < hi and pos + length > lo:
                    images.append(ImageRef(rec["id"], pos, length))
                pos += length
    stream = np.concatenate(parts) if parts else np.empty(0, dtype=TOKEN_DTYPE)
    rows = rows_in_range(stream, lo, images, spec.first_row, spec.num_rows, seq_len, spec.total_tokens, pad_id)

    def rows_with_fault_hook():
        for i, row in enumerate(rows):
            if i == spec.num_rows // 2:
                maybe_fault(layout, "shard", spec.name.removesuffix(".tar"))
            yield row

    info = shards.write_shard(layout.shard(spec.name), spec.split, rows_with_fault_hook())
    padding = spec.num_rows * seq_len - (hi - lo)
    entry = {"path": f"shards/{spec.name}", "split": spec.split, "first_row": spec.first_row, "rows": info.rows,
             "tokens": info.rows * seq_len, "padding_tokens": padding, "bytes": info.bytes, "sha256": info.sha256,
             "index": f"shards/{info.index}"}
    done = {"entry": entry, "retries": retry_counts()}
    write_record(layout.shards_done, task, done)
    return done
