"""Every pair of 64-bit hashes within Hamming distance R, exactly, without comparing all pairs; and the connected
components of those pairs. Plain numpy over arrays: the preprocess tasks (pipeline/preprocess/neardup.py) only
decide which hashes each call sees.

Multi-index hashing: split the 64 bits into R + 1 bands (masks of consecutive bits). Two hashes within distance R
differ in at most R bits, so at least one band holds none of them (pigeonhole): they are equal on that band. For
each band k, sorting by the band's bits puts such pairs in one run; a pair is reported by the first band it agrees
on only (it must differ on bands 0..k-1), so the bands' outputs are disjoint and can be computed by separate tasks.

Within a run of equal band values, pairs are compared by popcount:
- runs of up to SMALL_RUN hashes all at once (the i-th and (i+d)-th hashes of the sorted order, d = 1, 2, ...);
- a larger run (a popular band value: flat or near-flat images) is split again on its remaining bits into R + 1
  sub-bands, the same pigeonhole one level down, and only sub-runs compared tile by tile (TILE x TILE popcounts
  in memory at a time): the cost of a run is quadratic only in its sub-runs, and memory is bounded by TILE.
Identical hashes are expected to be merged before (np.unique): distance 0 needs no search.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

FULL_MASK = (1 << 64) - 1
SMALL_RUN = 64  # runs up to this size are compared by offsets, vectorized over all runs
TILE = 2048  # popcounts of a large run computed TILE x TILE at a time (32 MB of uint64)


def band_masks(radius: int, mask: int = FULL_MASK) -> list[int]:
    """radius + 1 masks over the set bits of `mask` (most significant first), as even as the bits allow; fewer
    when mask has fewer bits than that (each of its bits its own band)."""
    bits = [b for b in range(63, -1, -1) if mask >> b & 1]
    parts = min(radius + 1, len(bits))
    out, pos = [], 0
    for k in range(parts):
        width = len(bits) // parts + (1 if k < len(bits) % parts else 0)
        out.append(sum(1 << b for b in bits[pos : pos + width]))
        pos += width
    return out


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between 64-bit hashes, elementwise (uint8)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))


def band_value(hashes: np.ndarray, mask: int) -> np.ndarray:
    return np.bitwise_and(hashes, np.uint64(mask))


def near_pairs(hashes: np.ndarray, radius: int, masks: list[int], k: int,
               earlier: tuple[int, ...] = (), depth: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with i < j: indices into `hashes` (uint64, distinct) of the pairs equal on masks[k], within `radius`
    bits, and differing on masks[:k] and on every mask of `earlier`: each pair within radius is reported by exactly
    one k when k runs over all bands."""
    not_equal_on = tuple(earlier) + tuple(masks[:k])
    out = list(_pairs(hashes, radius, masks[k], not_equal_on, depth))
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i = np.concatenate([a for a, _ in out])
    j = np.concatenate([b for _, b in out])
    return np.minimum(i, j), np.maximum(i, j)


def all_near_pairs(hashes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair within radius (all bands, one process): for tests and benchmarks."""
    masks = band_masks(radius)
    parts = [near_pairs(hashes, radius, masks, k) for k in range(len(masks))]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _keep(hashes: np.ndarray, a: np.ndarray, b: np.ndarray, radius: int,
          not_equal_on: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    x = np.bitwise_xor(hashes[a], hashes[b])
    ok = np.bitwise_count(x) <= radius
    for m in not_equal_on:
        ok &= np.bitwise_and(x, np.uint64(m)) != 0
    return a[ok], b[ok]


def _pairs(hashes: np.ndarray, radius: int, mask: int, not_equal_on: tuple[int, ...],
           depth: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    n = len(hashes)
    if n < 2:
        return
    key = band_value(hashes, mask)
    order = np.argsort(key, kind="stable")
    sk = key[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    sizes = np.diff(np.r_[starts, n])
    small = np.repeat(sizes <= SMALL_RUN, sizes)
    # Small runs: position p pairs with p + d inside its run; no pair at offset d means no run is longer than d.
    for d in range(1, SMALL_RUN):
        p = np.flatnonzero(small[:-d] & (sk[:-d] == sk[d:]))
        if p.size == 0:
            break
        yield _keep(hashes, order[p], order[p + d], radius, not_equal_on)
    for s, z in zip(starts[sizes > SMALL_RUN], sizes[sizes > SMALL_RUN]):
        members = order[s : s + z]
        rest = FULL_MASK & ~mask
        sub = band_masks(radius, rest) if depth > 0 and bin(rest).count("1") > radius else []
        if sub:  # every pair of this run within radius is equal on one sub-band of the remaining bits
            for k2 in range(len(sub)):
                a, b = near_pairs(hashes[members], radius, sub, k2, not_equal_on, depth - 1)
                yield members[a], members[b]
        else:
            yield from _tiled(hashes, members, radius, not_equal_on)


def _tiled(hashes: np.ndarray, members: np.ndarray, radius: int,
           not_equal_on: tuple[int, ...]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All pairs of members within radius, TILE x TILE popcounts at a time."""
    z = len(members)
    for r0 in range(0, z, TILE):
        rows = members[r0 : r0 + TILE]
        for c0 in range(r0, z, TILE):
            cols = members[c0 : c0 + TILE]
            close = np.bitwise_count(np.bitwise_xor(hashes[rows][:, None], hashes[cols][None, :])) <= radius
            if c0 == r0:
                close = np.triu(close, 1)
            ri, ci = np.nonzero(close)
            yield _keep(hashes, rows[ri], cols[ci], radius, not_equal_on)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of n nodes and the edges (a[i], b[i]): each node's label is the smallest node of its
    component. Min-label propagation with pointer jumping: O(log) rounds of vector operations, no Python loop per
    edge, memory ~ the edges plus 3 arrays of n."""
    label = np.arange(n, dtype=np.int64)
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    while True:
        m = np.minimum(label[a], label[b])
        new = label.copy()
        for end in (a, b):  # hook the endpoints and their current roots
            np.minimum.at(new, end, m)
            np.minimum.at(new, label[end], m)
        while True:  # pointer jumping: follow labels to their roots
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return label
        label = new
