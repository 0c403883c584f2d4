"""Random number generators of a training process: one seed for the initial weights, one per micro-batch.

The RNG is re-seeded before every micro-batch from (seed, position of its first sample in the stream): the
position does not depend on the world size, so dropout-like randomness (none in the model today) and anything
else drawn during a step is the same on any number of processes and after any resume. The per-rank states are
still saved in each checkpoint and restored when the world size is unchanged.
"""

from __future__ import annotations

import random

import numpy as np


def seed_all(seed: int) -> None:
    """Python, NumPy and torch from one seed: identical initial weights on every rank and in every run."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def micro_batch_seed(seed: int, position: int) -> int:
    """RNG seed of a micro-batch, from its first sample's stream position: the same on any world size."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1, dtype=np.uint64)[0] >> 1)


def rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
