"""Ray schedules, nothing more: start or join Ray, declare tasks with the resources they need, and run them with
bounded submission. The tasks themselves are plain functions over OUTPUT (encode.py, shuffle.py, write.py, ...)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Callable, Iterable, Iterator

from pipeline.preprocess.config import PreprocessError

log = logging.getLogger(__name__)

TASK_RETRIES = 3  # per task: worker death and exceptions (e.g. an S3 outage that outlived storage.retry)
WORKER_MEMORY = 512 * 2**20  # a worker process with the codec, SentencePiece, pyarrow and s3fs loaded
# Ray's own lines that would reach the user on every run: the notice that a local Ray enables token authentication
# (Ray 2.60) and "Started a local Ray instance". Warnings and errors about the job itself still show.
QUIET_RAY_LOGGERS = ("ray._private.authentication.authentication_token_setup",)


def init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to (or start) Ray unless this process already did; True if we started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name in QUIET_RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    from pipeline.stats import plural

    resources = ray.cluster_resources()
    log.info("Ray: %s, %.1f GiB of memory for tasks", plural(int(resources.get("CPU", 0)), "CPU"),
             resources.get("memory", 0) / 2**30)
    return True


def largest_node_memory() -> int:
    """The most memory one task can ask for: the largest alive node's Ray `memory` resource."""
    import ray

    return int(max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0))


def remote(fn: Callable, data_bytes: int = 0):
    """fn as a Ray task on one CPU that declares the memory it needs (the worker's own plus data_bytes, the data
    it holds), so Ray never packs more tasks on a node than its memory holds. Capped at the largest node: a larger
    request could never be scheduled (the task then runs alone on that node)."""
    import ray

    memory = WORKER_MEMORY + int(data_bytes)
    cap = largest_node_memory()
    if cap and memory > cap:
        log.warning("%s asks for %.1f GiB but the largest node has %.1f GiB for tasks: asking for that instead",
                    fn.__name__, memory / 2**30, cap / 2**30)
        memory = cap
    # retry_exceptions: a task that failed (e.g. S3 down longer than storage.retry waits) runs again; its
    # output is the same whichever attempt writes it.
    return ray.remote(num_cpus=1, memory=memory, max_retries=TASK_RETRIES, retry_exceptions=True)(fn)


def run_bounded(submissions: Iterable[tuple[object, Callable]], max_in_flight: int, total: int,
                desc: str) -> Iterator[tuple[object, object]]:
    """(key, result) of (key, submit) pairs as they finish, at most max_in_flight pending, with a progress bar."""
    from tqdm import tqdm

    import ray

    with tqdm(total=total, desc=desc, unit="task", disable=total == 0, file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            for key, result in bounded(submissions, max_in_flight):
                bar.update(1)
                yield key, result
        except ray.exceptions.RayError as e:
            raise PreprocessError(f"{desc}: a task failed {TASK_RETRIES + 1} times; finished work is kept, so "
                                  f"rerunning the same command resumes. Last error: {e}") from e


def bounded(submissions: Iterable[tuple[object, Callable]], max_in_flight: int) -> Iterator[tuple[object, object]]:
    """Yield (key, result) as tasks finish, calling `submit()` lazily so that at most max_in_flight tasks are
    pending at any time (backpressure: the driver never queues the whole job). Results are small (counts,
    metadata): data moves through OUTPUT, never through the object store. A task that failed all its retries
    raises here, and so does Ctrl-C, after the pending tasks are cancelled."""
    import ray

    pending: dict = {}
    it = iter(submissions)
    try:
        while True:
            while len(pending) < max_in_flight:
                nxt = next(it, None)
                if nxt is None:
                    break
                key, submit = nxt
                pending[submit()] = key
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(ready[0])
            result = ray.get(ready[0])
            yield key, result
    except BaseException:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        raise
