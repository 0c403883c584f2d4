"""Where and how a command runs torch: the device, the dtype and the CPU threads (train, sample, eval, export).

    device = resolve_device("auto")                  # cuda when available, else cpu; "cuda" without CUDA is refused
    dtype = resolve_dtype(None, device)              # bf16 on cuda, fp32 on cpu; or DTYPES["fp16"] ...
    threads = set_threads(None)                      # the usable cores minus those other processes keep busy now
"""

from __future__ import annotations

import os
import time

import torch

from jpeglm.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(UserError, ValueError):
    """A device that this machine does not have; the message says what to use instead."""


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """`auto` (cuda when available, else cpu), cpu, cuda or cuda:N. option: how the user chose it (a flag or a
    config key), named in the refusal."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"{option}={name}: not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{option}={name} but no CUDA device is available on this machine "
                          f"(torch.cuda.is_available() is False): use {option}=cpu")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """DTYPES[name]; None: bf16 on cuda, fp32 on cpu."""
    if name:
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ---------------------------------------------------------------------------------------------- threads


def usable_cores() -> list[int]:
    """The CPUs this process may run on (its affinity: a GPU node's launcher often pins a rank to a few cores)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_threads() -> int:
    """torch CPU threads when --threads is not given: the cores this process may run on minus the cores other
    processes keep busy right now (busy_cores()), at least 1. OpenMP threads wait for each other at the end of every
    operation, so a thread that shares its core with a busy process stalls all of them: with one other busy process
    on 2 cores, 2 threads decoded 3.5x slower than 1 (bench/results/sample-threads.json)."""
    cores = usable_cores()
    return max(1, min(len(cores), round(len(cores) - busy_cores(cores))))


def busy_cores(cores: list[int], interval: float = 0.25) -> float:
    """How many of `cores` other processes use now: their non-idle CPU time over `interval` seconds (Linux
    /proc/stat, the per-CPU lines of those cores only: on a pinned node the rest of the machine does not matter; we
    are idle meanwhile); elsewhere the 1-minute load average, capped at len(cores)."""
    wanted = {f"cpu{c}" for c in cores}

    def sample() -> tuple[int, int]:
        total = idle = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *values = line.split()
                if name in wanted:
                    fields = [int(v) for v in values]
                    total, idle = total + sum(fields), idle + fields[3] + fields[4]  # idle + iowait
        if total == 0:
            raise ValueError("no per-CPU lines for these cores")
        return total, idle

    try:
        t0, idle0 = sample()
        time.sleep(interval)
        t1, idle1 = sample()
        return (1 - (idle1 - idle0) / max(1, t1 - t0)) * len(cores)
    except (OSError, ValueError, IndexError):
        try:
            return min(float(len(cores)), os.getloadavg()[0])
        except OSError:
            return 0.0


def set_threads(threads: int | None) -> int:
    """Apply --threads (None: default_threads()) to torch; returns the number used."""
    n = threads or default_threads()
    torch.set_num_threads(n)
    return n
