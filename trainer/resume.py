"""Continuing a run from a checkpoint: which one, whether it fits this run, and loading it into the engine.

Everything that can refuse a resume (another tokenizer, model or sample order) is checked from the checkpoint's
jpeglm.json before any process group exists. Loading on the world size the checkpoint was saved with restores
each rank's ZeRO partitions and RNG states; on another world size the checkpoint is first converted to DeepSpeed's
universal format (trainer/convert.py) and two silent bugs of DeepSpeed 0.19.8's stage-3 universal load are undone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from trainer import checkpoint as ckpt
from trainer.checkpoint import UNIVERSAL_SUFFIX
from trainer.config import ModelConfig, RunConfig


@dataclass
class ResumePoint:
    root: str  # the checkpoints folder
    tag: str  # global_stepN
    state: dict  # its jpeglm.json

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.tag)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def needs_universal(self, world: int) -> bool:
        return int(self.state["world_size"]) != world

    def load_tag(self, world: int) -> str:
        return self.tag + UNIVERSAL_SUFFIX if self.needs_universal(world) else self.tag


def find(resume: str, run_dir: str) -> ResumePoint | None:
    """The checkpoint `--resume` names (see trainer.checkpoint.find_resume), with its state, or None."""
    found = ckpt.find_resume(resume, run_dir)
    if found is None:
        return None
    return ResumePoint(*found, state=ckpt.read_state(*found))


def check_resume_state(state: dict, cfg: RunConfig, manifest, order_fingerprint: str, where: str) -> None:
    """Refuse to continue a run on different data or a different model (before any process group exists)."""
    if state.get("format") != ckpt.CHECKPOINT_FORMAT:
        raise ckpt.CheckpointError(f"{where} is not a jpeglm training checkpoint")
    theirs, ours = state["tokenizer"]["fingerprint"], manifest.fingerprint
    if theirs != ours:
        raise ckpt.CheckpointError(
            f"refusing to resume {where}: it was trained on data tokenized with tokenizer {theirs[:12]}, but "
            f"{manifest.root} was made with tokenizer {ours[:12]}. Token ids would mean different bytes; "
            "use data preprocessed with the run's tokenizer (preprocess --tokenizer RUN/tokenizer.model) "
            "or a new --run-dir"
        )
    # Activation checkpointing only trades memory for recomputation (same math): it may change between attempts.
    theirs_model = ModelConfig.from_dict(state["model"]).to_dict()
    diff = {k: (theirs_model[k], v) for k, v in cfg.model.to_dict().items()
            if theirs_model[k] != v and k != "activation_checkpointing"}
    if diff:
        raise ckpt.CheckpointError(f"refusing to resume {where}: model config differs (checkpoint, now): {diff}")
    if state.get("codec") and manifest.raw.get("codec") and state["codec"] != manifest.raw["codec"]:
        raise ckpt.CheckpointError(f"refusing to resume {where}: it was trained on images made with {state['codec']}, "
                                   f"but {manifest.root} has {manifest.raw['codec']}; use a new --run-dir")
    if state["data"]["order_fingerprint"] != order_fingerprint:
        raise ckpt.CheckpointError(
            f"refusing to resume {where}: the sample order changed (other shards, train.seq_len, train.seed or "
            "data.shuffle_block_shards than the run used), so the loader position would point at other samples"
        )


def load(engine, point: ResumePoint, world: int, weight_decays: list[float]) -> tuple[int, int]:
    """Load `point` into the engine (collective); returns (step, consumed loader positions)."""
    from trainer.rng import set_rng_state

    tag = point.load_tag(world)
    load_path, client_state = engine.load_checkpoint(point.root, tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=False)
    if load_path is None:
        raise ckpt.CheckpointError(f"DeepSpeed could not load {os.path.join(point.root, tag)}")
    if point.needs_universal(world):
        fix_universal_load(engine.optimizer, weight_decays)
    else:
        set_rng_state(client_state["rng"])  # per rank; a universal load hands every rank rank 0's
    return int(client_state["step"]), int(client_state["loader"]["consumed"])


def fix_universal_load(optimizer, weight_decays: list[float]) -> None:
    """Work around two silent bugs of DeepSpeed 0.19.8's ZeRO-3 universal load (without this, a resume on another
    number of processes drifts by ~1e-3; tests/test_train_distributed.py checks it is bitwise equal): every param group
    gets group 0's weight_decay, and all optimizer states share one `step` tensor (torch Adam increments it once
    per group, so bias correction goes wrong)."""
    groups = optimizer.param_groups
    for group, wd in zip(groups, weight_decays):
        group["weight_decay"] = wd
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if "step" in state and hasattr(state["step"], "clone"):
            state["step"] = state["step"].clone()
