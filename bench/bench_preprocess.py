"""Preprocessing speed: per-core work, reading from S3 at a given latency, and Ray's efficiency on the whole job.

    python bench/bench_preprocess.py --out bench/results/preprocess.json [--num 4000] [--io-images 1000]
                                     [--delay-ms 20] [--cpus N] [--repeat 3]

Inputs: pipeline.sample_images.derive(N) written to a folder (web-like crops of the bundled real photos: mostly
0.3-0.5 MP, 85% JPEG, 15% PNG), reused across runs.

1. per_core: read a file, canonicalize, tokenize, one process on one core, no Ray: the per-image work of an encode
   task (measured on a subset, before each Ray pass).
2. io: the same work through `sources.read_unit` (as an encode task reads its unit) on --io-images images, one
   process, from local disk and from S3: a moto server in its own process behind the delay proxy
   (jpeglm/devtools/s3proxy.py, also its own process, so neither shares this process's GIL) adding 0 ms and
   --delay-ms per request. Also the same at --delay-ms with reads one at a time (READ_WINDOW=1: how units read
   before). The four alternate --repeat rounds; per configuration the median round: images/s, CPU ms per image
   (this process, all threads), requests per image (the proxy's count during the reads; the listing excluded),
   the most requests in flight; latency_ratio is the median of the rounds' delay/0 ms ratios. moto spends ~3-4 ms of CPU per request on these 2 cores, so S3 vs local disk
   here is a floor, not what AWS gives; the latency ratio (delay vs 0 ms) is the figure that transfers.
3. ray_job: `jpeglm preprocess --tokenizer T --keep-work` (plan, encode every image, write the shards) on a Ray
   with --cpus CPUs that is already running, as on a cluster; efficiency = (N / job seconds) / (per-core rate x
   cpus) against the per-core pass just before it, alternating --repeat times, median reported. `limits` splits
   the median pass's loss: the share of the job spent outside encoding (plan, shards), the share of encode-phase
   CPU time no task was running (scheduling, imports, the last wave's tail), and the per-image speed inside tasks
   against the per-core rate (contention with Ray's own processes, per-task setup).
4. full_job_cold: the whole `jpeglm preprocess` command in a fresh process, as `make preprocess` runs it (starts
   Ray, fits BPE on --bpe-sample images, encodes, writes shards): for context.

Machines are noisy (other processes can take a core): quote the ratios from one run, with the command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TARGET_EFFICIENCY = 0.90
TARGET_LATENCY_RATIO = 0.90
BUCKET = "bench-preprocess"


def ensure_images(folder: str, num: int) -> list[str]:
    from pipeline.sample_images import write_sample_images

    marker = os.path.join(folder, f".done-{num}")
    if not os.path.exists(marker):
        shutil.rmtree(folder, ignore_errors=True)
        write_sample_images(folder, num)
        open(marker, "w").close()
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if not n.startswith("."))


def baseline_rate(paths: list[str], tokenizer) -> dict:
    """Single process, one core: read + canonicalize + tokenize, images/s."""
    from pipeline import codec

    start = time.perf_counter()
    tokens = 0
    for p in paths:
        with open(p, "rb") as f:
            body = codec.canonicalize(f.read())
        tokens += len(tokenizer.encode(body))
    seconds = time.perf_counter() - start
    return {"images": len(paths), "seconds": round(seconds, 3), "images_per_s": round(len(paths) / seconds, 1),
            "tokens": tokens}


# ---------------------------------------------------------------------------------------------------------------
# io: read_unit + codec + tokenizer from local disk and from S3 behind the delay proxy


@contextlib.contextmanager
def s3_behind_proxy():
    """(moto endpoint, proxy endpoint): a moto server and the delay proxy, each in its own process."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    from jpeglm.devtools.processes import free_port, wait_for_port

    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_for_port(port, procs[0], 60)
        moto = f"http://127.0.0.1:{port}"
        procs.append(subprocess.Popen([sys.executable, "-m", "jpeglm.devtools.s3proxy", "--upstream", moto],
                                      env=env, stdout=subprocess.PIPE, text=True))
        proxy = procs[1].stdout.readline().split()[-1]
        yield moto, proxy
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)


def encode_rate(input_uri: str, tokenizer, images_per_unit: int, proxy=None) -> dict:
    """read_unit + canonicalize + tokenize over every unit of an input, one process: images/s (wall) and CPU ms per
    image (this process, all threads: the S3 client's work included); planning excluded."""
    from pipeline import codec, sources

    units = list(sources.plan_units(sources.resolve_inputs([input_uri]), images_per_unit))
    if proxy is not None:
        proxy.reset_stats()
    images = 0
    start, cpu = time.perf_counter(), time.process_time()
    for unit in units:
        for src in sources.read_unit(unit):
            tokenizer.encode(codec.canonicalize(src.data))
            images += 1
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    out = {"images_per_s": round(images / seconds, 1), "cpu_ms_per_image": round(1000 * cpu / images, 2)}
    if proxy is not None:
        stats = proxy.stats()
        out.update(requests_per_image=round(stats["requests"] / images, 3), requests=stats["by_method"],
                   max_in_flight=stats["max_in_flight"])
    return out


def io_benchmark(paths: list[str], work: str, tokenizer, delay_ms: float, rounds: int) -> dict:
    """The configurations alternate, `rounds` times (other processes on the machine hit them all alike); the
    median round of each is reported."""
    from jpeglm.devtools.s3proxy import ProxyControl
    from pipeline import sources, storage

    local = os.path.join(work, "io-images")
    os.makedirs(local)
    for p in paths:
        os.link(p, os.path.join(local, os.path.basename(p)))
    per_unit = len(paths)  # one unit: the reads of a whole encode task
    delayed = f"s3_{delay_ms:g}ms"
    configs = [("local", None, None), ("s3_0ms", 0.0, None), (delayed, delay_ms, None),
               (delayed + "_one_at_a_time", delay_ms, 1)]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    with s3_behind_proxy() as (moto, endpoint):
        os.environ.update(AWS_ENDPOINT_URL=moto, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1")
        storage.reset_s3()
        storage._s3().mkdir(BUCKET)
        for p in paths:
            with open(p, "rb") as f:
                storage.write_bytes(f"s3://{BUCKET}/img/{os.path.basename(p)}", f.read())
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        storage.reset_s3()
        proxy = ProxyControl(endpoint)
        for r in range(rounds):
            for name, delay, window in configs:
                print(f"io round {r + 1}/{rounds}: {len(paths)} images, {name} ...", flush=True)
                saved = sources.READ_WINDOW
                sources.READ_WINDOW = window or saved
                try:
                    if delay is None:
                        runs[name].append(encode_rate(local, tokenizer, per_unit))
                    else:
                        proxy.configure(delay_s=delay / 1000)
                        runs[name].append(encode_rate(f"s3://{BUCKET}/img", tokenizer, per_unit, proxy))
                finally:
                    sources.READ_WINDOW = saved
        storage.reset_s3()
        os.environ.pop("AWS_ENDPOINT_URL")
    out = {"images": len(paths), "delay_ms": delay_ms, "read_window": sources.READ_WINDOW, "rounds": rounds}
    for name, results in runs.items():
        out[name] = {**sorted(results, key=lambda x: x["images_per_s"])[len(results) // 2],
                     "images_per_s_rounds": [x["images_per_s"] for x in results]}
    ratios = [d["images_per_s"] / z["images_per_s"] for d, z in zip(runs[delayed], runs["s3_0ms"])]
    out["latency_ratio"] = round(sorted(ratios)[len(ratios) // 2], 3)
    out["latency_ratio_rounds"] = [round(x, 3) for x in ratios]
    out["target_latency_ratio"] = TARGET_LATENCY_RATIO
    out["meets_target"] = out["latency_ratio"] >= TARGET_LATENCY_RATIO
    out["s3_0ms_vs_local"] = round(out["s3_0ms"]["images_per_s"] / out["local"]["images_per_s"], 3)
    out[delayed + "_vs_local"] = round(out[delayed]["images_per_s"] / out["local"]["images_per_s"], 3)
    return out


# ---------------------------------------------------------------------------------------------------------------
# ray: the job through Ray against the per-core rate


def ray_limits(work_dir: str, job_seconds: float, phase_seconds: dict, images: int, base_rate: float,
               cpus: int) -> dict:
    """Where the median pass lost efficiency (see the module docstring); the encode tasks' own timings come from
    their done records in OUTPUT/_work/encoded/done (kept by --keep-work; pipeline/preprocess/results.py)."""
    from pipeline.preprocess.layout import Layout
    from pipeline.preprocess.results import ResultLog

    with open(os.path.join(work_dir, "_work", "plan.json")) as f:
        units = len(json.load(f)["unit_sizes"])
    task_seconds = [r["seconds"] for _, r in ResultLog(Layout(work_dir).encoded_done, units).load() if "seconds" in r]
    encode_s = phase_seconds.get("encode", job_seconds)
    out = {"encode_share_of_job": round(encode_s / job_seconds, 3), "encode_tasks": len(task_seconds)}
    if task_seconds:
        out["task_busy_share_of_encode_cpu"] = round(sum(task_seconds) / (encode_s * cpus), 3)
        out["in_task_images_per_s"] = round(images / sum(task_seconds), 1)
        out["in_task_vs_per_core"] = round(images / sum(task_seconds) / base_rate, 3)
        out["task_seconds"] = sorted(round(s, 2) for s in task_seconds)
    return out


def ray_passes(args, paths: list[str], subset: list[str], tokenizer, tok_path: str, work: str) -> dict:
    import ray

    from jpeglm import cli

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources()["CPU"])
    passes = []
    try:
        for r in range(args.repeat):
            print(f"pass {r + 1}/{args.repeat}: per-core rate on {len(subset)} images (one core, no Ray) ...",
                  flush=True)
            base = baseline_rate(subset, tokenizer)
            out_dir = os.path.join(work, f"ray-job-{r}")
            job_args = ["preprocess", "--input", args.images_dir, "--output", out_dir, "--tokenizer", tok_path,
                        "--keep-work"]
            if args.images_per_unit:
                job_args += ["--images-per-unit", str(args.images_per_unit)]
            print(f"pass {r + 1}/{args.repeat}: {len(paths)} images on {cpus} CPUs: jpeglm {' '.join(job_args)}",
                  flush=True)
            start = time.perf_counter()
            if cli.main(job_args) != 0:
                raise RuntimeError(f"jpeglm {' '.join(job_args)} failed")
            seconds = time.perf_counter() - start
            with open(os.path.join(out_dir, "summary.json")) as f:
                summary = json.load(f)
            rate = len(paths) / seconds
            passes.append({"baseline_images_per_s": base["images_per_s"], "job_seconds": round(seconds, 2),
                           "job_images_per_s": round(rate, 1), "phase_seconds": summary["phase_seconds"],
                           "efficiency": round(rate / (base["images_per_s"] * cpus), 3),
                           "limits": ray_limits(out_dir, seconds, summary["phase_seconds"], len(paths),
                                                base["images_per_s"], cpus)})
            shutil.rmtree(out_dir)
    finally:
        ray.shutdown()
    median = sorted(passes, key=lambda p: p["efficiency"])[len(passes) // 2]
    return {"cpus": cpus, "efficiency": median["efficiency"],
            "efficiency_spread": [min(p["efficiency"] for p in passes), max(p["efficiency"] for p in passes)],
            "target_efficiency": TARGET_EFFICIENCY, "meets_target": median["efficiency"] >= TARGET_EFFICIENCY,
            "median_pass": median, "passes": passes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write the results to")
    parser.add_argument("--num", type=int, default=4000, help="images in the Ray job (default 4000)")
    parser.add_argument("--baseline-images", type=int, default=600, help="images timed for the per-core rate")
    parser.add_argument("--io-images", type=int, default=1000, help="images read in the io part (default 1000)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="S3 latency added per request (default 20)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray CPUs (default: all cores)")
    parser.add_argument("--images-dir", default=os.path.join(".cache", "bench-preprocess-images"),
                        help="where the derived images are kept between runs")
    parser.add_argument("--images-per-unit", type=int, default=None, help="passed to the job (default: the job's)")
    parser.add_argument("--bpe-sample", type=int, default=1000, help="BPE sample of the cold full job (default 1000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of the io configurations, and alternating per-core / Ray job passes (default 3)")
    parser.add_argument("--skip", action="append", default=[], choices=("io", "ray", "cold"),
                        help="leave out a part (repeatable), e.g. while developing")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from pipeline import codec
    from pipeline.tokenizer import Tokenizer

    if args.repeat < 1 or args.num < 1 or args.io_images < 1:
        parser.error("--repeat, --num and --io-images must be >= 1")
    paths = ensure_images(args.images_dir, args.num)
    result = {"benchmark": "preprocess",
              "command": " ".join([os.path.relpath(sys.executable), "bench/bench_preprocess.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "ray": ray.__version__},
              "images": len(paths)}
    work = tempfile.mkdtemp(prefix="bench-preprocess-")
    try:
        subset = paths[:: max(1, len(paths) // args.baseline_images)][: args.baseline_images]
        bodies = [codec.canonicalize(open(p, "rb").read()) for p in paths[:: max(1, len(paths) // 1000)]]
        tokenizer = Tokenizer.train(bodies, vocab_size=320)
        tok_path = os.path.join(work, "tokenizer.model")
        tokenizer.save(tok_path)
        print(f"per-core rate on {len(subset)} images (one core, no Ray) ...", flush=True)
        result["per_core"] = baseline_rate(subset, tokenizer)
        if "io" not in args.skip:
            io_paths = paths[:: max(1, len(paths) // args.io_images)][: args.io_images]
            result["io"] = io_benchmark(io_paths, work, tokenizer, args.delay_ms, args.repeat)
        if "ray" not in args.skip:
            result["ray"] = ray_passes(args, paths, subset, tokenizer, tok_path, work)
        if "cold" not in args.skip:
            cold_args = [sys.executable, "-m", "jpeglm", "preprocess", "--input", args.images_dir, "--output",
                         os.path.join(work, "cold"), "--bpe-sample", str(args.bpe_sample), "--num-cpus",
                         str(args.cpus)]
            print(f"full job, cold: {' '.join(cold_args[2:])}", flush=True)
            start = time.perf_counter()
            subprocess.run(cold_args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            with open(os.path.join(work, "cold", "summary.json")) as f:
                result["full_job_cold"] = {"seconds": round(seconds, 2), "images_per_s": round(len(paths) / seconds, 1),
                                           "bpe_sample": args.bpe_sample, "summary": json.load(f)}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"per core: {result['per_core']['images_per_s']:.0f} images/s")
    if "io" in result:
        io_ = result["io"]
        d = f"s3_{args.delay_ms:g}ms"
        print(f"io: local {io_['local']['images_per_s']:.0f}, S3 0 ms {io_['s3_0ms']['images_per_s']:.0f}, S3 "
              f"{args.delay_ms:g} ms {io_[d]['images_per_s']:.0f} ({io_['latency_ratio']:.2f}x of 0 ms; target "
              f"{TARGET_LATENCY_RATIO}), one at a time {io_[d + '_one_at_a_time']['images_per_s']:.0f} images/s; "
              f"{io_[d]['requests_per_image']} requests per image")
    if "ray" in result:
        r = result["ray"]
        print(f"Ray efficiency {r['efficiency']:.0%} (passes: "
              f"{', '.join(format(p['efficiency'], '.0%') for p in r['passes'])}; target {TARGET_EFFICIENCY:.0%}); "
              f"limits of the median pass: {r['median_pass']['limits']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
