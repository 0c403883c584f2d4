"""trainer/data.py, order.py: sample order, rank slicing, windows and masking, resume, S3, validation split.

Datasets here are written in the shard format of schemas/README.md by `write_dataset` (pipeline.shards writer,
hand-made manifest) with random tokens: these tests are about which row goes where, not about what is in it.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from pipeline import shards as shards_io
from pipeline import storage
from trainer import data
from jpeglm.errors import UserError
from trainer.data import IGNORE_INDEX, DataError, Manifest, SampleOrder, ShardRef, TrainStream, ValidationSet
from trainer.order import permutation

from helpers import write_dataset

pytestmark = pytest.mark.timeout(120)



def all_rows(manifest: Manifest, split: str) -> dict[int, tuple[np.ndarray, int]]:
    out = {}
    for shard in manifest.split(split):
        out.update(data.read_rows(shard, manifest.seq_len))
    return out


def take_steps(stream: TrainStream, steps: int) -> list[list[data.Batch]]:
    return [[stream.next_batch() for _ in range(stream.micro_batches_per_step)] for _ in range(steps)]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Manifest:
    """Train shards of very different sizes (1 to 23 rows), 64-token rows, a padded last row; 2 validation shards."""
    root = str(tmp_path_factory.mktemp("uneven"))
    write_dataset(root, {"train": [1, 23, 2, 9, 1, 5], "validation": [3, 4]}, row_len=64, last_valid=40)
    return Manifest.load(root)


def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch(uneven):
    order = SampleOrder(uneven.split("train"), windows=4, seed=7, block_shards=2)
    n = order.num_samples
    assert n == 41 * 4
    first = order.samples_at(np.arange(n))
    assert sorted(first.tolist()) == list(range(n))
    again = SampleOrder(uneven.split("train"), windows=4, seed=7, block_shards=2).samples_at(np.arange(n))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, order.samples_at(np.arange(n, 2 * n)))  # epoch 1
    assert not np.array_equal(first, SampleOrder(uneven.split("train"), 4, seed=8, block_shards=2).samples_at(np.arange(n)))
    # Each block holds exactly the samples of its shards, so one block is read from a few shards only.
    starts, members = order.blocks(0)
    for b, shard_ks in enumerate(members):
        rows = {int(s) // 4 for s in first[starts[b] : starts[b + 1]]}
        shard_rows = set()
        for k in shard_ks:
            s = order.shards[k]
            shard_rows |= set(range(s.first_row, s.first_row + s.rows))
        assert rows == shard_rows
    # The shuffle really mixes rows within a block (not the identity).
    assert not np.array_equal(first, np.sort(first))


def _whole_epoch_order(order: SampleOrder, epoch: int) -> np.ndarray:
    """The construction the trainer used before the order was computed per block (every run before then was
    trained in this order, so it must never change): the whole epoch's sample ids, built at once."""
    shard_order = permutation(len(order.shards), order.seed, epoch, 0)
    parts = []
    for b, i in enumerate(range(0, len(shard_order), order.block_shards)):
        members = [int(k) for k in shard_order[i : i + order.block_shards]]
        ids = np.concatenate([np.arange(order.shards[k].first_row * order.windows,
                                        (order.shards[k].first_row + order.shards[k].rows) * order.windows)
                              for k in members])
        parts.append(ids[permutation(len(ids), order.seed, epoch, 1, b)])
    return np.concatenate(parts)


@pytest.mark.parametrize("windows,block_shards", [(1, 1), (4, 2), (3, 4), (2, 64)])
def test_order_is_the_whole_epoch_construction_it_replaced(uneven, windows, block_shards):
    order = SampleOrder(uneven.split("train"), windows=windows, seed=11, block_shards=block_shards)
    n = order.num_samples
    expected = np.concatenate([_whole_epoch_order(order, e) for e in range(3)])
    assert np.array_equal(order.samples_at(np.arange(3 * n)), expected)
    # asked out of order and across epoch boundaries, one position at a time or scattered
    rng = np.random.default_rng(0)
    scattered = rng.integers(0, 3 * n, 200)
    assert np.array_equal(order.samples_at(scattered), expected[scattered])
    assert [int(order.samples_at(np.array([p]))[0]) for p in (3 * n - 1, 0, n)] == [expected[3 * n - 1], expected[0],
                                                                                    expected[n]]


def test_order_memory_is_shards_plus_one_block_not_the_epoch():
    """23M samples in 575 shards of 40,000 rows (1 GB shards at 12,288 tokens): positions anywhere in two epochs
    cost the shard plans and two block permutations, not an epoch (23M x 8 bytes = 184 MB)."""
    shards = [ShardRef(f"s/{k}", f"shards/train-{k:06d}.tar", "train", 40_000, k * 40_000) for k in range(575)]
    order = SampleOrder(shards, windows=1, seed=3, block_shards=4)
    assert order.num_samples == 23_000_000
    for p in (0, 22_999_999, 23_000_000 + 5_000_000, 45_999_999):
        sid = int(order.samples_at(np.array([p, p]))[0])
        assert 0 <= sid < order.num_samples
    held = order.held_bytes()
    block = 4 * 40_000 * 8
    assert held <= 2 * block + 2 * 575 * 16 + 64 * 1024, held  # two block permutations + two epochs' shard plans
    assert held < order.num_samples * 8 / 50


def test_ranks_split_every_step_evenly_and_steps_do_not_depend_on_world_size(uneven):
    # 41 rows x 2 windows = 82 samples per epoch; 12 steps of 16 samples cross two epoch boundaries.
    kwargs = dict(seq_len=32, seed=3, global_batch=16, micro_batch=2, block_shards=2)
    ranks = [TrainStream(uneven, rank=r, world=2, **kwargs) for r in range(2)]
    single = TrainStream(uneven, rank=0, world=1, **kwargs)
    try:
        per_rank = [take_steps(s, 12) for s in ranks]
        solo = take_steps(single, 12)
    finally:
        for s in [*ranks, single]:
            s.close()
    order = ranks[0].order
    for step in range(12):
        assert [len(per_rank[r][step]) for r in range(2)] == [4, 4]  # equal micro-batches on every rank
        positions = [p for r in range(2) for b in per_rank[r][step] for p in b.positions]
        assert positions == list(range(step * 16, (step + 1) * 16))
        ids = [i for r in range(2) for b in per_rank[r][step] for i in b.sample_ids]
        assert ids == order.samples_at(np.array(positions)).tolist()
        assert [i for b in solo[step] for i in b.sample_ids] == ids  # world size 1: same samples, same order
    # Exactly once per epoch: positions [0, 82) are one epoch, [82, 164) the next.
    used = [i for step in range(12) for r in range(2) for b in per_rank[r][step] for i in b.sample_ids]
    assert sorted(used[:82]) == list(range(82)) and sorted(used[82:164]) == list(range(82))
    assert ranks[0].consumed == ranks[1].consumed == 12 * 16


def test_windows_cut_rows_and_mask_the_row_end_and_padding(uneven):
    rows = all_rows(uneven, "train")
    last = max(rows)
    assert rows[last][1] == 40  # the padded row
    stream = TrainStream(uneven, seq_len=16, seed=0, global_batch=4, micro_batch=4, rank=0, world=1)
    try:
        batches = [b for step in take_steps(stream, 41) for b in step]  # 164 samples = one epoch
    finally:
        stream.close()
    seen = set()
    for b in batches:
        for inputs, targets, sid in zip(b.inputs, b.targets, b.sample_ids):
            row, window = divmod(sid, 4)
            tokens, valid = rows[row]
            assert inputs.tolist() == tokens[window * 16 : window * 16 + 16].tolist()
            for j in range(16):
                nxt = window * 16 + j + 1
                expected = int(tokens[nxt]) if nxt < valid and nxt < 64 else IGNORE_INDEX
                assert targets[j] == expected
            seen.add(sid)
    assert seen == set(range(164))
    # Every token after the first of each row is a target exactly once: 63 per full row, 39 in the padded one.
    total_targets = sum(int((b.targets != IGNORE_INDEX).sum()) for b in batches)
    assert total_targets == 40 * 63 + 39


def test_windows_must_divide_the_row_length():
    assert data.windows_per_row(12288, 1024) == 12
    with pytest.raises(DataError, match="must divide.*e.g. train.seq_len=1024"):
        data.windows_per_row(12288, 1000)
    with pytest.raises(DataError, match="must divide"):
        data.windows_per_row(1024, 2048)


def test_resume_from_saved_state_continues_the_same_batches(uneven):
    kwargs = dict(seq_len=32, seed=5, global_batch=8, micro_batch=2, world=2, block_shards=3)
    full = [TrainStream(uneven, rank=r, **kwargs) for r in range(2)]
    try:
        reference = [take_steps(s, 7) for s in full]
    finally:
        for s in full:
            s.close()
    head = [TrainStream(uneven, rank=r, **kwargs) for r in range(2)]
    try:
        for s in head:
            take_steps(s, 3)
        state = head[0].state()
    finally:
        for s in head:
            s.close()
    assert state["consumed"] == 24 and state["order_fingerprint"] == head[0].order.fingerprint()
    resumed = [TrainStream(uneven, rank=r, consumed=state["consumed"], **kwargs) for r in range(2)]
    try:
        tail = [take_steps(s, 4) for s in resumed]
    finally:
        for s in resumed:
            s.close()
    for r in range(2):
        for a, b in zip([x for st in reference[r][3:] for x in st], [x for st in tail[r] for x in st]):
            assert a.positions == b.positions and a.sample_ids == b.sample_ids
            assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets)


def test_reads_the_same_samples_from_s3(uneven, tmp_path, s3_bucket):
    root = f"{s3_bucket}/data"
    write_dataset(root, {"train": [1, 23, 2, 9, 1, 5], "validation": [3, 4]}, row_len=64, last_valid=40)
    remote = Manifest.load(root)
    assert remote.shards[0].uri.startswith("s3://")
    kwargs = dict(seq_len=64, seed=1, global_batch=4, micro_batch=2, rank=1, world=2)
    streams = [TrainStream(m, **kwargs) for m in (uneven, remote)]
    try:
        local_steps, remote_steps = (take_steps(s, 15) for s in streams)
    finally:
        for s in streams:
            s.close()
    for a, b in zip([x for st in local_steps for x in st], [x for st in remote_steps for x in st]):
        assert a.sample_ids == b.sample_ids and np.array_equal(a.inputs, b.inputs)
    val = ValidationSet(remote, seq_len=64, micro_batch=2, rank=0, world=1, max_samples=100)
    assert val.num_samples == 7 and len(val.batches) == 4


def test_prefetch_reads_ahead_of_training(uneven):
    stream = TrainStream(uneven, seq_len=64, seed=0, global_batch=2, micro_batch=2, rank=0, world=1,
                         block_shards=1, prefetch_micro_batches=3)
    try:
        deadline = time.monotonic() + 30
        while stream.ready() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream.ready() == 3 and len(stream._ahead) == 3  # three micro-batches read, no more
        stream.next_batch()
        assert len(stream._ahead) == 3  # taking one puts the next in flight
    finally:
        stream.close()
    assert not stream.reader.alive()


def test_manifest_and_shard_problems_are_reported(tmp_path, uneven):
    with pytest.raises(DataError, match="no manifest.json"):
        Manifest.load(str(tmp_path))
    raw = json.loads(storage.read_bytes(storage.join(uneven.root, "manifest.json")))
    bad = tmp_path / "future"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({**raw, "format_version": 3}))
    with pytest.raises(DataError, match="format_version 3 is not supported"):
        Manifest.load(str(bad))

    def stream_over(shard_entries, name):
        wrong = tmp_path / name
        wrong.mkdir()
        os.symlink(os.path.join(uneven.root, "shards"), wrong / "shards")
        (wrong / "manifest.json").write_text(json.dumps({**raw, "shards": shard_entries}))
        return TrainStream(Manifest.load(str(wrong)), seq_len=64, seed=0, global_batch=40, micro_batch=40, rank=0,
                           world=1, block_shards=8)

    # An index whose offsets (after the first) point 1 KB too far: into the middle of rows.
    offsets = shards_io.read_index(os.path.join(uneven.root, raw["shards"][1]["index"]), 23)
    shifted = offsets + np.where(np.arange(24) > 0, 1024, 0).astype(np.uint64)
    (tmp_path / "shifted.index.npy").write_bytes(shards_io.npy_bytes(shifted, shards_io.INDEX_DTYPE))
    # A manifest that disagrees with its shards: the error reaches the training loop from the reading threads.
    cases = {"rows": ({"rows": 22}, "row index is uint64\\(24,\\), expected uint64 \\(23,\\)"),
             "index": ({"index": "../shifted.index.npy"}, "the row index says|expected 'train-000000"),
             "v1": ({"rows": 22, "index": None}, "manifest places rows")}
    for name, (change, message) in cases.items():
        shards = [{k: v for k, v in s.items() if k != "first_row"} for s in raw["shards"]]  # only the shards can tell
        shards[1].update(change)
        stream = stream_over(shards, name)
        try:
            with pytest.raises(UserError, match=message):
                stream.next_batch()
        finally:
            stream.close()


def test_validation_spreads_over_the_whole_split_the_same_on_any_world_size(uneven):
    rows = all_rows(uneven, "validation")
    # 7 rows x 2 windows = 14 samples; 5 of them, evenly spread: ids floor(i * 14 / 5)
    expected = [0, 2, 5, 8, 11]
    for micro, world in [(1, 1), (3, 1), (1, 2), (3, 2), (2, 3), (4, 4)]:
        parts = [ValidationSet(uneven, seq_len=32, micro_batch=micro, rank=r, world=world, max_samples=5)
                 for r in range(world)]
        assert [p.num_samples for p in parts] == [5] * world
        passes = -(-(-(-5 // micro)) // world)
        assert [len(p.batches) for p in parts] == [passes] * world  # the same forward passes on every rank
        ids = [i for p in parts for b in p.batches for i in b.sample_ids if i >= 0]
        assert sorted(ids) == expected  # the same samples, each once, whatever the world size
        for p in parts:
            for b in p.batches:
                assert b.inputs.shape == b.targets.shape == (micro, 32) and b.inputs.dtype == np.int64
                for inputs, targets, sid, slot in zip(b.inputs, b.targets, b.sample_ids, b.positions):
                    if sid < 0:  # padding: nothing to predict
                        assert slot == -1 and (targets == IGNORE_INDEX).all()
                        continue
                    assert p.sample_ids[slot] == sid
                    row, window = divmod(sid, 2)
                    assert inputs.tolist() == rows[row][0][window * 32 : window * 32 + 32].tolist()
    # all of a small split; none asked, none run
    assert ValidationSet(uneven, seq_len=32, micro_batch=8, rank=1, world=2, max_samples=100).num_samples == 14
    assert len(ValidationSet(uneven, seq_len=32, micro_batch=2, rank=0, world=2, max_samples=0).batches) == 0


_REDUCE = r"""
import json, os, sys
import numpy as np, torch, torch.distributed as dist
from trainer.data import Manifest, ValidationSet
root, init, rank, world, micro = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
val = ValidationSet(Manifest.load(root), seq_len=32, micro_batch=micro, rank=rank, world=world, max_samples=13)
def value(sid):  # per-sample values of very different magnitudes: a sum that depends on its order
    return [0.0, 0.0] if sid < 0 else [float(np.sin(sid) * 10.0 ** (sid % 9 - 4)), 1.0]
rows = torch.tensor([value(s) for b in val.batches for s in b.sample_ids], dtype=torch.float64)
exact = val.total(rows)
naive = rows.sum(0)  # what a plain per-rank sum + all-reduce gives
dist.all_reduce(naive)
if rank == 0:
    print(json.dumps({"exact": exact, "naive": naive.tolist(), "ids": val.sample_ids.tolist()}))
dist.destroy_process_group()
"""


def test_validation_total_is_exact_and_the_same_on_any_world_size(uneven, tmp_path):
    """World 1 here, world 2 as two gloo processes: the same samples and the same sums to the last bit."""
    import math
    import subprocess
    import sys

    import torch

    init = f"file://{tmp_path}/rendezvous"
    procs = [subprocess.Popen([sys.executable, "-c", _REDUCE, uneven.root, init, str(r), "2", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    val = ValidationSet(uneven, seq_len=32, micro_batch=2, rank=0, world=1, max_samples=13)
    rows = torch.tensor([[float(np.sin(s) * 10.0 ** (s % 9 - 4)), 1.0] if s >= 0 else [0.0, 0.0]
                         for b in val.batches for s in b.sample_ids], dtype=torch.float64)
    single = {"exact": val.total(rows), "naive": rows.sum(0).tolist(), "ids": val.sample_ids.tolist()}
    outs = [p.communicate(timeout=90) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    two = json.loads(outs[0][0].strip().splitlines()[-1])
    truth = math.fsum(float(np.sin(s) * 10.0 ** (s % 9 - 4)) for s in single["ids"])
    assert two["ids"] == single["ids"] and len(single["ids"]) == 13
    assert two["exact"] == single["exact"] == [truth, 13.0]
    # the plain reduction really does depend on the world size here (else this test could not catch it)
    assert two["naive"][0] != single["naive"][0]


def test_sample_record_keeps_the_last_attempt(tmp_path):
    batch = data.Batch(np.zeros((1, 4)), np.zeros((1, 4)), positions=[5], sample_ids=[9])
    for attempt, (rank, steps) in enumerate([(0, [1, 2, 3]), (0, [3, 4])]):
        rec = data.SampleRecord(str(tmp_path), rank=rank, world=1, attempt=attempt)
        for step in steps:
            rec.add(batch)
            rec.end_step(step)
    by_step = data.read_sample_records(str(tmp_path))
    assert sorted(by_step) == [1, 2, 3, 4]
    assert [r["attempt"] for r in by_step[3]] == [1]
    assert by_step[2][0]["samples"] == [9] and by_step[2][0]["positions"] == [5]
