"""One log format for every jpeglm command: `HH:MM:SS LEVEL name: message` (stderr), ours at INFO, libraries at
WARNING. Progress bars (tqdm) and printed summaries go beside it; nothing else should call logging.basicConfig."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
OUR_LOGGERS = ("jpeglm", "pipeline", "trainer", "bench")


_handler: logging.Handler | None = None  # the root handler setup_logging installed


def setup_logging(level: int = logging.INFO, prefix: str | None = None) -> None:
    """Install the root handler once (unless the root logger has handlers already, e.g. pytest's) and set the
    levels. `prefix` goes before each message, e.g. "[rank 1] " in a distributed run; a later call with a prefix
    replaces it (None keeps the one set before)."""
    global _handler
    root = logging.getLogger()
    if _handler is None and not root.handlers:
        _handler = logging.StreamHandler(sys.stderr)
        _handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        root.addHandler(_handler)
    if _handler is not None and prefix is not None:
        _handler.setFormatter(logging.Formatter(FORMAT.replace("%(message)s", prefix + "%(message)s"), DATEFMT))
    root.setLevel(logging.WARNING)  # libraries: warnings and errors only
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)
