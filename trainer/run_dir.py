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

from trainer.config import ConfigError, RunConfig

ATTEMPTS = "attempts.jsonl"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


def check_output_folder(path: str | os.PathLike, flag: str, local_only: bool = False) -> str:
    """The absolute path of a folder a command will create or write into, or ConfigError (one line, before anything
    heavy is loaded) when it cannot be one: it or a parent is a file, or the nearest existing parent is read-only.
    s3:// URIs pass unchecked unless local_only."""
    from pipeline import storage

    path = os.fspath(path)
    if "://" in path:
        if local_only:
            raise ConfigError(f"{flag} {path}: must be a filesystem path every process can reach, not a URI "
                              "(checkpoints are written there)")
        return path
    problem = storage.folder_problem(path)
    if problem:
        raise ConfigError(f"{flag} {os.path.abspath(path)} {problem}: choose another {flag}")
    return os.path.abspath(path)


def finished_summary(run_dir: str, checkpoint_step: int, max_steps: int) -> dict | None:
    """The saved summary of a run that already finished (its last attempt ended normally at the step of its latest
    checkpoint, at or past max_steps), or None: then a start trains, validates or resumes."""
    try:
        with open(os.path.join(run_dir, SUMMARY)) as f:
            summary = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if summary.get("exit_code") == 0 and summary.get("step") == checkpoint_step >= max_steps:
        return summary
    return None


def write_run_files(run_dir: str, cfg: RunConfig, tokenizer_bytes: bytes) -> None:
    from pipeline import storage
    from trainer.config import to_yaml

    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
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


def plot_losses(run_dir: str, records: list[dict], config_name: str | None = None) -> str | None:
    """RUN/loss.png: the train loss per step (pale) with its moving average, and the validation loss, titled with
    the run dir and the preset; None when no step was logged."""
    from jpeglm.plots import ema, line_plot

    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["loss"]) for r in records if r["kind"] == "validation"]
    if not train:
        return None
    steps, losses = zip(*train)
    series = {"train (per step)": (steps, losses), "train (moving average)": (steps, ema(losses))}
    if val:
        series["validation"] = tuple(zip(*val))
    preset = os.path.splitext(os.path.basename(config_name))[0] if config_name else None
    shown = os.path.relpath(run_dir)  # as the user would type it, when it is below the working directory
    shown = run_dir if shown.startswith("..") else shown
    title = f"training loss: {shown}" + (f" ({preset} preset)" if preset else "")
    return line_plot(series, os.path.join(run_dir, LOSS_PLOT), title=title, xlabel="step", ylabel="loss (nats/token)",
                     faint={"train (per step)"})
