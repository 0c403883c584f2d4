"""Packing images into training rows, as in the paper: each image is BOS + tokens + EOS, the images of a split are
concatenated in a fixed order into one stream, and the stream is cut into rows of exactly seq_len tokens (an image
may continue into the next row or rows). Only the very last row of a split can be partial: it is padded with EOS
(and masked by `valid_tokens`) or dropped, per `last_row`.

These are plain functions over arrays: each shuffle bucket writes its split streams (pipeline/preprocess/shuffle.py),
the shard writer cuts any range of rows out of the concatenation of those streams with `rows_in_range`, and `pack`
is the whole thing in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

TOKEN_DTYPE = np.dtype("<u2")  # uint16, little endian: vocab 320 (anything < 65,536) fits
LAST_ROW_POLICIES = ("pad", "drop")


@dataclass(frozen=True)
class Span:
    """The part of one image inside one row: tokens [start, end) of the row. `bos`/`eos`: whether the span holds
    the image's BOS / EOS token (False when the image started in an earlier row / continues in the next)."""

    id: str
    start: int
    end: int
    bos: bool
    eos: bool

    def to_json(self) -> dict:
        return {"id": self.id, "start": self.start, "end": self.end, "bos": self.bos, "eos": self.eos}


@dataclass(frozen=True)
class Row:
    index: int  # row number within its split, dense from 0
    tokens: np.ndarray  # exactly seq_len tokens, TOKEN_DTYPE
    valid_tokens: int  # seq_len except in a padded last row
    spans: tuple[Span, ...]


@dataclass(frozen=True)
class ImageRef:
    """An image in a split's stream: id, offset of its BOS in the stream, and length with BOS and EOS."""

    id: str
    offset: int
    length: int


def image_sequence(tokens: Sequence[int] | np.ndarray, bos_id: int, eos_id: int) -> np.ndarray:
    """BOS + tokens + EOS as a TOKEN_DTYPE array."""
    out = np.empty(len(tokens) + 2, dtype=TOKEN_DTYPE)
    out[0] = bos_id
    out[1:-1] = tokens
    out[-1] = eos_id
    return out


def count_rows(total_tokens: int, seq_len: int, last_row: str = "pad") -> tuple[int, int, int]:
    """(rows, padding_tokens, dropped_tokens) for a stream of total_tokens."""
    if last_row not in LAST_ROW_POLICIES:
        raise ValueError(f"last_row must be one of {LAST_ROW_POLICIES}, not {last_row!r}")
    full, rest = divmod(total_tokens, seq_len)
    if rest == 0:
        return full, 0, 0
    if last_row == "pad":
        return full + 1, seq_len - rest, 0
    return full, 0, rest


def row_spans(images: Sequence[ImageRef], row_start: int, row_end: int, first: int = 0) -> tuple[Span, ...]:
    """Spans of the images overlapping stream positions [row_start, row_end), relative to row_start.
    `images` must be sorted by offset and may contain images outside the range; the search starts at index
    `first` (any image before it must end at or before row_start)."""
    spans = []
    for k in range(first, len(images)):
        im = images[k]
        im_end = im.offset + im.length
        if im.offset >= row_end:
            break
        if im_end <= row_start:
            continue
        spans.append(
            Span(
                id=im.id,
                start=max(im.offset, row_start) - row_start,
                end=min(im_end, row_end) - row_start,
                bos=im.offset >= row_start,
                eos=im_end <= row_end,
            )
        )
    return tuple(spans)


def rows_in_range(
    stream: np.ndarray,
    stream_offset: int,
    images: Sequence[ImageRef],
    first_row: int,
    num_rows: int,
    seq_len: int,
    total_tokens: int,
    pad_id: int,
) -> Iterator[Row]:
    """Rows first_row .. first_row+num_rows-1 of a split whose whole stream has total_tokens tokens.

    `stream` holds the stream's tokens from position `stream_offset` on, covering at least the valid part of those
    rows; `images` the images overlapping them (sorted by offset). The last row of the split is padded with pad_id.
    """
    first = 0  # rows only move forward: skip the images that ended before the current row
    for r in range(first_row, first_row + num_rows):
        start, end = r * seq_len, min((r + 1) * seq_len, total_tokens)
        while first < len(images) and images[first].offset + images[first].length <= start:
            first += 1
        if start >= total_tokens:
            raise ValueError(f"row {r} starts at {start}, past the end of the stream ({total_tokens} tokens)")
        valid = end - start
        tokens = np.full(seq_len, pad_id, dtype=TOKEN_DTYPE)
        piece = stream[start - stream_offset : end - stream_offset]
        if len(piece) != valid:
            raise ValueError(f"row {r} needs stream tokens [{start}, {end}) but the given slice is too short")
        tokens[:valid] = piece
        yield Row(index=r, tokens=tokens, valid_tokens=valid, spans=row_spans(images, start, end, first))


def pack(
    images: Iterable[tuple[str, Sequence[int] | np.ndarray]],
    seq_len: int,
    bos_id: int,
    eos_id: int,
    last_row: str = "pad",
) -> list[Row]:
    """All rows of one split, in memory: images = (id, body tokens) in stream order."""
    refs, parts, offset = [], [], 0
    for image_id, tokens in images:
        seq = image_sequence(tokens, bos_id, eos_id)
        refs.append(ImageRef(image_id, offset, len(seq)))
        parts.append(seq)
        offset += len(seq)
    stream = np.concatenate(parts) if parts else np.empty(0, dtype=TOKEN_DTYPE)
    rows, _, _ = count_rows(offset, seq_len, last_row)
    return list(rows_in_range(stream, 0, refs, 0, rows, seq_len, offset, eos_id))


def image_tokens(rows: Iterable[tuple[np.ndarray, Sequence[dict]]], image_id: str) -> np.ndarray | None:
    """Reassemble one image's body tokens (without BOS/EOS) from rows given in split order as (tokens, spans as
    JSON dicts). Returns None if the image is not there; raises if its pieces are not contiguous and complete."""
    pieces: list[np.ndarray] = []
    for tokens, spans in rows:
        for span in spans:
            if span["id"] != image_id:
                continue
            if span["bos"] != (not pieces):
                raise ValueError(f"image {image_id!r}: pieces out of order "
                                 f"(bos={span['bos']} after {len(pieces)} pieces)")
            pieces.append(np.asarray(tokens[span["start"] : span["end"]]))
            if span["eos"]:
                seq = np.concatenate(pieces)
                return seq[1:-1]
    if pieces:
        raise ValueError(f"image {image_id!r}: its EOS is missing (stream cut after {len(pieces)} pieces)")
    return None
