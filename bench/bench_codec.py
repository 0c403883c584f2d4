"""Per-core speed of the canonical codec + tokenizer against a naive baseline, on the same real photos.

    python bench/bench_codec.py --out bench/results/codec.json [--num 400] [--repeat 5]

The fixed set is pipeline.sample_images.derive(N): web-like crops of the bundled real photos (mostly 0.3-0.5 MP,
85% JPEG at quality 70-95, 15% PNG, a few grayscale). The process is pinned to one CPU and everything runs in
one thread, so the figures are images/s per core. Measured:

- ours:  pipeline.codec.canonicalize (DCT-domain downscaled decode, one resize(box=...), orientation on the small
         image) + pipeline.tokenizer.Tokenizer.encode (vectorized byte mapping + SentencePiece);
- naive: Image.open -> full-size decode -> convert("RGB") -> center crop -> LANCZOS resize -> save with the same
         JPEG parameters -> strip the tables -> "".join(map(chr, ...)) per-character mapping -> SentencePiece encode
         with the same model.

The two run alternately `--repeat` times over the whole set (machine noise hits both alike); images/s come from the
median pass, the speedup is the median of the per-pass ratios. A separate pass times each stage (decode, resize,
encode, tokenize) per image for the breakdown, and compares the two outputs' pixels (mean absolute difference, on
0..255) to show what DCT scaling costs in fidelity. The tokenizer is fitted once, outside the timing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TARGET_IMAGES_PER_S = 300  # per core, ours, on this set (issue 2)
TARGET_SPEEDUP = 1.5


def naive_canonicalize(data: bytes, size: int, quality: int):
    """The straightforward pipeline, stage by stage: returns (body, {stage: seconds})."""
    from PIL import Image

    t0 = time.perf_counter()
    im = Image.open(io.BytesIO(data))
    im.load()
    im = im.convert("RGB")
    t1 = time.perf_counter()
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    t2 = time.perf_counter()
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, subsampling=2, restart_marker_blocks=1)
    body = strip_tables(buf.getvalue())
    t3 = time.perf_counter()
    return body, {"decode": t1 - t0, "resize": t2 - t1, "encode": t3 - t2}


def strip_tables(jpeg: bytes) -> bytes:
    """Drop the DQT and DHT segments of a JPEG file (what the naive pipeline does after a normal save)."""
    out = bytearray(jpeg[:2])
    i = 2
    while True:
        marker = jpeg[i + 1]
        length = int.from_bytes(jpeg[i + 2 : i + 4], "big")
        if marker not in (0xDB, 0xC4):
            out += jpeg[i : i + 2 + length]
        i += 2 + length
        if marker == 0xDA:
            return bytes(out + jpeg[i:])


def naive_tokenize(sp, body: bytes) -> list[int]:
    return sp.encode("".join(map(lambda b: chr(0x2800 + b), body)))


def ours_stages(codec, tok, data: bytes, size: int, quality: int):
    """codec.canonicalize split at its internal stage boundaries, for the breakdown only."""
    t0 = time.perf_counter()
    im = codec._open(data)
    codec._check_size(im, codec.DEFAULT_MAX_PIXELS, 0)
    pixels, box, orientation = codec._decode(im, size)
    t1 = time.perf_counter()
    square = codec._square(pixels, box, size, orientation)
    t2 = time.perf_counter()
    body = codec._encode_body(square, quality)
    t3 = time.perf_counter()
    tok.encode(body)
    t4 = time.perf_counter()
    return body, {"decode": t1 - t0, "resize": t2 - t1, "encode": t3 - t2, "tokenize": t4 - t3}


def decode_floor(images: list[bytes]) -> dict:
    """What decoding alone costs, per format: JPEG at full size and at 1/8 DCT scale (the least any JPEG decode can
    cost: the entropy decoding stays), PNG (no reduced decode exists). Bounds the speedup any canonicalize can reach
    over the naive pipeline on this set."""
    from PIL import Image

    totals, counts = Counter(), Counter()
    for data in images:
        im = Image.open(io.BytesIO(data))
        fmt = "JPEG" if im.format == "JPEG" else "other"
        variants = {"full": None, "eighth": 8} if fmt == "JPEG" else {"full": None}
        for name, scale in variants.items():
            t = time.perf_counter()
            im = Image.open(io.BytesIO(data))
            if scale:
                im.draft(im.mode, (im.size[0] // scale, im.size[1] // scale))
            im.load()
            totals[f"{fmt}_{name}"] += time.perf_counter() - t
        counts[fmt] += 1
    return {
        "jpeg_decode_full_ms": round(totals["JPEG_full"] / max(counts["JPEG"], 1) * 1e3, 3),
        "jpeg_decode_eighth_scale_ms": round(totals["JPEG_eighth"] / max(counts["JPEG"], 1) * 1e3, 3),
        "other_formats_decode_ms": round(totals["other_full"] / max(counts["other"], 1) * 1e3, 3),
        "decode_floor_ms_per_image": round((totals["JPEG_eighth"] + totals["other_full"]) / len(images) * 1e3, 3),
    }


def machine_info() -> dict:
    import PIL
    import sentencepiece
    from PIL import features

    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    return {
        "cpu": cpu or platform.processor(),
        "avx2": " avx2" in cpuinfo,
        "cpus_visible": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pillow": PIL.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "sentencepiece": sentencepiece.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/codec.json", help="JSON result path (local or s3://)")
    parser.add_argument("--num", type=int, default=400, help="images in the fixed set derive(N) (default 400)")
    parser.add_argument("--repeat", type=int, default=5, help="timed passes per pipeline, alternating (default 5)")
    parser.add_argument("--fit", type=int, default=100, help="bodies the tokenizer is fitted on (default 100)")
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the first one allowed)")
    args = parser.parse_args(argv)
    if args.num <= 0 or args.repeat <= 0 or args.fit <= 0:
        parser.error("--num, --repeat and --fit must be positive")

    import numpy as np
    import sentencepiece as spm
    from PIL import Image
    from tqdm import tqdm

    from pipeline import codec, storage
    from pipeline.sample_images import derive
    from pipeline.tokenizer import Tokenizer

    pinned = None
    if hasattr(os, "sched_setaffinity"):
        pinned = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {pinned})

    images = [data for _, data in tqdm(derive(args.num), total=args.num, desc="deriving images", unit="img")]
    size, quality = codec.SIZE, codec.QUALITY
    bodies = [codec.canonicalize(d) for d in images]
    tok = Tokenizer.train(bodies[: args.fit], vocab_size=320)
    sp = spm.SentencePieceProcessor(model_proto=tok.model_bytes)

    def run_ours():
        for d in images:
            tok.encode(codec.canonicalize(d, size, quality))

    def run_naive():
        for d in images:
            naive_tokenize(sp, naive_canonicalize(d, size, quality)[0])

    run_ours(), run_naive()  # warm caches, plugin imports, tables
    times = {"ours": [], "naive": []}
    for _ in tqdm(range(args.repeat), desc="timed passes", unit="pass"):
        for name, fn in (("ours", run_ours), ("naive", run_naive)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    ratios = [n / o for o, n in zip(times["ours"], times["naive"])]

    stages = {"ours": Counter(), "naive": Counter()}
    diffs = []
    for d in tqdm(images, desc="stage breakdown", unit="img"):
        body, st = ours_stages(codec, tok, d, size, quality)
        stages["ours"].update(st)
        naive_body, st = naive_canonicalize(d, size, quality)
        t = time.perf_counter()
        naive_tokenize(sp, naive_body)
        st["tokenize"] = time.perf_counter() - t
        stages["naive"].update(st)
        a, b = (np.asarray(Image.open(io.BytesIO(codec.assemble(x))).convert("RGB"), dtype=np.int16)
                for x in (body, naive_body))
        diffs.append(float(np.abs(a - b).mean()))

    floor = decode_floor(images)
    formats = Counter()
    megapixels = []
    for d in images:
        im = Image.open(io.BytesIO(d))
        formats[im.format] += 1
        megapixels.append(im.size[0] * im.size[1] / 1e6)

    def summary(name: str) -> dict:
        median = statistics.median(times[name])
        return {
            "images_per_s": round(args.num / median, 1),
            "images_per_s_per_pass": [round(args.num / t, 1) for t in times[name]],
            "breakdown_ms_per_image": {k: round(v / args.num * 1e3, 3) for k, v in stages[name].items()},
        }

    result = {
        "bench": "codec",
        "command": "python bench/bench_codec.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "what": "images/s per core (one pinned CPU, one thread): image file bytes -> canonical body -> token ids",
        "images": {
            "set": f"pipeline.sample_images.derive({args.num})",
            "count": args.num,
            "formats": dict(formats),
            "megapixels_mean": round(statistics.mean(megapixels), 3),
            "megapixels_median": round(statistics.median(megapixels), 3),
            "file_kb_mean": round(statistics.mean(len(d) for d in images) / 1e3, 1),
            "body_bytes_mean": round(statistics.mean(len(b) for b in bodies), 1),
        },
        "ours": summary("ours"),
        "naive": summary("naive"),
        "speedup": round(statistics.median(ratios), 3),
        "speedup_per_pass": [round(r, 3) for r in ratios],
        "fidelity": {"mean_abs_pixel_diff_ours_vs_naive": round(statistics.mean(diffs), 3),
                     "max_abs_pixel_diff_mean_per_image": round(max(diffs), 3)},
        "limits": {
            **floor,
            # Even if resize, encode and tokenize were free and every JPEG decoded at its 1/8-scale cost:
            "max_speedup_bound": round(sum(times["naive"]) / args.repeat / args.num * 1e3
                                       / floor["decode_floor_ms_per_image"], 3),
        },
        "targets": {"images_per_s": TARGET_IMAGES_PER_S, "speedup": TARGET_SPEEDUP},
        "machine": {**machine_info(), "pinned_cpu": pinned, "repeat": args.repeat},
    }
    result["targets"]["met"] = (result["ours"]["images_per_s"] >= TARGET_IMAGES_PER_S
                                and result["speedup"] >= TARGET_SPEEDUP)
    storage.write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())

    o, n = result["ours"], result["naive"]
    print(f"codec bench on {args.num} images ({dict(formats)}, mean {result['images']['megapixels_mean']} MP), "
          f"CPU {pinned}, {args.repeat} passes:")
    for name, r in (("ours", o), ("naive", n)):
        parts = ", ".join(f"{k} {v:.3f}" for k, v in r["breakdown_ms_per_image"].items())
        print(f"  {name:5s} {r['images_per_s']:7.1f} images/s per core   (ms/image: {parts})")
    print(f"  speedup {result['speedup']:.2f}x (per pass {result['speedup_per_pass']}); mean |pixel diff| ours vs naive "
          f"{result['fidelity']['mean_abs_pixel_diff_ours_vs_naive']:.2f}/255")
    lim = result["limits"]
    print(f"  decode alone: JPEG {lim['jpeg_decode_full_ms']:.3f} ms full size, {lim['jpeg_decode_eighth_scale_ms']:.3f} ms "
          f"at 1/8 scale; other formats (PNG) {lim['other_formats_decode_ms']:.3f} ms; no pipeline can beat naive by more "
          f"than {lim['max_speedup_bound']:.2f}x on this set")
    print(f"  targets (>= {TARGET_IMAGES_PER_S} images/s, >= {TARGET_SPEEDUP}x): "
          f"{'met' if result['targets']['met'] else 'NOT met'}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
