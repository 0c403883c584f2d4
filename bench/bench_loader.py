"""Training data loader at the 7b preset's shape: host memory per rank, read amplification, requests per row.

    python bench/bench_loader.py --out bench/results/loader.json
    python bench/bench_loader.py --out /tmp/loader.json --shard-rows 4000 --micro-batches 500   # a quick run

Data: shards written by the project's writer (pipeline.shards.write_shard, via tests/helpers.write_dataset) into a
temporary folder (deleted at the end), rows of 12,288 random tokens (the 7b preset: train.seq_len 12,288,
micro-batch 1, global batch 256). Each case is measured with row indexes (format_version 2, range reads: new) and
on the same shards listed without them (format_version 1, whole-shard reads: the old way, still supported).

  memory          peak extra host RSS of one rank's TrainStream (VmHWM after /proc/self/clear_refs, in a fresh
                  process) over --micro-batches micro-batches, world 1 and rank 0 of world 8; --shards shards of
                  --shard-rows rows (default 4 x 40,000 rows = 4 x 1.06 GB: one shuffle block). The old way at
                  world 1 holds a whole block (4 GB): measured only with --old-world1.
  amplification   --epochs epochs on every rank of world 8 over 8 shards of --small-shard-rows rows, on local disk
                  and on a moto S3 server behind a counting proxy that adds --s3-latency-ms (30) to every request:
                  bytes read per byte of the rank's samples (seq_len x 2 bytes each), reads per row, rows/s, and for
                  S3 the proxy's own count of GETs and bytes (equal to the loader's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # helpers: the dataset writer and the counting S3 proxy

ROW = 12288
GLOBAL_BATCH = 256
TARGET_RSS = 256 << 20
TARGET_AMPLIFICATION = 1.25

_PEAK_MEMORY = r"""
import json, sys
from trainer.data import Manifest, TrainStream
root, world, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
manifest = Manifest.load(root)
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak RSS := current RSS
stream = TrainStream(manifest, seq_len=12288, seed=0, global_batch=256, micro_batch=1, rank=0, world=world,
                     block_shards=4, prefetch_micro_batches=8, read_threads=4)
for _ in range(n):
    stream.next_batch()
print(json.dumps({"extra_rss_bytes": status("VmHWM") - base, **stream.io_stats()}))
"""


def without_index(root: str, out: str) -> str:
    """A format_version 1 manifest over the same shards (what an older jpeglm wrote)."""
    with open(os.path.join(root, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["format_version"] = 1
    for entry in manifest["shards"]:
        entry.pop("index", None)
    os.makedirs(out, exist_ok=True)
    os.symlink(os.path.join(root, "shards"), os.path.join(out, "shards"))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return out


def memory(tmp: str, args) -> dict:
    from helpers import write_dataset

    t0 = time.perf_counter()
    v2 = write_dataset(os.path.join(tmp, "big"), {"train": [args.shard_rows] * args.shards, "validation": [1]},
                       row_len=ROW)
    shard_bytes = os.path.getsize(os.path.join(v2, "shards", "train-000000.tar"))
    print(f"memory: wrote {args.shards} shards of {shard_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
          flush=True)
    v1 = without_index(v2, os.path.join(tmp, "big-v1"))
    cases = [("new", v2, 1), ("new", v2, 8), ("old", v1, 8)] + ([("old", v1, 1)] if args.old_world1 else [])
    out = {"shards": args.shards, "rows_per_shard": args.shard_rows, "shard_bytes": shard_bytes,
           "micro_batches": args.micro_batches, "cases": []}
    for name, root, world in cases:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, root, str(world), str(args.micro_batches)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        rec = {"loader": name, "world": world, "rank": 0, **json.loads(proc.stdout.strip().splitlines()[-1]),
               "seconds": round(time.perf_counter() - t0, 1)}
        rec["extra_rss_mib"] = round(rec["extra_rss_bytes"] / 2**20, 1)
        out["cases"].append(rec)
        print(f"memory: {name} world {world} rank 0: {rec['extra_rss_mib']} MiB extra RSS", flush=True)
    new = [c["extra_rss_bytes"] for c in out["cases"] if c["loader"] == "new"]
    out["target_mib"] = TARGET_RSS >> 20
    out["target_met"] = max(new) <= TARGET_RSS
    return out


@contextlib.contextmanager
def moto_bucket():
    from moto.server import ThreadedMotoServer

    from jpeglm.devtools.processes import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-loader")
    try:
        yield endpoint, "s3://bench-loader"
    finally:
        server.stop()


@contextlib.contextmanager
def s3_client_through(endpoint: str):
    """This process's S3 client talks to `endpoint` (pipeline.storage keeps one client per process)."""
    from pipeline import storage

    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    storage.reset_s3()
    try:
        yield
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
        storage.reset_s3()


def epochs_of_rank(root: str, rank: int, world: int, epochs: int) -> dict:
    """`epochs` epochs of one rank; io stats once every read put in flight (the read-ahead included) has finished.
    The read-ahead past the last epoch makes the old way read one more block: several epochs amortize that."""
    from trainer.data import Manifest, TrainStream

    stream = TrainStream(Manifest.load(root), seq_len=ROW, seed=0, global_batch=GLOBAL_BATCH, micro_batch=1,
                         rank=rank, world=world, block_shards=4, prefetch_micro_batches=8, read_threads=4)
    try:
        t0 = time.perf_counter()
        n = epochs * stream.order.num_samples // world
        for _ in range(n):
            stream.next_batch()
        seconds = time.perf_counter() - t0
        while stream.ready() < len(stream._ahead):
            time.sleep(0.01)
        stats = stream.io_stats()
    finally:
        stream.close()
    return {"rank": rank, **stats, "amplification": round(stats["bytes"] / (stats["samples"] * ROW * 2), 4),
            "requests_per_row": round(stats["requests"] / stats["samples"], 4),
            "rows_per_s": round(n / seconds, 1)}


def summarize(ranks: list[dict]) -> dict:
    return {"amplification_max": max(r["amplification"] for r in ranks),
            "amplification_mean": round(sum(r["amplification"] for r in ranks) / len(ranks), 4),
            "requests_per_row_mean": round(sum(r["requests_per_row"] for r in ranks) / len(ranks), 4),
            "rows_per_s_mean": round(sum(r["rows_per_s"] for r in ranks) / len(ranks), 1), "ranks": ranks}


def amplification(tmp: str, args) -> dict:
    from helpers import write_dataset
    from jpeglm.devtools.s3proxy import S3Proxy

    world = 8
    layout = {"train": [args.small_shard_rows] * 8, "validation": [1]}
    local = write_dataset(os.path.join(tmp, "small"), layout, row_len=ROW)
    roots = {"new": local, "old": without_index(local, os.path.join(tmp, "small-v1"))}
    out = {"world": world, "shards": 8, "rows_per_shard": args.small_shard_rows, "epochs": args.epochs,
           "global_batch": GLOBAL_BATCH,
           "local": {}, "s3": {}}
    for name, root in roots.items():
        out["local"][name] = summarize([epochs_of_rank(root, r, world, args.epochs) for r in range(world)])
        print(f"amplification: local {name}: {out['local'][name]['amplification_max']} (max over ranks)", flush=True)
    with moto_bucket() as (endpoint, bucket):
        # the same seed: the same shards, listed with and without row indexes
        remote_roots = {"new": write_dataset(f"{bucket}/small", layout, row_len=ROW),
                        "old": write_dataset(f"{bucket}/small-v1", layout, row_len=ROW, row_index=False)}
        for name, root in remote_roots.items():
            with S3Proxy(endpoint, delay_s=args.s3_latency_ms / 1000) as proxy, s3_client_through(proxy.endpoint):
                ranks = []
                for r in range(world):
                    proxy.reset_stats()
                    rec = epochs_of_rank(root, r, world, args.epochs)
                    served = proxy.stats()
                    rec["proxy_requests"], rec["proxy_get_bytes"] = served["by_method"], served["response_bytes"]
                    ranks.append(rec)
            out["s3"][name] = summarize(ranks)
            print(f"amplification: s3 {name}: {out['s3'][name]['amplification_max']} (max over ranks), "
                  f"{out['s3'][name]['requests_per_row_mean']} reads per row", flush=True)
    out["s3_latency_ms"] = args.s3_latency_ms
    out["target"] = TARGET_AMPLIFICATION
    out["target_met"] = all(out[w]["new"]["amplification_max"] <= TARGET_AMPLIFICATION for w in ("local", "s3"))
    return out


def machine_info() -> dict:
    import fsspec
    import numpy
    import s3fs

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    return {"cpu": cpu or platform.processor(), "cpus_visible": os.cpu_count(), "load_average": os.getloadavg(),
            "python": platform.python_version(), "platform": platform.platform(), "numpy": numpy.__version__,
            "fsspec": fsspec.__version__, "s3fs": s3fs.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--shards", type=int, default=4, help="shards of the memory case (4 = one shuffle block)")
    p.add_argument("--shard-rows", type=int, default=40_000, help="rows per shard of the memory case (1.06 GB)")
    p.add_argument("--micro-batches", type=int, default=4000, help="micro-batches per memory measurement")
    p.add_argument("--old-world1", action="store_true", help="also measure the old way at world 1 (holds a block)")
    p.add_argument("--small-shard-rows", type=int, default=200, help="rows per shard of the amplification case")
    p.add_argument("--epochs", type=int, default=3, help="epochs per rank of the amplification case")
    p.add_argument("--s3-latency-ms", type=float, default=30.0, help="added to every S3 request by the proxy")
    p.add_argument("--tmp", default=None, help="folder for the generated shards (default: the system's temp)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    tmp = tempfile.mkdtemp(prefix="bench-loader-", dir=args.tmp)
    try:
        result = {"command": " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
                  "shape": {"row_tokens": ROW, "seq_len": ROW, "micro_batch": 1, "global_batch": GLOBAL_BATCH},
                  "machine": machine_info()}
        result["amplification"] = amplification(tmp, args)
        result["memory"] = memory(tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
