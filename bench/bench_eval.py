"""Evaluation speed: FID Inception feature extraction (images/s), and `jpeglm eval completion` end to end.

    python bench/bench_eval.py --out bench/results/eval.json --demo out/demo --sample-dir data/sample-images
    python bench/bench_eval.py --out bench/results/eval-gpu.json --device cuda --skip-eval    # GPU lent: features only

features: --images derived photos (pipeline.sample_images, 0.1-1 MP) decoded, resized to 299 and run through the
Inception network in batches of --batch; images/s over the whole pipeline (decode + resize + network) and of the
network alone, after one warm-up batch. On CPU with torch's default threads and with 1 thread; on CUDA in fp32.

eval: `jpeglm eval completion --num N --ratios 0.5` with the demo model (`make demo`'s out/demo/run) on N
validation images. The demo data holds ~95 of them, so a copy of the bundled photos is preprocessed again at 64x64
with the demo's tokenizer and --val-fraction 0.3 (~600 validation images; the demo model has seen some of them,
which changes no timing). Reports the command's wall time and its parts (sampling, features) from eval.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


def bench_features(device: torch.device, images: int, batch: int, inception: str | None) -> dict:
    import numpy as np
    from PIL import Image

    from evaluation.fid import extract_features, inception_input, load_inception
    from pipeline.sample_images import derive

    net = load_inception(inception, str(device))
    files = [data for _, data in derive(images, seed=1)]
    warm = [Image.open(io.BytesIO(d)).convert("RGB") for d in files[:batch]]
    extract_features(net, warm, batch)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    t0 = time.perf_counter()
    extract_features(net, (Image.open(io.BytesIO(d)).convert("RGB") for d in files), batch)
    sync()
    total = time.perf_counter() - t0
    x = torch.from_numpy(np.stack([inception_input(im) for im in warm])).to(device)
    sync()
    t0 = time.perf_counter()
    reps = max(1, images // batch)
    with torch.no_grad():
        for _ in range(reps):
            net(x)
    sync()
    network = time.perf_counter() - t0
    return {"images": images, "batch": batch, "images_per_s": round(images / total, 2),
            "network_only_images_per_s": round(reps * batch / network, 2)}


def bench_eval(args) -> dict:
    demo = args.demo
    run, data = os.path.join(demo, "run"), os.path.join(demo, "data")
    if not os.path.isfile(os.path.join(run, "summary.json")):
        raise SystemExit(f"bench_eval: no trained demo model in {run}: run `make demo` first")
    work = os.path.join(args.work, "bench-eval")
    bench_data, out = os.path.join(work, "data"), os.path.join(work, "eval")
    jpeglm = [sys.executable, "-m", "jpeglm"]
    if not os.path.isfile(os.path.join(bench_data, "manifest.json")):
        subprocess.run([*jpeglm, "preprocess", "--input", args.sample_dir, "--output", bench_data, "--image-size", "64",
                        "--tokenizer", os.path.join(data, "tokenizer.model"), "--val-fraction", "0.3",
                        "--shard-size", "4MB"], check=True)
    if os.path.exists(out):
        import shutil

        shutil.rmtree(out)  # no cached features: time the whole command
    cmd = [*jpeglm, "eval", "completion", "--checkpoint", run, "--data", bench_data, "--ratios", "0.5", "--num",
           str(args.num), "--out", out, "--batch", str(args.eval_batch), "--device", args.device]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "eval.json")) as f:
        result = json.load(f)
    section = result["completion"]["0.5"]
    return {"command": " ".join(["jpeglm", *cmd[3:]]), "num": result["num"], "wall_s": round(wall, 1),
            "timing": result.get("timing", {}), "fid": section["model"]["fid"], "kid": section["model"]["kid"],
            "complete_fraction": section["model"]["complete_fraction"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write (e.g. bench/results/eval.json)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--images", type=int, default=96, help="images for the feature benchmark (default 96)")
    parser.add_argument("--batch", type=int, default=16, help="Inception batch (default 16)")
    parser.add_argument("--inception", help="the FID Inception file (default: .cache/, from make eval-weights)")
    parser.add_argument("--demo", default="out/demo", help="make demo's output folder (default out/demo)")
    parser.add_argument("--sample-dir", default="data/sample-images", help="the bundled photos as files")
    parser.add_argument("--work", default="out", help="where the benchmark's own data goes (default out/)")
    parser.add_argument("--num", type=int, default=500, help="validation images for the eval timing (default 500)")
    parser.add_argument("--eval-batch", type=int, default=16, help="sampling batch of the eval (default 16)")
    parser.add_argument("--skip-eval", action="store_true", help="only the feature benchmark")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    result = {
        "command": "python bench/bench_eval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "features": {},
    }
    if device.type == "cpu":
        default = torch.get_num_threads()
        for threads in sorted({default, 1}, reverse=True):
            torch.set_num_threads(threads)
            result["features"][f"cpu_threads_{threads}"] = r = bench_features(device, args.images, args.batch,
                                                                               args.inception)
            print(f"features, {threads} thread(s): {r['images_per_s']} images/s "
                  f"(network alone {r['network_only_images_per_s']})", flush=True)
        torch.set_num_threads(default)
    else:
        result["features"]["cuda_fp32"] = r = bench_features(device, args.images * 4, args.batch * 4, args.inception)
        print(f"features on {device}: {r['images_per_s']} images/s (network alone {r['network_only_images_per_s']})")
    if not args.skip_eval:
        result["eval_completion"] = r = bench_eval(args)
        print(f"jpeglm eval completion, N={r['num']}, ratio 0.5: {r['wall_s']} s", flush=True)
    result["load_average_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
