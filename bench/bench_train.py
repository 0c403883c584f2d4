"""Training step throughput: DeepSpeed ZeRO-3 (as `jpeglm train` runs it) against a plain PyTorch loop, same model,
same batch, same process; tokens/s, TFLOP/s and MFU.

    python bench/bench_train.py --out bench/results/train.json                 # CPU: tiny and 150m
    python bench/bench_train.py --out bench/results/train-gpu.json --device cuda   # GPU: 1b and a 7b slice

Cases (presets from trainer/configs/, shapes overridable with --seq-len / --micro-batch / --set):
  tiny       the CPU preset as `make train` uses it (fp32, 1,024 tokens, micro-batch 4)
  150m       the 150m model at full width; on CPU with a short context (--cpu-seq-len, default 512), fp32
  1b         the 1b preset on one GPU: 12,288 tokens, micro-batch 1, bf16, activation checkpointing
  7b-slice   the paper's 7B at full width (d 4096, 32 heads, FFN 11008) but 4 of its 32 layers, 12,288 tokens, bf16,
             activation checkpointing: per-layer throughput of the real model on one GPU

For each case both steps are built once and then alternate (plain, ZeRO-3, plain, ...) for --steps measured steps
after --warmup, so a noisy neighbour slows both alike; the median step time of each is reported and
overhead_ratio = ZeRO-3 step time / plain step time.
  plain     model.to(device), torch.optim.AdamW, autocast to bf16 on GPU (fp32 master weights), gradient clipping
  zero3     deepspeed.initialize with trainer.ds_config.deepspeed_config (ZeRO stage 3, world size 1, zero.Init,
            torch AdamW as the client optimizer, bf16 params + fp32 master on GPU), as trainer/train.py does
Inputs are random token ids (the data loader is not timed: it prefetches in a background thread).
MFU = model FLOPs (6N + 12*L*d*T per token; recomputation not counted) / (step time x the device's dense peak:
trainer.metrics.PEAK_TFLOPS, or --peak-tflops). GPU cases are compared with the 40% MFU target on H100.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MFU_TARGET = 0.40
CASES = {
    "tiny": ("tiny", []),
    "150m": ("150m", []),
    "1b": ("1b", []),
    "7b-slice": ("7b", ["model.n_layers=4"]),
}
DEFAULT_CASES = {"cpu": ["tiny", "150m"], "cuda": ["1b", "7b-slice"]}


def case_config(name: str, device: str, args):
    from trainer.config import load_config

    preset, overrides = CASES[name]
    overrides = list(overrides)
    if device == "cpu":
        overrides += ["train.precision=fp32", "model.activation_checkpointing=0"]
        if name != "tiny":
            overrides += [f"train.seq_len={args.cpu_seq_len}", "train.micro_batch_size=1"]
    if args.seq_len:
        overrides += [f"train.seq_len={args.seq_len}"]
    if args.micro_batch:
        overrides += [f"train.micro_batch_size={args.micro_batch}"]
    overrides += list(args.set or [])
    cfg = load_config(preset, overrides)
    # One micro-batch per step on one process: no accumulation, so both loops do exactly the same work.
    cfg.train.global_batch_size = cfg.train.micro_batch_size
    cfg.train.device = device
    return cfg


class PlainStep:
    def __init__(self, cfg, device: str):
        import torch

        from trainer.model import Transformer
        from trainer.optim import build_optimizer

        self.torch = torch
        self.bf16 = cfg.train.precision == "bf16"
        self.clip = cfg.optimizer.grad_clip
        torch.manual_seed(0)
        with torch.device(device):
            self.model = Transformer(cfg.model)
        self.opt, _ = build_optimizer(self.model, cfg.optimizer, device)
        self.model.train()

    def __call__(self, inputs, targets) -> float:
        import torch.nn.functional as F

        torch = self.torch
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(inputs)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class ZeRO3Step:
    def __init__(self, cfg, device: str):
        import deepspeed
        import torch

        from trainer.ds_config import deepspeed_config
        from trainer.model import Transformer
        from trainer.optim import build_optimizer

        self.torch = torch
        ds_cfg = deepspeed_config(cfg, world_size=1)
        torch.manual_seed(0)
        with deepspeed.zero.Init(config_dict_or_path=ds_cfg, enabled=cfg.zero.stage == 3 and cfg.zero.init):
            model = Transformer(cfg.model)
        opt, _ = build_optimizer(model, cfg.optimizer, device)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
        self.engine.train()

    def __call__(self, inputs, targets) -> float:
        import torch.nn.functional as F

        logits = self.engine(inputs)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_case(name: str, device: str, args, peak: float | None) -> dict:
    import torch

    from trainer.metrics import throughput

    cfg = case_config(name, device, args)
    model_cfg, t = cfg.model, cfg.train
    batch, seq = t.micro_batch_size, t.seq_len
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(3, model_cfg.vocab_size, (batch, seq), generator=g).to(device)
    targets = torch.randint(3, model_cfg.vocab_size, (batch, seq), generator=g).to(device)
    print(f"[{name}] {model_cfg.num_params() / 1e6:,.1f}M non-embedding params, {model_cfg.n_layers} layers, "
          f"d {model_cfg.d_model}; batch {batch} x {seq} tokens, {t.precision}, {device}", flush=True)
    steps = {"plain": PlainStep(cfg, device), "zero3": ZeRO3Step(cfg, device)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    losses: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        for mode, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            losses[mode].append(step(inputs, targets))
            _sync(device)
            if i >= args.warmup:
                times[mode].append(time.perf_counter() - t0)
        label = "warmup" if i < args.warmup else ", ".join(f"{m} {times[m][-1]:.3f}s" for m in steps)
        print(f"[{name}] step {i + 1}/{args.warmup + args.steps}: {label}", flush=True)
    tokens = batch * seq
    fpt = model_cfg.flops_per_token(seq)
    out = {
        "case": name,
        "device": device,
        "precision": t.precision,
        "model": model_cfg.to_dict(),
        "seq_len": seq,
        "micro_batch": batch,
        "tokens_per_step": tokens,
        "params_non_embedding": model_cfg.num_params(),
        "flops_per_token": fpt,
    }
    for mode in steps:
        median = statistics.median(times[mode])
        out[mode] = {"step_s_median": median, "step_s": times[mode], "losses": losses[mode],
                     **throughput(tokens, median, fpt, 1, peak)}
    out["overhead_ratio"] = out["zero3"]["step_s_median"] / out["plain"]["step_s_median"]
    if device == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["mfu_target"] = MFU_TARGET
        out["zero3_meets_mfu_target"] = bool(out["zero3"]["mfu"] and out["zero3"]["mfu"] >= MFU_TARGET)
    del steps
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda if available (default)")
    parser.add_argument("--cases", default=None,
                        help=f"comma-separated, from {sorted(CASES)} (default: {DEFAULT_CASES['cpu']} on CPU, "
                             f"{DEFAULT_CASES['cuda']} on GPU)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per mode (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (default 2)")
    parser.add_argument("--cpu-seq-len", type=int, default=512,
                        help="context of the non-tiny cases on CPU (default 512; 12,288 would take minutes per step)")
    parser.add_argument("--seq-len", type=int, default=None, help="override every case's context")
    parser.add_argument("--micro-batch", type=int, default=None, help="override every case's micro-batch")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="config override for every case (repeatable), e.g. --set model.d_model=256")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: the table)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    cases = args.cases.split(",") if args.cases else DEFAULT_CASES[device]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    os.environ["DS_ACCELERATOR"] = device
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import deepspeed

    from trainer.metrics import peak_tflops
    from trainer.distributed import init_deepspeed

    init_deepspeed(device)
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    peak = peak_tflops(device_name if device == "cuda" else None, args.peak_tflops)

    results = []
    for name in cases:
        results.append(run_case(name, device, args, peak))
    report = {
        "benchmark": "train",
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]) if argv is None else "bench_train.main(...)",
        "device": device,
        "device_name": device_name,
        "peak_tflops": peak,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "python": platform.python_version()},
        "steps": args.steps,
        "warmup": args.warmup,
        "cases": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\n{'case':10} {'plain tok/s':>12} {'ZeRO-3 tok/s':>13} {'overhead':>9} {'TFLOP/s':>8} {'MFU':>7}")
    for r in results:
        mfu = f"{r['zero3']['mfu']:.1%}" if r["zero3"]["mfu"] is not None else "n/a"
        print(f"{r['case']:10} {r['plain']['tokens_per_s']:12,.0f} {r['zero3']['tokens_per_s']:13,.0f} "
              f"{r['overhead_ratio']:8.2f}x {r['zero3']['tflops_per_device']:8.3f} {mfu:>7}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
