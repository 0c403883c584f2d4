"""Ray's own output goes to a log file, not the user's terminal.

What Ray prints on the driver's terminal during a job is for Ray developers: worker output forwarded to the driver
(task tracebacks), the raylet's error messages (a dying node's `[state-dump]`, 30 lines of it), dedup notices,
autoscaler events, and warnings of Ray's Python loggers. A job routes all of it to one file (created on the first
line written, named in our messages) and shows only its own progress bars, one-line warnings and the summary.
`--verbose` (or JPEGLM_VERBOSE=1) leaves Ray's output on the terminal, for debugging.

This uses Ray's internal hooks (ray._private.worker: the worker-output dispatcher, print_to_stdstream); if a Ray
version lacks them, its output stays on the terminal and a debug line says so.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

log = logging.getLogger(__name__)

VERBOSE_ENV = "JPEGLM_VERBOSE"
_HANDLER_NAME = "ray_print_logs"  # the name ray.init gives its own handler of forwarded worker output


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


class RayLog:
    """The job's log file: Ray's output and the tracebacks of failed tasks; created on the first write."""

    def __init__(self, path: str | None = None):
        self.path = path or os.path.join(tempfile.gettempdir(),
                                         f"jpeglm-preprocess-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
        self._file = None
        self._lock = threading.Lock()

    def _open(self):
        if self._file is None:
            self._file = open(self.path, "a", buffering=1)
        return self._file

    def write(self, text: str) -> None:
        with self._lock:
            f = self._open()
            f.write(text if text.endswith("\n") else text + "\n")

    def write_batch(self, data: dict, ignore_prefix: bool = False) -> None:
        """A batch of forwarded lines, formatted as Ray would print them ("(task pid=1, ip=...) line")."""
        from ray._private.worker import print_worker_logs

        if not data.get("lines"):
            return  # nothing to say: no file
        with self._lock:
            print_worker_logs(data, self._open(), ignore_prefix)

    def written(self) -> str | None:
        """The path, if anything was written."""
        return self.path if self._file is not None else None

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None  # a later write reopens (appends)


class _ToRayLog(logging.Handler):
    def __init__(self, sink: RayLog):
        super().__init__()
        self.sink = sink
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.write(self.format(record))


class Routing:
    """Ray's output redirected to a RayLog after ray.init; `restore()` undoes it (after ray.shutdown)."""

    def __init__(self, sink: RayLog):
        self.sink = sink
        self._saved: list = []

    def start(self) -> "Routing":
        try:
            import ray._private.worker as ray_worker

            dispatcher = ray_worker.global_worker_stdstream_dispatcher
            original = ray_worker.print_to_stdstream
        except (ImportError, AttributeError) as e:
            log.debug("Ray's output stays on the terminal (no hook in this Ray: %s)", e)
            return self
        rays = [h for name, h in getattr(dispatcher, "handlers", []) if name == _HANDLER_NAME]
        dispatcher.remove_handler(_HANDLER_NAME)
        dispatcher.add_handler(_HANDLER_NAME, self.sink.write_batch)

        def restore_dispatcher():
            dispatcher.remove_handler(_HANDLER_NAME)
            if ray_worker.global_worker.connected:  # after ray.shutdown, the next ray.init adds its own
                for h in rays:
                    dispatcher.add_handler(_HANDLER_NAME, h)

        self._saved.append(restore_dispatcher)
        # the raylet's error messages (a node's state dump, worker deaths) are printed through this name
        ray_worker.print_to_stdstream = self.sink.write_batch
        self._saved.append(lambda: setattr(ray_worker, "print_to_stdstream", original))
        ray_logger = logging.getLogger("ray")
        handlers = list(ray_logger.handlers)
        ours = _ToRayLog(self.sink)
        for h in handlers:
            ray_logger.removeHandler(h)
        ray_logger.addHandler(ours)

        def restore_logger():
            ray_logger.removeHandler(ours)
            for h in handlers:
                ray_logger.addHandler(h)

        self._saved.append(restore_logger)
        return self

    def restore(self) -> None:
        while self._saved:
            self._saved.pop()()
        self.sink.close()
