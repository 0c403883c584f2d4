"""Universal checkpoints: DeepSpeed's ds_to_universal, to resume a checkpoint on another number of processes.

    RUN/checkpoints/global_stepN_universal/   the conversion of global_stepN (made once, renamed into place)
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

from trainer.checkpoint import UNIVERSAL_SUFFIX, CheckpointError

log = logging.getLogger(__name__)


def universal_tag(root: str, tag: str) -> str:
    """Convert a checkpoint to DeepSpeed's universal format (once; atomic rename) for loading on another world
    size. Run on rank 0 only, then barrier."""
    out = tag + UNIVERSAL_SUFFIX
    final = os.path.join(root, out)
    if os.path.isdir(final):
        return out
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", os.path.join(root, tag),
           "--output_folder", tmp, "--num_extract_workers", "2", "--num_merge_workers", "1"]
    log.info("converting %s to a universal checkpoint for another world size: %s", tag, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"ds_to_universal failed on {tag} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    os.replace(tmp, final)
    # ds_to_universal points a `latest_universal` file at the temporary name; we always pass tags explicitly.
    stale = os.path.join(root, "latest_universal")
    if os.path.exists(stale):
        os.unlink(stale)
    return out
