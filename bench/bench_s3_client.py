"""Client CPU per S3 GET: pipeline.storage.read_bytes against boto3 and pyarrow's C++ S3FileSystem, in one run.

    python bench/bench_s3_client.py --out bench/results/s3_client.json [--objects 400] [--rounds 5]

A moto server in its own process on 127.0.0.1 (so that its ~3-4 ms of CPU per request is not counted) holds
--objects objects of 60 KB. Each client reads all of them with 8 threads; the figure is this process's CPU time
(user + system, every thread: time.process_time) per GET. Clients take turns, round after round, and each one's
median round is reported (the machine is shared). Before timing, each client reads every object once (connection
pools, credential and endpoint caches warm) and, through the counting proxy (jpeglm/devtools/s3proxy.py), a few
objects to count the HTTP requests it sends per read (pyarrow's stream sends a HEAD before its GET).

Clients:
- `storage.read_bytes`: ours (pipeline/storage.py, the one counted retry layer);
- `s3fs.cat_file`: what read_bytes did before (s3fs through fsspec's async machinery, max_concurrency=1);
- `boto3.get_object`: one shared boto3 client, `get_object(...)["Body"].read()`;
- `pyarrow.S3FileSystem`: `open_input_stream(path).read()` (HEAD + GET).
Target: read_bytes within 1.25x of the best client measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

OBJECT_BYTES = 60_000
THREADS = 8
TARGET_RATIO = 1.25
BUCKET = "bench-s3-client"


def start_moto() -> tuple[subprocess.Popen, str]:
    from jpeglm.devtools.processes import free_port, wait_for_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from moto.server import main; "
                             f"main(['-H', '127.0.0.1', '-p', '{port}'])"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc, 60)
    return proc, f"http://127.0.0.1:{port}"


def clients(endpoint: str) -> dict:
    """name -> get(key) -> bytes."""
    import boto3
    import pyarrow.fs
    import s3fs

    from pipeline import storage

    boto = boto3.client("s3", endpoint_url=endpoint)
    plain_s3fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, use_listings_cache=False)
    arrow = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1")

    def read_arrow(key):
        with arrow.open_input_stream(f"{BUCKET}/{key}") as f:
            return f.read()

    return {
        "storage.read_bytes": lambda key: storage.read_bytes(f"s3://{BUCKET}/{key}"),
        "s3fs.cat_file": lambda key: plain_s3fs.cat_file(f"{BUCKET}/{key}", max_concurrency=1),
        "boto3.get_object": lambda key: boto.get_object(Bucket=BUCKET, Key=key)["Body"].read(),
        "pyarrow.S3FileSystem": read_arrow,
    }


def read_all(pool: ThreadPoolExecutor, get, keys: list[str]) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) to read every key with the pool's threads."""
    cpu, wall = time.process_time(), time.perf_counter()
    sizes = list(pool.map(lambda k: len(get(k)), keys))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert sizes == [OBJECT_BYTES] * len(keys), "a read returned the wrong number of bytes"
    return cpu, wall


def requests_per_read(moto_endpoint: str, keys: list[str]) -> dict:
    """HTTP requests each client sends per read, counted by the proxy (its own clients, pointed at it)."""
    from jpeglm.devtools.s3proxy import S3Proxy
    from pipeline import storage

    out = {}
    with S3Proxy(moto_endpoint) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        storage.reset_s3()
        try:
            for name, get in clients(proxy.endpoint).items():
                proxy.reset_stats()
                for k in keys:
                    get(k)
                by_method = proxy.stats()["by_method"]
                out[name] = {m: n / len(keys) for m, n in sorted(by_method.items())}
        finally:
            os.environ["AWS_ENDPOINT_URL"] = moto_endpoint
            storage.reset_s3()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--objects", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    proc, endpoint = start_moto()
    try:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket=BUCKET)
        keys = [f"img/{i:06d}.jpg" for i in range(args.objects)]
        for i, k in enumerate(keys):
            s3.put_object(Bucket=BUCKET, Key=k, Body=os.urandom(OBJECT_BYTES))
        requests = requests_per_read(endpoint, keys[:20])
        getters = clients(endpoint)
        cpu: dict[str, list[float]] = {n: [] for n in getters}
        wall: dict[str, list[float]] = {n: [] for n in getters}
        with ThreadPoolExecutor(THREADS) as pool:
            for get in getters.values():
                read_all(pool, get, keys)  # warm up
            for _ in range(args.rounds):
                for name, get in getters.items():
                    c, w = read_all(pool, get, keys)
                    cpu[name].append(c / len(keys) * 1e3)
                    wall[name].append(len(keys) / w)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    results = {n: {"cpu_ms_per_get": round(statistics.median(cpu[n]), 3),
                   "cpu_ms_per_get_rounds": [round(c, 3) for c in cpu[n]],
                   "gets_per_s": round(statistics.median(wall[n]), 1),
                   "requests_per_read": requests[n]} for n in getters}
    best = min(r["cpu_ms_per_get"] for r in results.values())
    ours = results["storage.read_bytes"]["cpu_ms_per_get"]
    report = {
        "what": "client process CPU per S3 GET (user+system, all threads), moto on 127.0.0.1 in another process",
        "command": "python bench/bench_s3_client.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "object_bytes": OBJECT_BYTES, "threads": THREADS, "objects": args.objects, "rounds": args.rounds,
        "clients": results,
        "read_bytes_vs_best": round(ours / best, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ours / best <= TARGET_RATIO,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    for n, r in results.items():
        print(f"{n:<22} {r['cpu_ms_per_get']:6.3f} ms CPU/GET  {r['gets_per_s']:7.1f} GET/s  "
              f"requests/read {r['requests_per_read']}")
    print(f"read_bytes / best = {ours / best:.2f} (target <= {TARGET_RATIO})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
