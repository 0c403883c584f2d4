"""The canonical JPEG codec: body structure, every kind of input, every kind of bad input, repair of model output.

Images are made here or derived from the bundled real photos. Stream structure is checked with a marker walk
written here, independently of pipeline.codec's own parser.
"""

from __future__ import annotations

import importlib.metadata
import io
import pickle
import random
import re
import struct
import warnings
import zlib

import numpy as np
import PIL
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps, features

from pipeline import codec
from pipeline.repair import decode_tolerant, prompt_prefix, repair, repair_report
from pipeline.sample_images import derive, photo_bytes

pytestmark = pytest.mark.timeout(120)

SOI, EOI = b"\xff\xd8", b"\xff\xd9"


# ---------------------------------------------------------------------------------------------- helpers


def segments(jpeg: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of each segment from SOI to SOS inclusive, then ("scan", entropy data + trailer)."""
    assert jpeg[:2] == SOI
    out, i = [], 2
    while True:
        assert jpeg[i] == 0xFF, f"no marker at {i}"
        marker = jpeg[i + 1]
        if marker in (0xD8, 0xD9):
            out.append((marker, b""))
            i += 2
            if marker == 0xD9:
                return out
            continue
        length = int.from_bytes(jpeg[i + 2 : i + 4], "big")
        out.append((marker, jpeg[i + 4 : i + 2 + length]))
        i += 2 + length
        if marker == 0xDA:
            out.append(("scan", jpeg[i:]))
            return out


def restart_markers(scan: bytes) -> list[int]:
    """RST marker numbers, in order, in entropy-coded data."""
    return [scan[i + 1] - 0xD0 for i in range(len(scan) - 1) if scan[i] == 0xFF and 0xD0 <= scan[i + 1] <= 0xD7]


def pixels(jpeg_or_body: bytes) -> np.ndarray:
    data = codec.assemble(jpeg_or_body) if not segments_have_tables(jpeg_or_body) else jpeg_or_body
    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.size == (256, 256)
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def segments_have_tables(data: bytes) -> bool:
    return any(m in (0xDB, 0xC4) for m, _ in segments(data) if m != "scan")


def encode(im: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def canon(data: bytes, **kw) -> np.ndarray:
    return pixels(codec.canonicalize(data, **kw))


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def reason(data: bytes, **kw) -> str:
    with pytest.raises(codec.CodecError) as e:
        codec.canonicalize(data, **kw)
    assert e.value.reason in codec.REASONS
    assert e.value.reason in str(e.value)
    return e.value.reason


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bytes(width: int, height: int, raw_rows: bytes | None = None, depth: int = 8, color: int = 2) -> bytes:
    """A PNG written by hand (lets a header claim any size, or hold 16-bit RGB, which Pillow cannot write)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    idat = zlib.compress(raw_rows if raw_rows is not None else b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A real landscape photo (451x300 RGB)."""
    return Image.open(io.BytesIO(photo_bytes("chelsea.jpg"))).convert("RGB")


@pytest.fixture(scope="module")
def body() -> bytes:
    return codec.canonicalize(photo_bytes("astronaut.jpg"))


# ---------------------------------------------------------------------------------------------- the build


def test_pil_is_pillow_simd_with_libjpeg_turbo():
    assert "post" in PIL.__version__, f"PIL {PIL.__version__} is not pillow-simd"
    names = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
    assert "pillow" not in names, "plain Pillow is installed and overwrites pillow-simd's PIL/"
    assert "pillow-simd" in names
    assert features.check_feature("libjpeg_turbo"), "PIL lacks libjpeg-turbo"


# ---------------------------------------------------------------------------------------------- the body


@pytest.mark.parametrize("name", ["astronaut.jpg", "chelsea.jpg", "camera.jpg", "retina.jpg", "rocket.jpg"])
def test_body_is_canonical(name):
    data = photo_bytes(name)
    body = codec.canonicalize(data)
    assert body == codec.canonicalize(data), "not deterministic"
    assert body.startswith(SOI) and body.endswith(EOI)
    segs = segments(body)
    markers = [m for m, _ in segs]
    assert 0xDB not in markers and 0xC4 not in markers, "tables inside the body"
    assert 0xC2 not in markers, "progressive"
    sof = dict(segs)[0xC0]  # baseline
    assert struct.unpack(">BHHB", sof[:6]) == (8, 256, 256, 3)
    assert [sof[6 + 3 * k + 1] for k in range(3)] == [0x22, 0x11, 0x11]  # 4:2:0
    assert dict(segs)[0xDD] == b"\x00\x01"  # restart interval: one MCU
    scan = segs[-1][1]
    rst = restart_markers(scan)
    assert len(rst) == 255
    assert rst == [k % 8 for k in range(255)]
    assert scan.count(b"\xff\xd7") == 31
    im = Image.open(io.BytesIO(codec.assemble(body)))
    im.load()
    assert (im.size, im.mode, im.format) == ((256, 256), "RGB", "JPEG")
    assert not im.info.get("progressive")


def test_every_body_has_the_same_header_and_no_metadata(photo):
    plain = codec.canonicalize(encode(photo, "JPEG", quality=90))
    header_len = len(plain) - len(segments(plain)[-1][1])
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"  # Make
    exif[0x0112] = 1
    loaded = encode(photo, "JPEG", quality=90, exif=exif, icc_profile=b"ICCPROFILE" * 50, comment=b"a comment here")
    src = Image.open(io.BytesIO(loaded))
    assert src.info.get("comment") == b"a comment here" and "icc_profile" in src.info  # the source really has them
    body = codec.canonicalize(loaded)
    assert body[:header_len] == plain[:header_len]
    assert b"comment" not in body and b"CameraMaker" not in body and b"ICCPROFILE" not in body
    derived = [codec.canonicalize(d) for _, d in derive(6)]
    assert {b[:header_len] for b in derived} == {plain[:header_len]}


def test_tables_and_assemble(body):
    t = codec.tables()
    assert t is codec.tables(), "tables are not cached"
    assert t != codec.tables(50)
    segs = segments(t)
    assert [m for m, _ in segs] == [0xDB, 0xDB, 0xC4, 0xC4, 0xC4, 0xC4, 0xD9]
    assert len(t) == 574
    assembled = codec.assemble(body)
    assert assembled == SOI + t[2:-2] + body[2:]
    with pytest.raises(codec.CodecError):
        codec.assemble(body[2:])


def test_assembled_body_decodes_like_a_standard_jpeg_file(photo):
    # A 256x256 source is not resampled, so the body is exactly that image encoded; assemble() must give a file
    # that decodes to the same pixels as a normal JPEG with the same parameters.
    square = photo.resize((256, 256))
    body = codec.canonicalize(encode(square, "PNG"))
    standard = encode(square, "JPEG", quality=25, subsampling=2, restart_marker_blocks=1)
    assert np.array_equal(pixels(body), pixels(standard))
    assert not np.array_equal(pixels(body), pixels(encode(square, "JPEG", quality=50, subsampling=2)))


def test_bodies_do_not_depend_on_processing_order():
    images = [d for _, d in derive(16)]
    forward = [codec.canonicalize(d) for d in images]
    backward = [codec.canonicalize(d) for d in reversed(images)][::-1]
    assert forward == backward
    assert len(set(forward)) == 16


@pytest.mark.parametrize("name", ["astronaut.jpg", "chelsea.jpg", "coins.jpg", "hubble_deep_field.jpg", "retina.jpg"])
def test_close_to_full_size_reference(name):
    # Reference: full-size decode, orientation, RGB, Lanczos over the exactly centered square (a float box: an
    # integer crop of 451x300 is half a pixel off, which alone costs ~4 levels on fur), same encoder settings.
    # What remains is the DCT-domain downscaling of the decode (astronaut: 512 -> 256 by libjpeg alone).
    data = photo_bytes(name)
    ref = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = ref.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    ours = canon(data)
    reference = pixels(encode(ref.resize((256, 256), Image.LANCZOS, box=box), "JPEG", quality=25, subsampling=2))
    assert mean_diff(ours, reference) < 3
    # The same photo cropped a few percent off-center is far further away: the threshold is meaningful.
    shifted = (box[0] + side / 16, box[1] + side / 16, box[2], box[3])
    off = pixels(encode(ref.resize((256, 256), Image.LANCZOS, box=shifted), "JPEG", quality=25, subsampling=2))
    assert mean_diff(ours, off) > 2 * mean_diff(ours, reference) + 3


def test_info_reports_displayed_source_size_and_format(photo):
    info = codec.canonicalize_with_info(photo_bytes("chelsea.jpg"))
    assert (info.source_width, info.source_height, info.source_format) == (451, 300, "JPEG")
    assert info.body == codec.canonicalize(photo_bytes("chelsea.jpg"))
    info = codec.canonicalize_with_info(encode(photo.resize((30, 70)), "PNG"))
    assert (info.source_width, info.source_height, info.source_format) == (30, 70, "PNG")


# ---------------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("portrait", [False, True])
def test_non_square_keeps_the_centered_square(fmt, portrait):
    # 1280x640: the center square is x in [320, 960). Outside it blue, inside green; JPEG sources go through the
    # 1/2 DCT-scaled decode. Nothing of the margins may show inside the output (edges: filter support).
    im = Image.new("RGB", (1280, 640), (0, 0, 255))
    im.paste((0, 255, 0), (320, 0, 960, 640))
    if portrait:
        im = im.transpose(Image.Transpose.TRANSPOSE)
    out = canon(encode(im, fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    inner = out[4:-4, 4:-4]
    assert np.abs(inner - np.array([0, 255, 0])).max() < 20
    assert out[..., 2].mean() < 8  # no blue band anywhere


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(photo, orientation):
    # Store the photo so that applying `orientation` shows it upright, as a camera does.
    inverse = {2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}
    stored = photo if orientation == 1 else photo.transpose(codec._ORIENTATION_TRANSPOSE[inverse[orientation]])
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif)
    # The test's construction agrees with Pillow's own exif_transpose:
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert shown.size == photo.size and mean_diff(np.asarray(shown), np.asarray(photo)) < 3
    upright = canon(encode(photo, "JPEG", quality=95))
    assert mean_diff(canon(data), upright) < 2
    info = codec.canonicalize_with_info(data)
    assert (info.source_width, info.source_height) == photo.size
    if orientation in (6, 8):  # and it matters: ignoring it gives a very different image
        assert mean_diff(pixels(codec.canonicalize(encode(stored, "JPEG", quality=95))), upright) > 10


def test_exif_orientation_in_png(photo):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photo.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)
    assert mean_diff(canon(data), canon(encode(photo, "PNG"))) < 1


def test_broken_exif_does_not_reject_the_image(photo):
    good = encode(photo, "JPEG", quality=90)
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + 20) + b"Exif\x00\x00" + b"MM\x00*\x00\x00\x00\x08\xff\xff" + b"\x00" * 10
    broken = good[:2] + app1 + good[2:]
    assert mean_diff(canon(broken), canon(good)) == 0


def test_cmyk_jpeg_and_tiff_come_out_in_the_right_colors(photo):
    upright = canon(encode(photo, "PNG"))
    cmyk = photo.convert("CMYK")
    jpeg = encode(cmyk, "JPEG", quality=95)  # Adobe CMYK JPEG (stored inverted, as Photoshop does)
    assert Image.open(io.BytesIO(jpeg)).mode == "CMYK"
    assert mean_diff(canon(jpeg), upright) < 3
    tiff = encode(cmyk, "TIFF")
    assert mean_diff(canon(tiff), upright) < 1
    inverted = Image.eval(photo, lambda v: 255 - v)
    assert mean_diff(canon(jpeg), canon(encode(inverted, "PNG"))) > 50


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # transparent red: must not show
    rgba.paste((0, 0, 255, 255), (32, 0, 64, 64))  # opaque blue right half
    rgba.paste((0, 0, 0, 128), (0, 48, 16, 64))  # half-transparent black corner
    out = canon(encode(rgba, "PNG"))
    assert np.abs(out[8:120, 8:100] - 255).max() < 8  # white, not red (nor black)
    assert np.abs(out[8:248, 150:248] - np.array([0, 0, 255])).max() < 25
    assert np.abs(out[215:250, 5:50] - 127).max() < 12  # 50% black over white

    la = Image.new("LA", (40, 40), (0, 0))
    la.paste((0, 255), (20, 0, 40, 40))
    out = canon(encode(la, "PNG"))
    assert np.abs(out[8:248, 8:100] - 255).max() < 8 and np.abs(out[8:248, 160:248]).max() < 8


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    im = Image.new("P", (48, 48), 0)
    im.putpalette([200, 0, 0, 0, 160, 0] + [0] * 762)
    im.paste(1, (0, 0, 24, 48))  # left half: index 1 = green, right half: index 0 = red but transparent
    data = encode(im, fmt, transparency=0)
    out = canon(data)
    assert np.abs(out[8:248, 8:110] - np.array([0, 160, 0])).max() < 25
    assert np.abs(out[8:248, 150:248] - 255).max() < 8
    opaque = canon(encode(im, fmt))  # without transparency the palette colors show
    assert np.abs(opaque[8:248, 150:248] - np.array([200, 0, 0])).max() < 30


def test_sixteen_bit_grayscale_keeps_its_range():
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (256, 1))
    im = Image.fromarray(ramp)
    assert im.mode.startswith("I")
    out = canon(encode(im, "PNG"))
    expected = (ramp >> 8).astype(np.int16)
    assert np.abs(out[..., 0] - expected).mean() < 2  # not clipped to white above 255
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_sixteen_bit_rgb_png():
    row = struct.pack(">HHH", 0xFF00, 0x8000, 0x0000) * 8
    data = png_bytes(8, 8, b"".join(b"\x00" + row for _ in range(8)), depth=16, color=2)
    out = canon(data)
    assert np.abs(out - np.array([255, 128, 0])).max() < 8


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_grayscale_becomes_three_equal_channels(photo, fmt):
    gray = photo.convert("L")
    data = encode(gray, fmt)
    body = codec.canonicalize(data)
    assert dict(segments(body))[0xC0][5] == 3
    out = pixels(body)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert mean_diff(out, canon(encode(gray.convert("RGB"), fmt))) < 1.5


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_animated_images_use_their_first_frame(fmt):
    frames = [Image.new("RGB", (40, 30), c) for c in [(220, 20, 20), (20, 220, 20), (20, 20, 220)]]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = buf.getvalue()
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = canon(data)
    assert np.abs(out - np.array([220, 20, 20])).max() < 30


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (2, 5), (16, 16)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_tiny_images_are_upscaled(size, fmt):
    color = (30, 140, 220)
    out = canon(encode(Image.new("RGB", size, color), fmt, **({"quality": 100} if fmt == "JPEG" else {})))
    assert np.abs(out - np.array(color)).max() < 12


@pytest.mark.parametrize("size", [(4000, 10), (10, 4000), (4096, 16)])
def test_extreme_aspect_ratios(size):
    w, h = size
    im = Image.new("RGB", size, (250, 250, 0))
    side = min(w, h)
    im.paste((0, 0, 200), ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    fmt = "JPEG" if size == (4096, 16) else "PNG"
    out = canon(encode(im, fmt, **({"quality": 100} if fmt == "JPEG" else {})))
    assert np.abs(out[20:-20, 20:-20] - np.array([0, 0, 200])).max() < 30


def test_mode_1_and_float_images():
    bilevel = Image.new("1", (32, 32), 0)
    bilevel.paste(1, (16, 0, 32, 32))
    out = canon(encode(bilevel, "PNG"))
    assert out[8:248, 8:100].max() < 10 and out[8:248, 160:248].min() > 245
    flt = Image.new("F", (32, 32), 100.0)
    out = canon(encode(flt, "TIFF"))
    assert np.abs(out - 100).max() < 4


# ---------------------------------------------------------------------------------------------- bad inputs


def test_codec_error_is_one_picklable_type():
    e = codec.CodecError("truncated", "ends early")
    again = pickle.loads(pickle.dumps(e))
    assert isinstance(again, codec.CodecError) and again.reason == "truncated" and str(again) == str(e)
    with pytest.raises(ValueError):
        codec.CodecError("no_such_reason", "x")
    assert {"empty", "not_an_image", "truncated", "corrupt", "too_large", "too_small"} <= set(codec.REASONS)


def test_empty():
    assert reason(b"") == "empty"


@pytest.mark.parametrize(
    "data", [b"hello", b"<!doctype html><html><body>404</body></html>", bytes(random.Random(0).randbytes(5000)),
             b"\x00" * 100, b'{"json": true}', b"PK\x03\x04" + b"\x00" * 60],
)
def test_not_an_image(data):
    assert reason(data) == "not_an_image"


def test_truncated_jpeg(photo):
    data = encode(photo, "JPEG", quality=90)
    for cut in [3, 10, 300, 700, len(data) // 2, len(data) - 100, len(data) - 2]:
        assert reason(data[:cut]) == "truncated", cut


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_truncated_png_and_gif(photo, fmt):
    data = encode(photo.convert("P") if fmt == "GIF" else photo, fmt)
    for cut in [8, 13, 20, 40, 200, len(data) // 2]:
        assert reason(data[:cut]) == "truncated", cut


def test_corrupt(photo):
    png = bytearray(encode(photo, "PNG"))
    mid = len(png) // 2
    png[mid : mid + 64] = b"\x00" * 64  # broken deflate stream
    assert reason(bytes(png)) == "corrupt"
    jpeg = encode(photo, "JPEG", quality=90)
    dht = jpeg.index(b"\xff\xc4")
    bad_table = jpeg[: dht + 5] + b"\xff" * 16 + jpeg[dht + 21 :]  # impossible Huffman code lengths
    assert reason(bad_table) == "corrupt"
    sof = jpeg.index(b"\xff\xc0")
    assert reason(jpeg[: sof + 7] + b"\x00\x00" + jpeg[sof + 9 :]) == "corrupt"  # width 0
    assert reason(png_bytes(0, 10)) == "corrupt"


def test_unsupported(photo):
    jpeg = encode(photo, "JPEG", quality=90)
    sof = jpeg.index(b"\xff\xc0")
    assert reason(jpeg[: sof + 4] + b"\x0c" + jpeg[sof + 5 :]) == "unsupported"  # 12-bit samples
    assert reason(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n") == "unsupported"
    assert reason(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64) == "unsupported"
    if not features.check("webp"):  # this build: no libwebp
        assert reason(b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 40) == "unsupported"


def test_too_large_is_decided_on_the_header():
    # Headers claiming huge sizes with almost no data: decoding first would say "truncated", not "too_large".
    assert reason(png_bytes(9000, 9000)) == "too_large"  # above ours (8192^2), below Pillow's warning
    assert reason(png_bytes(20000, 20000)) == "too_large"  # Pillow's own DecompressionBombError
    jpeg = bytearray(encode(Image.new("RGB", (64, 48)), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    assert reason(bytes(jpeg)) == "too_large"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning raised as an exception
        assert reason(png_bytes(10000, 10000)) == "too_large"
        assert reason(png_bytes(10000, 10000), max_pixels=10**9) == "too_large"


def test_max_pixels_is_configurable():
    data = photo_bytes("astronaut.jpg")  # 512x512
    assert reason(data, max_pixels=512 * 512 - 1) == "too_large"
    assert codec.canonicalize(data, max_pixels=512 * 512) == codec.canonicalize(data)


def test_png_text_chunk_bomb():
    bomb = png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * (4 << 20)))
    data = png_bytes(4, 4, b"\x00" + b"\x00" * 12)
    data = data[:33] + bomb + data[33:]
    assert reason(data) == "too_large"


def test_min_side():
    data = encode(Image.new("RGB", (100, 50), (9, 9, 9)), "PNG")
    assert reason(data, min_side=64) == "too_small"
    assert codec.canonicalize(data, min_side=50)
    assert codec.canonicalize(data)  # default 0 accepts


def test_max_aspect_ratio_is_checked_on_the_source_either_way_round():
    wide = encode(Image.new("RGB", (400, 100), (9, 9, 9)), "PNG")
    tall = encode(Image.new("RGB", (100, 400), (9, 9, 9)), "PNG")
    assert reason(wide, max_aspect_ratio=3) == reason(tall, max_aspect_ratio=3) == "bad_aspect_ratio"
    assert codec.canonicalize(wide, max_aspect_ratio=4)  # exactly 4:1 is allowed
    assert codec.canonicalize(wide)  # default 0 accepts


def test_batch_of_mixed_inputs_never_raises_anything_but_codec_error(photo):
    good = encode(photo, "JPEG", quality=90)
    rng = random.Random(3)
    inputs = [good[: rng.randrange(len(good))] for _ in range(30)]
    for _ in range(30):
        d = bytearray(good)
        for _ in range(rng.randrange(1, 30)):
            d[rng.randrange(len(d))] = rng.randrange(256)
        inputs.append(bytes(d))
    outcomes = []
    for d in inputs:
        try:
            codec.canonicalize(d)
            outcomes.append("ok")
        except codec.CodecError as e:
            outcomes.append(e.reason)
    assert set(outcomes) <= {"ok", *codec.REASONS}
    assert "truncated" in outcomes and "ok" in outcomes


# ---------------------------------------------------------------------------------------------- model output


def test_decode_tolerant_on_complete_streams(body):
    expected = pixels(body)
    for data in [body, codec.assemble(body), b"junk\xff\x00" + body + b"trailing\xff\xd8\x00"]:
        im, complete = decode_tolerant(data)
        assert complete and im.mode == "RGB"
        assert np.array_equal(np.asarray(im, dtype=np.int16), expected)
    assert repair(codec.assemble(body)) == codec.assemble(body)
    foreign = photo_bytes("chelsea.jpg")  # a normal JPEG file with its own tables
    im, complete = decode_tolerant(foreign)
    assert complete and np.array_equal(np.asarray(im), np.asarray(Image.open(io.BytesIO(foreign)).convert("RGB")))


def test_decode_tolerant_on_incomplete_streams(body):
    for data in [body[:-2], body[2:], body[: len(body) // 2], body[:40], b"", b"\xff"]:
        im, complete = decode_tolerant(data)
        assert not complete and im.size == (256, 256)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # no global was flipped


@pytest.mark.parametrize("ratio", [0.125, 0.375, 0.5, 0.75])
def test_prompt_prefix_and_its_decoding(body, ratio):
    n = int(32 * ratio)
    prefix = prompt_prefix(body, ratio)
    assert body.startswith(prefix) and prefix.endswith(b"\xff\xd7")
    scan = segments(prefix + EOI)[-1][1]
    assert scan.count(b"\xff\xd7") == n and len(restart_markers(scan)) == 8 * n  # 8n MCUs
    im, complete = decode_tolerant(prefix)
    assert not complete
    got, full = np.asarray(im, dtype=np.int16), pixels(body)
    rows = 8 * n  # n even here: n/2 whole MCU rows; the last row's chroma upsampling sees the filled area
    assert np.array_equal(got[: rows - 1], full[: rows - 1])
    assert not np.array_equal(got[rows:], full[rows:])


def test_prompt_prefix_rejects_bad_ratios(body):
    for ratio in [0, -0.5, 1 / 64, 1.0, 1.5]:
        with pytest.raises(ValueError):
            prompt_prefix(body, ratio)
    with pytest.raises(ValueError):
        prompt_prefix(prompt_prefix(body, 0.25), 0.5)  # fewer markers than asked for
    with pytest.raises(ValueError):
        prompt_prefix(b"not a jpeg", 0.5)


def _assert_well_formed(fixed: bytes) -> None:
    assert fixed.startswith(SOI) and fixed.endswith(EOI)
    im = Image.open(io.BytesIO(fixed))  # strict decode: LOAD_TRUNCATED_IMAGES stays off
    im.load()
    assert im.size[0] > 0 and im.size[1] > 0
    assert repair(fixed) == fixed  # idempotent


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_repair_always_gives_a_decodable_file(body, data):
    """Model output can be anything: cut anywhere, bytes changed (header included), junk inserted."""
    assembled = codec.assemble(body)
    base = data.draw(st.sampled_from([body, assembled]))
    out = bytearray(base)
    for _ in range(data.draw(st.integers(0, 6))):
        pos = data.draw(st.integers(0, len(out) - 1))
        if data.draw(st.booleans()):
            out[pos] = data.draw(st.integers(0, 255))
        else:
            out[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    out = out[: data.draw(st.integers(0, len(out)))]
    fixed = repair(bytes(out))
    _assert_well_formed(fixed)
    decode_tolerant(bytes(out))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000))
def test_repair_of_arbitrary_bytes(garbage):
    _assert_well_formed(repair(garbage))
    im, complete = decode_tolerant(garbage)
    assert im.size == (256, 256) and not complete


def test_garbage_keeps_its_content_after_repair():
    # An untrained model writes noise: each output must still decode to its own image (not one blank file),
    # the same output always to the same file.
    rng = random.Random(11)
    outputs = [rng.randbytes(3000) for _ in range(3)] + [b"\xff\xd8" + rng.randbytes(3000)]
    fixed = [repair(o) for o in outputs]
    assert fixed == [repair(o) for o in outputs]
    images = [np.asarray(decode_tolerant(o)[0]) for o in outputs]
    for i in range(len(images)):
        for j in range(i):
            assert fixed[i] != fixed[j] and not np.array_equal(images[i], images[j])


def test_repair_replaces_headers_libjpeg_would_refuse(body):
    sof = body.index(b"\xff\xc0")
    too_many_blocks = body[: sof + 11] + b"\x22\x00\x02\x22\x01\x03\x22\x01" + body[sof + 19 :]  # 12 blocks per MCU
    undefined_table = body[: sof + 13] + b"\x03" + body[sof + 14 :]  # component 2 uses quantization table 3
    progressive = body[: sof + 1] + b"\xc2" + body[sof + 2 :]
    for damaged in (too_many_blocks, undefined_table, progressive):
        assert len(damaged) == len(body) and damaged != body
        fixed = repair(damaged)
        _assert_well_formed(fixed)
        im, complete = decode_tolerant(damaged)
        assert not complete and im.size == (256, 256)
        # The canonical header replaces the bad one and the entropy data is kept: the image is still there.
        assert mean_diff(np.asarray(im), pixels(body)) < 1


def test_repair_of_random_header_damage(body, photo):
    """Seeded fuzzing of the header region (where a wrong length or table makes libjpeg fail hard)."""
    rng = random.Random(7)
    bases = [codec.assemble(body), body, encode(photo, "JPEG", quality=80)]
    for i in range(1500):
        d = bytearray(bases[i % 3])
        for _ in range(rng.randrange(1, 6)):
            d[rng.randrange(700)] = rng.randrange(256)
        _assert_well_formed(repair(bytes(d)))


def test_bad_arguments_are_programming_errors_not_codec_errors(body):
    data = photo_bytes("rocket.jpg")
    for kwargs in ({"size": 0}, {"quality": 0}, {"quality": 101}):
        with pytest.raises(ValueError):
            codec.canonicalize(data, **kwargs)
    small = codec.canonicalize(data, size=64, quality=50)
    im = Image.open(io.BytesIO(codec.assemble(small, quality=50)))
    assert im.size == (64, 64) and len(restart_markers(segments(small)[-1][1])) == 15  # 4x4 MCUs


# ---------------------------------------------------------------------------------------------- repair keeps data


def _paper_prefix(body: bytes, ratio: float) -> bytes:
    """The paper's rule, written independently: cut after the n-th FF D7, n = int(32 * ratio)."""
    i = 0
    for _ in range(int(32 * ratio)):
        i = body.index(b"\xff\xd7", i) + 2
    return body[:i]


@pytest.mark.parametrize("ratio", [0.25, 0.375, 0.5])
def test_prompts_at_256_are_the_papers(body, ratio):
    assert prompt_prefix(body, ratio) == _paper_prefix(body, ratio)


def test_a_bogus_segment_length_keeps_the_image(body):
    # Two of `make sample`'s images were blank: a header length the model got wrong swallowed the whole stream.
    dri = body.index(b"\xff\xdd")
    for damaged in (body[: dri + 2] + b"\xf3\x10" + body[dri + 4 :],  # DRI claims 62,224 bytes
                    body[: dri + 1] + b"\x11" + body[dri + 2 :]):  # a marker byte that is no marker
        report = repair_report(damaged)
        assert report.header_replaced and not report.complete
        assert report.mcus == report.mcus_total == 256
        im, complete = decode_tolerant(damaged)
        assert not complete and mean_diff(np.asarray(im), pixels(body)) < 1


def test_a_foreign_marker_in_the_scan_loses_one_mcu_not_the_rest(body):
    scan_start = len(codec.canonical_header())
    cut = [m.start() for m in re.finditer(rb"\xff[\xd0-\xd7]", body[scan_start:])][100] + scan_start
    damaged = body[: cut - 3] + b"\xff\xc4" + body[cut - 3 :]  # inside MCU 101
    report = repair_report(damaged)
    assert report.markers_dropped == 1 and not report.complete and report.mcus == 256
    got, full = np.asarray(decode_tolerant(damaged)[0], dtype=np.int16), pixels(body)
    assert mean_diff(got, full) < 1  # one 16x16 block of 65,536 pixels at most
    assert np.array_equal(got[112:], full[112:])  # every MCU row after the damaged one (row 6) is intact


def test_restart_markers_are_renumbered_in_sequence(body):
    scan_start = len(codec.canonical_header())
    pos = [m.start() for m in re.finditer(rb"\xff[\xd0-\xd7]", body[scan_start:])]
    damaged = bytearray(body)
    for k in (3, 50, 200):
        damaged[scan_start + pos[k] + 1] = 0xD0 + (k + 3) % 8  # the model skipped ahead in the cycle
    report = repair_report(bytes(damaged))
    assert report.restarts_renumbered == 3 and not report.complete
    assert report.jpeg == codec.assemble(body)  # renumbering restores the exact stream


def test_restarts_past_the_last_mcu_end_the_image(body):
    overlong = body[:-2] + b"\x12\x34\xff\xd7\x56\xff\xd0\x78" + EOI
    report = repair_report(overlong)
    assert report.mcus == 256 and not report.complete
    assert report.jpeg.startswith(codec.assemble(body)[:-2])


@pytest.mark.parametrize("k", [0, 1, 17, 254])
def test_mcus_present_counts_closed_mcus(body, k):
    scan_start = len(codec.canonical_header())
    ends = [m.end() for m in re.finditer(rb"\xff[\xd0-\xd7]", body[scan_start:])]
    report = repair_report(body[: scan_start + ends[k] + 1])  # one byte into MCU k + 2
    assert report.mcus == k + 1 and report.mcus_total == 256 and not report.complete
    assert repair_report(body).mcu_fraction == 1.0 and repair_report(body).complete


def test_image_size_64_prompts_and_repair():
    body = codec.canonicalize(photo_bytes("coffee.jpg"), size=64)
    full = np.asarray(Image.open(io.BytesIO(codec.assemble(body))).convert("RGB"), dtype=np.int16)
    assert prompt_prefix(body, 0.5) == prompt_prefix(body, 0.6)  # 2 of 4 MCU rows either way
    for ratio, rows in ((0.25, 1), (0.5, 2), (0.75, 3)):
        prefix = prompt_prefix(body, ratio)
        assert len(restart_markers(segments(prefix + EOI)[-1][1])) == 4 * rows
        report = repair_report(prefix, size=64)
        assert report.mcus == 4 * rows and report.mcus_total == 16
        im, complete = decode_tolerant(prefix, size=64)
        got = np.asarray(im, dtype=np.int16)
        assert im.size == (64, 64) and not complete
        assert np.array_equal(got[: 16 * rows - 1], full[: 16 * rows - 1])
    for bad in (0.2, 1.0):  # 0.2 x 4 rows is no whole row
        with pytest.raises(ValueError, match="0.25 <= ratio"):
            prompt_prefix(body, bad)
    # A header lost entirely is replaced by the canonical header of the size asked for.
    headless = body[len(codec.canonical_header(64)) :]
    im, complete = decode_tolerant(headless, size=64)
    assert im.size == (64, 64) and mean_diff(np.asarray(im), full) < 1


def test_missing_mcus_decode_as_flat_grey(body):
    # A cut stream: the MCUs it lacks are written as flat blocks, not left to the decoder (which reads the missing
    # bits as zeros: one checkered MCU). The prompt's rows are intact, everything below is exactly grey 128.
    prefix = prompt_prefix(body, 0.5)
    got = np.asarray(decode_tolerant(prefix)[0], dtype=np.int16)
    assert np.array_equal(got[:127], pixels(body)[:127])
    assert (got[136:] == 128).all()  # below the first row after the cut (chroma upsampling reaches across)
    scan_start = len(codec.canonical_header())
    ends = [m.end() for m in re.finditer(rb"\xff[\xd0-\xd7]", body[scan_start:])]
    for cut in (scan_start + ends[40] + 5, scan_start + ends[-1] + 3, len(body) - 3):  # mid-MCU, in the last MCU
        fixed = repair(body[:cut])
        _assert_well_formed(fixed)
        report = repair_report(body[:cut])
        assert not report.complete and report.mcus == len(restart_markers(segments(body[:cut] + EOI)[-1][1]))
