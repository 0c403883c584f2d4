"""The run directory's own files (besides checkpoints/, written by trainer/checkpoint.py):

    RUN/config.yaml        the full config of the latest attempt
    RUN/tokenizer.model    the data's tokenizer (export and sampling must not depend on the data staying around)
    RUN/attempts.jsonl     one line per start: attempt number, time, world size (sample records are keyed by it)
    RUN/metrics.jsonl      per-step and validation records (trainer/metrics.py), RUN/tensorboard/
    RUN/samples/           what each rank trained on (trainer/data.py SampleRecord)
    RUN/summary.json       the last attempt's summary, RUN/loss.png its loss curves
"""

from __future__ import annotations

import json
import os
import time

ATTEMPTS = "attempts.jsonl"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


def write_run_files(run_dir: str, cfg: dict, tokenizer_bytes: bytes) -> None:
    import yaml

    from pipeline import storage

    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    storage.write_bytes(os.path.join(run_dir, "tokenizer.model"), tokenizer_bytes)


def next_attempt(run_dir: str, rank: int) -> int:
    """This start's number (0 for the first), agreed by all ranks: rank 0 appends to attempts.jsonl and
    broadcasts the number (collective)."""
    import torch.distributed as dist

    path = os.path.join(run_dir, ATTEMPTS)
    box = [0]
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        if os.path.exists(path):
            with open(path) as f:
                box[0] = sum(1 for _ in f)
        with open(path, "a") as f:
            f.write(json.dumps({"attempt": box[0], "time": time.time(), "world_size": dist.get_world_size()}) + "\n")
    dist.broadcast_object_list(box, src=0)
    return box[0]


def write_summary(run_dir: str, summary: dict) -> None:
    with open(os.path.join(run_dir, SUMMARY), "w") as f:
        json.dump(summary, f, indent=2)


def plot_losses(run_dir: str, records: list[dict]) -> str | None:
    """RUN/loss.png: train and validation loss against the step (None when no step was logged)."""
    from jpeglm.plots import line_plot

    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["loss"]) for r in records if r["kind"] == "validation"]
    if not train:
        return None
    series = {"train": tuple(zip(*train))}
    if val:
        series["validation"] = tuple(zip(*val))
    return line_plot(series, os.path.join(run_dir, LOSS_PLOT), title="JPEG-LM training loss", xlabel="step",
                     ylabel="loss (nats/token)")
