"""Model output -> a JPEG file any decoder opens, how much of the image it holds; and completion prompts.

    r = repair_report(generated, size=256)   # Repaired: r.jpeg, r.complete, r.mcus / r.mcus_total, what was fixed
    jpeg = repair(generated)                 # r.jpeg
    image, complete = decode_tolerant(generated)
    prefix = prompt_prefix(body, 0.375)      # the body cut after its top whole MCU rows (the paper's prompt)

What repair keeps. A model writes the canonical header (constant for a size and quality) and then entropy-coded
data in which a restart marker closes every MCU; a decoder resynchronizes at each marker, so damage stays inside
the MCU where it happened. Repair therefore keeps every byte that can still be decoded:
- the first SOI..EOI span (junk before SOI and after EOI is dropped; a lost SOI is added);
- the header if libjpeg can decode it with the standard tables; otherwise the canonical size x size header, and
  the entropy data starts right after the model's own SOS segment (found by its bytes when a bogus segment length
  or marker hides it), else where the header stopped making sense: different garbage still gives different images;
- in the entropy data, a marker a decoder would stop at (anything but RST, EOI and stuffed FF 00) is dropped and
  the data after it kept; restart markers are renumbered in sequence (the k-th closes MCU k whatever number the
  model gave it); markers beyond the frame's last MCU end the data; a dangling 0xFF is dropped;
- the MCUs a cut stream lacks are written as flat grey blocks (4 bytes each in the standard Huffman tables, each
  followed by its restart marker), so they decode cleanly; EOI is appended, and the tables are spliced after SOI
  unless they are there already. repair(repair(x)) == repair(x); repair(assemble(body)) ==
assemble(body).

Completeness. `complete` means nothing had to be fixed: SOI, a decodable header, every restart marker in order,
no foreign marker, EOI. `mcus` counts the MCUs whose data is all there (closed by a restart marker or EOI).

Prompts. `prompt_prefix` cuts a body after whole MCU rows: rows = floor(ratio x MCU rows), at least one and fewer
than all; at 256x256 (16 MCU rows) the paper's ratios 0.25 / 0.375 / 0.5 give 4 / 6 / 8 rows, the cut after its
n-th FF D7 marker, n = int(32 x ratio), exactly as the paper's. Any restart marker counts (at 64x64 an MCU row is
4 MCUs, so a row does not end on FF D7).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

from PIL import Image

from pipeline.codec import (
    EOI,
    QUALITY,
    RST_MARKERS,
    SIZE,
    SOI,
    CodecError,
    Header,
    canonical_header,
    decodable_with_default_tables,
    parse_header,
    tables,
)

_RST_RE = re.compile(rb"\xff[\xd0-\xd7]")


@dataclass(frozen=True)
class Repaired:
    jpeg: bytes  # a well-formed JPEG file
    complete: bool  # nothing had to be fixed (see the module docstring)
    mcus: int  # MCUs whose entropy-coded data is all there
    mcus_total: int  # MCUs of the frame
    header_replaced: bool  # the model's header was unusable and the canonical one stands in
    markers_dropped: int  # foreign markers removed from the entropy data
    restarts_renumbered: int  # restart markers out of sequence, renumbered

    @property
    def mcu_fraction(self) -> float:
        return self.mcus / self.mcus_total if self.mcus_total else 0.0


def mcu_grid(h: Header) -> tuple[int, int]:
    """(MCUs per row, MCU rows) of a frame: 16x16-pixel MCUs for 4:2:0 colour, 8x8 for a single component."""
    hmax = max(c[1] for c in h.components)
    vmax = max(c[2] for c in h.components)
    if len(h.components) == 1:
        hmax = vmax = 1  # a single-component scan is not interleaved: one MCU per 8x8 block
    return -(-h.width // (8 * hmax)), -(-h.height // (8 * vmax))


def repair(generated: bytes, quality: int = QUALITY, size: int = SIZE) -> bytes:
    """Model output -> a well-formed JPEG file that any decoder opens (see the module docstring)."""
    return repair_report(generated, quality, size).jpeg


def repair_report(data: bytes, quality: int = QUALITY, size: int = SIZE) -> Repaired:
    """Repair model output (or a body, or a JPEG file) and say what was kept. `size` is the canonical image size,
    used when the header has to be replaced."""
    soi = data.find(SOI)
    has_soi = soi >= 0
    if not has_soi:
        data, soi = SOI + data, 0  # SOI lost: the rest may still be a header
    header = parse_header(data, soi)
    replaced = not (header.status == "ok" and decodable_with_default_tables(header))
    if replaced:
        head = canonical_header(size, quality)
        scan_start = _scan_start_after_bad_header(data, soi, header, head)
        header = parse_header(head, 0)
    else:
        head, scan_start = data[soi : header.scan_start], header.scan_start
    per_row, rows = mcu_grid(header)
    total, interval = per_row * rows, header.restart_interval
    expected = -(-total // interval) - 1 if interval else None
    scan, found_eoi, restarts, dropped, renumbered, overflow = _clean_scan(data, scan_start, expected)
    if interval:
        mcus = min(total, (restarts + (found_eoi or overflow)) * interval)  # the last MCU closed too
    else:
        mcus = total if found_eoi else 0  # no restart markers: nothing tells where the data stopped
    complete = (has_soi and not replaced and found_eoi and (expected is None or restarts == expected)
                and not dropped and not renumbered and not overflow)
    if not found_eoi and not overflow and interval == 1 and _standard_420(header):
        scan += _flat_fill(scan, restarts, total)
    table_segments = tables(quality)[2:-2]
    if not head[2:].startswith(table_segments):  # already there when the input came from assemble() or repair()
        head = SOI + table_segments + head[2:]  # tables of the stream's own, if any, come later and take precedence
    return Repaired(head + scan + EOI, complete, mcus, total, replaced, dropped, renumbered)


def _scan_start_after_bad_header(data: bytes, soi: int, header: Header, canonical: bytes) -> int:
    if header.status == "ok":  # a whole header libjpeg would refuse: the model's scan follows its SOS
        return header.scan_start
    # A bogus length or marker made the walk stop early; the model's SOS segment is usually still there.
    sos = canonical[canonical.rindex(b"\xff\xda") :]
    i = data.find(sos, soi)
    return i + len(sos) if i >= 0 else header.scan_start


# One MCU of 4:2:0 data in which every block is flat mid-grey, in the standard Huffman tables (JPEG Annex K, which
# `tables()` holds): per luminance block DC difference 0 ('00') and end-of-block ('1010'), per chroma block '00'
# and '00': 4 x 6 + 2 x 4 = 32 bits. With a restart after every MCU the DC predictor starts at 0, i.e. grey 128.
_FLAT_MCU = bytes([0x28, 0xA2, 0x8A, 0x00])


def _standard_420(h: Header) -> bool:
    """A header like the canonical one: Y 2x2 + Cb, Cr 1x1 with the spliced standard Huffman tables."""
    return ([c[:3] for c in h.components] == [(1, 2, 2), (2, 1, 1), (3, 1, 1)] and not h.dc_tables
            and not h.ac_tables and [c[1:] for c in h.scan_components] == [(0, 0), (1, 1), (1, 1)])


def _flat_fill(scan: bytes, restarts: int, total: int) -> bytes:
    """Entropy data for the MCUs a cut stream lacks, each flat grey, so that they decode cleanly (a decoder would
    otherwise read the missing bits as zeros: a checkered block, then nothing). A partial last MCU is closed by a
    restart marker first (its missing blocks still decode as zeros)."""
    out = bytearray()
    ended_on_marker = not scan or _RST_RE.fullmatch(scan[-2:]) is not None
    if not ended_on_marker:  # the partial MCU ends here
        if restarts >= total - 1:
            return b""  # it is the last one: EOI closes it
        out += bytes([0xFF, 0xD0 + restarts % 8])
        restarts += 1
    for k in range(restarts, total):
        out += _FLAT_MCU
        if k < total - 1:
            out += bytes([0xFF, 0xD0 + k % 8])
    return bytes(out)


def _clean_scan(data: bytes, start: int, expected: int | None) -> tuple[bytes, bool, int, int, int, bool]:
    """The entropy-coded data from `start` up to EOI or the end, as a decoder can read it. Returns (data, found
    EOI, restart markers kept, markers dropped, restart markers renumbered, ended by one restart too many)."""
    out = bytearray()
    n, i = len(data), start
    restarts = dropped = renumbered = 0
    while True:
        j = data.find(b"\xff", i)
        if j < 0:
            out += data[i:]
            return bytes(out), False, restarts, dropped, renumbered, False
        k = j + 1
        while k < n and data[k] == 0xFF:  # fill bytes
            k += 1
        if k >= n:  # a dangling 0xFF
            out += data[i:j]
            return bytes(out), False, restarts, dropped, renumbered, False
        b = data[k]
        if b == 0x00:
            out += data[i : k + 1]
        elif b == 0xD9:
            out += data[i:j]
            return bytes(out), True, restarts, dropped, renumbered, False
        elif b in RST_MARKERS and expected is None:  # no restart interval: keep them as they are
            out += data[i : k + 1]
        elif b in RST_MARKERS:
            if restarts == expected:  # past the frame's last MCU: the image is over
                out += data[i:j]
                return bytes(out), False, restarts, dropped, renumbered, True
            want = 0xD0 + restarts % 8
            out += data[i:k]
            out.append(want)
            renumbered += b != want
            restarts += 1
        else:  # a marker a decoder would stop at: drop it, keep what follows
            out += data[i:j]
            dropped += 1
        i = k + 1


def decode_tolerant(jpeg: bytes, quality: int = QUALITY, size: int = SIZE) -> tuple[Image.Image, bool]:
    """Decode model output, a body, or a JPEG file to an RGB image, whatever state it is in: (image, complete).
    The input goes through `repair` first, so truncated data decodes (missing MCUs become flat blocks) without
    ImageFile.LOAD_TRUNCATED_IMAGES."""
    image, report = decode_report(jpeg, quality, size)
    return image, report.complete


def decode_report(data: bytes, quality: int = QUALITY, size: int = SIZE) -> tuple[Image.Image, Repaired]:
    """`decode_tolerant` with the whole repair report."""
    report = repair_report(data, quality, size)
    try:
        im = Image.open(io.BytesIO(report.jpeg), formats=("JPEG",))
        im.load()
    except Exception as e:  # noqa: BLE001 - repair() should make this unreachable; never crash a sampler
        raise CodecError("corrupt", f"repaired stream still undecodable: {type(e).__name__}: {e}") from None
    return (im if im.mode == "RGB" else im.convert("RGB")), report


# ---------------------------------------------------------------------------------------------- prompts


def prompt_rows(ratio: float, mcu_rows: int) -> int:
    """Whole MCU rows in a prompt of `ratio` of an image with `mcu_rows` rows: floor(ratio x rows), 1..rows-1."""
    rows = math.floor(ratio * mcu_rows + 1e-9)
    if not 0 < ratio < 1 or not 1 <= rows < mcu_rows:
        raise ValueError(f"ratio {ratio} gives {rows} of {mcu_rows} MCU rows: the prompt must hold at least one "
                         f"whole row and not all, i.e. {1 / mcu_rows:.4g} <= ratio < 1")
    return rows


def mcu_rows_of(body: bytes) -> int:
    """MCU rows of a body (or JPEG file) from its frame header."""
    return mcu_grid(_body_header(body))[1]


def prompt_prefix(body: bytes, ratio: float) -> bytes:
    """The body cut right after the restart marker that closes its top `prompt_rows(ratio, MCU rows)` MCU rows:
    the prompt for image completion (see the module docstring)."""
    h = _body_header(body)
    per_row, n_rows = mcu_grid(h)
    rows = prompt_rows(ratio, n_rows)
    if not h.restart_interval or (rows * per_row) % h.restart_interval:
        raise ValueError(f"the body has no restart marker at the end of MCU row {rows} (restart interval "
                         f"{h.restart_interval} MCUs): not a canonical body")
    markers = rows * per_row // h.restart_interval
    end = None
    for count, m in enumerate(_RST_RE.finditer(body, h.scan_start), 1):
        if count == markers:
            end = m.end()
            break
    if end is None:
        raise ValueError(f"body has fewer than {markers} restart markers (ratio {ratio}: {rows} of {n_rows} rows)")
    return body[:end]


def _body_header(body: bytes) -> Header:
    h = parse_header(body, 0) if body.startswith(SOI) else None
    if h is None or h.status != "ok":
        raise ValueError("not a JPEG body: no SOI..SOS header")
    return h
