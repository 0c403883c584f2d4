"""Sampling speed: KV-cache decoding against full recomputation, and images/min at batch 1 and batch B.

    python bench/bench_sample.py --out bench/results/sample.json                       # CPU: tiny and 150m, fp32
    python bench/bench_sample.py --out bench/results/sample-gpu.json --presets 1b --device cuda --dtype bf16

Models are the presets' architectures (trainer/configs/*.yaml) with random weights: speed does not depend on the
weights, and random weights never stop early, so every run decodes exactly the tokens asked for. The sampler is
trainer.generate.generate with the authors' settings (temperature 1, top-k 50, top-p 0.9), so the figures include
sampling and the per-step stop checks.

On CPU every figure comes twice: per wall-clock second, and per second of the process's CPU time (one thread, so
this is what a dedicated core gives; on a shared machine the wall-clock figure also counts time other processes
held the core). Ratios are taken between figures of one run.

Measured per preset (each KV-cache figure the median of --repeat runs; on CPU one thread, so figures are per core):
- kv_vs_recompute: tokens/s decoding --new-tokens tokens from BOS at batch 1, with the KV cache and by recomputing
  the whole sequence each step (the same generate() with use_cache=False), and their ratio. The ratio grows with the
  length decoded (recomputation is quadratic), so it is reported for that length only.
- images_per_min at batch 1 and batch B: tokens/s of KV-cache decoding of --window tokens starting at the middle of
  an image (context = tokens_per_image / 2, prefilled once and not timed; --repeat consecutive windows), which is the
  mean per-token cost over a whole image since attention cost grows linearly with position;
  images/min = 60 x tokens/s / tokens_per_image.
  tokens_per_image is measured: the mean token count of the bundled photos' canonical bodies, tokenized with a BPE
  (vocab 320) fitted on them, plus BOS. With --full-image the tiny preset also generates whole images at batch 1 and
  B (tokens_per_image tokens each) to check the estimate against a direct measurement.
The tiny preset's max_seq_len (1,024) is raised to 12,288 for the measurement so it can hold an image.

--threads-check (issue: sampling collapsed under CPU contention): tokens/s of the tiny preset decoding from BOS
(batch 1, KV cache) with 1 thread and with all cores, first as the machine is, then while one busy process of ours
(a Python loop) runs beside it; and what `jpeglm sample`'s default (trainer.devices.default_threads: cores minus
the cores busy now) chooses on this machine, without and with that process. Each figure is the median of --repeat runs, alternated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import NamedTuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def preset_model_config(name: str, max_seq_len: int = 12288):
    import dataclasses

    from trainer.config import ConfigError, load_config

    try:
        model = load_config(name).model
    except ConfigError as e:
        raise SystemExit(f"bench_sample: {e}") from None
    return dataclasses.replace(model, max_seq_len=max(model.max_seq_len, max_seq_len), activation_checkpointing=0)


def measure_tokens_per_image() -> dict:
    from pipeline import codec
    from pipeline.sample_images import photo_bytes, photo_names
    from pipeline.tokenizer import Tokenizer

    bodies = [codec.canonicalize(photo_bytes(n)) for n in photo_names()]
    tok = Tokenizer.train(bodies, 320)
    counts = [len(tok.encode(b)) + 1 for b in bodies]  # + BOS
    return {"tokens_per_image": round(statistics.mean(counts)),
            "bytes_per_image": round(statistics.mean(map(len, bodies))),
            "source": f"{len(bodies)} bundled photos, canonical bodies, BPE vocab 320 fitted on them, + BOS"}


class Rate(NamedTuple):
    wall: float  # tokens per wall-clock second
    cpu: float  # tokens per second of this process's CPU time (one thread: what a dedicated core gives)


def decode_rate(model, batch: int, context: int, new_tokens: int, use_cache: bool, seed: int) -> Rate:
    """tokens/s (all rows) of generate() decoding `new_tokens` after a random prompt of `context` tokens; the
    prefill is excluded from the time."""
    return chunk_rates(model, batch, context, new_tokens, 1, use_cache, seed)[0]


def chunk_rates(model, batch: int, context: int, chunk: int, chunks: int, use_cache: bool, seed: int) -> list[Rate]:
    """Decode chunks x chunk tokens after one prefill of a random `context`-token prompt; tokens/s of each chunk
    (repeats without paying the prefill again). Step times come from generate()'s per-step callback."""
    from trainer.generate import GenerationStats, SamplingParams, generate

    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    prompt = [1] + torch.randint(3, model.cfg.vocab_size, (context - 1,), generator=g).tolist()
    stamps: list[tuple[float, float]] = []

    def on_step(_active: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append((time.perf_counter(), time.process_time()))

    gen = torch.Generator(device=device).manual_seed(seed)
    # +1: the first token comes from the prefill's logits; its stamp starts the clock.
    generate(model, [prompt] * batch, chunk * chunks + 1, SamplingParams(), generator=gen, use_cache=use_cache,
             stats=GenerationStats(), on_step=on_step)
    rates = []
    for i in range(chunks):
        (w0, c0), (w1, c1) = stamps[i * chunk], stamps[(i + 1) * chunk]
        rates.append(Rate(batch * chunk / (w1 - w0), batch * chunk / max(c1 - c0, 1e-9)))
    return rates


def median(rates: list[Rate]) -> Rate:
    return Rate(statistics.median(r.wall for r in rates), statistics.median(r.cpu for r in rates))


def bench_preset(name: str, args, device, dtype, tokens_per_image: int) -> dict:
    from trainer.model import Transformer

    cfg = preset_model_config(name)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    rep = args.repeat
    print(f"[{name}] {params / 1e6:.1f}M parameters on {device} {dtype}", flush=True)

    decode_rate(model, 1, 1, 4, True, 0)  # warm-up (allocator, kernels)
    n = args.new_tokens
    # Alternate the two so machine noise hits both alike.
    cached, recompute = [], []
    for i in range(max(rep, args.recompute_repeat)):
        if i < rep:
            cached.append(decode_rate(model, 1, 1, n, True, i))
        if i < args.recompute_repeat:
            recompute.append(decode_rate(model, 1, 1, n, False, i))
    cached, recompute = median(cached), median(recompute)
    print(f"[{name}] {n} tokens from BOS, batch 1: KV cache {cached.wall:.1f} tok/s, recompute {recompute.wall:.1f} "
          f"tok/s ({cached.wall / recompute.wall:.1f}x; per CPU second {cached.cpu:.1f} vs {recompute.cpu:.1f}, "
          f"{cached.cpu / recompute.cpu:.1f}x)", flush=True)

    mid = tokens_per_image // 2
    rates = {}
    for b in sorted({1, args.batch}):
        rates[b] = median(chunk_rates(model, b, mid, args.window, rep, True, b))
        print(f"[{name}] batch {b} at context {mid}: {rates[b].wall:.1f} tok/s = "
              f"{60 * rates[b].wall / tokens_per_image:.2f} images/min (per CPU second: "
              f"{60 * rates[b].cpu / tokens_per_image:.2f})", flush=True)
    cpu = device.type == "cpu"

    def figures(r: Rate, prefix: str = "") -> dict:
        out = {f"{prefix}tokens_per_s": round(r.wall, 2)}
        if cpu:
            out[f"{prefix}tokens_per_cpu_s"] = round(r.cpu, 2)
        return out

    result = {
        "parameters": params,
        "model": cfg.to_dict(),
        "kv_vs_recompute": {
            "batch": 1,
            "new_tokens_from_bos": n,
            **figures(cached, "kv_cache_"),
            **figures(recompute, "recompute_"),
            "speedup": round(cached.wall / recompute.wall, 2),
            **({"speedup_cpu_time": round(cached.cpu / recompute.cpu, 2)} if cpu else {}),
        },
        "images_per_min": {
            str(b): {
                "batch": b,
                "context": mid,
                "window_tokens": args.window,
                **figures(r),
                "images_per_min": round(60 * r.wall / tokens_per_image, 3),
                **({"images_per_cpu_min": round(60 * r.cpu / tokens_per_image, 3)} if cpu else {}),
            }
            for b, r in rates.items()
        },
        "batch_speedup": round(rates[args.batch].wall / rates[1].wall, 2) if args.batch != 1 else 1.0,
    }
    if args.full_image and name == "tiny":
        full = {}
        for b in sorted({1, args.batch}):
            r = chunk_rates(model, b, 1, tokens_per_image - 1, 1, True, 0)[0]
            full[str(b)] = {"batch": b, "images_per_min": round(60 * r.wall / tokens_per_image, 3),
                            **({"images_per_cpu_min": round(60 * r.cpu / tokens_per_image, 3)} if cpu else {})}
            print(f"[{name}] whole images, batch {b}: {full[str(b)]['images_per_min']:.2f} images/min (measured; "
                  f"per CPU second: {60 * r.cpu / tokens_per_image:.2f})", flush=True)
        result["full_image_measured"] = full
    return result


def threads_check(args) -> dict:
    """Decoding speed with 1 thread vs all cores, without and with one busy process beside it."""
    import subprocess

    from trainer.model import Transformer
    from trainer.devices import default_threads, usable_cores

    torch.manual_seed(0)
    model = Transformer(preset_model_config("tiny")).eval()
    cores = len(usable_cores())
    counts = sorted({1, cores})
    before = torch.get_num_threads()

    def rates() -> dict:
        runs: dict[int, list[Rate]] = {n: [] for n in counts}
        for i in range(args.repeat):
            for n in counts:
                torch.set_num_threads(n)
                runs[n].append(decode_rate(model, 1, 1, args.new_tokens, True, i))
        return {str(n): round(median(r).wall, 1) for n, r in runs.items()}

    out = {"model": "tiny", "new_tokens_from_bos": args.new_tokens, "cores": cores,
           "load_average": os.getloadavg()[0], "default_threads_now": default_threads()}  # before our busy process
    out["as_is_tokens_per_s"] = rates()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        out["default_threads_with_busy_process"] = default_threads()
        out["one_busy_process_tokens_per_s"] = rates()
    finally:
        busy.kill()
        busy.wait()
    torch.set_num_threads(before)
    for key in ("as_is_tokens_per_s", "one_busy_process_tokens_per_s"):
        r = out[key]
        print(f"threads: {key}: " + ", ".join(f"{n} thread(s) {v:,.0f} tok/s" for n, v in r.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write (e.g. bench/results/sample.json)")
    parser.add_argument("--presets", default="tiny,150m",
                        help="comma-separated presets from trainer/configs (default tiny,150m)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--batch", type=int, default=8, help="the larger batch B (default 8)")
    parser.add_argument("--new-tokens", type=int, default=128,
                        help="tokens decoded from BOS for KV cache vs recompute (default 128)")
    parser.add_argument("--window", type=int, default=32,
                        help="tokens decoded mid-image per images/min measurement (default 32)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per KV-cache figure; the median is reported (default 3)")
    parser.add_argument("--recompute-repeat", type=int, default=1, help="runs of the recompute baseline (default 1)")
    parser.add_argument("--tokens-per-image", type=int, help="override the measured mean tokens per image")
    parser.add_argument("--full-image", action="store_true", help="tiny only: also time whole-image generation")
    parser.add_argument("--threads-check", action="store_true",
                        help="also measure 1 thread vs all cores, with and without one busy process beside")
    parser.add_argument("--threads", type=int,
                        help="torch threads; default 1 on CPU (per-core figures: on a shared 2-core VM, 2-thread "
                             "OpenMP barriers stalled decoding up to 50x), torch's choice on cuda")
    args = parser.parse_args(argv)
    if min(args.batch, args.new_tokens, args.window, args.repeat, args.recompute_repeat) < 1:
        parser.error("--batch, --new-tokens, --window, --repeat and --recompute-repeat must be positive")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)

    tpi = {"tokens_per_image": args.tokens_per_image, "source": "--tokens-per-image"} if args.tokens_per_image \
        else measure_tokens_per_image()
    print(f"tokens per image: {tpi['tokens_per_image']} ({tpi['source']})", flush=True)
    results = {
        "command": "python bench/bench_sample.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "sampling": {"temperature": 1.0, "top_k": 50, "top_p": 0.9},
        "tokens_per_image": tpi,
        "presets": {},
    }
    t0 = time.perf_counter()
    if args.threads_check and device.type == "cpu":
        results["threads"] = threads_check(args)
    for name in [p.strip() for p in args.presets.split(",") if p.strip()]:
        results["presets"][name] = bench_preset(name, args, device, dtype, tpi["tokens_per_image"])
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["load_average_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out} ({results['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
