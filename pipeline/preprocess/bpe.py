"""The tokenizer phase's tasks: canonicalize a unit's share of the BPE sample, then fit BPE on all of it."""

from __future__ import annotations

import io
import json
import struct
from typing import Iterator

from pipeline import storage
from pipeline.preprocess.config import pretty_json
from pipeline.preprocess.encode import canonicalize
from pipeline.preprocess.faults import maybe_fault
from pipeline.preprocess.layout import Layout
from pipeline.preprocess.plan import sample_positions, unit_size

SAMPLE_BODY_BYTES = 16 * 2**10  # a 256 px canonical body is ~5 KB; with headroom
FIT_BYTES_PER_IMAGE = 128 * 2**10  # SentencePiece's trainer: ~3 UTF-8 bytes per body byte, times its tables


def sample_memory(take: int, image_size: int) -> int:
    """Data a BPE sample task holds: the bodies of its share of the sample."""
    return int(take * SAMPLE_BODY_BYTES * max(1.0, (image_size / 256) ** 2))


def fit_memory(bpe_sample: int, image_size: int) -> int:
    """Data the BPE fit holds: every sample body as SentencePiece text, and its trainer's state."""
    return int(bpe_sample * FIT_BYTES_PER_IMAGE * max(1.0, (image_size / 256) ** 2))


def bpe_sample_task(output: str, index: int, take: int, config: dict) -> int:
    """Canonicalize this unit's share of the BPE sample into _work/bpe/NNNNNN.bin; returns how many bodies."""
    from pipeline import codec, sources

    layout = Layout(output)
    maybe_fault(layout, "bpe", index)
    unit = json.loads(storage.read_bytes(layout.unit(index)))
    chosen = sample_positions(unit_size(unit), take)
    positions = range(chosen) if isinstance(chosen, int) else chosen  # a tar: its first `take` images
    out = io.BytesIO()
    count = 0
    for src in sources.read_unit(unit, positions):  # reads only the chosen images
        if src.data is None:
            continue
        try:
            body = canonicalize(src.data, config).body
        except codec.CodecError:
            continue  # bad images are counted by the encode phase; the sample just has one less
        out.write(struct.pack("<I", len(body)))
        out.write(body)
        count += 1
    storage.write_bytes(layout.bpe_bodies(index), out.getvalue())
    return count


def read_bodies(data: bytes) -> Iterator[bytes]:
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        yield data[pos + 4 : pos + 4 + n]
        pos += 4 + n


def fit_tokenizer_task(output: str, unit_indices: list[int], vocab_size: int) -> dict:
    """Fit BPE on the sample bodies (in unit order) and write tokenizer.model + tokenizer.json."""
    from pipeline.tokenizer import Tokenizer

    layout = Layout(output)
    counted = {"images": 0}

    def bodies() -> Iterator[bytes]:
        for i in unit_indices:
            for body in read_bodies(storage.read_bytes(layout.bpe_bodies(i))):
                counted["images"] += 1
                yield body

    tok = Tokenizer.train(bodies(), vocab_size=vocab_size)
    tok.save(layout.tokenizer_model)
    meta = {**tok.metadata(), "source": "fitted", "sample_images": counted["images"], "sample_units": len(unit_indices)}
    storage.write_bytes(layout.tokenizer_json, pretty_json(meta))
    return meta

