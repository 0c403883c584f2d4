"""The encode phase's task: read one work unit, canonicalize and tokenize its images, write its split streams and
per-image stats, then its done-marker."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np

from pipeline import storage
from pipeline.preprocess.config import SPLITS, canonical_json
from pipeline.preprocess.faults import maybe_fault
from pipeline.preprocess.layout import Layout

log = logging.getLogger(__name__)


def split_of(image_id: str, val_fraction: float) -> str:
    """validation iff the first 8 bytes of sha256(id), as a fraction of 2**64, fall below val_fraction."""
    h = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big")
    return "validation" if h < val_fraction * 2**64 else "train"




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
                                        min_side=config["min_side"])


def encode_unit_task(output: str, index: int, config: dict, fingerprint: str) -> dict:
    """Read, canonicalize and tokenize one unit; write its split streams, its stats, then its done-marker.
    Returns the done-marker's content (counts only)."""
    from pipeline import codec, sources, stats
    from pipeline.packing import TOKEN_DTYPE, image_sequence

    layout = Layout(output)
    maybe_fault(layout, "encode", index)
    start = time.perf_counter()
    unit = json.loads(storage.read_bytes(layout.unit(index)))
    tok = _tokenizer(layout, fingerprint)
    records: list[stats.ImageStat] = []
    ok: list[tuple[stats.ImageStat, bytes]] = []
    for src in sources.read_unit(unit):
        rec = stats.ImageStat(id=src.id, source=src.source, status=stats.READ_ERROR, message=src.error)
        records.append(rec)
        if src.data is None:
            continue
        rec.source_bytes = len(src.data)
        try:
            img = canonicalize(src.data, config)
        except codec.CodecError as e:
            rec.status, rec.message = e.reason, e.message
            continue
        except Exception as e:  # noqa: BLE001 - one image must never fail the job; the codec should not get here
            log.warning("unexpected codec failure on %s: %s: %s", src.id, type(e).__name__, e)
            rec.status, rec.message = stats.INTERNAL_ERROR, f"{type(e).__name__}: {e}"
            continue
        rec.status, rec.message = stats.OK, ""
        rec.source_format, rec.source_width, rec.source_height = img.source_format, img.source_width, img.source_height
        rec.jpeg_bytes, rec.split = len(img.body), split_of(src.id, config["val_fraction"])
        ok.append((rec, img.body))
    token_lists = tok.encode_batch([body for _, body in ok], num_threads=1) if ok else []
    streams: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for (rec, _), ids in zip(ok, token_lists):
        rec.tokens = len(ids)
        streams[rec.split].append(image_sequence(ids, tok.bos_id, tok.eos_id))
    for split in SPLITS:
        parts = streams[split]
        data = np.concatenate(parts).astype(TOKEN_DTYPE, copy=False).tobytes() if parts else b""
        storage.write_bytes(layout.stream(index, split), data)
    stats.write(layout.stats(index), records)
    counts = stats.Counts.of(records)
    done = {"unit": index, "counts": counts.to_json(), "seconds": round(time.perf_counter() - start, 3)}
    storage.write_bytes(layout.encoded_done(index), canonical_json(done))
    return done
