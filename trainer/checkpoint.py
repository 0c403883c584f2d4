"""Checkpoints of a run: RUN/checkpoints/global_stepN/ (DeepSpeed ZeRO shards + our state), `latest`, keep-K.

    RUN/checkpoints/
      global_step200/             engine.save_checkpoint: every rank's ZeRO-3 parameter and optimizer shards,
                                  model-state files with our client_state (loader state, RNG states, step)
      global_step200/jpeglm.json  written by rank 0 after every rank finished saving: marks the checkpoint complete
                                  and holds what resuming and export need (config, data fingerprints, world size)
      global_step200/tokenizer.model  the run's tokenizer, so a checkpoint folder exports on its own
      global_step200_universal/   ds_to_universal conversion, made to resume on another world size (convert.py)
      latest                      the tag of the newest complete checkpoint (same format as DeepSpeed's own)

Atomicity: a checkpoint counts only once jpeglm.json exists, and it is written (atomically, temp + rename) after
a barrier that follows the save on every rank; `latest` is then replaced atomically. A crash mid-save leaves an
incomplete folder that is never resumed from and is deleted by the next save. Checkpoints live on a filesystem
every rank can reach (local disk for one node; a shared filesystem such as NFS/FSx/Lustre for several).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

from jpeglm.errors import UserError
from pipeline import storage

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "jpeglm.json"
TOKENIZER_FILE = "tokenizer.model"
UNIVERSAL_SUFFIX = "_universal"  # global_stepN_universal/: trainer/convert.py
CHECKPOINT_FORMAT = "jpeglm-train-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used as asked; the message says why."""


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def is_complete(root: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(root, tag, STATE_FILE))


def complete_tags(root: str) -> list[str]:
    """Complete checkpoint tags under a checkpoints folder, oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if step_of(t) is not None and is_complete(root, t)]
    return sorted(tags, key=step_of)


def latest_tag(root: str) -> str | None:
    """The tag `latest` names if that checkpoint is complete, else the newest complete one (or None)."""
    path = os.path.join(root, LATEST)
    if os.path.isfile(path):
        with open(path) as f:
            tag = f.read().strip()
        if is_complete(root, tag):
            return tag
        log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one", path, tag)
    tags = complete_tags(root)
    return tags[-1] if tags else None


def read_state(root: str, tag: str) -> dict:
    with open(os.path.join(root, tag, STATE_FILE)) as f:
        return json.load(f)


def resolve(path: str) -> tuple[str, str]:
    """(checkpoints folder, tag) for a run dir, a checkpoints folder or one checkpoint folder."""
    path = path.rstrip("/")
    if is_complete(os.path.dirname(path), os.path.basename(path)):
        return os.path.dirname(path), os.path.basename(path)
    for root in (checkpoints_dir(path), path):
        tag = latest_tag(root)
        if tag is not None:
            return root, tag
    if os.path.isdir(path) and step_of(os.path.basename(path)) is not None:
        raise CheckpointError(f"{path} is an incomplete checkpoint (no {STATE_FILE}: the save did not finish)")
    raise CheckpointError(f"no complete checkpoint in {path} "
                          "(expected a run dir, its checkpoints/ or a global_stepN folder)")


def find_resume(resume: str, run_dir: str) -> tuple[str, str] | None:
    """What `--resume` means: 'auto' = the latest checkpoint of run_dir if any, 'none' = start fresh (refused if the
    run dir already has checkpoints, so a run is never silently restarted over its own history), or a path."""
    if resume == "auto":
        tag = latest_tag(checkpoints_dir(run_dir))
        return (checkpoints_dir(run_dir), tag) if tag else None
    if resume == "none":
        if complete_tags(checkpoints_dir(run_dir)):
            raise CheckpointError(
                f"{run_dir} already has checkpoints; resume with --resume auto, or use another --run-dir"
            )
        return None
    return resolve(resume)


def save(engine, root: str, step: int, client_state: dict, state: dict, keep_last: int,
         tokenizer_bytes: bytes | None = None) -> str:
    """Save on every rank (collective), then mark complete, point `latest` at it and prune: rank 0 only."""
    import torch.distributed as dist

    tag = tag_for(step)
    if dist.get_rank() == 0 and os.path.isdir(os.path.join(root, tag)):
        # Left by an attempt that crashed mid-save (or a replayed step): stale shards of another world size
        # must not mix with the new ones.
        shutil.rmtree(os.path.join(root, tag))
    dist.barrier()
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's shards are on disk before the checkpoint is declared complete
    if dist.get_rank() == 0:
        if tokenizer_bytes is not None:
            storage.write_bytes(os.path.join(root, tag, TOKENIZER_FILE), tokenizer_bytes)
        storage.write_bytes(os.path.join(root, tag, STATE_FILE), json.dumps(state, indent=2, sort_keys=True).encode())
        storage.write_bytes(os.path.join(root, LATEST), tag.encode())
        prune(root, keep_last)
    dist.barrier()
    return tag


def prune(root: str, keep_last: int) -> list[str]:
    """Delete all but the newest keep_last complete checkpoints (with their universal conversions), and every
    incomplete one older than the newest complete checkpoint (left by a crash mid-save)."""
    tags = complete_tags(root)
    keep = set(tags[-keep_last:])
    newest = step_of(tags[-1]) if tags else -1
    removed = []
    for name in os.listdir(root):
        # global_stepN_universal and its .lock / .failed / .tmp-* companions (trainer/convert.py) go with global_stepN
        base = name.split(UNIVERSAL_SUFFIX)[0]
        step = step_of(base)
        if step is None or base in keep:
            continue
        if base in tags or step < newest:
            path = os.path.join(root, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            removed.append(name)
    return sorted(removed)
