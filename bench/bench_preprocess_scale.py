"""The preprocess driver at scale, and the write-time shuffle.

    python bench/bench_preprocess_scale.py --out bench/results/preprocess_scale.json [--listed 100000 1000000]
                                           [--shuffle-images 1000]

1. planning: the driver's plan phase (pipeline.preprocess.plan.plan_units: stream the listing into work units
   written to OUTPUT/_work/units/, fix the bucket count) on listings of --listed images, each in a fresh process:
   seconds, the process's peak RSS (ru_maxrss) and its RSS before planning (imports). The listing is a synthetic
   folder tree of empty .jpg files on tmpfs (/dev/shm): 1,000 files per folder, the first 100k in part-a/ and the
   rest in part-b/, so the 100k input is part-a/ and the 1M input the whole tree. Planning only lists (the files
   are never read), so empty files measure exactly what the driver does; OUTPUT is on tmpfs too. Linear time means
   seconds per listed image stay flat from 100k to 1M; the target is a peak RSS under 1 GB at 1M.
2. shuffle: `jpeglm preprocess` on --shuffle-images derived photos in 10 class folders listed folder by folder (an
   ImageNet-like layout), local Ray; the fraction of adjacent images of the packed train stream that share a folder,
   against its expectation in a uniformly random order (target: <= 1.5x), and the same figure for listing order;
   the job's seconds by phase show what the shuffle phase costs next to encoding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FILES_PER_FOLDER = 1000
SMALL_PART = 100_000
RSS_TARGET_MB = 1000
SHUFFLE_TARGET = 1.5

# Runs in a fresh process: plan the listing of argv[1] into OUTPUT argv[2]; prints one JSON line.
_PLAN_CHILD = """
import json, os, resource, sys, time
from pipeline.preprocess import plan as plan_mod
from pipeline.preprocess.config import DEFAULTS, codec_params
from pipeline.preprocess.layout import Layout

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

config = {"inputs": [sys.argv[1]], "image_column": None, "images_per_unit": DEFAULTS["images_per_unit"],
          "images_per_bucket": DEFAULTS["images_per_bucket"], "codec": codec_params()}
before = rss_mb()
t0 = time.perf_counter()
plan = plan_mod.plan_units(Layout(sys.argv[2]), config)
chosen, take = plan_mod.bpe_sample_plan(plan.unit_sizes, DEFAULTS["bpe_sample"])
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": round(seconds, 2), "rss_before_mb": round(before, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "units": plan.units, "buckets": plan.buckets, "planned_images": sum(plan.unit_sizes),
                  "bpe_sample_units": len(chosen)}))
"""


def make_tree(root: str, total: int) -> None:
    """part-a/ holds the first SMALL_PART files, part-b/ the rest; FILES_PER_FOLDER empty .jpg files per folder."""
    marker = os.path.join(root, f".done-{total}")
    if os.path.exists(marker):
        return
    shutil.rmtree(root, ignore_errors=True)
    for i in range(total // FILES_PER_FOLDER):
        part = "part-a" if i * FILES_PER_FOLDER < SMALL_PART else "part-b"
        folder = os.path.join(root, part, f"d{i:05d}")
        os.makedirs(folder)
        for j in range(FILES_PER_FOLDER):
            os.close(os.open(os.path.join(folder, f"img-{j:04d}.jpg"), os.O_CREAT | os.O_WRONLY, 0o644))
    open(marker, "w").close()


def plan_listing(root: str, listed: int, work: str) -> dict:
    inp = os.path.join(root, "part-a") if listed == SMALL_PART else root
    out = os.path.join(work, f"plan-{listed}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _PLAN_CHILD, inp, out], capture_output=True, text=True, env=env,
                          check=True)
    shutil.rmtree(out, ignore_errors=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["planned_images"] == listed, result
    return {"listed_images": listed, **result,
            "microseconds_per_image": round(result["seconds"] / listed * 1e6, 2)}


def shuffle_metric(num: int, work: str) -> dict:
    """A 10-folder job through `jpeglm preprocess`; adjacency of folders in its packed train stream."""
    from jpeglm import cli
    from pipeline import shards
    from pipeline.preprocess.shuffle import adjacency
    from pipeline.sample_images import derive

    root = os.path.join(work, "classes")
    per_class = num // 10
    for i, (name, data) in enumerate(derive(10 * per_class, seed=3)):
        folder = os.path.join(root, f"class-{i // per_class}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    out = os.path.join(work, "classes-out")
    args = ["preprocess", "--input", root, "--output", out, "--bpe-sample", "500", "--seq-len", "12288",
            "--shard-size", "64MB", "--images-per-bucket", str(max(1, num // 8))]
    start = time.perf_counter()
    assert cli.main(args) == 0
    seconds = time.perf_counter() - start
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    order = [s["id"] for e in manifest["shards"] if e["split"] == "train"
             for _, _, meta in shards.read_samples(os.path.join(out, e["path"])) for s in meta["images"] if s["bos"]]
    groups = [i.split("/")[0] for i in order]
    same, expected = adjacency(groups)
    listing_same, listing_expected = adjacency(sorted(groups))
    return {"images": 10 * per_class, "folders": 10, "packed_train_images": len(order),
            "same_folder_adjacent": round(same, 4), "random_expectation": round(expected, 4),
            "ratio": round(same / expected, 3), "listing_order_ratio": round(listing_same / listing_expected, 2),
            "target_ratio": SHUFFLE_TARGET, "meets_target": same <= SHUFFLE_TARGET * expected,
            "job_seconds": round(seconds, 1),
            "phase_seconds": json.load(open(os.path.join(out, "summary.json")))["phase_seconds"],
            "command": "jpeglm " + " ".join(args)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write the results to")
    parser.add_argument("--listed", type=int, nargs="+", default=[SMALL_PART, 1_000_000],
                        help="listing sizes to plan (default: 100000 1000000; multiples of 1000, the first 100000)")
    parser.add_argument("--tree", default="/dev/shm/jpeglm-bench-listing",
                        help="where the synthetic listing is made (tmpfs; removed afterwards unless --keep-tree)")
    parser.add_argument("--keep-tree", action="store_true", help="keep the synthetic listing for the next run")
    parser.add_argument("--shuffle-images", type=int, default=1000, help="images of the 10-folder job (0: skip)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if any(n % FILES_PER_FOLDER or (n != SMALL_PART and n < SMALL_PART) for n in args.listed):
        parser.error(f"--listed: multiples of {FILES_PER_FOLDER}, {SMALL_PART} or more")

    work = tempfile.mkdtemp(prefix="bench-preprocess-scale-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        t0 = time.perf_counter()
        make_tree(args.tree, max(args.listed))
        tree_seconds = time.perf_counter() - t0
        planning = []
        for n in args.listed:
            print(f"planning {n:,} listed images ...", flush=True)
            planning.append(plan_listing(args.tree, n, work))
            print(f"  {planning[-1]['seconds']} s, peak RSS {planning[-1]['peak_rss_mb']} MB", flush=True)
        shuffle = None
        if args.shuffle_images:
            print(f"shuffle: a 10-folder job of {args.shuffle_images:,} images ...", flush=True)
            shuffle = shuffle_metric(args.shuffle_images, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep_tree:
            shutil.rmtree(args.tree, ignore_errors=True)

    import ray

    largest = planning[-1]
    result = {
        "benchmark": "preprocess_scale",
        "command": " ".join([os.path.relpath(sys.executable), "bench/bench_preprocess_scale.py", *(argv or sys.argv[1:])]),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ray": ray.__version__},
        "listing": f"synthetic folder tree of empty .jpg files on tmpfs, {FILES_PER_FOLDER} per folder "
                   f"(made in {tree_seconds:.0f} s)",
        "planning": planning,
        "planning_time_ratio": round(largest["seconds"] / planning[0]["seconds"], 2) if len(planning) > 1 else None,
        "planning_size_ratio": largest["listed_images"] / planning[0]["listed_images"],
        "rss_target_mb": RSS_TARGET_MB,
        "meets_rss_target": largest["peak_rss_mb"] < RSS_TARGET_MB,
        "shuffle": shuffle,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"planning {p['listed_images']:,} images: {p['seconds']} s ({p['microseconds_per_image']} us/image), "
             f"peak RSS {p['peak_rss_mb']} MB" for p in planning]
    if shuffle:
        lines.append(f"shuffle: adjacent images sharing a folder {shuffle['same_folder_adjacent']:.3f} vs "
                     f"{shuffle['random_expectation']:.3f} random ({shuffle['ratio']}x; listing order "
                     f"{shuffle['listing_order_ratio']}x)")
    print("\n".join(lines) + f"\nWrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
