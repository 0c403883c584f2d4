"""The near-duplicate phase (between encode and the shuffle): which images are near-copies of another (`--dedup
near`) or of an excluded image (`--exclude`), decided on the pHash of each canonical image (pipeline/phash.py).

- The encode task writes, per unit, `_work/encoded/NNNNNN.hashes.parquet` (HASHES_SCHEMA: position, phash,
  body_sha256, id of each ok image) and `NNNNNN.bands.u64` (bands_bytes: the unit's phashes once per band, each
  band's grouped by slot, SLOTS = 1024 slots of the mixed band value, after a header of offsets); the exclude stage
  (exclude.py) writes the same for the excluded images.
- One band task per (band k of the R + 1 bands, partition p of P): partition p is a contiguous range of slots
  (P, fixed by NEAR_TASK_HASHES, the knob of its memory, is only known after encode: slots let the encode task
  group without it), so from each unit's bands file the task reads its offsets (one ranged read) and then exactly
  its hashes (one more): every hash is read once per band, by the one task that needs it, and the bytes read by the
  phase grow as (R + 1) x N, not (R + 1) x P x N. It writes the pairs within R that band k reports
  (pipeline/hamming.py: each pair by exactly one band), as hash values: near pairs between images, matches against
  excluded images, and, on band 0, every hash that two images share (distance 0).
- One components task reads those pairs (their count is the near-duplicates found, not the images) and takes
  connected components over the hash values that appear in them (pipeline/hamming.py), so its memory grows with
  the paired hashes (~52 bytes each measured; declared as 128 per pair, components_memory), not with the images.
  A component's id is its smallest hash, a pure function of the content. An image within R of an excluded image is
  `excluded` (excluded_by = the excluded image's id, the closest, then the smallest body sha256) and takes no part
  in groups: its hash is a component of its own. The task writes the (hash, component, excluded_by) table, sorted
  by hash, as P_g slices: slice p holds the components whose mixed id falls in slot range p (slot_of, slot_range).
- P_g place tasks (P_g = N / NEAR_GROUP_IMAGES, the knob of their memory, place_memory): place task p reads its
  slice and then the units' hashes files (each whole, decoding position, phash, body_sha256, bucket), holding the
  images whose hash is in its slice only, and places each: the kept image of a component is its smallest body sha256
  (then the first in listing order), so the output is the same whatever the workers, partitions or P_g. Every other
  image of the component with another body is `near_duplicate` (duplicate_of = the kept image's id; copies with
  the kept image's body stay exact `duplicate`s of it, found by the bucket as before). It writes
  `_work/neardup/drops/BBBBBB-PPPPPP.parquet` per shuffle bucket that has such images of its slice, then its done
  record; the driver sums the place records into groups.json, the phase's done record. Each place task reads every
  unit's hashes file (P_g x N reads of ~48 bytes per image): a place task holds ~1 / P_g of the images in groups,
  but a single component is never split (a component larger than a slice, e.g. millions of flat images of one
  hash, is held by one task).
- The bucket task (shuffle.py) reads its drops files of every slice (load_drops) and gives those images their
  status instead of packing them.
Every task's outputs precede its done record (results.py): a killed job resumes where it stopped, with the same bytes.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import hamming, storage
from pipeline.stats import EXCLUDED, NEAR_DUPLICATE
from pipeline.prefetch import ordered
from pipeline.preprocess.faults import maybe_fault
from pipeline.preprocess.layout import Layout
from pipeline.preprocess.ranged import iter_ranges
from pipeline.preprocess.results import retry_counts, write_record

log = logging.getLogger(__name__)

NEAR_TASK_HASHES = 8_000_000  # hashes a band task holds at most (~40 bytes each with its sort): P = N / this
# Images a place task covers (its slice of the component ids, ~1 / P_g of the images): it holds at most those of
# them in a group or excluded (~300 bytes each, place_memory: <= 2.8 GB if all were, ~0.5 GB at 20%), so
# P_g = N / this; each place task reads every unit's hashes file, so the bytes read grow as P_g x N.
NEAR_GROUP_IMAGES = 8_000_000
READ_WINDOW = 16  # hashes files a place task reads ahead
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads band values (zeros in low bits) over partitions
SLOT_BITS = 10
# Hash slots per band in a bands file. P is decided after encode (it needs the ok images), so the encode task
# groups by slot and partition p takes a contiguous range of slots: P <= SLOTS, 8 billion images at 8M a task.
SLOTS = 1 << SLOT_BITS

HASHES_SCHEMA = pa.schema([pa.field("position", pa.uint32(), nullable=False),
                           pa.field("phash", pa.uint64(), nullable=False),
                           pa.field("body_sha256", pa.binary(32), nullable=False),
                           pa.field("id", pa.string(), nullable=False),
                           pa.field("bucket", pa.uint32(), nullable=False)])  # its shuffle bucket (0: excluded)
DROPS_SCHEMA = pa.schema([pa.field("unit", pa.uint32(), nullable=False),
                          pa.field("position", pa.uint32(), nullable=False),
                          pa.field("status", pa.string(), nullable=False),
                          pa.field("of", pa.string(), nullable=False)])
PAIR_DTYPE = np.dtype([("a", "<u8"), ("b", "<u8")])
MATCH_DTYPE = np.dtype([("train", "<u8"), ("excluded", "<u8"), ("distance", "<u1")])


def active(config: dict) -> bool:
    return config["dedup"] == "near" or bool(config.get("exclude"))


def hashes_bytes(rows: list[tuple[int, int, bytes, str, int]]) -> bytes:
    """(position, phash, body_sha256, id, bucket) rows -> a hashes file."""
    cols = list(zip(*rows)) if rows else [[], [], [], [], []]
    table = pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, HASHES_SCHEMA)], schema=HASHES_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_hashes(hashes_uri: str, bands_uri: str, rows: list[tuple[int, int, bytes, str, int]],
                 radius: int | None) -> None:
    """A unit's hashes file and, when the near-duplicate phase runs (a radius: config["near_radius"]), its bands
    file."""
    storage.write_bytes(hashes_uri, hashes_bytes(rows))
    if radius is not None:
        storage.write_bytes(bands_uri, bands_bytes(np.array([r[1] for r in rows], np.uint64), radius))


def read_hashes(uris: list[str], columns: list[str]) -> Iterator[tuple[pa.Table, int]]:
    """(table, bytes read) of these hashes files (each read whole, only `columns` decoded), in order, READ_WINDOW
    files read ahead."""
    def read(uri: str) -> tuple[pa.Table, int]:
        data = storage.read_bytes(uri)
        return pq.read_table(io.BytesIO(data), columns=columns), len(data)

    return ordered(read, uris, window=min(READ_WINDOW, max(1, len(uris))))


def slot_of(hashes: np.ndarray, mask: int) -> np.ndarray:
    """The slot (0..SLOTS-1) of each hash's band value: the top bits of the mixed value (the best mixed ones)."""
    mixed = np.multiply(hamming.band_value(hashes, mask), _MIX)
    return (mixed >> np.uint64(64 - SLOT_BITS)).astype(np.int64)


def slot_range(part: int, parts: int) -> tuple[int, int]:
    """Partition `part`'s slots [lo, hi): contiguous, so one ranged read per bands file; sizes differ by <= 1."""
    return -(-part * SLOTS // parts), -(-(part + 1) * SLOTS // parts)


def partitions(images: int) -> int:
    return min(SLOTS, max(1, math.ceil(images / NEAR_TASK_HASHES)))


def band_memory(images: int, parts: int) -> int:
    """A band task holds its partition's hashes (8 bytes, with duplicates until np.unique) and their sort (~4x);
    its largest partition has ceil(SLOTS / parts) slots."""
    return 48 * math.ceil(images * math.ceil(SLOTS / parts) / SLOTS) + 2**26


def bands_bytes(hashes: np.ndarray, radius: int) -> bytes:
    """A unit's bands file: its pHashes once per band of `radius`, each band's sorted by slot (stable), after a
    header of uint64 offsets (bands x SLOTS + 1, little-endian): header[k, s] = the byte where band k's slot s
    starts, header[k, SLOTS] where band k ends. Band task (k, p) reads header[k, lo..hi] and then bytes
    [header[k, lo], header[k, hi]): exactly its hashes, whatever P turns out to be."""
    hashes = np.asarray(hashes, np.uint64)
    masks = hamming.band_masks(radius)
    header = np.zeros((len(masks), SLOTS + 1), "<u8")
    body = []
    for k, mask in enumerate(masks):
        slots = slot_of(hashes, mask)
        body.append(hashes[np.argsort(slots, kind="stable")].astype("<u8"))
        header[k] = header.nbytes + 8 * (k * len(hashes) + np.r_[0, np.cumsum(np.bincount(slots, minlength=SLOTS))])
    return header.tobytes() + b"".join(b.tobytes() for b in body)


def read_slices(uris: list[str], band: int, part: int, parts: int) -> tuple[np.ndarray, int]:
    """The hashes of partition `part` of band `band` in these bands files (with duplicates, in file order) and
    the bytes read for them: per file one ranged read of the header's offsets, one of the slice."""
    lo, hi = slot_range(part, parts)
    row = band * (SLOTS + 1) * 8
    bounds = [np.frombuffer(b, "<u8")[[0, -1]] for b in iter_ranges([(u, row + 8 * lo, row + 8 * (hi + 1))
                                                                         for u in uris])]
    sizes = [int(e - s) for s, e in bounds]
    out = np.empty(sum(sizes) // 8, np.uint64)  # filled in place: the partition's hashes held once
    at = 0
    for data in iter_ranges([(u, int(s), int(e)) for u, (s, e) in zip(uris, bounds)]):
        out[at : at + len(data) // 8] = np.frombuffer(data, "<u8")
        at += len(data) // 8
    return out, 8 * (hi - lo + 1) * len(uris) + sum(sizes)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _load_npy(uri: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


# -- band task --------------------------------------------------------------------------------------------------


def band_task(output: str, band: int, part: int, parts: int, units: int, exclude_units: int, radius: int,
              near: bool) -> dict:
    """The pairs band `band` reports among the hashes of partition `part`; see the module docstring."""
    layout = Layout(output)
    maybe_fault(layout, "near", band * parts + part)
    retry_counts()
    start = time.perf_counter()
    masks = hamming.band_masks(radius)

    train, train_bytes = read_slices([layout.unit_bands(u) for u in range(units)], band, part, parts)
    read = len(train)
    train, counts = np.unique(train, return_counts=True)
    excluded, excluded_bytes = read_slices([layout.exclude_bands(u) for u in range(exclude_units)], band, part,
                                           parts)
    read += len(excluded)
    excluded = np.unique(excluded)
    combined = np.concatenate([train, excluded])
    i, j = hamming.near_pairs(combined, radius, masks, band)
    i_train, j_train = i < len(train), j < len(train)
    pairs = np.zeros(0, PAIR_DTYPE)
    if near:
        both = i_train & j_train
        pairs = np.zeros(int(both.sum()) + (int((counts > 1).sum()) if band == 0 else 0), PAIR_DTYPE)
        n = int(both.sum())
        pairs["a"][:n], pairs["b"][:n] = combined[i[both]], combined[j[both]]
        if band == 0:  # hashes shared by several images: distance 0, a group of their own
            pairs["a"][n:] = pairs["b"][n:] = train[counts > 1]
    one = i_train != j_train
    t = np.where(i_train, i, j)[one]
    e = np.where(i_train, j, i)[one]
    matches = np.zeros(len(t), MATCH_DTYPE)
    matches["train"], matches["excluded"] = combined[t], combined[e]
    matches["distance"] = hamming.distance(combined[t], combined[e])
    storage.write_bytes(layout.near_pairs(band, part), _npy(np.sort(pairs)))
    storage.write_bytes(layout.near_matches(band, part), _npy(np.sort(matches)))
    record = {"band": band, "part": part, "hashes": len(train), "excluded_hashes": len(excluded),
              "hashes_read": read, "bytes_read": train_bytes + excluded_bytes,
              "pairs": len(pairs), "matches": len(matches), "seconds": round(time.perf_counter() - start, 3),
              "retries": retry_counts()}
    write_record(layout.near_done, band * parts + part, record)
    return record


# -- components task --------------------------------------------------------------------------------------------

COMPONENTS_SCHEMA = pa.schema([pa.field("hash", pa.uint64(), nullable=False),
                               pa.field("component", pa.uint64(), nullable=False),  # smallest hash of it
                               pa.field("excluded_by", pa.string(), nullable=False)])  # "" unless excluded


def group_parts(images: int) -> int:
    """Place tasks: sized as if every image were in a group, the worst case (the count in groups is not known
    before the components)."""
    return min(SLOTS, max(1, math.ceil(images / NEAR_GROUP_IMAGES)))


def components_memory(pairs: int) -> int:
    """The components task holds the pairs and matches (16-17 bytes each), their nodes and labels (~100 bytes per
    pair with np.unique's and the propagation's temporaries)."""
    return 128 * pairs + 2**27


def components_task(output: str, bands: int, parts: int, exclude_units: int, places: int) -> dict:
    """Connected components over the paired hash values and the excluded hashes; see the module docstring."""
    layout = Layout(output)
    maybe_fault(layout, "groups", 0)
    retry_counts()
    start = time.perf_counter()
    tasks = [(k, p) for k in range(bands) for p in range(parts)]
    pairs = np.concatenate([_load_npy(layout.near_pairs(k, p)) for k, p in tasks])
    matches = np.concatenate([_load_npy(layout.near_matches(k, p)) for k, p in tasks])
    excluded_by = _excluded_by(layout, matches, exclude_units)  # train hash -> excluded image id
    del matches
    excluded_hashes = np.array(sorted(excluded_by), dtype=np.uint64)
    if len(excluded_hashes):  # an excluded image takes no part in groups
        pairs = pairs[~(np.isin(pairs["a"], excluded_hashes) | np.isin(pairs["b"], excluded_hashes))]
    nodes, inverse = np.unique(np.concatenate([pairs["a"], pairs["b"]]), return_inverse=True)
    n_pairs = len(pairs)
    label = hamming.components(len(nodes), inverse[:n_pairs], inverse[n_pairs:])
    del pairs, inverse
    # nodes are sorted, a label is the smallest node index: nodes[label] is the smallest hash, a pure function of
    # the component's content. Excluded hashes are their own component (their slice is that of their own hash).
    hashes = np.concatenate([nodes, excluded_hashes])
    component = np.concatenate([nodes[label], excluded_hashes])
    by = np.array([""] * len(nodes) + [excluded_by[h] for h in excluded_hashes.tolist()], dtype=object)
    del label
    slot = slot_of(component, hamming.FULL_MASK)
    for place in range(places):
        lo, hi = slot_range(place, places)
        rows = np.flatnonzero((slot >= lo) & (slot < hi))
        rows = rows[np.argsort(hashes[rows], kind="stable")]
        table = pa.Table.from_arrays([pa.array(hashes[rows]), pa.array(component[rows]),
                                      pa.array(by[rows].tolist(), pa.string())], schema=COMPONENTS_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.write_bytes(layout.near_components(place), buf.getvalue())
    record = {"pairs": n_pairs, "paired_hashes": len(nodes), "excluded_hashes": len(excluded_hashes),
              "seconds": round(time.perf_counter() - start, 3), "retries": retry_counts()}
    storage.write_bytes(layout.near_components_done, json.dumps(record, sort_keys=True).encode())
    return record


# -- place tasks ------------------------------------------------------------------------------------------------


def place_memory(images: int, places: int) -> int:
    """A place task holds, for the images of its slice that are in a group or excluded, unit, position, bucket,
    body sha256 and component with their concatenation, sort and drops (~300 bytes each measured with the read-ahead
    hashes files, bench_neardup.py), sized for every image of its share being one, plus its slice of the components
    table and the process."""
    return 320 * math.ceil(images / places) + 2**28


def place_task(output: str, place: int, places: int, units: int) -> dict:
    """Kept images and the `near_duplicate` / `excluded` images of the components of slice `place`; see the
    module docstring."""
    layout = Layout(output)
    maybe_fault(layout, "place", place)
    retry_counts()
    start = time.perf_counter()
    table = pq.read_table(io.BytesIO(storage.read_bytes(layout.near_components(place))))
    hashes = table.column("hash").to_numpy()  # sorted
    component = table.column("component").to_numpy()
    by = np.array(table.column("excluded_by").to_pylist(), dtype=object)
    del table
    is_excluded = by != ""
    excluded_ids = sorted(set(by[is_excluded].tolist()))
    of_ids: list[str] = list(excluded_ids)  # excluded images' ids, then the kept images' ids
    of_index = {x: i for i, x in enumerate(excluded_ids)}
    excluded_of = np.array([of_index.get(x, -1) for x in by.tolist()], np.int64)  # of each hash, -1: grouped
    del by

    members = {k: [] for k in ("label", "unit", "position", "sha", "bucket")}
    out = {k: [] for k in ("unit", "position", "bucket", "of")}  # dropped images; `of` indexes of_ids
    uris = [layout.unit_hashes(u) for u in range(units)]
    read = 0
    for unit, (t, size) in enumerate(read_hashes(uris, ["position", "phash", "body_sha256", "bucket"])):
        read += size
        h = t.column("phash").to_numpy()
        at = np.minimum(np.searchsorted(hashes, h), max(0, len(hashes) - 1))
        found = np.flatnonzero(hashes[at] == h) if len(hashes) else np.zeros(0, np.int64)
        if not len(found):
            continue
        at = at[found]
        pos = t.column("position").to_numpy()[found].astype(np.int64)
        bucket = t.column("bucket").to_numpy()[found].astype(np.int64)
        x = is_excluded[at]
        out["unit"].append(np.full(int(x.sum()), unit, np.int64))
        out["position"].append(pos[x])
        out["bucket"].append(bucket[x])
        out["of"].append(excluded_of[at[x]])
        g = ~x
        members["label"].append(component[at[g]])
        members["unit"].append(np.full(int(g.sum()), unit, np.int64))
        members["position"].append(pos[g])
        members["sha"].append(_sha_array(t)[found][g])
        members["bucket"].append(bucket[g])
    del hashes, component, is_excluded, excluded_of
    excluded = sum(len(x) for x in out["unit"])
    m = {k: np.concatenate(v) for k, v in members.items()} if members["label"] else {}
    del members
    held = excluded + (len(m["label"]) if m else 0)
    groups, near, largest = 0, 0, []
    if m and len(m["label"]):
        # kept = smallest (sha, unit, position) of each component: lexsort's last key is the primary one
        order = np.lexsort((m["position"], m["unit"], m["sha"], m["label"]))
        lab, sha_sorted = m["label"][order], m["sha"][order]
        first = np.r_[True, lab[1:] != lab[:-1]]
        comp = np.cumsum(first) - 1  # of each sorted member
        kept = order[first]
        other = sha_sorted != sha_sorted[np.flatnonzero(first)[comp]]  # not a copy of the kept body
        used = np.unique(comp[other])  # only the kept images that something duplicates need an id
        sizes = np.bincount(comp)[used]
        groups, near, largest = len(used), int(other.sum()), sorted(sizes.tolist(), reverse=True)[:10]
        kept_ids = _ids(layout, m["unit"][kept[used]], m["position"][kept[used]])
        slot = np.full(len(kept), -1, np.int64)
        slot[used] = np.arange(len(used)) + len(of_ids)
        of_ids += kept_ids
        o = order[other]
        out["unit"].append(m["unit"][o])
        out["position"].append(m["position"][o])
        out["bucket"].append(m["bucket"][o])
        out["of"].append(slot[comp[other]])
    del m
    _write_drops(layout, place, out, excluded, of_ids)
    record = {"place": place, "groups": groups, "near_duplicate": near, "excluded": excluded,
              "largest_groups": largest, "images_held": held, "bytes_read": read,
              "seconds": round(time.perf_counter() - start, 3), "retries": retry_counts()}
    write_record(layout.near_place_done, place, record)
    return record


def _write_drops(layout: Layout, place: int, out: dict, excluded: int, of_ids: list[str]) -> None:
    """One drops file per bucket that has dropped images of this slice (the first `excluded` rows are excluded
    images), rows in (unit, position) order."""
    if not out["unit"]:
        return
    d = {k: np.concatenate(v) for k, v in out.items()}
    status = np.where(np.arange(len(d["unit"])) < excluded, 1, 0)
    bucket = d["bucket"]
    order = np.lexsort((d["position"], d["unit"], bucket))
    starts = np.flatnonzero(np.r_[True, bucket[order][1:] != bucket[order][:-1]]) if len(order) else []
    for s, e in zip(starts, list(starts[1:]) + [len(order)]):
        rows = order[s:e]
        table = pa.Table.from_arrays([pa.array(d["unit"][rows], pa.uint32()), pa.array(d["position"][rows], pa.uint32()),
                                      pa.array(np.array([NEAR_DUPLICATE, EXCLUDED])[status[rows]]),
                                      pa.array([of_ids[i] for i in d["of"][rows].tolist()], pa.string())],
                                     schema=DROPS_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.write_bytes(layout.near_drops(int(bucket[order[s]]), place), buf.getvalue())


def _sha_array(table: pa.Table) -> np.ndarray:
    """The body_sha256 column as a numpy 'S32' array (sortable, comparable)."""
    col = table.column("body_sha256").combine_chunks()
    data = np.frombuffer(col.buffers()[1], dtype="S32", count=len(col) + col.offset)
    return data[col.offset :]


def _ids(layout: Layout, units: np.ndarray, positions: np.ndarray) -> list[str]:
    """The ids of these (unit, position) images, reading each unit's hashes file once."""
    wanted: dict[int, dict[int, int]] = {}
    for x, (u, p) in enumerate(zip(units.tolist(), positions.tolist())):
        wanted.setdefault(u, {})[p] = x
    out = [""] * len(units)
    todo = sorted(wanted)
    for u, (table, _) in zip(todo, read_hashes([layout.unit_hashes(u) for u in todo], ["position", "id"])):
        for p, image_id in zip(table.column("position").to_pylist(), table.column("id").to_pylist()):
            if p in wanted[u]:
                out[wanted[u][p]] = image_id
    return out


def _excluded_by(layout: Layout, matches: np.ndarray, exclude_units: int) -> dict[int, str]:
    """train hash -> the id of its closest excluded image (then the smallest body sha256, then id)."""
    if not len(matches):
        return {}
    wanted = set(matches["excluded"].tolist())
    best_of_hash: dict[int, tuple[bytes, str]] = {}  # excluded hash -> (sha, id), the smallest
    uris = [layout.exclude_hashes(u) for u in range(exclude_units)]
    for table, _ in read_hashes(uris, ["phash", "body_sha256", "id"]):
        for h, sha, image_id in zip(table.column("phash").to_pylist(), table.column("body_sha256").to_pylist(),
                                    table.column("id").to_pylist()):
            if h in wanted and (h not in best_of_hash or (sha, image_id) < best_of_hash[h]):
                best_of_hash[h] = (sha, image_id)
    best: dict[int, tuple] = {}
    for t, e, d in zip(matches["train"].tolist(), matches["excluded"].tolist(), matches["distance"].tolist()):
        cand = (d, *best_of_hash[e])
        if t not in best or cand < best[t]:
            best[t] = cand
    return {t: c[2] for t, c in best.items()}


def phase_record(components: dict, places: list[dict]) -> dict:
    """The phase's record: the place tasks' counts summed (each component is in one slice), the 10 largest groups
    of all."""
    return {"groups": sum(r["groups"] for r in places), "near_duplicate": sum(r["near_duplicate"] for r in places),
            "excluded": sum(r["excluded"] for r in places), "excluded_hashes": components["excluded_hashes"],
            "pairs": components["pairs"], "paired_hashes": components["paired_hashes"],
            "largest_groups": sorted((s for r in places for s in r["largest_groups"]), reverse=True)[:10]}


def near_plan(layout: Layout, images: int, parts: int | None = None, places: int | None = None) -> tuple[int, int]:
    """(band partitions, place tasks): fixed by the first run (the done records and drops files refer to them),
    else these or the knobs' and written."""
    plan = json.loads(storage.read_bytes(layout.near_plan)) if storage.exists(layout.near_plan) else {}
    if "places" not in plan:  # new, or planned before the place tasks existed: its band records still hold
        plan = {"parts": plan.get("parts", parts or partitions(images)), "places": places or group_parts(images)}
        storage.write_bytes(layout.near_plan, json.dumps(plan, sort_keys=True).encode())
    return plan["parts"], plan["places"]


def load_drops(layout: Layout, bucket: int) -> dict[tuple[int, int], tuple[str, str]]:
    """(unit, position) -> (status, id it duplicates or matched) for the bucket's dropped images, from the drops
    files of every place task (a slice's image is in one place task only)."""
    places = json.loads(storage.read_bytes(layout.near_plan))["places"]
    out = {}
    for place in range(places):
        uri = layout.near_drops(bucket, place)
        if storage.exists(uri):
            t = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
            cols = (t.column(c).to_pylist() for c in DROPS_SCHEMA.names)
            out.update({(u, p): (s, o) for u, p, s, o in zip(*cols)})
    return out


# -- the phase, as the driver runs it ---------------------------------------------------------------------------


def near_phase(layout: Layout, config: dict, units: int, ok_images: int, exclude_units: int,
               in_flight: int) -> dict:
    """Band tasks, the components task, then the place tasks, each skipped when done before; returns the phase's
    record (the place tasks' summed)."""
    from pipeline.preprocess import executor
    from pipeline.preprocess.results import ResultLog

    if storage.exists(layout.near_groups_done):
        return json.loads(storage.read_bytes(layout.near_groups_done))
    parts, places = near_plan(layout, ok_images)
    radius = config["near_radius"]
    bands = len(hamming.band_masks(radius))
    near = config["dedup"] == "near"
    results = ResultLog(layout.near_done, bands * parts)
    pairs = sum(r["pairs"] + r["matches"] for _, r in results.load())
    todo = results.todo()
    task = executor.remote(band_task, band_memory(ok_images, parts))
    for i, record in executor.run_bounded(
            ((i, lambda i=i: task.remote(layout.output, i // parts, i % parts, parts, units, exclude_units, radius,
                                         near)) for i in todo), in_flight, len(todo), "near-duplicates (bands)"):
        results.add(i, record)
        pairs += record["pairs"] + record["matches"]
    if storage.exists(layout.near_components_done):
        components = json.loads(storage.read_bytes(layout.near_components_done))
    else:
        task = executor.remote(components_task, components_memory(pairs))
        [(_, components)] = executor.run_bounded(
            [(0, lambda: task.remote(layout.output, bands, parts, exclude_units, places))],
            1, 1, "near-duplicates (components)")
    placed = ResultLog(layout.near_place_done, places)
    records = dict(placed.load())
    todo = placed.todo()
    task = executor.remote(place_task, place_memory(ok_images, places))
    for i, record in executor.run_bounded(((i, lambda i=i: task.remote(layout.output, i, places, units))
                                           for i in todo), in_flight, len(todo), "near-duplicates (groups)"):
        placed.add(i, record)
        records[i] = record
    record = phase_record(components, [records[i] for i in range(places)])
    storage.write_bytes(layout.near_groups_done, json.dumps(record, sort_keys=True).encode())
    return record


def curation_report(config: dict, curation: dict, total) -> dict:
    """The manifest's and summary's `near_duplicates` and `exclude` entries (only those in use)."""
    from pipeline import stats

    out = {}
    if config["dedup"] == "near":
        groups = curation["groups"]
        out["near_duplicates"] = {"radius": config["near_radius"], "groups": groups["groups"],
                                  "largest_groups": groups["largest_groups"]}
    if config.get("exclude"):
        ex = curation["exclude"]
        out["exclude"] = {"inputs": config["exclude"], "radius": config["near_radius"], "images": ex["images"],
                          "hashed": ex["hashed"], "failed": ex["failed"],
                          "matched": total.status.get(stats.EXCLUDED, 0)}
    return out
