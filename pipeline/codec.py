"""The canonical JPEG codec of JPEG-LM: any image -> the bytes the model reads and writes.

    body = canonicalize(data, size=256)  # size x size, baseline q25 4:2:0, RST after every MCU, no tables
    jpeg = assemble(body)                # a standard JPEG file: the tables spliced back after SOI

Model output (repair, tolerant decoding, completion prompts) is pipeline/repair.py.

Canonical form (the paper's): EXIF orientation applied; every mode made RGB; the largest centered square crop;
antialiased (Lanczos) resize to size x size; baseline JPEG at `quality`, 4:2:0, a restart marker after every MCU
(255 RST markers at 256x256, 15 at 64x64), written as an abbreviated stream without quantization/Huffman tables
(those are the same for every image at a quality, see `tables`). Deterministic: the same input bytes give the same
output bytes on a given build (pillow-simd's resize kernels are not guaranteed bit-identical across builds or SIMD
levels).

Decisions on awkward inputs (documented here, tested in tests/test_codec.py):
- Alpha (RGBA, LA, PA, P with transparency) is composited on white: transparent pixels become white, as a browser
  shows them on a white page; grayscale stays grayscale until the final RGB conversion.
- CMYK (e.g. Adobe JPEGs, already un-inverted by Pillow) and YCbCr go through Pillow's plain conversion. ICC
  profiles are ignored everywhere: this pillow-simd build has no LittleCMS, and sRGB is the web's assumption.
- 16-bit grayscale (I;16*, I) keeps its top 8 bits (v >> 8); Pillow's own conversion would clip everything above
  255 to white. 16-bit RGB(A) PNGs are already reduced to 8 bits by Pillow. 'F' (float) is clipped to 0..255 and
  bilevel '1' becomes 0/255 grayscale.
- Animated images (GIF, APNG, MPO, multi-page TIFF) use their first frame.
- Tiny and extreme-aspect images are accepted (the crop is upscaled) unless `min_side` says otherwise.
- Metadata (EXIF, ICC, comments, DPI) never reaches the body: every body has the same header bytes.
- Formats: everything Pillow reads except EPS (Pillow would run Ghostscript on untrusted data). WebP, AVIF, HEIF
  and JPEG 2000 files are reported as `unsupported` when this Pillow build cannot decode them.

Failures raise `CodecError` with `.reason` in `REASONS`:
- `empty`: zero bytes.
- `not_an_image`: no image format recognizes the bytes.
- `truncated`: the file ends early: in its header, or before all pixel data (a JPEG missing only its final EOI marker
  counts as truncated too: libjpeg cannot tell it from a cut file, and such files are rare).
- `corrupt`: recognized but undecodable (bad header values, broken compressed data, zero size). JPEG entropy-data
  corruption that libjpeg only warns about decodes (with visible damage) and is not reported.
- `unsupported`: a real image this build cannot decode (12-bit or lossless JPEG, WebP without libwebp, EPS, ...).
- `too_large`: width x height above `max_pixels` (default 8192 x 8192), checked on the header before any pixel is
  decoded, so a decompression bomb never allocates its claimed size. Pillow's own DecompressionBombError (above
  2 x PIL.Image.MAX_IMAGE_PIXELS) and, when warnings are turned into errors, DecompressionBombWarning also map here.
  The default stays below Pillow's warning threshold, so with defaults Pillow never warns; a max_pixels above
  2 x PIL.Image.MAX_IMAGE_PIXELS needs that global raised too.
- `too_small`: the shorter side is below `min_side` (default 0: accept everything).
- `bad_aspect_ratio`: the longer side is more than `max_aspect_ratio` times the shorter (default 0: accept
  everything); checked on the source, before the centre crop keeps only its middle square (a 4:1 banner keeps 25%).

Thread safety: nothing here changes Pillow's globals. ImageFile.LOAD_TRUNCATED_IMAGES is never set: a truncated
input is detected from Pillow's exception, and `decode_tolerant` decodes a repaired stream that always ends in EOI,
which libjpeg decodes (filling the missing MCUs) without that flag.

Speed: JPEG sources are decoded with DCT-domain downscaling (`Image.draft`) to the smallest scale (1/2, 1/4, 1/8)
that still leaves the crop at least `size` pixels, then cropped and resized in one `resize(box=...)` call; the
orientation is applied to the small result. See bench/bench_codec.py.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import NamedTuple

from PIL import ExifTags, Image, UnidentifiedImageError, features

SIZE = 256
QUALITY = 25
DEFAULT_MAX_PIXELS = 8192 * 8192

REASONS = ("empty", "not_an_image", "truncated", "corrupt", "unsupported", "too_large", "too_small", "bad_aspect_ratio")

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
RST_MARKERS = range(0xD0, 0xD8)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # C4 = DHT, C8 = JPG, CC = DAC
_DENIED_FORMATS = frozenset({"EPS"})  # opening runs Ghostscript
_PLUGIN_FEATURE = {"WEBP": "webp", "AVIF": "avif", "JPEG2000": "jpg_2000"}  # format -> the library it needs

# EXIF orientation -> the transpose that shows the image upright (as PIL.ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class CodecError(Exception):
    """An input the codec cannot turn into a canonical image; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown CodecError reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across Ray / multiprocessing boundaries
        return (CodecError, (self.reason, self.message))


@dataclass(frozen=True)
class CanonicalImage:
    body: bytes
    source_width: int  # as displayed, i.e. after EXIF orientation
    source_height: int
    source_format: str  # Pillow's format name: "JPEG", "PNG", "GIF", "MPO", ...


# ---------------------------------------------------------------------------------------------------------------
# canonicalize


def canonicalize(
    data: bytes,
    size: int = SIZE,
    quality: int = QUALITY,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 0,
    max_aspect_ratio: float = 0,
) -> bytes:
    """Any image file Pillow can read -> the canonical JPEG-LM body (abbreviated JPEG stream without tables)."""
    return canonicalize_with_info(data, size, quality, max_pixels=max_pixels, min_side=min_side,
                                  max_aspect_ratio=max_aspect_ratio).body


def canonicalize_with_info(
    data: bytes,
    size: int = SIZE,
    quality: int = QUALITY,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 0,
    max_aspect_ratio: float = 0,
) -> CanonicalImage:
    """`canonicalize`, also returning the source's displayed width/height and format (one decode)."""
    if size < 1 or not 1 <= quality <= 100:
        raise ValueError(f"size must be positive and quality in 1..100, got size={size}, quality={quality}")
    im = _open(data)
    source_format = im.format or ""
    width, height = _check_size(im, max_pixels, min_side, max_aspect_ratio)
    pixels, box, orientation = _decode(im, size)
    square = _square(pixels, box, size, orientation)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return CanonicalImage(_encode_body(square, quality), width, height, source_format)


def _open(data: bytes) -> Image.Image:
    """Image.open (lazy: header only), every failure mapped to a CodecError."""
    if not data:
        raise CodecError("empty", "no bytes")
    try:
        return Image.open(io.BytesIO(data), formats=_readable_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CodecError("too_large", str(e)) from None
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except Exception as e:  # noqa: BLE001 - a bad file must never crash a batch
        raise _load_error(e, data) from None


@functools.cache
def _readable_formats() -> tuple[str, ...]:
    Image.init()
    # Plugins whose library is missing from this build would only warn; their files are reported `unsupported`.
    missing = {fmt for fmt, feature in _PLUGIN_FEATURE.items() if not features.check(feature)}
    usable = [f for f in Image.ID if f not in _DENIED_FORMATS and f not in missing]
    first = [f for f in ("JPEG", "PNG", "GIF", "WEBP") if f in usable]  # the common ones are tried first
    return tuple(first + [f for f in usable if f not in first])


def _check_size(im: Image.Image, max_pixels: int, min_side: int, max_aspect_ratio: float = 0) -> tuple[int, int]:
    width, height = im.size
    if width <= 0 or height <= 0:
        raise CodecError("corrupt", f"image has zero size {width}x{height}")
    if width * height > max_pixels:
        raise CodecError("too_large", f"{width}x{height} = {width * height} pixels > max_pixels={max_pixels}")
    if min(width, height) < min_side:
        raise CodecError("too_small", f"{width}x{height}: shorter side < min_side={min_side}")
    if max_aspect_ratio and max(width, height) > max_aspect_ratio * min(width, height):
        raise CodecError("bad_aspect_ratio", f"{width}x{height}: aspect ratio "
                                             f"{max(width, height) / min(width, height):.2f} > {max_aspect_ratio:g}")
    return width, height


def _decode(im: Image.Image, size: int) -> tuple[Image.Image, tuple[float, float, float, float], int]:
    """Decode the pixels (JPEG: DCT-scaled) and convert to RGB or L. Returns (pixels, the centered square crop box
    in their coordinates, EXIF orientation)."""
    width, height = im.size
    scale = 1.0
    try:
        if im.format in ("JPEG", "MPO"):
            # draft picks the largest of 1/8, 1/4, 1/2 that keeps both sides >= size, hence the crop too.
            drafted = im.draft("RGB", (size, size))
            if drafted is not None:
                scale = drafted[1][2] / width
        im.load()
        orientation = _orientation(im)  # after load: a PNG's eXIf chunk may follow its pixel data
        pixels = _to_rgb_or_l(im)
    except CodecError:
        raise
    except Exception as e:  # noqa: BLE001 - a bad file must never crash a batch
        raise _load_error(e) from None
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return pixels, (left * scale, top * scale, (left + side) * scale, (top + side) * scale), orientation


def _to_rgb_or_l(im: Image.Image) -> Image.Image:
    """RGB or L; L stays single-channel until after the resize (3x cheaper)."""
    mode = im.mode
    if mode in ("RGB", "L"):
        return im
    if mode == "P":
        mode = "PA" if "transparency" in im.info or im.palette.mode == "RGBA" else "RGB"
        if mode == "RGB":
            return im.convert("RGB")
    if mode in _ALPHA_MODES:
        grayscale = mode in ("LA", "La")
        im = im.convert("LA" if grayscale else "RGBA")
        flat = Image.new("L", im.size, 255) if grayscale else Image.new("RGB", im.size, (255, 255, 255))
        flat.paste(im, mask=im.getchannel("A"))
        return flat
    if mode in _SIXTEEN_BIT_MODES:
        import numpy as np

        values = np.asarray(im)
        return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
    if mode in ("1", "F"):
        return im.convert("L")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise CodecError("unsupported", f"cannot convert mode {im.mode} to RGB: {e}") from None


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8; a missing or unreadable EXIF block counts as 1 (the pixels are still fine)."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - broken metadata must not reject a decodable image
        return 1
    return value if value in _ORIENTATION_TRANSPOSE else 1


def _square(im: Image.Image, box: tuple[float, float, float, float], size: int, orientation: int) -> Image.Image:
    """Crop + antialiased resize in one call, then orientation (on 256x256 instead of the source), then RGB.
    A centered square crop commutes with the eight orientations, so the order does not change the result."""
    out = im.resize((size, size), Image.Resampling.LANCZOS, box=box)
    if orientation != 1:
        out = out.transpose(_ORIENTATION_TRANSPOSE[orientation])
    if out.mode != "RGB":
        out = out.convert("RGB")
    return out


def _encode_body(im: Image.Image, quality: int) -> bytes:
    im.info = {}  # resize copies the source's info; Pillow would write its "comment" into the header
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, subsampling=2, restart_marker_blocks=1, streamtype=2)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# classifying failures


def _load_error(e: BaseException, data: bytes | None = None) -> CodecError:
    message = f"{type(e).__name__}: {e}"
    text = str(e).lower()
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError)):
        return CodecError("too_large", message)
    if "max_text_chunk" in text or "max_text_memory" in text:  # PNG text-chunk decompression bomb
        return CodecError("too_large", message)
    if isinstance(e, EOFError) or "truncated" in text:
        return CodecError("truncated", message)
    if any(s in text for s in ("cannot handle", "not supported", "unsupported", "not available")):
        return CodecError("unsupported", message)
    if data is not None and data.startswith(SOI):
        header = parse_header(data, 0)
        if header.status == "truncated":
            return CodecError("truncated", message)
    return CodecError("corrupt", message)


def _signature(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "AVIF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
        return "HEIF"
    if data.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG2000"
    if data.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        return "EPS"
    return None



def _unidentified(data: bytes) -> CodecError:
    """Pillow recognized no format: tell a foreign file from a damaged or unsupported image."""
    kind = _signature(data)
    if kind is None:
        return CodecError("not_an_image", f"unrecognized data ({len(data)} bytes, starts {data[:8].hex(' ')})")
    if kind in ("HEIF", "EPS") or (kind in _PLUGIN_FEATURE and not features.check(_PLUGIN_FEATURE[kind])):
        return CodecError("unsupported", f"{kind} image, which this Pillow build cannot read")
    if kind == "JPEG":
        header = parse_header(data, 0)
        if header.status == "truncated":
            return CodecError("truncated", f"JPEG ends inside its header ({len(data)} bytes)")
        if header.status == "ok" and header.sof is not None and (header.sof > 0xC2 or header.precision != 8):
            return CodecError("unsupported", f"JPEG SOF{header.sof - 0xC0} with {header.precision}-bit samples")
    if (kind == "PNG" and _png_header_truncated(data)) or (kind == "GIF" and _gif_header_truncated(data)):
        return CodecError("truncated", f"{kind} ends inside its header ({len(data)} bytes)")
    return CodecError("corrupt", f"{kind} header is not readable ({len(data)} bytes)")


def _png_header_truncated(data: bytes) -> bool:
    """True when the PNG ends before its first IDAT chunk (Image.open reads every chunk up to there)."""
    pos = 8
    while pos + 8 <= len(data):
        if data[pos + 4 : pos + 8] == b"IDAT":
            return False
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return True


def _gif_header_truncated(data: bytes) -> bool:
    """True when the GIF ends before its first image descriptor (Image.open reads up to there)."""
    n = len(data)
    if n < 13:
        return True
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # global color table
    while pos < n:
        block = data[pos]
        if block == 0x2C:  # image descriptor
            return pos + 10 > n
        if block != 0x21:  # anything else (trailer, junk) is not truncation
            return False
        pos += 2  # extension introducer + label, then sub-blocks until a zero-size one
        while pos < n and data[pos]:
            pos += 1 + data[pos]
        pos += 1
    return True


# ---------------------------------------------------------------------------------------------------------------
# JPEG stream structure


class Header(NamedTuple):
    status: str  # "ok": SOS reached; "truncated": the data ends first; "invalid": not a marker where one must be
    # "ok": the first entropy-coded byte. Otherwise where the walk stopped: a byte that is not a marker ("invalid"),
    # or the payload of a segment that runs past the end of the data ("truncated"; len(data) if the data ends first).
    scan_start: int
    sof: int | None  # SOFn marker byte
    precision: int
    width: int
    height: int
    components: tuple[tuple[int, int, int, int], ...]  # (id, h, v, quantization table)
    scan_components: tuple[tuple[int, int, int], ...]  # (id, DC table, AC table)
    spectral: tuple[int, ...]  # SOS (Ss, Se, Ah/Al byte)
    restart_interval: int
    markers: frozenset[int]  # every marker byte seen
    tables_ok: bool  # every DQT/DHT segment is well-formed
    quant_tables: frozenset[int]  # table ids the header itself defines
    dc_tables: frozenset[int]
    ac_tables: frozenset[int]


def parse_header(data: bytes, start: int) -> Header:
    """Walk the marker segments from the SOI at `start` up to the end of the SOS segment."""
    n = len(data)
    i = start + 2
    sof, precision, width, height, components = None, 0, 0, 0, ()
    restart_interval, markers, tables_ok = 0, set(), True
    quant, dc, ac = set(), set(), set()

    def result(status: str, scan_start: int = -1, scan_components: tuple = (), spectral: tuple = ()) -> Header:
        return Header(status, scan_start, sof, precision, width, height, components, scan_components, spectral,
                       restart_interval, frozenset(markers), tables_ok, frozenset(quant), frozenset(dc), frozenset(ac))

    while True:
        if i >= n:
            return result("truncated", n)
        if data[i] != 0xFF:
            return result("invalid", i)
        while i < n and data[i] == 0xFF:  # fill bytes may precede a marker
            i += 1
        if i >= n:
            return result("truncated", n)
        marker = data[i]
        i += 1
        if marker in RST_MARKERS or marker in (0x00, 0x01, 0xD8, 0xD9):
            return result("invalid", i)
        if i + 2 > n:
            return result("truncated", n)
        length = int.from_bytes(data[i : i + 2], "big")
        if length < 2:
            return result("invalid", i)
        if i + length > n:
            return result("truncated", i + 2)
        seg = data[i + 2 : i + length]
        i += length
        markers.add(marker)
        if marker in _SOF_MARKERS:
            if len(seg) < 6 or len(seg) != 6 + 3 * seg[5]:  # libjpeg insists on the exact length
                return result("invalid", i)
            sof, precision = marker, seg[0]
            height, width = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big")
            components = tuple(
                (seg[6 + 3 * k], seg[7 + 3 * k] >> 4, seg[7 + 3 * k] & 15, seg[8 + 3 * k]) for k in range(seg[5])
            )
        elif marker == 0xDB:
            tables_ok &= _read_dqt(seg, quant)
        elif marker == 0xC4:
            tables_ok &= _read_dht(seg, dc, ac)
        elif marker == 0xDD:
            if len(seg) != 2:
                return result("invalid", i)
            restart_interval = int.from_bytes(seg, "big")
        elif marker == 0xDA:
            if len(seg) < 1 or len(seg) != 1 + 2 * seg[0] + 3:
                return result("invalid", i)
            scan = tuple((seg[1 + 2 * k], seg[2 + 2 * k] >> 4, seg[2 + 2 * k] & 15) for k in range(seg[0]))
            return result("ok", i, scan, tuple(seg[-3:]))


def _read_dqt(seg: bytes, defined: set) -> bool:
    i = 0
    while i < len(seg):
        precision, table = seg[i] >> 4, seg[i] & 15
        size = 1 + 64 * (precision + 1)
        if precision > 1 or table > 3 or i + size > len(seg):
            return False
        defined.add(table)
        i += size
    return True


def _read_dht(seg: bytes, dc: set, ac: set) -> bool:
    """Checks libjpeg would fail on: lengths, table ids, an over-full code (Kraft), DC symbols above 15."""
    i = 0
    while i < len(seg):
        if i + 17 > len(seg):
            return False
        kind, table = seg[i] >> 4, seg[i] & 15
        counts = seg[i + 1 : i + 17]
        total = sum(counts)
        if kind > 1 or table > 3 or total > 256 or i + 17 + total > len(seg):
            return False
        code = 0
        for length, count in enumerate(counts, 1):
            code += count
            if code > (1 << length):
                return False
            code <<= 1
        if kind == 0 and any(v > 15 for v in seg[i + 17 : i + 17 + total]):
            return False
        (ac if kind else dc).add(table)
        i += 17 + total
    return True


_HEADER_MARKERS = frozenset(range(0xE0, 0xF0)) | {0xFE, 0xDB, 0xC4, 0xDD, 0xDA}  # APPn, COM, tables, DRI, SOS


def decodable_with_default_tables(h: Header) -> bool:
    """A single-scan sequential Huffman header that libjpeg decodes once the tables of `tables()` (ids 0 and 1)
    are spliced in front: only segments libjpeg accepts there, one SOF0/SOF1, every referenced table defined."""
    if h.status != "ok" or h.sof not in (0xC0, 0xC1) or h.precision != 8 or not h.tables_ok:
        return False
    if not h.markers <= _HEADER_MARKERS | {h.sof}:
        return False
    if not (0 < h.width * h.height <= DEFAULT_MAX_PIXELS) or len(h.components) not in (1, 3):
        return False
    if any(not (1 <= hs <= 2 and 1 <= vs <= 2) for _, hs, vs, _ in h.components):
        return False
    if len(h.components) > 1 and sum(hs * vs for _, hs, vs, _ in h.components) > 10:  # libjpeg's blocks per MCU
        return False
    if any(tq not in h.quant_tables | {0, 1} for *_, tq in h.components):
        return False
    ids = [c[0] for c in h.components]
    if len(set(ids)) != len(ids) or sorted(c[0] for c in h.scan_components) != sorted(ids):
        return False
    if h.spectral != (0, 63, 0):
        return False
    return all(td in h.dc_tables | {0, 1} and ta in h.ac_tables | {0, 1} for _, td, ta in h.scan_components)


@functools.cache
def tables(quality: int = QUALITY) -> bytes:
    """The tables-only JPEG stream (SOI, DQT, DHT, EOI) shared by every body of this quality."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "JPEG", quality=quality, subsampling=2, streamtype=1)
    return buf.getvalue()


@functools.cache
def canonical_header(size: int = SIZE, quality: int = QUALITY) -> bytes:
    """SOI .. end of SOS of every canonical body of this size and quality (59 bytes)."""
    body = _encode_body(Image.new("RGB", (size, size)), quality)
    return body[: parse_header(body, 0).scan_start]


def assemble(body: bytes, quality: int = QUALITY) -> bytes:
    """A canonical body -> a standard JPEG file (the tables spliced in right after SOI)."""
    if not body.startswith(SOI):
        raise CodecError("corrupt", "a body must start with SOI (FF D8)")
    return SOI + tables(quality)[2:-2] + body[2:]
