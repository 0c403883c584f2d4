"""Universal checkpoints: DeepSpeed's ds_to_universal, to resume a checkpoint on another number of processes.

    RUN/checkpoints/global_stepN_universal/          the conversion of global_stepN (renamed into place when whole)
    RUN/checkpoints/global_stepN_universal.lock      held by the one process converting (its mtime is a heartbeat)
    RUN/checkpoints/global_stepN_universal.failed    why the last conversion failed (JSON)

A 7B optimizer state takes longer to convert than any sensible collective timeout, so the conversion never runs
inside a process group: `jpeglm checkpoint convert RUN --world-size N` runs it before the launch (infra/ and the
Makefile do), and otherwise the training processes agree by file before they create the group: rank 0 converts
while the others poll for the folder (or the failure file) under distributed.startup_timeout_s, with no
collective open. Conversions of the same checkpoint exclude each other by the lock, so a launcher's convert and
rank 0 of a job may overlap safely; a lock not refreshed for LOCK_STALE_S is taken over (its holder died).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

from trainer.checkpoint import UNIVERSAL_SUFFIX, CheckpointError

log = logging.getLogger(__name__)

LOCK_STALE_S = 60.0  # a converter refreshes its lock every LOCK_STALE_S / 6
POLL_S = 2.0
CLOCK_SLACK_S = 60.0  # a failure file older than this before we started is from an earlier launch
DELAY_ENV = "JPEGLM_CONVERT_DELAY_S"  # test hook: seconds the converter sleeps first (a slow 7B conversion)


def _paths(root: str, tag: str) -> tuple[str, str, str]:
    final = os.path.join(root, tag + UNIVERSAL_SUFFIX)
    return final, final + ".lock", final + ".failed"


def ensure_universal(root: str, tag: str, convert: bool, wait_s: float, poll_s: float = POLL_S) -> str:
    """The universal tag of checkpoint root/tag, converting it first if `convert` (one process: rank 0 or the
    `jpeglm checkpoint convert` command) or waiting up to wait_s for the process that does. Raises CheckpointError
    if the conversion failed, stopped, or did not finish in time."""
    final, lock, failed = _paths(root, tag)
    out = tag + UNIVERSAL_SUFFIX
    started = time.time()
    deadline = time.monotonic() + wait_s
    lock_seen = announced = False
    while True:
        if os.path.isdir(final):
            return out
        failure = _read_failure(failed, newer_than=started - CLOCK_SLACK_S)
        if failure:
            raise CheckpointError(f"converting {os.path.join(root, tag)} to a universal checkpoint failed "
                                  f"({failure.get('by', '?')}): {failure['error']}")
        if convert and _take_lock(lock):
            try:
                return _convert(root, tag)
            except Exception as e:  # noqa: BLE001 - recorded for the waiting processes, then re-raised
                _write_failure(failed, f"{type(e).__name__}: {e}")
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"converting {os.path.join(root, tag)} failed: {type(e).__name__}: {e}") from e
            finally:
                _unlink(lock)
        age = _age(lock)
        if age is not None:
            lock_seen = True
            if age > LOCK_STALE_S and not convert:
                raise CheckpointError(f"the conversion of {os.path.join(root, tag)} stopped ({lock} not refreshed for "
                                      f"{age:.0f} s: its process died); run `jpeglm checkpoint convert "
                                      f"{os.path.join(root, tag)}`, then launch again")
        elif lock_seen and not os.path.isdir(final) and not convert:
            time.sleep(poll_s)  # the lock goes just before the failure file or after the rename: look once more
            if not os.path.isdir(final) and not _read_failure(failed, newer_than=started - CLOCK_SLACK_S):
                raise CheckpointError(f"the conversion of {os.path.join(root, tag)} ended without a result; run "
                                      f"`jpeglm checkpoint convert {os.path.join(root, tag)}` to see why")
            continue
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"waited {wait_s:.0f} s for {final} (the conversion to resume on another number of processes) and it "
                f"is not there; run `jpeglm checkpoint convert {os.path.join(root, tag)}` before launching, or raise "
                "distributed.startup_timeout_s")
        if not announced:
            log.info("waiting for %s to be converted to a universal checkpoint (by %s)", tag,
                     "another process" if convert else "rank 0")
            announced = True
        time.sleep(poll_s)


def _convert(root: str, tag: str) -> str:
    """Run ds_to_universal into a private temporary folder and rename it into place (we hold the lock)."""
    final, lock, failed = _paths(root, tag)
    _unlink(failed)
    for stale in glob.glob(glob.escape(final) + ".tmp-*"):  # left by converters that died (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{final}.tmp-{socket.gethostname()}-{os.getpid()}"
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", os.path.join(root, tag),
           "--output_folder", tmp, "--num_extract_workers", "2", "--num_merge_workers", "1"]
    log.info("converting %s to a universal checkpoint for another number of processes", os.path.join(root, tag))
    t0 = time.perf_counter()
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True)
    beat.start()
    try:
        time.sleep(float(os.environ.get(DELAY_ENV, 0) or 0))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"ds_to_universal failed on {tag} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # else another converter (a taken-over lock) finished first: same result
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        stop.set()
        beat.join()
        shutil.rmtree(tmp, ignore_errors=True)
    # ds_to_universal points a `latest_universal` file at the temporary name; we always pass tags explicitly.
    _unlink(os.path.join(root, "latest_universal"))
    log.info("converted %s in %.1f s", tag, time.perf_counter() - t0)
    return tag + UNIVERSAL_SUFFIX


def _take_lock(lock: str) -> bool:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            age = _age(lock)
            if age is not None and age > LOCK_STALE_S:
                log.warning("taking over %s (not refreshed for %.0f s: its process died)", lock, age)
                _unlink(lock)
                continue
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)
        return True
    return False


def _heartbeat(lock: str, stop: threading.Event) -> None:
    while not stop.wait(LOCK_STALE_S / 6):
        try:
            os.utime(lock)
        except FileNotFoundError:
            return


def _age(path: str) -> float | None:
    try:
        return time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_failure(path: str, error: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"error": error, "by": f"{socket.gethostname()} pid {os.getpid()}", "time": time.time()}, f)
    os.replace(tmp, path)


def _read_failure(path: str, newer_than: float) -> dict | None:
    try:
        if os.stat(path).st_mtime < newer_than:
            return None  # left by an earlier launch
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ---- `jpeglm checkpoint convert` ----------------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser(
        "convert", help="convert a checkpoint to DeepSpeed's universal format to resume it on another number of "
                        "processes (launchers run this before the job; conversion inside the job is the fallback)",
        description="Convert RUN's latest checkpoint (or the one named) to global_stepN_universal/, once. With "
                    "--world-size, only if it was saved on another number of processes (nothing to do otherwise, "
                    "and none for a run without checkpoints).")
    p.add_argument("run", metavar="RUN", help="training run dir (its latest checkpoint), its checkpoints/ folder, "
                                              "or a checkpoints/global_stepN folder")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="the number of processes the next launch will have (nodes x GPUs per node)")
    p.add_argument("--wait", type=float, default=7200.0, metavar="SECONDS",
                   help="how long to wait for another process already converting it (default 7200)")


def run(args: argparse.Namespace) -> int:
    from jpeglm.logs import setup_logging
    from trainer import checkpoint as ckpt

    from trainer.run_dir import check_output_folder

    setup_logging()
    check_output_folder(args.run, "RUN")  # the conversion is written beside the checkpoint
    if args.world_size is not None and args.world_size < 1:
        raise CheckpointError(f"--world-size must be >= 1, got {args.world_size}")
    if args.world_size is not None and ckpt.step_of(os.path.basename(args.run.rstrip("/"))) is None and not any(
            ckpt.latest_tag(d) for d in (ckpt.checkpoints_dir(args.run), args.run)):
        print(f"{args.run}: no checkpoint yet, nothing to convert")  # a launcher's first start
        return 0
    root, tag = ckpt.resolve(args.run)
    saved_on = ckpt.read_state(root, tag).get("world_size")
    where = os.path.join(root, tag)
    if args.world_size is not None and saved_on == args.world_size:
        print(f"{where} was saved on {saved_on} processes: no conversion needed for {args.world_size}")
        return 0
    t0 = time.perf_counter()
    out = ensure_universal(root, tag, convert=True, wait_s=args.wait)
    print(f"{where} (saved on {saved_on} processes) -> {os.path.join(root, out)} in {time.perf_counter() - t0:.1f} s; "
          "`jpeglm train ... --resume auto` on another number of processes loads it")
    return 0
