"""FID / KID: the Frechet distance against an independent implementation, the real Inception network on real photos
(identical sets, blur), `jpeglm eval fid` on folders, and one-line errors for missing or wrong weights.

The network file comes from `make eval-weights` (`make test` runs it first)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

from evaluation import fid
from jpeglm.cli import main

pytestmark = pytest.mark.timeout(600)


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Written differently on purpose (as torchmetrics does it): eigenvalues of the non-symmetric S1 S2, float64."""
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2).astype(np.complex128)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).real.sum())


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """n samples of one fixed d-dimensional distribution (correlated, offset like real features), plus `shift`."""
    law = np.random.default_rng(d)
    mix, offset = law.normal(size=(d, d)) / np.sqrt(d), law.gamma(2.0, size=d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ mix * 3 + shift + offset


@pytest.mark.parametrize("n_a, n_b, d", [(600, 500, 64), (40, 70, 256), (30, 30, 512), (3000, 20, 32)])
def test_frechet_distance_equals_an_independent_implementation(n_a, n_b, d):
    a, b = _features(n_a, d, 1), _features(n_b, d, 2, shift=0.3)
    ours, ref = fid.frechet_distance(a, b), _reference_fid(a, b)
    assert ours == pytest.approx(ref, rel=1e-6)
    assert fid.frechet_distance(b, a) == pytest.approx(ours, rel=1e-9)  # symmetric
    # Identical sets: 0 up to rounding, also when N < D (singular covariances).
    assert abs(fid.frechet_distance(a, a.copy())) < 1e-8 * np.trace(np.cov(a, rowvar=False))


def test_kid_is_unbiased_and_separates():
    same = [fid.kernel_inception_distance(_features(200, 64, s), _features(200, 64, s + 100), subsets=20)[0]
            for s in range(5)]
    assert abs(np.mean(same)) < 0.05 * fid.kernel_inception_distance(_features(200, 64, 1),
                                                                      _features(200, 64, 2, shift=0.5))[0]
    kid, std = fid.kernel_inception_distance(_features(300, 64, 1), _features(300, 64, 2, shift=0.5))
    assert kid > 5 * std > 0
    # The whole-kernel shortcut and per-subset kernels draw the same subsets and agree.
    a, b = _features(150, 32, 3), _features(120, 32, 4, shift=0.2)
    whole = fid.kernel_inception_distance(a, b, subsets=10, subset_size=50)
    limit = fid._WHOLE_KERNEL_MAX
    try:
        fid._WHOLE_KERNEL_MAX = 0
        per_subset = fid.kernel_inception_distance(a, b, subsets=10, subset_size=50)
    finally:
        fid._WHOLE_KERNEL_MAX = limit
    assert whole == pytest.approx(per_subset, rel=1e-9)


@pytest.fixture(scope="module")
def photos():
    """12 real photos (random crops of the bundled ones, of various sizes)."""
    from pipeline.sample_images import derive

    return [Image.open(io.BytesIO(data)).convert("RGB") for _, data in derive(12, seed=3)]


@pytest.fixture(scope="module")
def net():
    return fid.load_inception()


def test_inception_input_range_and_resize(photos):
    x = fid.inception_input(photos[0])
    assert x.shape == (3, 299, 299) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 0.9921875
    white = fid.inception_input(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert np.allclose(white, 0.9921875)  # TF's range: 255 -> 127/128


def test_identical_sets_give_zero_and_blur_increases_fid(net, photos):
    real = fid.extract_features(net, photos, batch_size=8)
    assert real.shape == (12, 2048) and real.dtype == np.float64
    again = fid.extract_features(net, reversed(photos[:4]), batch_size=3)[::-1]  # other batches, other order
    assert np.allclose(again, real[:4], rtol=1e-4, atol=1e-4)
    assert abs(fid.frechet_distance(real, real.copy())) < 1e-6
    scores = []
    for radius in (1, 3, 8):
        blurred = fid.extract_features(net, (p.filter(ImageFilter.GaussianBlur(radius)) for p in photos), 8)
        scores.append(fid.fid_kid(real, blurred))
    fids, kids = [s["fid"] for s in scores], [s["kid"] for s in scores]
    assert 1 < fids[0] < fids[1] < fids[2], fids
    assert kids[0] < kids[1] < kids[2], kids


def test_eval_fid_command_on_folders(photos, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "nested").mkdir(parents=True)
    for i, p in enumerate(photos[:5]):
        p.save(tmp_path / "a" / f"{i}.png")
        p.resize((100, 80)).save(tmp_path / "b" / "nested" / f"{i}.jpg", quality=90)  # any size, any format
    out = tmp_path / "r" / "fid.json"
    assert main(["eval", "fid", str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(out), "--num", "4"]) == 0
    result = json.loads(out.read_text())
    assert {"fid", "kid", "kid_std", "num_real", "num_fake"} <= set(result)
    assert result["num_real"] == result["num_fake"] == 4 and result["fid"] > 0
    assert "FID" in capsys.readouterr().out


def test_missing_or_wrong_weights_give_one_line_with_the_fix(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "a" / "x.png")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "a" / "y.png")
    wrong = tmp_path / "wrong.pt"
    wrong.write_bytes(b"not a network")
    for weights, says in ((tmp_path / "missing.pt", "FID Inception weights not found at"),
                          (wrong, "is not the FID Inception network")):
        assert main(["eval", "fid", str(tmp_path / "a"), str(tmp_path / "a"), "--inception", str(weights)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and says in err and "make eval-weights" in err, err
    assert main(["eval", "fid", str(tmp_path / "nothing"), str(tmp_path / "a")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_default_weights_path_is_the_make_target(monkeypatch):
    monkeypatch.delenv("JPEGLM_INCEPTION", raising=False)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert fid.default_inception_path() == os.path.join(root, ".cache", fid.INCEPTION_FILE)
    makefile = open(os.path.join(root, "Makefile")).read()
    assert f"INCEPTION := .cache/{fid.INCEPTION_FILE}" in makefile
    test_target = next(line for line in makefile.splitlines() if line.startswith("test:"))
    assert "eval-weights" in test_target.split()  # make test fetches the weights first


def test_an_installed_package_looks_for_the_weights_in_the_user_cache(monkeypatch, tmp_path):
    """Installed (not editable), the module lies in site-packages with no checkout around it: the default is the
    user's cache folder, never a .cache/ inside site-packages."""
    monkeypatch.delenv("JPEGLM_INCEPTION", raising=False)
    site = tmp_path / "site-packages" / "evaluation"
    site.mkdir(parents=True)
    monkeypatch.setattr(fid, "__file__", str(site / "fid.py"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fid.default_inception_path() == str(tmp_path / "xdg" / "jpeglm" / fid.INCEPTION_FILE)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fid.default_inception_path() == str(tmp_path / "home" / ".cache" / "jpeglm" / fid.INCEPTION_FILE)
    monkeypatch.setenv("JPEGLM_INCEPTION", str(tmp_path / "mine.pt"))
    assert fid.default_inception_path() == str(tmp_path / "mine.pt")


def test_bench_eval_feature_figures_with_small_shapes(tmp_path):
    """bench/bench_eval.py's feature benchmark end to end on 4 images (the eval timing needs `make demo`)."""
    from helpers import load_bench

    bench = load_bench("bench_eval")
    out = tmp_path / "eval.json"
    assert bench.main(["--out", str(out), "--images", "4", "--batch", "2", "--skip-eval"]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and "eval_completion" not in result
    for figures in result["features"].values():
        assert figures["images"] == 4 and figures["images_per_s"] > 0 and figures["network_only_images_per_s"] > 0
