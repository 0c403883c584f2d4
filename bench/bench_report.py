"""`jpeglm report` at scale: the stats scan's time and peak memory against the number of images.

    python bench/bench_report.py --out bench/results/report.json [--images 1000000 10000000 23000000] [--per-file 20000]

For each N: synthetic stats files of --per-file rows each (bucket files as a 23M-image job writes them: ~80% ok,
~10% exact duplicates of an image of the same file (a heavy tail of group sizes), ~5% near duplicates spread over
all files as near copies are over buckets: half of them copies of a few popular images of the first file (large
groups), half of random earlier images (hundreds of thousands of small groups, so the candidate cap and the second
pass are exercised), the rest failures of 4 reasons, random sizes) in a temporary output with a minimal manifest,
then pipeline.report.scan + render in a fresh process: its seconds and peak RSS (ru_maxrss) and its RSS after
imports; flat peak RSS as N grows is what bounded means. `top_groups_exact`: the page's 8 largest groups and sizes
equal the true ones (counted by the generator). Thumbnails are not read (there are no shards): the real report
reads one ranged row span per shown image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_CHILD = """
import json, resource, sys, time
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
from pipeline import report
from pipeline.inspect import Output
base = rss_mb()
t = time.perf_counter()
out = Output(sys.argv[1])
found = report.scan(out)
page = report.render(out, found, {})
print(json.dumps({"seconds": time.perf_counter() - t, "rss_after_imports_mb": base,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "images": sum(found.status.values()), "page_kb": len(page) / 1e3, "second_pass": found.recounted,
                  "top_groups": found.largest_groups(report.MAX_GROUPS)}))
"""


def write_stats(root: str, images: int, per_file: int, seed: int = 0) -> list:
    """Writes the files; returns the true 8 largest groups [(kept id, copies)]."""
    from collections import Counter

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import stats

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "stats"))
    reasons = np.array(["truncated", "not_an_image", "too_small", "bad_aspect_ratio"])
    sizes: Counter = Counter()
    popular = None
    for f, start in enumerate(range(0, images, per_file)):
        n = min(per_file, images - start)
        ids = np.array([f"part-{(start + i) // 1000:05d}/img-{start + i:09d}.jpg" for i in range(n)], dtype=object)
        kind = rng.choice(4, size=n, p=[0.8, 0.1, 0.05, 0.05])
        kind[0] = 0
        status = np.where(kind == 0, "ok", np.where(kind == 1, "duplicate", np.where(kind == 2, "near_duplicate",
                                                                                     reasons[rng.integers(0, 4, n)])))
        ok_pos = np.flatnonzero(kind == 0)
        # a copy points at an earlier ok image of its file, skewed towards a few (some large groups)
        target = ok_pos[np.minimum((rng.pareto(1.2, n) * 3).astype(np.int64), ok_pos.size - 1)]
        dup_of = np.where(kind == 1, ids[target], None)
        if popular is None:
            popular = ids[ok_pos[:1000]]
        near = np.flatnonzero(kind == 2)
        spread = rng.random(near.size) < 0.5
        dup_of[near[spread]] = popular[np.minimum((rng.pareto(1.0, int(spread.sum())) * 2).astype(np.int64), 999)]
        earlier = rng.integers(0, max(1, start), int((~spread).sum()))  # any earlier image's id
        dup_of[near[~spread]] = [f"part-{e // 1000:05d}/img-{e:09d}.jpg" for e in earlier]
        sizes.update(d for d in dup_of if d is not None)
        tokens = rng.lognormal(8.3, 0.25, n).astype(np.int32)
        ok = kind == 0
        table = pa.table({
            "id": ids, "source": np.array(["s3://crawl/" + i for i in ids], dtype=object), "status": status,
            "message": np.where(ok, "", "why"), "source_bytes": rng.lognormal(11, 1, n).astype(np.int64),
            "source_format": rng.choice(["JPEG", "PNG", "WEBP"], n, p=[0.8, 0.15, 0.05]),
            "source_width": rng.integers(200, 4000, n).astype(np.int32),
            "source_height": rng.integers(200, 3000, n).astype(np.int32),
            "jpeg_bytes": pa.array(np.where(ok, tokens * 1.15, 0).astype(np.int32), mask=~ok),
            "tokens": pa.array(tokens, mask=~ok), "split": pa.array(np.where(ok, "train", None), pa.string()),
            "body_sha256": pa.nulls(n, pa.string()), "duplicate_of": pa.array(dup_of, pa.string()),
        }, schema=stats.SCHEMA)
        pq.write_table(table, os.path.join(root, "stats", f"bucket-{f:06d}.parquet"), compression="zstd")
    manifest = {"format": "jpeglm-shards", "format_version": 2, "seq_len": 12288, "token_dtype": "uint16",
                "tokenizer": {"path": "tokenizer.model", "vocab_size": 320}, "codec": {"size": 256, "quality": 25},
                "config": {"inputs": ["s3://crawl"]}, "shards": [], "totals": {}, "last_row_policy": "pad"}
    with open(os.path.join(root, "manifest.json"), "w") as fh:
        json.dump(manifest, fh)
    return sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:8]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", type=int, nargs="+", default=[1_000_000, 10_000_000, 23_000_000])
    parser.add_argument("--per-file", type=int, default=20_000)
    args = parser.parse_args(argv)
    runs = []
    for n in args.images:
        with tempfile.TemporaryDirectory(prefix="jpeglm-bench-report-") as root:
            truth = write_stats(root, n, args.per_file)
            child = subprocess.run([sys.executable, "-c", _CHILD, root], capture_output=True, text=True, check=True,
                                   cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
            r = json.loads(child.stdout.strip().splitlines()[-1])
        shown = [tuple(g) for g in r.pop("top_groups")]
        r.update(images_written=n, images_per_s=round(n / r["seconds"]), top_groups_exact=shown == truth,
                 largest_group=shown[0][1] if shown else 0)
        runs.append({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()})
        print(json.dumps(runs[-1]))
    report = {"what": "pipeline.report.scan + render over synthetic stats files (no thumbnails), fresh process",
              "command": "python bench/bench_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "per_file": args.per_file, "runs": runs,
              "hours_for_23m_images_at_the_last_rate": round(23e6 / runs[-1]["images_per_s"] / 3600, 2),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
