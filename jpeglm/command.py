"""How a message names the `jpeglm` command, so that the user can paste what it prints."""

from __future__ import annotations

import os
import shutil
import sys


def jpeglm_command() -> str:
    """How to run jpeglm again from the user's shell, for the commands we print as hints: `jpeglm` when that name on
    PATH is this installation, else the path of this installation's script (e.g. `.venv/bin/jpeglm` after `make
    preprocess`, which does not activate the venv), relative to the current folder when it lies below it."""
    script = os.path.join(os.path.dirname(sys.executable), "jpeglm")
    if os.path.basename(sys.argv[0]) == "jpeglm" and os.path.exists(sys.argv[0]):
        script = sys.argv[0]
    found = shutil.which("jpeglm")
    if not os.path.exists(script) or (found and os.path.realpath(found) == os.path.realpath(script)):
        return "jpeglm"
    rel = os.path.relpath(os.path.abspath(script))
    return rel if not rel.startswith("..") else os.path.abspath(script)
