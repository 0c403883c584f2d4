"""A test hook, off unless set: make the first attempt of one task die or hang, to prove retries and resume."""

from __future__ import annotations

import os
import time

from pipeline import storage
from pipeline.preprocess.layout import Layout

# Off unless set: "PHASE:INDEX:ACTION[,...]" makes the first attempt of that task exit the worker process
# (ACTION "exit"), hang (ACTION "hang") or pause SLOW_S seconds and go on (ACTION "slow": long enough to kill its
# node), to prove retries and resume. PHASE:INDEX is bpe:N, encode:N (unit N), near:N (near-duplicate band task N),
# groups:0 (the components task), place:N (near-duplicate place task N), bucket:N (shuffle bucket N) or shard:NAME
# (e.g. shard:train-000001, which dies halfway through writing that tar).
FAULT_ENV = "JPEGLM_PREPROCESS_FAULT"
SLOW_S = 20.0


def maybe_fault(layout: Layout, phase: str, index: int | str) -> None:
    """The FAULT_ENV test hook (see its comment); a no-op unless that variable names this very task."""
    specs = [s for s in os.environ.get(FAULT_ENV, "").split(",") if s.startswith(f"{phase}:{index}:")]
    if not specs:
        return
    marker = layout.fault_marker(phase, index)
    if storage.exists(marker):
        return  # the retry (or the rerun) proceeds normally
    storage.write_bytes(marker, b"")
    if specs[0].endswith(":slow"):
        time.sleep(SLOW_S)
        return
    if specs[0].endswith(":hang"):
        time.sleep(3600)
    os._exit(17)

