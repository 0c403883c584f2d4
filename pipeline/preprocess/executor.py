"""Ray schedules, nothing more: start or join Ray, declare tasks with the resources they need, and run them with
bounded submission. The tasks themselves are plain functions over OUTPUT (encode.py, shuffle.py, write.py, ...).

Failures (failures.py): a task body never raises; Ray retries only a task whose worker died (TASK_RETRIES), and
the driver counts those retries (node_lost / worker_died, beside the in-task retries by kind) and says each lost
node in one line. Ray's own output goes to a log file (ray_output.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections import Counter
from typing import Callable, Iterable, Iterator

from pipeline.preprocess import failures
from pipeline.preprocess.ray_output import RayLog, Routing, verbose_from_env

log = logging.getLogger(__name__)

TASK_RETRIES = 3  # per task, by Ray: its worker process died (node lost, killed); exceptions: failures.guarded
NODE_POLL_S = 5.0  # how often the driver looks for lost nodes while tasks run
WORKER_MEMORY = 512 * 2**20  # a worker process with the codec, SentencePiece, pyarrow and s3fs loaded
# Ray's own lines that would reach the user on every run: the notice that a local Ray enables token authentication
# (Ray 2.60) and "Started a local Ray instance". Warnings and errors about the job itself still show.
QUIET_RAY_LOGGERS = ("ray._private.authentication.authentication_token_setup",)


class _Session:
    """This driver's Ray output routing, log file and task retry counts (one job at a time per process)."""

    log = RayLog()
    routing: Routing | None = None
    task_retries: Counter = Counter()
    output: str | None = None  # OUTPUT, so that a failure names the flag to change (--output or --input)


def log_path() -> str | None:
    """The job's log file (Ray's output, tracebacks of failed tasks) if anything was written to it."""
    return _Session.log.written()


def take_task_retries() -> dict[str, int]:
    """Task retries by cause since the last call: in-task retries by kind (throttled, server_error, ...) and Ray's
    restarts (node_lost, worker_died)."""
    counts = dict(sorted(_Session.task_retries.items()))
    _Session.task_retries.clear()
    return counts


def report_task_retries() -> dict[str, int]:
    """take_task_retries(), said in one line when there were any (each was said when it happened)."""
    from pipeline.stats import plural

    counts = take_task_retries()
    if counts:
        log.warning("tasks: %s (%s); see task_retries in the summary", plural(sum(counts.values()), "retry", "retries"),
                    ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def init_ray(address: str | None, num_cpus: int | None, verbose: bool = False, output: str | None = None) -> bool:
    """Connect to (or start) Ray unless this process already did; True if we started it (and must shut it down,
    with shutdown_ray). Unless verbose, Ray's own output goes to the log file from here on."""
    import ray

    take_task_retries()
    _Session.output = output
    if ray.is_initialized():
        return False
    _Session.log = RayLog()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name in QUIET_RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    from pipeline.stats import plural

    if not (verbose or verbose_from_env()):
        _Session.routing = Routing(_Session.log).start()
    resources = ray.cluster_resources()
    log.info("Ray: %s, %.1f GiB of memory for tasks", plural(int(resources.get("CPU", 0)), "CPU"),
             resources.get("memory", 0) / 2**30)
    return True


def shutdown_ray() -> None:
    import ray

    ray.shutdown()
    if _Session.routing is not None:
        _Session.routing.restore()
        _Session.routing = None


def largest_node_memory() -> int:
    """The most memory one task can ask for: the largest alive node's Ray `memory` resource."""
    import ray

    return int(max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0))


class Task:
    """A Ray task: `.remote(*args)` submits it (an ObjectRef of a failures.Outcome); `.memory` it declared."""

    def __init__(self, remote_function, memory: int):
        self.remote_function, self.memory = remote_function, memory

    def remote(self, *args, **kwargs):
        ref = self.remote_function.remote(*args, **kwargs)
        _DECLARED[ref] = self
        return ref


_DECLARED: dict = {}  # ObjectRef -> Task until bounded() takes its result, for the messages of failed tasks


def remote(fn: Callable, data_bytes: int = 0) -> Task:
    """fn as a Ray task on one CPU that declares the memory it needs (the worker's own plus data_bytes, the data
    it holds), so Ray never packs more tasks on a node than its memory holds. Capped at the largest node: a larger
    request could never be scheduled (the task then runs alone on that node). The body runs in failures.guarded."""
    import ray

    memory = WORKER_MEMORY + int(data_bytes)
    cap = largest_node_memory()
    if cap and memory > cap:
        log.warning("%s asks for %.1f GiB but the largest node has %.1f GiB for tasks: asking for that instead",
                    fn.__name__, memory / 2**30, cap / 2**30)
        memory = cap
    # Ray retries a task whose worker died (its output is the same whichever attempt writes it); exceptions are
    # classified and retried (or not) inside the task by failures.guarded.
    return Task(ray.remote(num_cpus=1, memory=memory, max_retries=TASK_RETRIES, retry_exceptions=False)(
        failures.guarded(fn)), memory)


def run_bounded(submissions: Iterable[tuple[object, Callable]], max_in_flight: int, total: int,
                desc: str) -> Iterator[tuple[object, object]]:
    """(key, result) of (key, submit) pairs as they finish, at most max_in_flight pending, with a progress bar.
    A failed task stops the job with one line (failures.TaskFailed); lost nodes are said at the end, one line each."""
    from tqdm import tqdm

    import ray

    nodes = _NodeWatch()
    try:
        with tqdm(total=total, desc=desc, unit="task", disable=total == 0, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for key, outcome in bounded(submissions, max_in_flight, on_idle=nodes.poll):
                bar.update(1)
                yield key, _value(desc, key, outcome, nodes)
    except failures.RayTaskGaveUp as e:
        _Session.log.write(f"{desc}: task {e.key}: Ray gave up: {e.error}")
        raise failures.ray_error(desc, e.key, e.error, e.memory, TASK_RETRIES, log_path()) from None
    finally:
        nodes.report(desc)  # below the progress bar


def _value(desc: str, key, outcome, nodes: "_NodeWatch"):
    if not isinstance(outcome, failures.Outcome):
        return outcome  # a task made by plain ray.remote
    _Session.task_retries.update(outcome.retries)
    if outcome.retries:
        log.warning("%s: task %s met transient errors and ran again in its worker (%s)", desc, key,
                    ", ".join(f"{k} {v}" for k, v in outcome.retries.items()))
    if outcome.attempt:
        nodes.poll(force=True)
        cause = nodes.cause()
        _Session.task_retries[cause] += outcome.attempt
        if cause == "worker_died":
            log.warning("%s: task %s lost its worker process; Ray ran it again (%d of %d retries)", desc, key,
                        outcome.attempt, TASK_RETRIES)
    if outcome.failure is not None:
        failure = outcome.failure
        _Session.log.write(f"{desc}: task {key} failed:\n{failure.traceback}")
        raise failures.task_failed(desc, key, failure, outcome.memory, log_path(), _Session.output)
    return outcome.value


class _NodeWatch:
    """The nodes that died while a phase ran, found by polling ray.nodes() (cheap: one GCS request)."""

    def __init__(self):
        self.alive: dict[str, str] = {}  # node id -> address
        self.lost: dict[str, list] = {}  # node id -> [address, tasks retried since]
        self.last = 0.0
        self.poll(force=True)

    def poll(self, force: bool = False) -> None:
        import ray

        if not force and time.monotonic() - self.last < NODE_POLL_S:
            return
        self.last = time.monotonic()
        try:
            nodes = ray.nodes()
        except Exception:  # noqa: BLE001 - a GCS hiccup: look again next time
            return
        for n in nodes:
            node_id, address = n.get("NodeID", ""), n.get("NodeManagerAddress", "?")
            if n.get("Alive"):
                self.alive[node_id] = address
            elif node_id in self.alive and node_id not in self.lost:
                self.lost[node_id] = [self.alive.pop(node_id), 0]

    def cause(self) -> str:
        """Why a task was restarted: its node was lost (if one was, while this phase ran), else its worker died."""
        if not self.lost:
            return "worker_died"
        self.lost[list(self.lost)[-1]][1] += 1
        return "node_lost"

    def report(self, desc: str) -> None:
        from pipeline.stats import plural

        for node_id, (address, retried) in self.lost.items():
            log.warning("lost node %s (%s) during %s: %s retried elsewhere", address, node_id[:8], desc,
                        plural(retried, "task"))
        self.lost.clear()


def bounded(submissions: Iterable[tuple[object, Callable]], max_in_flight: int,
            on_idle: Callable[[], None] | None = None) -> Iterator[tuple[object, object]]:
    """Yield (key, result) as tasks finish, calling `submit()` lazily so that at most max_in_flight tasks are
    pending at any time (backpressure: the driver never queues the whole job). Results are small (counts,
    metadata): data moves through OUTPUT, never through the object store. A task Ray gave up on raises
    failures.RayTaskGaveUp here, and so does Ctrl-C, after the pending tasks are cancelled. on_idle() is called
    at least every NODE_POLL_S while tasks run."""
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
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=NODE_POLL_S)
            if on_idle is not None:
                on_idle()
            if not ready:
                continue
            key = pending.pop(ready[0])
            task = _DECLARED.pop(ready[0], None)
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                raise failures.RayTaskGaveUp(key, e, task.memory if task else 0) from None
            if isinstance(result, failures.Outcome) and task is not None:
                result.memory = task.memory
            yield key, result
    except BaseException:
        for ref in pending:
            _DECLARED.pop(ref, None)
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        raise
