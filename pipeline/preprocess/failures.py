"""How a preprocess task fails, decided where it fails, and how the driver says it.

Every task runs inside `guarded`: an exception is classified in the worker, where it happened.
- An environment failure no retry can fix (pipeline/environment.py: no space, read-only, no permission, S3 access
  denied or no bucket, no credentials) ends the task at once: it returns an Outcome holding a TaskFailure, so Ray
  does not retry it, and the driver stops the job with one line (what, which path, what to do).
- A transient error that outlived storage.retry (an S3 outage, a flaky NFS) is retried here, in the same worker,
  after a pause, up to TASK_EXCEPTION_RETRIES times; each retry is counted by its kind.
- Anything else (a bug) is not retried: one line, and its traceback goes to the job's log file.
Ray itself retries only what kills the worker process (a lost node, a killed worker): the next attempt's Outcome
carries Ray's attempt number, and the driver counts those retries as node_lost or worker_died.
"""

from __future__ import annotations

import functools
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.environment import Problem, problem_of
from pipeline.preprocess.config import PreprocessError

TASK_EXCEPTION_RETRIES = 3
TASK_RETRY_PAUSE_S = 5.0  # first pause; doubles: storage.retry already waited ~30 s for this error
MEMORY_KNOBS = "--images-per-unit (encode) or --images-per-bucket (shuffle), or --max-in-flight"


class TaskFailed(PreprocessError):
    """A task hit a failure no retry can fix, or failed every retry: one line, exit code 1 (the environment, not
    the command line, must change); finished work is kept, so the same command resumes."""

    exit_code = 1


@dataclass
class TaskFailure:
    problem: Problem | None
    error: str  # "OSError: [Errno 28] No space left on device: '/out/_work/encoded/000001.bin'"
    traceback: str
    memory: bool = False  # a MemoryError in the task


@dataclass
class Outcome:
    """What a guarded task returns: its value, or its failure; its retries inside the task; Ray's attempt number
    (how many times Ray restarted it after its worker died)."""

    value: object = None
    failure: TaskFailure | None = None
    retries: dict = field(default_factory=dict)
    attempt: int = 0
    memory: int = 0  # what the task declared (set by the driver)


class RayTaskGaveUp(Exception):
    """Raised on the driver for a task whose every attempt Ray lost (its worker or node died)."""

    def __init__(self, key, error: BaseException, memory: int):
        super().__init__(key, error)
        self.key, self.error, self.memory = key, error, memory


def _attempt_number() -> int:
    try:
        import ray

        return int(ray._private.worker.global_worker.core_worker.get_current_task_attempt_number())
    except Exception:  # noqa: BLE001 - not in a Ray task (tests call tasks directly), or another Ray: unknown
        return 0


def guarded(fn):
    """fn as a task body that never raises an Exception (see the module docstring)."""

    @functools.wraps(fn)
    def task(*args, **kwargs):
        retries: Counter = Counter()
        attempt = _attempt_number()
        for i in range(TASK_EXCEPTION_RETRIES + 1):
            try:
                return Outcome(value=fn(*args, **kwargs), retries=dict(retries), attempt=attempt)
            except Exception as e:  # noqa: BLE001 - classified here; the driver reports it
                kind = storage.transient_kind(e, exhausted_too=True)
                if kind is None or i == TASK_EXCEPTION_RETRIES:
                    failure = TaskFailure(problem_of(e), f"{type(e).__name__}: {e}", traceback.format_exc(),
                                          memory=isinstance(e, MemoryError))
                    return Outcome(failure=failure, retries=dict(retries), attempt=attempt)
                retries[kind] += 1
                time.sleep(TASK_RETRY_PAUSE_S * 2**i)
        raise AssertionError("unreachable")

    return task


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def task_failed(desc: str, key, failure: TaskFailure, memory: int, log_path: str | None,
                output: str | None = None) -> TaskFailed:
    """The one line for a task that returned a failure (`output`: OUTPUT, to tell its paths from the inputs')."""
    details = f" (traceback in {log_path})" if log_path else ""
    resume = "finished work is kept, so rerunning the same command resumes"
    if failure.problem is not None:
        path = failure.problem.path
        flag = "--input" if path and output and not path.startswith(output) else "--output"
        return TaskFailed(f"{desc}: {failure.problem.line(flag)}; {resume}")
    if failure.memory:
        return TaskFailed(f"{desc}: task {key} ran out of memory ({failure.error}; it declared {_gib(memory)}): "
                          f"lower {MEMORY_KNOBS}; {resume}{details}")
    return TaskFailed(f"{desc}: task {key} failed: {failure.error} (not retried: not a transient error){details}; "
                      f"{resume}")


def ray_error(desc: str, key, error: BaseException, memory: int, retries: int, log_path: str | None) -> TaskFailed:
    """The one line for a task Ray gave up on: its worker was killed every time (out of memory, node lost)."""
    import ray

    resume = "finished work is kept, so rerunning the same command resumes"
    logs = f" (Ray's output: {log_path})" if log_path else ""
    if isinstance(error, ray.exceptions.OutOfMemoryError):
        return TaskFailed(f"{desc}: task {key} was killed by Ray's memory monitor (the node ran low on memory; the "
                          f"task declared {_gib(memory)}): lower {MEMORY_KNOBS}, or give the nodes more memory; "
                          f"{resume}{logs}")
    if isinstance(error, (ray.exceptions.WorkerCrashedError, ray.exceptions.LocalRayletDiedError)):
        return TaskFailed(f"{desc}: task {key} lost its worker process {retries + 1} times (killed: most often the "
                          f"kernel's OOM killer, see `dmesg`; the task declared {_gib(memory)}): lower "
                          f"{MEMORY_KNOBS}; {resume}{logs}")
    if isinstance(error, ray.exceptions.NodeDiedError):
        return TaskFailed(f"{desc}: task {key} lost its node {retries + 1} times; check the cluster's nodes; "
                          f"{resume}{logs}")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return TaskFailed(f"{desc}: task {key} failed in Ray: {type(error).__name__}: {first}; {resume}{logs}")
