"""Near-duplicates: calibration of the pHash radius, the grouping stage at scale (simulated), and a real run.

    python bench/bench_neardup.py --out bench/results/neardup.json [--sim 1000000 2000000 5000000]
                                  [--task-hashes 2000000] [--real 2000]

1. recall: the bundled photos (pipeline/photos) and near-copies of each: downscaled 0.5-0.9x, JPEG re-compressed
   at q 40-95, cropped 1-5% (from one corner, and from every side), brightness x0.9-1.1, PNG and WebP round trips,
   and all of downscale 0.7 + q 60 + 2% crop at once; each copy canonicalized and hashed like a training image; the
   fraction of copies within R bits of their original, per kind and R.
2. false positives: pairs of distinct images within R bits. With 8 photos, "distinct" means: (a) crops of two
   different photos; (b) crops of the same photo that share under 20% of their pixels (intersection over union):
   another part of the same scene is another training image, while heavily overlapping crops are near-copies by
   any definition and are left out. 24 random crops per photo (30-70% of the short side, random place).
3. chance pairs at 23M images: the bit statistics measured on a population of distinct images (the derived sample
   set, pipeline/sample_images, 2000 web-like crops; pairs from different source photos), the distance of two
   unrelated images modelled two ways: bits independent with the measured per-bit probabilities (Poisson-binomial)
   and, to include the measured pairwise bit correlations, a beta-binomial with the measured mean and variance of
   the distance (the variance holds every pairwise covariance). P(distance <= R) x N(N-1)/2 = expected chance
   pairs at N images; the uniform-bits figure is shown for comparison.
4. scale: the grouping stage (band tasks, the components task, then the place tasks, each run as the plain
   function in a fresh process) on synthetic hashes with planted groups (10% of the images near-copies 1-4 bits from
   a base, 1% sharing one hash: flat images), bits drawn with the measured per-bit probabilities; seconds, peak RSS
   and bytes read of every task (the driver, the process that runs the phase, holds no per-image data).
   NEAR_TASK_HASHES = --task-hashes, NEAR_GROUP_IMAGES = --group-images.
5. real: `jpeglm preprocess --dedup near` on --real derived images (local Ray, 2 CPUs): the neardup phase's
   seconds and images/s next to the encode phase.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline import codec, hamming, phash, sample_images  # noqa: E402

RADII = list(range(0, 13))
N_TARGET = 23_000_000
REAL_DUP_FRACTION = 0.3  # the LAION-2B audit's "likely duplicates": the real pairs at 23M are ~millions


def _hash_of(data: bytes) -> int:
    return phash.phash_body(codec.canonicalize(data), codec.QUALITY)


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _originals() -> list[tuple[str, Image.Image]]:
    out = []
    for name in sample_images.photo_names():
        im = Image.open(io.BytesIO(sample_images.photo_bytes(name)))
        out.append((name, im.convert("RGB")))
    return out


def _copies(im: Image.Image) -> list[tuple[str, bytes]]:
    from PIL import ImageEnhance, features

    w, h = im.size
    out = []
    for s in (0.5, 0.6, 0.7, 0.8, 0.9):
        out.append((f"downscale {s}", _encode(im.resize((int(w * s), int(h * s)), Image.Resampling.LANCZOS))))
    for q in (40, 50, 60, 75, 95):
        out.append((f"jpeg q{q}", _encode(im, "JPEG", quality=q)))
    for c in (0.01, 0.02, 0.03, 0.05):
        out.append((f"crop {c:.0%} corner", _encode(im.crop((int(w * c), int(h * c), w, h)))))
        out.append((f"crop {c:.0%} sides", _encode(im.crop((int(w * c / 2), int(h * c / 2), w - int(w * c / 2),
                                                             h - int(h * c / 2))))))
    for f in (0.9, 0.95, 1.05, 1.1):
        out.append((f"brightness x{f}", _encode(ImageEnhance.Brightness(im).enhance(f))))
    out.append(("png round trip", _encode(im, "PNG")))
    if features.check("webp"):
        out.append(("webp q80 round trip", _encode(im, "WEBP", quality=80)))
    small = im.resize((int(w * 0.7), int(h * 0.7)), Image.Resampling.LANCZOS)
    sw, sh = small.size
    out.append(("downscale 0.7 + q60 + crop 2%", _encode(small.crop((int(sw * .02), int(sh * .02), sw, sh)), "JPEG",
                                                          quality=60)))
    return out


def recall(originals) -> dict:
    by_kind: dict[str, list[int]] = {}
    for _, im in originals:
        h0 = _hash_of(_encode(im, "JPEG", quality=98))
        for kind, data in _copies(im):
            family = kind.split(" ")[0] if "+" not in kind else kind
            by_kind.setdefault(family, []).append(int(hamming.distance(h0, _hash_of(data))))
    allds = [d for ds in by_kind.values() for d in ds]
    table = {kind: {"copies": len(ds), "distance_max": max(ds), "distance_mean": round(float(np.mean(ds)), 2),
                    "recall": {r: round(sum(d <= r for d in ds) / len(ds), 3) for r in RADII}}
             for kind, ds in sorted(by_kind.items())}
    table["all"] = {"copies": len(allds), "distance_max": max(allds),
                    "distance_mean": round(float(np.mean(allds)), 2),
                    "recall": {r: round(sum(d <= r for d in allds) / len(allds), 3) for r in RADII}}
    return table


def false_positives(originals, crops_per_photo: int = 24) -> dict:
    rng = random.Random(0)
    crops = []  # (photo, box, hash)
    for p, (_, im) in enumerate(originals):
        w, h = im.size
        for _ in range(crops_per_photo):
            side = rng.uniform(0.3, 0.7) * min(w, h)
            x, y = rng.uniform(0, w - side), rng.uniform(0, h - side)
            box = (x, y, x + side, y + side)
            crops.append((p, box, _hash_of(_encode(im.crop(tuple(int(v) for v in box))))))

    def iou(a, b):
        ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    cross, same = [], []
    for i in range(len(crops)):
        for j in range(i + 1, len(crops)):
            (pa, ba, ha), (pb, bb, hb) = crops[i], crops[j]
            d = int(hamming.distance(ha, hb))
            if pa != pb:
                cross.append(d)
            elif iou(ba, bb) < 0.2:
                same.append(d)
    photos = [_hash_of(_encode(im, "JPEG", quality=98)) for _, im in originals]
    whole = [int(hamming.distance(a, b)) for i, a in enumerate(photos) for b in photos[i + 1 :]]
    return {name: {"pairs": len(ds), "distance_min": min(ds),
                   "false_positive_rate": {r: sum(d <= r for d in ds) / len(ds) for r in RADII}}
            for name, ds in [("different photos", whole), ("crops of different photos", cross),
                             ("crops of one photo, IoU < 0.2", same)]}


def _bits(hashes: np.ndarray) -> np.ndarray:
    return ((hashes[:, None] >> np.arange(63, -1, -1, dtype=np.uint64)) & np.uint64(1)).astype(np.float64)


def _poisson_binomial_cdf(q: np.ndarray, r: int) -> float:
    pmf = np.zeros(len(q) + 1)
    pmf[0] = 1.0
    for x in q:
        pmf[1:] = pmf[1:] * (1 - x) + pmf[:-1] * x
        pmf[0] *= 1 - x
    return float(pmf[: r + 1].sum())


def _beta_binomial_cdf(n: int, mean: float, var: float, r: int) -> float:
    p = mean / n
    rho = (var / (n * p * (1 - p)) - 1) / (n - 1)  # intra-class correlation; var = n p (1-p) (1 + (n-1) rho)
    rho = min(max(rho, 1e-9), 0.999)
    a, b = p * (1 / rho - 1), (1 - p) * (1 / rho - 1)

    def log_pmf(k):
        return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + math.lgamma(k + a)
                + math.lgamma(n - k + b) - math.lgamma(n + a + b) + math.lgamma(a + b) - math.lgamma(a)
                - math.lgamma(b))

    return float(sum(math.exp(log_pmf(k)) for k in range(r + 1)))


def chance_pairs(population: int = 2000) -> tuple[dict, np.ndarray]:
    """Bit statistics of distinct images and the expected chance pairs at N_TARGET per R; returns the per-bit
    probabilities too (for the simulation)."""
    hashes, photo = [], []
    for i, (_, data) in enumerate(sample_images.derive(population)):
        try:
            hashes.append(_hash_of(data))
            photo.append(i % len(sample_images.photo_names()))  # derive() cycles through the photos
        except codec.CodecError:
            continue
    h = np.array(hashes, dtype=np.uint64)
    photo = np.array(photo)
    bits = _bits(h)
    p = bits.mean(axis=0)
    corr = np.corrcoef(bits.T)
    off = np.abs(corr[~np.eye(64, dtype=bool)])
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    cross = d[np.triu(photo[:, None] != photo[None, :], 1)]
    mean, var = float(cross.mean()), float(cross.var())
    pairs_at = N_TARGET * (N_TARGET - 1) / 2
    q = 2 * p * (1 - p)
    out = {"population": len(h), "pairs": int(cross.size), "bit_one_probability": {
        "min": round(float(p.min()), 3), "max": round(float(p.max()), 3), "mean": round(float(p.mean()), 3)},
        "bit_correlation_abs": {"mean": round(float(off.mean()), 3), "max": round(float(off.max()), 3)},
        "distance_mean": round(mean, 2), "distance_var": round(var, 2), "distance_var_if_independent":
        round(float((q * (1 - q)).sum()), 2), "empirical_min_distance": int(cross.min()), "per_radius": {}}
    for r in RADII:
        uniform = sum(math.comb(64, k) for k in range(r + 1)) / 2**64
        indep = _poisson_binomial_cdf(q, r)
        corr_model = _beta_binomial_cdf(64, mean, var, r)
        out["per_radius"][r] = {"p_uniform_bits": uniform, "p_independent_bits": indep, "p_correlated": corr_model,
                                "empirical_fraction": float((cross <= r).mean()),
                                "chance_pairs_23M_uniform": uniform * pairs_at,
                                "chance_pairs_23M_independent": indep * pairs_at,
                                "chance_pairs_23M_correlated": corr_model * pairs_at}
    return out, p


# -- scale simulation ---------------------------------------------------------------------------------------------

_SIM_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from pipeline.preprocess import neardup
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
if args["task"] == "band":
    record = neardup.band_task(args["out"], args["band"], args["part"], args["parts"], args["units"], 0, args["radius"], True)
elif args["task"] == "components":
    record = neardup.components_task(args["out"], args["bands"], args["parts"], 0, args["places"])
else:
    record = neardup.place_task(args["out"], args["place"], args["places"], args["units"])
print(json.dumps({{"seconds": round(time.perf_counter() - t0, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "record": {{k: v for k, v in record.items() if k != "retries"}}}}))
"""
_BASE_RSS_CHILD = """
import resource, sys
sys.path.insert(0, {repo!r})
from pipeline.preprocess import neardup
print(round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
"""


def _write_synthetic(out: str, n: int, per_unit: int, p_one: np.ndarray, seed: int,
                     radius: int) -> tuple[int, int]:
    """Units of synthetic hashes (hashes and bands files, as the encode task writes them): 10% near-copies of a
    base (1-4 bits flipped), 1% one flat hash; returns (units, planted copies)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.preprocess import neardup
    from pipeline.preprocess.layout import Layout

    layout = Layout(out)
    rng = np.random.default_rng(seed)
    weights = np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)
    units = math.ceil(n / per_unit)
    planted = 0
    os.makedirs(os.path.dirname(layout.unit_hashes(0)), exist_ok=True)
    for u in range(units):
        m = min(per_unit, n - u * per_unit)
        h = ((rng.random((m, 64)) < p_one) * weights).sum(axis=1, dtype=np.uint64)
        copies = rng.random(m) < 0.10
        base_of = rng.integers(0, m, m)
        flips = np.zeros(m, np.uint64)
        for _ in range(4):
            flips |= np.where(rng.random(m) < 0.6, np.uint64(1) << rng.integers(0, 64, m).astype(np.uint64),
                              np.uint64(0))
        h[copies] = h[base_of[copies]] ^ flips[copies]
        h[rng.random(m) < 0.01] = np.uint64(0x8000000000000000)  # a flat image's hash
        planted += int(copies.sum())
        sha = pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), m, [None, pa.py_buffer(rng.bytes(32 * m))])
        ids = pa.array(np.char.add(f"u{u}/", np.arange(m).astype(str)))
        table = pa.Table.from_arrays([pa.array(np.arange(m), pa.uint32()), pa.array(h), sha, ids,
                                      pa.array(rng.integers(0, 1 + n // 20000, m), pa.uint32())],
                                     schema=neardup.HASHES_SCHEMA)
        pq.write_table(table, layout.unit_hashes(u), compression="zstd")
        with open(layout.unit_bands(u), "wb") as f:
            f.write(neardup.bands_bytes(h, radius))
    return units, planted


def simulate(n: int, radius: int, task_hashes: int, group_images: int, p_one: np.ndarray, workdir: str) -> dict:
    from pipeline.preprocess import neardup

    out = os.path.join(workdir, f"sim-{n}")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    units, planted = _write_synthetic(out, n, 100_000, p_one, seed=n, radius=radius)
    write_s = time.perf_counter() - t0
    parts = max(1, math.ceil(n / task_hashes))
    places = max(1, math.ceil(n / group_images))
    bands = len(hamming.band_masks(radius))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo}

    def child(args: dict) -> dict:
        proc = subprocess.run([sys.executable, "-c", _SIM_CHILD.format(repo=repo), json.dumps(args)],
                              capture_output=True, text=True, env=env, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    base = float(subprocess.run([sys.executable, "-c", _BASE_RSS_CHILD.format(repo=repo)], capture_output=True,
                                text=True, env=env, check=True).stdout.strip())
    band_runs = [child({"task": "band", "out": out, "band": k, "part": p, "parts": parts, "units": units,
                        "radius": radius}) for k in range(bands) for p in range(parts)]
    comp = child({"task": "components", "out": out, "bands": bands, "parts": parts, "places": places})
    place_runs = [child({"task": "place", "out": out, "place": p, "places": places, "units": units})
                  for p in range(places)]
    group = neardup.phase_record(comp["record"], [r["record"] for r in place_runs])
    shutil.rmtree(out, ignore_errors=True)
    place_s = sum(r["seconds"] for r in place_runs)
    cpu_s = sum(r["seconds"] for r in band_runs) + comp["seconds"] + place_s
    return {"images": n, "units": units, "planted_copies": planted, "radius": radius, "partitions_per_band": parts,
            "band_tasks": len(band_runs), "write_inputs_s": round(write_s, 1),
            "band_task_s_max": max(r["seconds"] for r in band_runs), "band_tasks_s_total": round(
                sum(r["seconds"] for r in band_runs), 1),
            "band_task_peak_rss_mb_max": max(r["peak_rss_mb"] for r in band_runs),
            "band_task_mb_read_max": round(max(r["record"]["bytes_read"] for r in band_runs) / 1e6, 1),
            "band_tasks_mb_read_total": round(sum(r["record"]["bytes_read"] for r in band_runs) / 1e6, 1),
            "components_task_s": comp["seconds"], "components_task_peak_rss_mb": comp["peak_rss_mb"],
            "paired_hashes": comp["record"]["paired_hashes"], "place_tasks": places,
            "place_task_s_max": max(r["seconds"] for r in place_runs), "place_tasks_s_total": round(place_s, 1),
            "place_task_peak_rss_mb_max": max(r["peak_rss_mb"] for r in place_runs),
            "place_task_images_held_max": max(r["record"]["images_held"] for r in place_runs),
            "place_task_mb_read_max": round(max(r["record"]["bytes_read"] for r in place_runs) / 1e6, 1),
            "place_tasks_mb_read_total": round(sum(r["record"]["bytes_read"] for r in place_runs) / 1e6, 1),
            "task_process_base_rss_mb": base, "pairs": sum(r["record"]["pairs"] for r in band_runs),
            "groups": group["groups"], "near_duplicate": group["near_duplicate"],
            "largest_group": (group["largest_groups"] or [0])[0],
            "seconds_on_2_cores": round(sum(r["seconds"] for r in band_runs) / 2 + comp["seconds"] + place_s / 2, 1),
            "task_cpu_s_per_million_images": round(cpu_s / (n / 1e6), 1)}


def real_run(n: int, workdir: str) -> dict:
    src = os.path.join(workdir, "real-in")
    out = os.path.join(workdir, "real-out")
    shutil.rmtree(out, ignore_errors=True)
    if not os.path.isdir(src):
        sample_images.write_sample_images(src, n)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jpeglm", "preprocess", "--input", src, "--output", out,
                           "--dedup", "near", "--bpe-sample", "500", "--shard-size", "4MB", "--num-cpus", "2"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    summary = json.load(open(os.path.join(out, "summary.json")))
    phases = summary["phase_seconds"]
    shutil.rmtree(out, ignore_errors=True)
    return {"images": summary["images"], "ok": summary["images_ok"],
            "near_duplicate": summary["images_near_duplicate"], "groups": summary["near_duplicates"]["groups"],
            "phase_seconds": phases, "neardup_images_per_s": round(summary["images"] / phases["neardup"], 1),
            "encode_images_per_s": round(summary["images"] / phases["encode"], 1), "wall_s": round(wall, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sim", type=int, nargs="*", default=[1_000_000, 2_000_000, 5_000_000])
    ap.add_argument("--task-hashes", type=int, default=2_000_000)
    ap.add_argument("--group-images", type=int, default=None,
                    help="images per place task (NEAR_GROUP_IMAGES; default: the module's)")
    ap.add_argument("--radius", type=int, default=None, help="radius of the simulation (default: the chosen R)")
    ap.add_argument("--real", type=int, default=2000)
    args = ap.parse_args()
    from pipeline.preprocess.config import DEFAULTS

    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "command": "python bench/bench_neardup.py " + " ".join(sys.argv[1:])}
    t0 = time.perf_counter()
    originals = _originals()
    result["recall"] = recall(originals)
    result["false_positives"] = false_positives(originals)
    result["chance"], p_one = chance_pairs()
    print(f"calibration: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    radius = args.radius if args.radius is not None else DEFAULTS["near_radius"]
    if args.group_images is None:
        from pipeline.preprocess.neardup import NEAR_GROUP_IMAGES
        args.group_images = NEAR_GROUP_IMAGES
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as workdir:
        result["simulation"] = []
        for n in args.sim:
            result["simulation"].append(simulate(n, radius, args.task_hashes, args.group_images, p_one, workdir))
            print(json.dumps(result["simulation"][-1]), file=sys.stderr)
        if args.real:
            result["real"] = real_run(args.real, workdir)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    summary = {r: (result["recall"]["all"]["recall"][r],
                   result["false_positives"]["crops of different photos"]["false_positive_rate"][r],
                   f'{result["chance"]["per_radius"][r]["chance_pairs_23M_correlated"]:.3g}') for r in RADII}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
