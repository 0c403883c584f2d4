"""The bundled sample dataset: real photos, and a deterministic set of web-like images derived from them.

`pipeline/photos/` holds a few public-domain / CC0 photographs taken from scikit-image's bundled data
(see photos/LICENSES.md). `derive(n)` turns them into n distinct images that look like a web crawl: random
crops of varied aspect ratio, 0.1-1 megapixel (mostly 0.3-0.5), mostly JPEG at varied quality, some PNG,
some grayscale. The same n always gives the same bytes.

    python -m pipeline.sample_images --out data/sample-images --num 2000
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
from importlib import resources
from typing import Iterator

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def photo_names() -> list[str]:
    return sorted(
        p.name for p in resources.files("pipeline").joinpath("photos").iterdir() if p.name.lower().endswith(PHOTO_SUFFIXES)
    )


def photo_bytes(name: str) -> bytes:
    """The original bytes of one bundled photo (e.g. 'astronaut.jpg')."""
    return resources.files("pipeline").joinpath("photos", name).read_bytes()


def derive(n: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """Yield (file name, encoded bytes) for n deterministic web-like images."""
    from PIL import Image

    originals = []
    for name in photo_names():
        im = Image.open(io.BytesIO(photo_bytes(name)))
        im.load()
        originals.append(im.convert("RGB") if im.mode not in ("RGB", "L") else im)
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        src = originals[i % len(originals)]
        megapixels = rng.choice([0.1, 0.2]) if rng.random() < 0.1 else rng.uniform(0.3, 0.5)
        if rng.random() < 0.1:
            megapixels = rng.uniform(0.5, 1.0)
        aspect = rng.choice([1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, rng.uniform(0.5, 2.0)])
        # Random crop of the source with the target aspect, at least 40% of the short side.
        sw, sh = src.size
        crop_h = rng.uniform(0.4, 1.0) * min(sh, sw / aspect)
        crop_w = crop_h * aspect
        x0 = rng.uniform(0, sw - crop_w)
        y0 = rng.uniform(0, sh - crop_h)
        out_h = int((megapixels * 1e6 / aspect) ** 0.5)
        out_w = max(16, int(out_h * aspect))
        im = src.resize((out_w, max(16, out_h)), Image.BICUBIC, box=(x0, y0, x0 + crop_w, y0 + crop_h))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < 0.05 and im.mode == "RGB":
            im = im.convert("L")
        # JPEG and PNG only: WebP support depends on how pillow-simd was built, and the set must be the same everywhere.
        fmt = rng.choices(["JPEG", "PNG"], weights=[85, 15])[0]
        buf = io.BytesIO()
        if fmt == "JPEG":
            im.save(buf, "JPEG", quality=rng.randint(70, 95), optimize=rng.random() < 0.3, progressive=rng.random() < 0.2)
        else:
            im.save(buf, "PNG", compress_level=1)
        ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
        yield f"img-{i:06d}.{ext}", buf.getvalue()


def write_sample_images(out_dir: str, n: int, seed: int = 0) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, data in derive(n, seed):
        path = os.path.join(out_dir, name)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the bundled sample dataset of derived real photos.")
    parser.add_argument("--out", required=True, help="folder to write img-NNNNNN.{jpg,png} into")
    parser.add_argument("--num", type=int, default=2000, help="number of images (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="derivation seed (default 0)")
    args = parser.parse_args(argv)
    if args.num <= 0:
        parser.error("--num must be positive")
    paths = write_sample_images(args.out, args.num, args.seed)
    total = sum(os.path.getsize(p) for p in paths)
    print(f"wrote {len(paths)} images ({total / 1e6:.1f} MB) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
