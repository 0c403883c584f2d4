"""GPU check: the README's GPU figures on one lent GPU in one command (<= 8 minutes with the install).

    bash bench/gpu_check.sh                                  # on the GPU machine (see docs/training.md)
    python bench/gpu_check.py --out gpu_check.json           # the same without the install step
    python bench/gpu_check.py --out /tmp/check.json --dry-run   # every step on CPU at small shapes (tests run it)

Steps, each a subprocess with its own time limit (a failure is recorded and the next step still runs; the JSON is
rewritten after every step, so a run cut short keeps what it measured):
  imports    every module the steps import is on the machine's image or in .whl/ (IMAGE_PACKAGES, CARRIED)
  env        GPU, driver, torch / CUDA / DeepSpeed versions; the bf16 matmul rate measured on random data (8192^3):
             the achievable ceiling, next to the datasheet peak (trainer.metrics.PEAK_TFLOPS) that MFU is quoted on
  train      bench/bench_train.py --device cuda --cases 1b,7b-slice: one GPU, ZeRO-3 as `jpeglm train` runs it and a
             plain PyTorch loop, tokens/s, TFLOP/s, MFU (target >= 40% on the 7b slice), peak memory
  sample     bench/bench_sample.py --device cuda --dtype bf16 --presets 1b: KV-cache tokens/s, images/min at batch
             1 and 8 (the authors' sampling settings)
  sample-7b  the same for the paper's 7B (random weights); last, as it is the least needed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
MFU_TARGET = 0.40

# Python distributions on the lent machine's image (/work/.library/device/KINDS.md, package list read 2026-11-17),
# and what bench/gpu_wheels.sh puts in .whl/ to be carried there. Names normalized (lower case, '-').
IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())
CARRIED = frozenset({"deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
                     "typing-extensions"})
# Distributions that stand in for an image package here (pillow-simd provides PIL, as pillow does there).
SAME_AS = {"pillow-simd": "pillow"}
OUR_PACKAGES = ("jpeglm", "pipeline", "trainer", "bench")

# What the train and sample steps import (bench scripts, the trainer's DeepSpeed path, the sampler, the codec and
# tokenizer that measure tokens per image); printed as {module: [distributions]}.
_IMPORTS = r"""
import importlib, importlib.metadata, json, os, sys
os.environ.setdefault("DS_ACCELERATOR", "cpu" if sys.argv[1] == "cpu" else "cuda")
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
for name in ("bench_train", "bench_sample", "trainer.train", "trainer.distributed", "trainer.sample", "trainer.sampling",
             "deepspeed", "deepspeed.checkpoint.ds_to_universal", "pipeline.codec", "pipeline.sample_images",
             "pipeline.tokenizer"):
    importlib.import_module(name)
dists = importlib.metadata.packages_distributions()
top = sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names))
print(json.dumps({m: dists.get(m, []) for m in top}))
"""

_ENV = r"""
import json, os, subprocess, sys, time
import torch
cpu = sys.argv[1] == "cpu"
out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
import deepspeed
out["deepspeed"] = deepspeed.__version__
if cpu:
    device, dtype, n = "cpu", torch.float32, 512
else:
    device, dtype, n = "cuda", torch.bfloat16, 8192
    out["device_name"] = torch.cuda.get_device_name()
    out["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        out["nvidia_smi"] = repr(e)
from trainer.metrics import peak_tflops
out["datasheet_peak_tflops"] = peak_tflops(out.get("device_name"))
# The achievable matmul rate on random data (METHOD.md: never time zeros), median of 10 after warm-up.
a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
times = []
for i in range(13):
    if not cpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    c = a @ b
    if not cpu:
        torch.cuda.synchronize()
    if i >= 3:
        times.append(time.perf_counter() - t0)
times.sort()
out["matmul"] = {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / times[len(times) // 2] / 1e12}
print(json.dumps(out))
"""


def steps(dry_run: bool, out_dir: str) -> list[tuple[str, list[str], float]]:
    """(name, command, time limit in seconds) of every step."""
    py = sys.executable
    device = "cpu" if dry_run else "cuda"
    train = [py, "bench/bench_train.py", "--out", os.path.join(out_dir, "train.json"), "--device", device,
             "--cases", "1b,7b-slice"]
    sample = [py, "bench/bench_sample.py", "--device", device, "--dtype", "fp32" if dry_run else "bf16",
              "--batch", "8"]
    if dry_run:
        small = ["--set", "model.d_model=64", "--set", "model.n_heads=2", "--set", "model.ffn_dim=176",
                 "--set", "model.n_layers=2"]
        train += ["--steps", "2", "--warmup", "1", "--seq-len", "64", *small]
        sample = [*sample[:-1], "2", "--new-tokens", "8", "--window", "4", "--repeat", "1", "--tokens-per-image", "256"]
    else:
        train += ["--steps", "5", "--warmup", "2"]
    return [
        ("imports", [py, "-c", _IMPORTS, device], 120),
        ("env", [py, "-c", _ENV, device], 90),
        ("train", train, 300),
        ("sample", [*sample, "--out", os.path.join(out_dir, "sample.json"), "--presets", "tiny" if dry_run else "1b"],
         150),
        ("sample-7b", [*sample, "--out", os.path.join(out_dir, "sample-7b.json"), "--presets", "7b"], 150),
    ]


def run_step(name: str, cmd: list[str], limit: float, log_dir: str) -> dict:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    record = {"command": " ".join(c if len(c) < 200 else "<script>" for c in cmd), "limit_s": limit}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        record.update(exit_code=proc.returncode, stdout_tail=proc.stdout[-3000:], stderr_tail=proc.stderr[-3000:])
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace") \
            if isinstance(e.stdout, bytes) or e.stdout is None else e.stdout + (e.stderr or "")
        record.update(exit_code=None, timed_out=True, stdout_tail=output[-3000:])
    record["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(log_dir, f"gpu_check-{name}.log"), "w") as f:
        f.write(output)
    record["ok"] = record.get("exit_code") == 0
    return record


def check_imports(record: dict) -> None:
    """Turn the imports step's output into the list of distributions the image would lack."""
    lines = [line for line in record.get("stdout_tail", "").splitlines() if line.startswith("{")]
    if not record["ok"] or not lines:
        return
    modules = json.loads(lines[-1])
    needed = set()
    for module, dists in modules.items():
        if module in OUR_PACKAGES or module.startswith("_") or not dists:
            continue  # the repository's own packages, interpreter internals, modules outside any distribution
        for dist in dists:
            name = dist.lower().replace("_", "-")
            needed.add(SAME_AS.get(name, name))
    record["distributions"] = sorted(needed)
    record["carried"] = sorted(needed & CARRIED)
    record["missing"] = sorted(needed - IMAGE_PACKAGES - CARRIED - {"jpeglm"})
    record["ok"] = not record["missing"]


def summarize(report: dict, out_dir: str) -> dict:
    """The figures the README quotes, from the steps' JSON files."""
    figures: dict = {}
    env = report["steps"].get("env", {})
    env_lines = [line for line in env.get("stdout_tail", "").splitlines() if line.startswith("{")]
    matmul = json.loads(env_lines[-1])["matmul"]["tflops"] if env.get("ok") and env_lines else None
    figures["matmul_tflops_measured"] = matmul
    path = os.path.join(out_dir, "train.json")
    if report["steps"].get("train", {}).get("ok") and os.path.exists(path):
        with open(path) as f:
            train = json.load(f)
        figures["peak_tflops_datasheet"] = train.get("peak_tflops")
        for case in train["cases"]:
            z, p = case["zero3"], case["plain"]
            figures[f"train_{case['case']}"] = {
                "tokens_per_step": case["tokens_per_step"],
                "zero3_tokens_per_s": z["tokens_per_s"], "zero3_tflops": z["tflops_per_device"], "zero3_mfu": z["mfu"],
                "zero3_mfu_vs_measured_matmul": z["tflops_per_device"] / matmul if matmul else None,
                "plain_tokens_per_s": p["tokens_per_s"], "plain_mfu": p["mfu"],
                "overhead_ratio": case["overhead_ratio"], "first_loss_zero3_vs_plain": [z["losses"][0],
                                                                                        p["losses"][0]],
                "peak_memory_gib": case.get("peak_memory_gib"),
                "meets_mfu_target": bool(z["mfu"] is not None and z["mfu"] >= MFU_TARGET),
            }
    for step, name in (("sample", "sample.json"), ("sample-7b", "sample-7b.json")):
        path = os.path.join(out_dir, name)
        if report["steps"].get(step, {}).get("ok") and os.path.exists(path):
            with open(path) as f:
                sample = json.load(f)
            for preset, r in sample["presets"].items():
                figures[f"sample_{preset}"] = {
                    "dtype": sample["dtype"],
                    "kv_cache_tokens_per_s_batch1": r["kv_vs_recompute"]["kv_cache_tokens_per_s"],
                    "kv_vs_recompute": r["kv_vs_recompute"]["speedup"],
                    **{f"tokens_per_s_batch{b}": v["tokens_per_s"] for b, v in r["images_per_min"].items()},
                    **{f"images_per_min_batch{b}": v["images_per_min"] for b, v in r["images_per_min"].items()},
                    "tokens_per_image": sample["tokens_per_image"]["tokens_per_image"],
                }
    return figures


def print_table(report: dict) -> None:
    print(f"\n{'step':10} {'ok':>4} {'seconds':>8}")
    for name, r in report["steps"].items():
        print(f"{name:10} {'yes' if r['ok'] else 'NO':>4} {r['seconds']:8.1f}" + (" (timed out)" if r.get("timed_out")
                                                                                   else ""))
    f = report["figures"]
    print(f"\nbf16 matmul measured: {f.get('matmul_tflops_measured') or float('nan'):.0f} TFLOP/s; datasheet peak "
          f"{f.get('peak_tflops_datasheet')}")
    for key, v in f.items():
        if key.startswith("train_"):
            mfu = f"{v['zero3_mfu']:.1%}" if v["zero3_mfu"] is not None else "n/a"
            print(f"{key:18} ZeRO-3 {v['zero3_tokens_per_s']:10,.0f} tok/s {v['zero3_tflops']:7.1f} TFLOP/s MFU {mfu} "
                  f"(target {MFU_TARGET:.0%}: {'met' if v['meets_mfu_target'] else 'not met'}); plain "
                  f"{v['plain_tokens_per_s']:,.0f} tok/s; overhead {v['overhead_ratio']:.2f}x")
        elif key.startswith("sample_"):
            print(f"{key:18} batch 1 {v['tokens_per_s_batch1']:8,.0f} tok/s = {v['images_per_min_batch1']:.2f} img/min; "
                  + ", ".join(f"batch {k[len('tokens_per_s_batch'):]} {v[k]:,.0f} tok/s = "
                              f"{v['images_per_min_batch' + k[len('tokens_per_s_batch'):]]:.2f} img/min"
                              for k in v if k.startswith("tokens_per_s_batch") and k != "tokens_per_s_batch1"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--log-dir", default=None, help="per-step logs and JSON (default: beside --out)")
    parser.add_argument("--dry-run", action="store_true", help="every step on CPU at small shapes")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out, e.g. sample-7b")
    args = parser.parse_args(argv)
    out_dir = os.path.abspath(args.log_dir or os.path.dirname(os.path.abspath(args.out)))
    os.makedirs(out_dir, exist_ok=True)
    skip = {s for s in args.skip.split(",") if s}
    if args.dry_run:
        skip.add("sample-7b")  # a 7B model on CPU: the sample step already runs the same code
    report = {"benchmark": "gpu_check", "dry_run": args.dry_run, "command": " ".join(sys.argv),
              "mfu_target": MFU_TARGET, "steps": {}, "figures": {}}
    started = time.perf_counter()
    for name, cmd, limit in steps(args.dry_run, out_dir):
        if name in skip:
            continue
        print(f"[gpu_check] {name}: {' '.join(c if len(c) < 200 else '<script>' for c in cmd)}", flush=True)
        record = run_step(name, cmd, limit, out_dir)
        if name == "imports":
            check_imports(record)
        report["steps"][name] = record
        report["figures"] = summarize(report, out_dir)
        report["wall_s"] = round(time.perf_counter() - started, 1)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        status = "ok" if record["ok"] else f"FAILED (exit {record.get('exit_code')})"
        print(f"[gpu_check] {name}: {status} in {record['seconds']} s", flush=True)
        if not record["ok"]:
            print(record.get("stderr_tail", "") or record.get("stdout_tail", ""), flush=True)
            if record.get("missing"):
                print(f"[gpu_check] not on the image and not carried: {record['missing']}", flush=True)
    print_table(report)
    print(f"wrote {args.out} ({report['wall_s']} s)")
    return 0 if all(r["ok"] for r in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
