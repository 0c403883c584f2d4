"""Small helpers for tools that start servers in other processes: a free port, waiting for it to open, the
processes a process started."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from typing import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float, describe: Callable[[], str] = str) -> None:
    """Return once 127.0.0.1:port accepts connections; raise RuntimeError (with describe()) if `proc` exits first
    or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]}... exited with {proc.returncode}:\n{describe()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open within {timeout_s:.0f} s:\n{describe()}")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc; Linux): launchers such as torchrun start workers in sessions of
    their own, so a process group does not reach them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def process_name(pid: int) -> str:
    """The command name of a process ("" once it has gone)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""
