"""Image sets for evaluation: a folder of image files, or the validation images of a `jpeglm preprocess` output.

    images = open_image_set("out/samples")            # every image file below the folder, sorted by path
    images = open_image_set("out/preprocess", num=500) # 500 validation images, spread evenly over the split
    for name, image in images: ...                     # PIL RGB images, streamed

Validation images are read back from the shards exactly as the model sees them: the split's rows are streamed in
order (one shard at a time, never the whole split in memory), each wanted image's token spans are joined, decoded
by the output's tokenizer and made a JPEG with the tables of the manifest's quality (pipeline.codec.assemble).
"Spread" picks image k_i = floor((i + 1/2) x M / N) of the M in the split, i = 0..N-1: deterministic, the same
images on every run, from the whole split rather than its first rows. Reading stops after the last one needed.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from evaluation.fid import EvalError
from pipeline import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ValidationImage:
    index: int  # position in the split's image order
    id: str
    tokens: np.ndarray  # body tokens, without BOS / EOS
    body: bytes  # the canonical body (no tables)
    jpeg: bytes  # a standard JPEG file of it


def is_preprocess_output(uri: str) -> bool:
    from pipeline.manifest import MANIFEST_NAME

    return storage.exists(storage.join(uri, MANIFEST_NAME))


def spread(total: int, num: int | None) -> list[int]:
    """`num` indices spread evenly over range(total) (all of them when num is None or >= total)."""
    if num is None or num >= total:
        return list(range(total))
    return [(2 * i + 1) * total // (2 * num) for i in range(num)]


def validation_images(uri: str, num: int | None = None, split: str = "validation") -> list[ValidationImage]:
    """`num` images of a preprocess output's split, spread over it (see the module docstring)."""
    from pipeline import codec
    from pipeline.manifest import read_manifest, split_image_tokens
    from pipeline.tokenizer import Tokenizer

    manifest = read_manifest(uri)
    total = (manifest.get("totals") or {}).get(split, {}).get("images", 0)
    if not total:
        raise EvalError(f"{uri} has no {split} images: preprocess with --val-fraction > 0 (e.g. 0.01)")
    tok = Tokenizer.load(storage.join(uri, manifest["tokenizer"]["path"]))
    quality = manifest["codec"]["quality"]
    out = []
    for index, image_id, tokens in split_image_tokens(uri, manifest, split, spread(total, num)):
        body = tok.decode(tokens.tolist())
        out.append(ValidationImage(index, image_id, tokens, body, codec.assemble(body, quality)))
    return out


def open_image_set(uri: str | os.PathLike, num: int | None = None) -> tuple[int, Iterator]:
    """(count, iterator of (name, PIL RGB image)) for a folder of images or a preprocess output (validation)."""
    from PIL import Image

    uri = os.fspath(uri)
    if not storage.exists(uri):
        raise EvalError(f"{uri}: no such folder")
    if is_preprocess_output(uri):
        images = validation_images(uri, num)
        return len(images), ((v.id, Image.open(io.BytesIO(v.jpeg)).convert("RGB")) for v in images)
    files = [f for f in storage.walk_files(uri) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise EvalError(f"{uri}: no image files ({', '.join(IMAGE_EXTENSIONS)}) and no manifest.json")
    files = [files[i] for i in spread(len(files), num)]

    def load():
        for f in files:
            try:
                yield f, Image.open(io.BytesIO(storage.read_bytes(f))).convert("RGB")
            except Exception as e:  # noqa: BLE001 - name the file; a damaged image in a set is the user's to fix
                raise EvalError(f"{f}: not a readable image ({type(e).__name__}: {e})") from None

    return len(files), load()
