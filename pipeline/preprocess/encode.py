"""The encode phase's task: read one work unit, canonicalize and tokenize its images, and write

- `_work/encoded/NNNNNN.bin`: its ok images grouped by shuffle bucket (shuffle.py), with their body hash, stats
  and tokens;
- `_work/encoded/NNNNNN.hashes.parquet`: position, pHash, body sha256 and id of its ok images, and (with --dedup near
  or --exclude) `NNNNNN.bands.u64`: their pHashes grouped by band and slot, for the near-duplicate phase (neardup.py);
- `stats/unit-NNNNNN.parquet`: its images that could not be used, and why;
- then its done record (results.py): counts, the bucket offsets of its file, an example per failure reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np

from pipeline import storage
from pipeline.phash import phash_body
from pipeline.preprocess.faults import maybe_fault
from pipeline.preprocess.layout import Layout
from pipeline.preprocess.neardup import write_hashes
from pipeline.preprocess.results import retry_counts, write_record
from pipeline.preprocess.shuffle import bucket_of, group_by_bucket, order_key, unit_record

log = logging.getLogger(__name__)

TOKENIZE_BATCH = 256  # bodies tokenized at once: bounds the Python lists SentencePiece returns
ENCODED_IMAGE_BYTES = 16 * 2**10  # a unit's file holds ~9 KB per 256 px image (tokens + meta); with headroom
TAR_IMAGES_ESTIMATE = 10_000  # img2dataset's default images per tar: a tar unit's size is known only once read

_TOKENIZERS: dict = {}


def _tokenizer(layout: Layout, fingerprint: str):
    """The output's tokenizer, loaded once per worker process (keyed by fingerprint: workers outlive jobs)."""
    from pipeline.tokenizer import Tokenizer

    tok = _TOKENIZERS.get(fingerprint)
    if tok is None:
        tok = Tokenizer.load(layout.tokenizer_model)
        if tok.fingerprint != fingerprint:
            raise RuntimeError(f"{layout.tokenizer_model} changed during the job (fingerprint {tok.fingerprint[:12]}, "
                               f"expected {fingerprint[:12]})")
        _TOKENIZERS[fingerprint] = tok
    return tok


def canonicalize(data: bytes, config: dict):
    from pipeline import codec

    c = config["codec"]
    return codec.canonicalize_with_info(data, c["size"], c["quality"], max_pixels=config["max_pixels"],
                                        min_side=config["min_side"],
                                        max_aspect_ratio=config.get("max_aspect_ratio", 0))


def encode_memory(unit_images: int | None, image_size: int, source_bytes: int = 0) -> int:
    """Data an encode task holds: its unit's encoded file (tokens grow with the image's area), plus the source
    bytes its reader holds at once (a Parquet column of image bytes: the unit's images, sources "source_bytes")."""
    n = TAR_IMAGES_ESTIMATE if unit_images is None else unit_images
    return int(n * ENCODED_IMAGE_BYTES * max(1.0, (image_size / 256) ** 2)) + source_bytes


def encode_unit_task(output: str, index: int, config: dict, fingerprint: str, buckets: int) -> dict:
    """Read, canonicalize and tokenize one unit; write its file, its failures' stats, then its done record.
    Returns the done record (counts and offsets only)."""
    from pipeline import codec, sources, stats

    layout = Layout(output)
    maybe_fault(layout, "encode", index)
    retry_counts()  # drop what an earlier task of this worker process left uncounted
    start = time.perf_counter()
    unit = json.loads(storage.read_bytes(layout.unit(index)))
    tok = _tokenizer(layout, fingerprint)
    failed: list[stats.ImageStat] = []
    examples: dict[str, list[str]] = {}  # reason -> [id, message] of its first image in this unit
    records: list[tuple[int, bytes]] = []  # (bucket, unit_record) in unit order
    hashes: list[tuple[int, int, bytes, str, int]] = []  # (position, phash, body sha256, id, bucket) in unit order
    batch: list[tuple[int, dict, bytes]] = []  # (position, meta, body) waiting to be tokenized
    images = 0

    def flush():
        for (position, meta, body), ids in zip(batch, tok.encode_batch([b for _, _, b in batch], num_threads=1)):
            sha = hashlib.sha256(body).digest()
            tokens = np.asarray(ids, dtype="<u2")
            meta["phash"] = phash_body(body, config["codec"]["quality"])
            bucket = bucket_of(order_key(sha, config["seed"]), buckets)
            hashes.append((position, meta["phash"], sha, meta["id"], bucket))
            records.append((bucket, unit_record(sha, position, meta, tokens)))
        batch.clear()

    for position, src in enumerate(sources.read_unit(unit)):
        images += 1
        rec = stats.ImageStat(id=src.id, source=src.source, status=stats.READ_ERROR, message=src.error)
        if src.data is not None:
            rec.source_bytes = len(src.data)
            try:
                img = canonicalize(src.data, config)
                meta = {"id": src.id, "source": src.source, "source_bytes": len(src.data),
                        "source_format": img.source_format, "source_width": img.source_width,
                        "source_height": img.source_height, "jpeg_bytes": len(img.body)}
                batch.append((position, meta, img.body))
                if len(batch) == TOKENIZE_BATCH:
                    flush()
                continue
            except codec.CodecError as e:
                rec.status, rec.message = e.reason, e.message
            except Exception as e:  # noqa: BLE001 - one image must never fail the job; the codec should not get here
                log.warning("unexpected codec failure on %s: %s: %s", src.id, type(e).__name__, e)
                rec.status, rec.message = stats.INTERNAL_ERROR, f"{type(e).__name__}: {e}"
        failed.append(rec)
        examples.setdefault(rec.status, [rec.id, rec.message])
    flush()
    data, offsets = group_by_bucket(records, buckets)
    storage.write_bytes(layout.encoded(index), data)
    # near_radius is in the config exactly when the near-duplicate phase runs (config.py)
    write_hashes(layout.unit_hashes(index), layout.unit_bands(index), hashes, config.get("near_radius"))
    stats.write(layout.unit_stats(index), failed)
    done = {"unit": index, "images": images, "ok": len(records), "encoded_bytes": len(data),
            "counts": stats.Counts.of(failed).to_json(), "examples": examples, "bucket_offsets": offsets,
            "seconds": round(time.perf_counter() - start, 3), "retries": retry_counts()}
    write_record(layout.encoded_done, index, done)
    return done
