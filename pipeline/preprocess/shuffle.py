"""Content-addressed split, exact dedup and the write-time shuffle, designed together.

Every ok image is known by its body hash h = sha256(canonical body):
- split: validation iff the first 8 bytes of h, as a fraction of 2**64, are below --val-fraction. No seed and no
  id: an image keeps its split when inputs are added or renamed, and identical images share a side.
- order key k = sha256(seed as 8 bytes || h); bucket = floor(first 8 bytes of k * R / 2**64), R buckets fixed by
  the plan (about --images-per-bucket images each).
- encode (encode.py) writes one file per unit with its ok images grouped by bucket (UNIT_RECORD below), and the
  bucket offsets in its done record; the driver gathers those into a bucket-major index per chunk of units.
- one task per bucket reads its slice of every unit's file (ranged reads), orders its images by (k, h, unit,
  position), keeps the first image of each h and counts the others `duplicate` (same h means same k and same
  bucket, so dedup is local to a bucket and keeps the first in listing order), and writes the bucket's split
  streams and its stats.
Buckets cover consecutive ranges of k, so the buckets' streams in bucket order are the images sorted by k: the
packed stream of a split is a pure function of (the images' content, seed), whatever the listing order, the
number of buckets or workers. A bucket larger than its memory budget (tars hold more images than the plan guessed)
is read in several passes over sub-ranges of k: the same bytes, bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from pipeline import storage
from pipeline.preprocess.faults import maybe_fault
from pipeline.preprocess.layout import Layout
from pipeline.preprocess.neardup import active as near_active
from pipeline.preprocess.neardup import load_drops
from pipeline.preprocess.ranged import read_ranges
from pipeline.preprocess.results import retry_counts, write_record

# One record per ok image in a unit's file: body sha256, position in the unit, meta JSON length, token count;
# then the meta JSON (id, source, source_bytes, source_format, source_width, source_height, jpeg_bytes, phash) and the
# body's tokens (uint16 little endian, without BOS/EOS).
UNIT_RECORD = struct.Struct("<32sIII")
INDEX_DTYPE = np.dtype("<u8")
SPLIT_PREFIX_BYTES = 8
READ_BATCH = 256  # slices read (concurrently) at a time by a bucket task


def body_split(body_sha256: bytes, val_fraction: float) -> str:
    """validation iff the first 8 bytes of sha256(body), as a fraction of 2**64, fall below val_fraction."""
    h = int.from_bytes(body_sha256[:SPLIT_PREFIX_BYTES], "big")
    return "validation" if h < val_fraction * 2**64 else "train"


def order_key(body_sha256: bytes, seed: int) -> bytes:
    return hashlib.sha256(seed.to_bytes(8, "big") + body_sha256).digest()


def bucket_of(key: bytes, buckets: int) -> int:
    return (int.from_bytes(key[:8], "big") * buckets) >> 64


def adjacency(groups: list) -> tuple[float, float]:
    """How well a stream is shuffled: (fraction of adjacent images from the same group, e.g. the same class folder;
    the same fraction expected of a uniformly random order: sum n_g (n_g - 1) / (N (N - 1)))."""
    n = len(groups)
    if n < 2:
        return 0.0, 0.0
    same = sum(a == b for a, b in zip(groups, groups[1:])) / (n - 1)
    sizes = Counter(groups).values()
    return same, sum(k * (k - 1) for k in sizes) / (n * (n - 1))


# -- a unit's file (written by the encode task) ------------------------------------------------------------------


def unit_record(body_sha256: bytes, position: int, meta: dict, tokens: np.ndarray) -> bytes:
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return (UNIT_RECORD.pack(body_sha256, position, len(meta_bytes), len(tokens)) + meta_bytes
            + np.asarray(tokens, dtype="<u2").tobytes())


def group_by_bucket(records: list[tuple[int, bytes]], buckets: int) -> tuple[bytes, list[int]]:
    """(bucket, record) pairs in unit order -> (the unit's file: records grouped by bucket, each group in unit
    order; offsets: R + 1 byte offsets, bucket b is bytes [offsets[b], offsets[b + 1]))."""
    by_bucket: list[list[bytes]] = [[] for _ in range(buckets)]
    for b, rec in records:
        by_bucket[b].append(rec)
    offsets, pos = [0], 0
    for group in by_bucket:
        pos += sum(len(r) for r in group)
        offsets.append(pos)
    return b"".join(r for group in by_bucket for r in group), offsets


@dataclass
class Image:
    unit: int
    position: int
    body_sha256: bytes
    meta: dict
    tokens: np.ndarray  # a view into the slice read


def decode_records(data: bytes, unit: int) -> Iterator[Image]:
    pos = 0
    view = memoryview(data)
    while pos < len(data):
        sha, position, meta_len, n = UNIT_RECORD.unpack_from(data, pos)
        pos += UNIT_RECORD.size
        meta = json.loads(bytes(view[pos : pos + meta_len]))
        pos += meta_len
        tokens = np.frombuffer(data, dtype="<u2", count=n, offset=pos)
        pos += 2 * n
        yield Image(unit, position, sha, meta, tokens)


# -- the bucket index (written by the driver, read by bucket tasks) ----------------------------------------------


def write_bucket_index(layout: Layout, first_unit: int, records: list[dict]) -> None:
    """The bucket offsets of units first_unit.. (their done records, in unit order), bucket-major, so that a
    bucket task reads its two rows of a chunk of units in one ranged read."""
    matrix = np.array([r["bucket_offsets"] for r in records], dtype=INDEX_DTYPE).T
    storage.write_bytes(layout.bucket_index(first_unit), np.ascontiguousarray(matrix).tobytes())


def bucket_slices(layout: Layout, bucket: int, units: int, chunk: int) -> list[tuple[int, int, int]]:
    """(unit, start, end) of every unit's non-empty slice of this bucket, in unit order."""
    firsts = list(range(0, units, chunk))
    width = [min(chunk, units - f) for f in firsts]
    rows = read_ranges([(layout.bucket_index(f), bucket * w * 8, (bucket + 2) * w * 8) for f, w in zip(firsts, width)])
    out = []
    for f, w, data in zip(firsts, width, rows):
        starts, ends = np.frombuffer(data, dtype=INDEX_DTYPE).reshape(2, w)
        out += [(f + j, int(s), int(e)) for j, (s, e) in enumerate(zip(starts, ends)) if e > s]
    return out


# -- the bucket task ---------------------------------------------------------------------------------------------


def bucket_memory(pass_bytes: int) -> int:
    """Data a bucket task holds: one pass's slices (tokens are views into them) plus its sort keys and stats rows
    (the bucket's stats file is written pass by pass, one row group of rows held at a time)."""
    return 2 * pass_bytes


def shuffle_bucket_task(output: str, bucket: int, buckets: int, units: int, chunk: int, config: dict,
                        bos_id: int, eos_id: int, pass_bytes: int) -> dict:
    """Dedup and order one bucket's images; write its split streams, its stats, then its done record."""
    from pipeline import stats
    from pipeline.packing import image_sequence

    layout = Layout(output)
    maybe_fault(layout, "bucket", bucket)
    retry_counts()  # drop what an earlier task of this worker process left uncounted
    start = time.perf_counter()
    slices = bucket_slices(layout, bucket, units, chunk)
    passes = max(1, math.ceil(sum(e - s for _, s, e in slices) / max(1, pass_bytes)))
    dedup, seed, val_fraction = config["dedup"] in ("exact", "near"), config["seed"], config["val_fraction"]
    drops = load_drops(layout, bucket) if near_active(config) else {}  # near_duplicate / excluded (neardup.py)
    with storage.atomic_writer(layout.bucket_stream(bucket, "train")) as train, \
            storage.atomic_writer(layout.bucket_stream(bucket, "validation")) as validation, \
            storage.atomic_writer(layout.bucket_stats(bucket)) as stats_file, \
            stats.StatsWriter(stats_file) as rows:  # fixed-size row groups: bytes independent of the passes
        streams = {"train": train, "validation": validation}
        for p in range(passes):
            keyed = []
            for im in _read_images(layout, slices, copy=passes > 1):
                key = order_key(im.body_sha256, seed)
                if passes == 1 or (int.from_bytes(key[:8], "big") * buckets * passes >> 64) - bucket * passes == p:
                    keyed.append((key, im.body_sha256, im.unit, im.position, im))
            keyed.sort(key=lambda t: t[:4])
            kept_sha, kept_id = None, None
            for _, sha, _, _, im in keyed:
                rec = stats.ImageStat(id=im.meta["id"], source=im.meta["source"], status=stats.OK,
                                      source_bytes=im.meta["source_bytes"], source_format=im.meta["source_format"],
                                      source_width=im.meta["source_width"], source_height=im.meta["source_height"],
                                      jpeg_bytes=im.meta["jpeg_bytes"], tokens=len(im.tokens), body_sha256=sha.hex(),
                                      phash=im.meta.get("phash"))
                drop = drops.get((im.unit, im.position))
                if drop is not None:
                    rec.status, of = drop
                    if rec.status == stats.EXCLUDED:
                        rec.excluded_by, rec.message = of, f"matches the excluded image {of}"
                    else:
                        rec.duplicate_of, rec.message = of, f"near-copy of {of}"
                elif dedup and sha == kept_sha:
                    rec.status, rec.duplicate_of = stats.DUPLICATE, kept_id
                    rec.message = f"same canonical image as {kept_id}"
                else:
                    kept_sha, kept_id = sha, rec.id
                    rec.split = body_split(sha, val_fraction)
                    streams[rec.split].write(image_sequence(im.tokens, bos_id, eos_id).tobytes())
                rows.add(rec)
            del keyed
    record = {"bucket": bucket, "counts": rows.counts.to_json(), "passes": passes,
              "seconds": round(time.perf_counter() - start, 3), "retries": retry_counts()}
    write_record(layout.buckets_done, bucket, record)
    return record


def _read_images(layout: Layout, slices: list[tuple[int, int, int]], copy: bool) -> Iterator[Image]:
    """The images of the slices, read READ_BATCH slices at a time; copy=True detaches each image's tokens from
    its slice, so that a pass that keeps a few images does not keep every slice alive."""
    for b in range(0, len(slices), READ_BATCH):
        batch = slices[b : b + READ_BATCH]
        for (unit, _, _), data in zip(batch, read_ranges([(layout.encoded(u), s, e) for u, s, e in batch])):
            for im in decode_records(data, unit):
                if copy:
                    im.tokens = im.tokens.copy()
                yield im

