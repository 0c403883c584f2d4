"""Ray schedules, nothing more: start or join Ray, declare tasks, and run them with bounded submission."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Iterable, Iterator

from pipeline.preprocess.config import PreprocessError

log = logging.getLogger(__name__)

TASK_RETRIES = 3  # per task: worker death and exceptions (e.g. an S3 outage that outlived storage.retry)


def init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to (or start) Ray unless this process already did; True if we started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    log.info("Ray: %s CPUs", ray.cluster_resources().get("CPU"))
    return True


def remote(fn: Callable):
    import ray

    # retry_exceptions: a task that failed (e.g. S3 down longer than storage.retry waits) runs again; its
    # output is the same whichever attempt writes it.
    return ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=True)(fn)


def run_bounded(submissions: Iterable[tuple[object, Callable]], max_in_flight: int, total: int, desc: str) -> dict:
    """Run (key, submit) pairs with at most max_in_flight tasks pending, with a progress bar; {key: result}."""
    from tqdm import tqdm

    import ray

    results: dict = {}
    with tqdm(total=total, desc=desc, unit="task", disable=total == 0, file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            for key, result in bounded(submissions, max_in_flight):
                results[key] = result
                bar.update(1)
        except ray.exceptions.RayError as e:
            raise PreprocessError(f"{desc}: a task failed {TASK_RETRIES + 1} times; finished work is kept, so "
                                  f"rerunning the same command resumes. Last error: {e}") from e
    return results


def bounded(submissions: Iterable[tuple[object, Callable]], max_in_flight: int) -> Iterator[tuple[object, object]]:
    """Yield (key, result) as tasks finish, calling `submit()` lazily so that at most max_in_flight tasks are
    pending at any time (backpressure: the driver never queues the whole job). Results are small (counts,
    metadata): data moves through OUTPUT, never through the object store. A task that failed all its retries
    raises here, after the pending ones are cancelled."""
    import ray

    pending: dict = {}
    it = iter(submissions)
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
        try:
            result = ray.get(ready[0])
        except Exception:
            for ref in pending:
                ray.cancel(ref)
            raise
        yield key, result
