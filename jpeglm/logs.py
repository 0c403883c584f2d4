"""One log format for every jpeglm command: `HH:MM:SS LEVEL name: message` (stderr), ours at INFO, libraries at
WARNING. Progress bars (tqdm) and printed summaries go beside it; nothing else should call logging.basicConfig."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
OUR_LOGGERS = ("jpeglm", "pipeline", "trainer", "bench")


def setup_logging(level: int = logging.INFO, prefix: str = "") -> None:
    """Configure the root handler once (later calls only adjust levels). `prefix` goes before each message, e.g.
    "[rank 1] " in a distributed run."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT.replace("%(message)s", prefix + "%(message)s"), DATEFMT))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)  # libraries: warnings and errors only
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)
