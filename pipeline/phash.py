"""A 64-bit perceptual hash (pHash) of a canonical image, with numpy only.

The standard recipe (as phash.org's ph_dct_imagehash): the image as 32x32 grayscale -> 2D DCT-II (two matrix
products with the orthonormal DCT matrix) -> the 8x8 lowest frequencies without the DC row and column
(coefficients [1:9, 1:9]) -> bit = coefficient > their median. Bit 63 (the most significant) is coefficient [1, 1],
then row by row. A brightness change moves mostly the DC term, which is left out; re-compression and resizing
barely move the low frequencies: near-copies land within a few bits (calibrated in bench/bench_neardup.py).

The 32x32 grayscale comes from the canonical body itself, decoded with libjpeg's DCT-domain downscaling
(`draft`: at 256 px the 1/8 scale *is* 32x32, from the DC coefficients alone, ~0.1 ms): the hash is a pure function
of the body, so an image and its exact copies always share it, and excluded images hashed the same way compare
exactly.
"""

from __future__ import annotations

import functools
import io

import numpy as np

HASH_SIDE = 32  # the grayscale image the DCT runs on
LOW = 8  # the LOW x LOW lowest frequencies (after the DC row and column) make the 64 bits
_WEIGHTS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64))  # bit 63 first


@functools.cache
def _dct_matrix(n: int = HASH_SIDE) -> np.ndarray:
    """Orthonormal DCT-II matrix D: D @ x is the DCT of column vector x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def phash_gray(gray: np.ndarray) -> int:
    """pHash of a HASH_SIDE x HASH_SIDE grayscale array (any numeric dtype)."""
    d = _dct_matrix()
    coeffs = (d @ gray.astype(np.float64) @ d.T)[1 : LOW + 1, 1 : LOW + 1].ravel()
    bits = coeffs > np.median(coeffs)
    return int(np.sum(_WEIGHTS[bits], dtype=np.uint64))


def gray_of_body(body: bytes, quality: int) -> np.ndarray:
    """The canonical body (tables stripped) as HASH_SIDE x HASH_SIDE grayscale: libjpeg decodes the luma only at the
    smallest DCT scale that keeps HASH_SIDE pixels (1/8 at 256 px: no IDCT beyond the DC term), then a box filter
    covers other image sizes."""
    from PIL import Image

    from pipeline import codec

    im = Image.open(io.BytesIO(codec.assemble(body, quality)))
    im.draft("L", (HASH_SIDE, HASH_SIDE))
    im = im.convert("L") if im.mode != "L" else im
    if im.size != (HASH_SIDE, HASH_SIDE):
        im = im.resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BOX)
    return np.asarray(im)


def phash_body(body: bytes, quality: int) -> int:
    """The pHash of a canonical body: what `phash` in the per-image stats holds."""
    return phash_gray(gray_of_body(body, quality))
