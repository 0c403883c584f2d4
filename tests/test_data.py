"""trainer/data.py: sample order, rank slicing, windows and masking, resume, S3, validation split.

Datasets here are written in the shard format of schemas/README.md by `write_dataset` (pipeline.shards writer,
hand-made manifest) with random tokens: these tests are about which row goes where, not about what is in it.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from pipeline import storage
from trainer import data
from trainer.data import IGNORE_INDEX, DataError, Manifest, SampleOrder, TrainStream, ValidationSet

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
    assert order.num_samples == 41 * 4
    first, blocks = order.epoch(0)
    assert sorted(first.tolist()) == list(range(order.num_samples))
    again = SampleOrder(uneven.split("train"), windows=4, seed=7, block_shards=2).epoch(0)[0]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, order.epoch(1)[0])
    assert not np.array_equal(first, SampleOrder(uneven.split("train"), 4, seed=8, block_shards=2).epoch(0)[0])
    # Each block holds exactly the samples of its shards, so one block is read from a few shards only.
    for lo, hi, members in blocks:
        rows = {int(s) // 4 for s in first[lo:hi]}
        shard_rows = set()
        for k in members:
            s = order.shards[k]
            shard_rows |= set(range(s.first_row, s.first_row + s.rows))
        assert rows == shard_rows
    # The shuffle really mixes rows within a block (not the identity).
    assert not np.array_equal(first, np.sort(first))


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
    assert val.num_samples == 6


def test_prefetch_reads_ahead_of_training(uneven):
    stream = TrainStream(uneven, seq_len=64, seed=0, global_batch=2, micro_batch=2, rank=0, world=1,
                         block_shards=1, prefetch_blocks=3)
    try:
        deadline = time.monotonic() + 30
        while stream._queue.qsize() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream._queue.qsize() == 3  # three blocks ready before the first batch is asked for
        stream.next_batch()
    finally:
        stream.close()
    assert not stream._thread.is_alive()


def test_manifest_and_shard_problems_are_reported(tmp_path, uneven):
    with pytest.raises(DataError, match="no manifest.json"):
        Manifest.load(str(tmp_path))
    raw = json.loads(storage.read_bytes(storage.join(uneven.root, "manifest.json")))
    bad = tmp_path / "future"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({**raw, "format_version": 2}))
    with pytest.raises(DataError, match="format_version 2 is not supported"):
        Manifest.load(str(bad))
    # A manifest that disagrees with its shards: the error reaches the training loop from the prefetch thread.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    os.symlink(os.path.join(uneven.root, "shards"), wrong / "shards")
    shards = [dict(s) for s in raw["shards"]]
    shards[1]["rows"] = 22
    (wrong / "manifest.json").write_text(json.dumps({**raw, "shards": shards}))
    stream = TrainStream(Manifest.load(str(wrong)), seq_len=64, seed=0, global_batch=40, micro_batch=40, rank=0,
                         world=1, block_shards=8)
    try:
        with pytest.raises(DataError, match="manifest places rows"):
            stream.next_batch()
    finally:
        stream.close()


def test_validation_is_split_evenly_and_in_order(uneven):
    rows = all_rows(uneven, "validation")
    # 7 rows x 2 windows = 14 samples; capped at 13, then truncated to a multiple of 2 ranks x 3 = 12.
    parts = [ValidationSet(uneven, seq_len=32, micro_batch=3, rank=r, world=2, max_samples=13) for r in range(2)]
    assert [p.num_samples for p in parts] == [12, 12]
    assert [len(p.batches) for p in parts] == [2, 2]
    ids = sorted(i for p in parts for b in p.batches for i in b.sample_ids)
    assert ids == list(range(12))
    for p in parts:
        for b in p.batches:
            for inputs, sid in zip(b.inputs, b.sample_ids):
                row, window = divmod(sid, 2)
                assert inputs.tolist() == rows[row][0][window * 32 : window * 32 + 32].tolist()
    assert ValidationSet(uneven, seq_len=32, micro_batch=8, rank=0, world=2, max_samples=14).num_samples == 0


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
