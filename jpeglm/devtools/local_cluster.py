"""A real two-node Ray cluster on one machine, for tests and benchmarks of multi-node behaviour.

    with two_node_cluster(hidden=["/tmp/x/local-only"]) as cluster:
        ray.init(address=cluster.address)   # or RAY_ADDRESS=cluster.address jpeglm preprocess ...

Both nodes run on 127.0.0.1 (`ray start --head`, then `ray start --address`), each with `cpus_per_node` CPUs. The
worker node's daemons run in their own mount namespace with an empty tmpfs mounted over each `hidden` folder, so
its tasks see those folders empty: exactly a worker node without the shared filesystem (needs root and `unshare`,
see `can_hide_paths`). Each node has a private --temp-dir, so the cluster never becomes the one a plain
`ray.init()` elsewhere on the machine would find (Ray records its latest cluster in /tmp/ray). Ports are free ones.

Both `ray start` processes run with --block and are stopped by their own process ids (SIGTERM, then SIGKILL):
their node then stops the raylet, workers and other daemons it started. `ray stop` is never used (it would stop
every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from jpeglm.devtools.processes import free_port, process_name, process_tree, wait_for_port

START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 30


@dataclass
class LocalCluster:
    address: str  # "127.0.0.1:PORT", for ray.init(address=...) or RAY_ADDRESS
    hidden: list[str]  # folders the worker node cannot see
    temp_dir: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def worker_raylet(self) -> int | None:
        """The process id of the worker node's raylet (kill -9 it to lose that node), None if it is gone."""
        return next((p for p in process_tree(self.processes[1].pid) if process_name(p) == "raylet"), None)

    def env(self) -> dict[str, str]:
        """Environment for a driver subprocess (e.g. `jpeglm preprocess`) that should use this cluster."""
        return {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled"}


def can_hide_paths() -> str | None:
    """None if the worker node can be given its own mount namespace here, else why not."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    if os.geteuid() != 0:
        return "mounting a tmpfs in a new mount namespace needs root"
    return None


def _ray_cli() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "ray")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "ray.scripts.scripts"]


def _node_ports() -> list[str]:
    # Fixed defaults (dashboard agent 52365, ...) would collide between the two nodes and with other Rays.
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def _log_tail(path: str) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read()[-3000:].decode(errors="replace")
    return ""


def _wait_for_nodes(address: str, count: int, processes: list[subprocess.Popen], worker_log: str) -> None:
    """Poll from a subprocess (this process may be connected to another Ray, or want to connect later)."""
    script = ("import ray, sys, time\n"
              f"ray.init(address={address!r}, log_to_driver=False)\n"
              f"deadline = time.monotonic() + {START_TIMEOUT_S}\n"
              f"while sum(n['Alive'] for n in ray.nodes()) < {count} and time.monotonic() < deadline:\n"
              "    time.sleep(0.5)\n"
              f"sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) >= {count} else 1)\n")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=START_TIMEOUT_S + 30)
    if result.returncode != 0 or any(p.poll() is not None for p in processes):
        raise RuntimeError(f"the cluster did not reach {count} alive nodes: {result.stderr[-2000:]}\n"
                           f"{_log_tail(worker_log)}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)


@contextlib.contextmanager
def two_node_cluster(hidden: Sequence[str | os.PathLike] = (), cpus_per_node: int = 1,
                     env: dict[str, str] | None = None) -> Iterator[LocalCluster]:
    """Start the cluster (~10-20 s), yield it, stop it. `env` adds variables for both nodes' processes and so
    their tasks (the caller's environment is inherited: PYTHONPATH, AWS_*). `hidden` folders must exist."""
    hidden = [os.path.abspath(os.fspath(h)) for h in hidden]
    if hidden and (why := can_hide_paths()):
        raise RuntimeError(f"cannot hide folders from the worker node: {why}")
    for h in hidden:
        if not os.path.isdir(h):
            raise FileNotFoundError(f"{h}: the folder to hide must exist")
    temp_dir = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")  # short: Ray's Unix socket paths must fit 107 bytes
    node_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    node_env.pop("RAY_ADDRESS", None)
    port = free_port()
    address = f"127.0.0.1:{port}"
    cluster = LocalCluster(address, hidden, temp_dir)
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}", "--num-gpus=0", "--block",
              "--disable-usage-stats"]
    try:
        head_log = os.path.join(temp_dir, "head.log")
        head = _ray_cli() + ["start", "--head", f"--port={port}", "--include-dashboard=false",
                             f"--temp-dir={temp_dir}/head",
                             *common, *_node_ports()]
        with open(head_log, "wb") as log:
            cluster.processes.append(subprocess.Popen(head, env=node_env, stdout=log, stderr=subprocess.STDOUT,
                                                      stdin=subprocess.DEVNULL))
        wait_for_port(port, cluster.processes[0], START_TIMEOUT_S, lambda: _log_tail(head_log))
        worker = _ray_cli() + ["start", f"--address={address}", f"--temp-dir={temp_dir}/worker", *common,
                               *_node_ports()]
        if hidden:
            mounts = " && ".join(f"mount -t tmpfs none {shlex.quote(h)}" for h in hidden)
            worker = ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mounts} && exec {shlex.join(worker)}"]
        worker_log = os.path.join(temp_dir, "worker.log")
        with open(worker_log, "wb") as log:
            cluster.processes.append(subprocess.Popen(worker, env=node_env, stdout=log, stderr=subprocess.STDOUT,
                                                      stdin=subprocess.DEVNULL))
        _wait_for_nodes(address, 2, cluster.processes, worker_log)
        yield cluster
    finally:
        for proc in reversed(cluster.processes):  # the worker node first
            _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
