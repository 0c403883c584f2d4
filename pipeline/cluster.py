"""Cluster topology: before any work, check that every node of a multi-node Ray cluster sees the job's local paths.

Tasks read the inputs and write OUTPUT from whichever node they run on. On a cluster whose nodes do not share a
filesystem, a local path is a different folder (or none) on each node: without this check, a local OUTPUT fails
after retries with a raw FileNotFoundError, and a local input on such a node turns its images into read errors.

How: the driver writes a probe file with a random token where OUTPUT will be (OUTPUT itself, or its nearest
existing parent folder) and notes a known file of each local input (its size). One tiny task pinned to each alive
node that can run tasks (NodeAffinitySchedulingStrategy, 0 CPUs: it runs even on busy nodes) checks it sees the
same things and writes a reply file next to the probe, which the driver must then see. Inputs are only read.
s3:// paths are skipped; a one-node cluster returns at once. Probe and reply files are removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Iterable

from jpeglm.errors import UserError
from pipeline import storage

PROBE_TIMEOUT_S = 120.0
PROBE_PREFIX = ".jpeglm-probe-"  # starts with ".": ignored by listings of OUTPUT
SHARED_HINT = "use s3:// or a filesystem shared by all nodes"


class ClusterPathError(UserError):
    """A node of the Ray cluster does not see a local input or the output as the driver does."""


def check_paths_visible(inputs: Iterable[str | os.PathLike], output: str | os.PathLike | None = None,
                        timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise ClusterPathError (one line: node, path, what to do) unless every alive node of the connected Ray
    cluster that has CPUs sees every local input (a known file of it, same size) and the local output (reads the
    driver's probe file there and writes one the driver reads back). Call after ray.init, before any work."""
    import ray

    local_inputs = [os.path.abspath(os.fspath(p)) for p in inputs if not storage.is_remote(p)]
    local_output = None
    if output is not None and not storage.is_remote(output):
        local_output = os.path.abspath(os.fspath(output))
    if not local_inputs and local_output is None:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if len(nodes) <= 1:
        return
    checks = [c for c in (_input_check(p) for p in local_inputs) if c is not None]
    probe = None
    if local_output is not None:
        folder = _nearest_folder(local_output)
        if folder is not None:
            token = uuid.uuid4().hex
            probe = os.path.join(folder, PROBE_PREFIX + token)
            with open(probe, "w") as f:
                f.write(token)
            checks.append({"kind": "output", "path": local_output, "probe": probe, "token": token})
    try:
        _run_checks(nodes, checks, timeout_s)
    finally:
        if probe is not None:
            _remove_probes(probe)


def _input_check(path: str) -> dict | None:
    """What a node must see of a local input: a file with its size (the input itself, or the first file in it)."""
    if os.path.isfile(path):
        return {"kind": "input", "path": path, "file": path, "size": os.path.getsize(path)}
    if not os.path.isdir(path):
        return None  # missing: the listing reports it
    first = next(storage.walk_files(path), None)
    if first is None:
        return {"kind": "input", "path": path, "file": path, "size": None}  # an empty folder: must exist
    return {"kind": "input", "path": path, "file": first, "size": os.path.getsize(first)}


def _nearest_folder(path: str) -> str | None:
    """The output folder if it exists, else its nearest existing ancestor (where the job will create it)."""
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return path if os.path.isdir(path) else None  # a file in the way: the job's own checks say so


def _run_checks(nodes: list[dict], checks: list[dict], timeout_s: float) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe_task = ray.remote(num_cpus=0, max_retries=0)(probe_paths)
    refs = {}
    for node in nodes:
        strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
        refs[probe_task.options(scheduling_strategy=strategy).remote(checks, node["NodeID"])] = node
    ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in not_ready:
        ray.cancel(ref, force=True)
    for ref in not_ready:
        raise ClusterPathError(f"{_node_name(refs[ref])} did not answer the check of the job's local paths within "
                               f"{timeout_s:.0f} s; is it overloaded or unreachable?")
    for ref in ready:
        node = refs[ref]
        try:
            problem = ray.get(ref)
        except ray.exceptions.RayError as e:  # the node died after ray.nodes(), or its worker failed
            raise ClusterPathError(f"{_node_name(node)} failed the check of the job's local paths: "
                                   f"{str(e).strip().splitlines()[-1]}") from None
        if problem is None and (output := next((c for c in checks if c["kind"] == "output"), None)):
            if not os.path.exists(_reply_path(output["probe"], node["NodeID"])):
                problem = f"output {output['path']} (the driver does not see the file the node wrote there)"
        if problem is not None:
            raise ClusterPathError(f"{_node_name(node)} does not see the local {problem}: {SHARED_HINT}")


def probe_paths(checks: list[dict], node_id: str) -> str | None:
    """Run on one node: the first problem with the checks, as "input|output PATH (what differs)", or None."""
    for check in checks:
        if check["kind"] == "input":
            if not os.path.exists(check["file"]):
                what = "missing on the node" if check["file"] == check["path"] else \
                    f"no {os.path.relpath(check['file'], check['path'])} in it on the node"
                return f"input {check['path']} ({what})"
            try:
                size = os.path.getsize(check["file"]) if check["size"] is not None else None
            except OSError as e:
                return f"input {check['path']} ({check['file']}: {e.strerror} on the node)"
            if size != check["size"]:
                return f"input {check['path']} ({check['file']}: {size} bytes on the node, {check['size']} on the driver)"
        else:
            try:
                with open(check["probe"]) as f:
                    seen = f.read()
            except OSError:
                seen = None
            if seen != check["token"]:
                return f"output {check['path']} (no probe file from the driver in {os.path.dirname(check['probe'])})"
            try:
                with open(_reply_path(check["probe"], node_id), "w") as f:
                    f.write(node_id)
            except OSError as e:
                return f"output {check['path']} (cannot write in {os.path.dirname(check['probe'])}: {e.strerror})"
    return None


def _reply_path(probe: str, node_id: str) -> str:
    return f"{probe}.{node_id[:16]}"


def _remove_probes(probe: str) -> None:
    folder, name = os.path.split(probe)
    with contextlib.suppress(OSError):
        for entry in os.listdir(folder):
            if entry.startswith(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, entry))


def _node_name(node: dict) -> str:
    return f"Ray node {node.get('NodeManagerAddress', '?')} (id {node['NodeID'][:12]})"
