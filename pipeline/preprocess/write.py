"""The shard phase: cut each split's token stream into shards (planning), and the task that writes one shard."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline import storage
from pipeline.preprocess.config import canonical_json
from pipeline.preprocess.faults import maybe_fault
from pipeline.preprocess.layout import Layout


@dataclass(frozen=True)
class ShardSpec:
    split: str
    index: int
    first_row: int
    num_rows: int
    total_tokens: int  # valid tokens of the whole split stream
    pieces: tuple[tuple[int, int, int], ...]  # (unit, offset of the unit's stream in the split stream, its tokens)

    @property
    def name(self) -> str:
        from pipeline.shards import shard_name

        return shard_name(self.split, self.index)


def plan_shards(split: str, unit_tokens: list[tuple[int, int]], seq_len: int, rows_per_shard: int,
                last_row: str) -> tuple[list[ShardSpec], int, int, int]:
    """Cut a split's stream (the units' streams in unit order: (unit, tokens)) into shards of rows_per_shard rows.
    Returns (specs, rows, padding_tokens, dropped_tokens)."""
    from pipeline.packing import count_rows

    offsets, pos = [], 0
    for unit, n in unit_tokens:
        if n:
            offsets.append((unit, pos, n))
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


def write_shard_task(output: str, spec: ShardSpec, seq_len: int, pad_id: int) -> dict:
    """Write one shard from the stream slices and stats of the units it covers; then its done-marker."""
    from pipeline import shards, stats
    from pipeline.packing import TOKEN_DTYPE, ImageRef, rows_in_range

    layout = Layout(output)
    lo = spec.first_row * seq_len
    hi = min((spec.first_row + spec.num_rows) * seq_len, spec.total_tokens)
    parts, images = [], []
    for unit, offset, n in spec.pieces:
        a, b = max(lo, offset) - offset, min(hi, offset + n) - offset
        with storage.open_read(layout.stream(unit, spec.split)) as f:
            f.seek(2 * a)
            chunk = f.read(2 * (b - a))
        if len(chunk) != 2 * (b - a):
            raise RuntimeError(f"unit {unit} {spec.split} stream is shorter than its done-marker says")
        parts.append(np.frombuffer(chunk, dtype=TOKEN_DTYPE))
        table = stats.read(layout.stats(unit), columns=["id", "status", "split", "tokens"]).to_pylist()
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
             "tokens": info.rows * seq_len, "padding_tokens": padding, "bytes": info.bytes, "sha256": info.sha256}
    storage.write_bytes(layout.shard_done(spec.name), canonical_json(entry))
    return entry

