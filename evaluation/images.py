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
import json
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
    return storage.exists(storage.join(uri, "manifest.json"))


def read_manifest(uri: str) -> dict:
    from pipeline.shards import manifest_format_problem

    path = storage.join(uri, "manifest.json")
    if not storage.exists(path):
        raise EvalError(f"{uri}: no manifest.json, so not a finished `jpeglm preprocess` output")
    manifest = json.loads(storage.read_bytes(path))
    problem = manifest_format_problem(manifest)
    if problem:
        raise EvalError(f"{path}: {problem}")
    return manifest


def spread(total: int, num: int | None) -> list[int]:
    """`num` indices spread evenly over range(total) (all of them when num is None or >= total)."""
    if num is None or num >= total:
        return list(range(total))
    return [(2 * i + 1) * total // (2 * num) for i in range(num)]


def split_image_tokens(uri: str, manifest: dict, split: str, wanted: list[int] | None = None
                       ) -> Iterator[tuple[int, str, np.ndarray]]:
    """(index in the split, image id, body tokens) for the wanted images of a split, in stream order."""
    from pipeline.shards import read_samples

    wanted_set = set(wanted) if wanted is not None else None
    last = max(wanted) if wanted else None
    index, image_id, pieces = -1, None, None
    for shard in sorted((s for s in manifest["shards"] if s["split"] == split), key=lambda s: s["first_row"]):
        for _, tokens, meta in read_samples(storage.join(uri, shard["path"])):
            for span in meta["images"]:
                if span["bos"]:
                    index += 1
                    image_id = span["id"]
                    pieces = [] if wanted_set is None or index in wanted_set else None
                    if pieces is None and last is not None and index > last:
                        return
                if pieces is None:
                    continue
                pieces.append(tokens[span["start"] : span["end"]])
                if span["eos"]:
                    joined = np.concatenate(pieces)
                    yield index, image_id, joined[1:-1]
                    pieces = None
                    if index == last:
                        return


def validation_images(uri: str, num: int | None = None, split: str = "validation") -> list[ValidationImage]:
    """`num` images of a preprocess output's split, spread over it (see the module docstring)."""
    from pipeline import codec
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
