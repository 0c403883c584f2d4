"""The train sample order: position -> sample id, a pure function of (shards, windows, seed, block size, epoch).

For each epoch the train shards are permuted (`permutation(shards, seed, epoch, 0)`), grouped into blocks of
`block_shards` consecutive shards, and the samples of block b are permuted (`permutation(n_b, seed, epoch, 1, b)`)
in the order of their shards' sample ids. Epochs are concatenated into one endless stream of positions: position p
is sample `order(p // N)[p % N]` (N = samples per epoch).

Memory: an epoch costs its shard permutation and block boundaries (O(shards)); a block's permutation is computed
when a position in it is first asked for and kept for the current and the next block only. Nothing of size
O(samples of an epoch) is ever built (23M samples would be 184 MB of int64 per rank).

Steps and ranks: an optimizer step takes the next G = global_batch_size positions; rank r of W takes the contiguous
slice [r*G/W, (r+1)*G/W) of them, as G/W/micro consecutive micro-batches. So the samples of a step do not depend on
the world size, and every rank runs the same number of micro-batches.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import numpy as np

from pipeline.manifest import DataError, ShardRef


def permutation(n: int, *seed_words: int) -> np.ndarray:
    """A permutation of range(n) that depends only on the seed words: argsort of PCG64 raw outputs, whose stream
    NumPy guarantees across versions (Generator.permutation's algorithm may change, which would break resume)."""
    keys = np.random.PCG64(np.random.SeedSequence([int(w) for w in seed_words])).random_raw(n)
    return np.argsort(keys, kind="stable")


class SampleOrder:
    """Position -> sample id for the train split; see the module docstring."""

    _KEEP_EPOCHS = 2  # current and next
    _KEEP_BLOCKS = 2

    def __init__(self, shards: list[ShardRef], windows: int, seed: int, block_shards: int):
        if not shards:
            raise DataError("the data has no train rows")
        self.shards, self.windows, self.seed, self.block_shards = shards, windows, seed, block_shards
        self._first = np.array([s.first_row * windows for s in shards], dtype=np.int64)  # first sample id per shard
        self._count = np.array([s.rows * windows for s in shards], dtype=np.int64)
        self.num_samples = int(self._count.sum())
        self._epochs: OrderedDict[int, tuple[np.ndarray, list[np.ndarray]]] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def fingerprint(self) -> str:
        """Changes whenever the same position would map to another sample (other data, window, seed, blocks)."""
        desc = {
            "shards": [(s.path, s.rows) for s in self.shards],
            "windows": self.windows,
            "seed": self.seed,
            "block_shards": self.block_shards,
            "algorithm": 1,
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

    def blocks(self, epoch: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(starts, members): block b holds epoch positions [starts[b], starts[b+1]) and the shards members[b]
        (indices into self.shards, in block order)."""
        if epoch not in self._epochs:
            shard_order = permutation(len(self.shards), self.seed, epoch, 0)
            members = [shard_order[i : i + self.block_shards] for i in range(0, len(shard_order), self.block_shards)]
            starts = np.zeros(len(members) + 1, dtype=np.int64)
            np.cumsum([self._count[m].sum() for m in members], out=starts[1:])
            self._epochs[epoch] = (starts, members)
            while len(self._epochs) > self._KEEP_EPOCHS:
                self._epochs.popitem(last=False)
        self._epochs.move_to_end(epoch)
        return self._epochs[epoch]

    def block_permutation(self, epoch: int, block: int) -> np.ndarray:
        key = (epoch, block)
        if key not in self._perms:
            starts, _ = self.blocks(epoch)
            self._perms[key] = permutation(int(starts[block + 1] - starts[block]), self.seed, epoch, 1, block)
            while len(self._perms) > self._KEEP_BLOCKS:
                self._perms.popitem(last=False)
        self._perms.move_to_end(key)
        return self._perms[key]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, block) of each position."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs = positions // self.num_samples
        blocks = np.empty(len(positions), dtype=np.int64)
        for e in np.unique(epochs):
            mask = epochs == e
            starts, _ = self.blocks(int(e))
            blocks[mask] = np.searchsorted(starts, positions[mask] - e * self.num_samples, side="right") - 1
        return epochs, blocks

    def samples_at(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty(len(positions), dtype=np.int64)
        epochs, blocks = self.locate(positions)
        for e, b in sorted(set(zip(epochs.tolist(), blocks.tolist()))):
            mask = (epochs == e) & (blocks == b)
            starts, members = self.blocks(e)
            # index into the block's samples, which are its shards' sample ids in member order
            i = self.block_permutation(e, b)[positions[mask] - e * self.num_samples - starts[b]]
            ends = np.cumsum(self._count[members[b]])
            j = np.searchsorted(ends, i, side="right")
            out[mask] = self._first[members[b]][j] + i - (ends[j] - self._count[members[b]][j])
        return out

    def held_bytes(self) -> int:
        """Bytes of the arrays this order keeps (epoch plans and block permutations)."""
        epochs = sum(s.nbytes + sum(m.nbytes for m in ms) for s, ms in self._epochs.values())
        return int(self._first.nbytes + self._count.nbytes + epochs + sum(p.nbytes for p in self._perms.values()))


def micro_batch_positions(start: int, index: int, global_batch: int, micro_batch: int, rank: int,
                          world: int) -> np.ndarray:
    """Positions of this rank's `index`-th micro-batch counted from position `start` (a step boundary)."""
    per_rank = global_batch // world
    step, k = divmod(index, per_rank // micro_batch)
    lo = start + step * global_batch + rank * per_rank + k * micro_batch
    return np.arange(lo, lo + micro_batch, dtype=np.int64)


def rank_positions(lo: int, hi: int, start: int, global_batch: int, rank: int, world: int) -> np.ndarray:
    """This rank's positions in [lo, hi), for steps taking global_batch positions each from `start` on."""
    per_rank = global_batch // world
    p = np.arange(max(lo, start), hi, dtype=np.int64)
    slot = (p - start) % global_batch
    return p[(slot >= rank * per_rank) & (slot < (rank + 1) * per_rank)]
