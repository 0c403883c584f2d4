"""The run dir's disk: will the checkpoints fit, and what to say when a save does not.

A ZeRO-3 checkpoint holds, summed over the ranks' partitions, the optimizer's fp32 master copy of every parameter
plus AdamW's two moments (the optimizer-state files): 12 bytes per parameter, whatever the training precision (the
model-state files hold no partitioned weights under ZeRO-3), plus our small files. Measured: 1,765,579 bytes for
141,632 parameters (fp32, 2 ranks; tests/test_train_disk.py). `keep_last` complete checkpoints stay on disk and the one
being written comes on top, before the oldest is pruned: keep_last + 1 of them at the peak.

At start, rank 0 warns in one line when the run dir's filesystem has less free space than the checkpoints still
need. A save that fails (torch.save: `basic_ios::clear: iostream error`, `unexpected pos`, or ENOSPC/EACCES/EROFS)
becomes CheckpointSaveError: one line from the rank that hit it (what, where, bytes needed vs free, the checkpoint
a rerun resumes from), exit code 1; the other ranks stop with "another rank ended".
"""

from __future__ import annotations

import logging
import os
import shutil
import threading

from jpeglm.errors import UserError
from pipeline.environment import NO_SPACE, problem_of

log = logging.getLogger(__name__)

OPTIMIZER_BYTES_PER_PARAM = 12  # fp32 master weights + AdamW exp_avg + exp_avg_sq
OVERHEAD_BYTES = 256 * 2**10  # tokenizer.model, jpeglm.json, model-state files (measured: ~66 KB in all at 2 ranks)


class CheckpointSaveError(UserError):
    """A checkpoint could not be written: the environment must change (space, permissions); exit code 1."""

    exit_code = 1


def checkpoint_bytes(num_params: int) -> int:
    """Estimated size of one checkpoint on disk (all ranks' files together)."""
    return num_params * OPTIMIZER_BYTES_PER_PARAM + OVERHEAD_BYTES


def _existing(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def free_bytes(path: str) -> int:
    return shutil.disk_usage(_existing(path)).free


def folder_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def space_warning(run_dir: str, num_params: int, keep_last: int) -> str | None:
    """One line when the filesystem of run_dir has less free space than keep_last + 1 checkpoints need beyond the
    checkpoints already there (None when they fit)."""
    from trainer.checkpoint import checkpoints_dir

    one = checkpoint_bytes(num_params)
    peak = (keep_last + 1) * one
    present = folder_bytes(checkpoints_dir(run_dir)) if os.path.isdir(checkpoints_dir(run_dir)) else 0
    needed, free = peak - present, free_bytes(run_dir)
    if needed <= free:
        return None
    return (f"the run dir's filesystem has {_mib(free)} free, but checkpoints need about {_mib(needed)} more "
            f"({keep_last + 1} x {_mib(one)}: checkpoint.keep_last={keep_last} plus the one being written): a save "
            f"will fail; free space, lower checkpoint.keep_last, or use another --run-dir")


def save_failed(error: BaseException, folder: str, step: int, needed: int,
                resume_from: str | None) -> CheckpointSaveError | None:
    """CheckpointSaveError for a save that failed because of the environment, else None (a bug: re-raise it).
    torch.save reports a full disk as a RuntimeError without errno; the filesystem's free space tells."""
    problem = problem_of(error)
    free = free_bytes(folder)
    if problem is None and isinstance(error, (RuntimeError, OSError)) and free < needed:
        what, fix = "no space left on the device", "free space, lower checkpoint.keep_last, or use another --run-dir"
    elif problem is not None:
        what, fix = problem.what, problem.fix.format(flag="--run-dir")
        if problem.kind == NO_SPACE:
            fix = "free space, lower checkpoint.keep_last, or use another --run-dir"
    else:
        return None
    resume = (f"a rerun resumes from {resume_from}, the last complete checkpoint" if resume_from
              else "no complete checkpoint yet: a rerun starts over")
    return CheckpointSaveError(f"saving the checkpoint of step {step} failed: {what} ({folder}; about "
                               f"{_mib(needed)} needed, {_mib(free)} free): {fix}; {resume}")


def quiet_thread_failures() -> None:
    """A background thread (tensorboardX's event writer) that dies of an environment failure says so in one line
    instead of a traceback; other thread failures keep Python's default report."""
    default = threading.excepthook

    def hook(args):
        problem = problem_of(args.exc_value) if args.exc_value is not None else None
        if problem is None and not _looks_like_full_disk(args.exc_value):
            return default(args)
        name = args.thread.name if args.thread is not None else "a thread"
        log.warning("%s stopped: %s: %s", name, type(args.exc_value).__name__,
                    str(args.exc_value).strip().splitlines()[0] if str(args.exc_value).strip() else "")

    threading.excepthook = hook


def _looks_like_full_disk(error: BaseException | None) -> bool:
    # torch/tensorboardX raise these without an errno when a write fails on a full filesystem
    return isinstance(error, RuntimeError) and any(s in str(error) for s in ("iostream error", "unexpected pos"))
