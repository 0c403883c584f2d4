"""The shard row index (pipeline/shards.py) and what the loader reads with it (trainer/rows.py, trainer/data.py):
only each rank's rows, local and on S3 (bytes counted by a proxy in front of the moto server), in bounded memory,
and outputs without an index still read the old way."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from pipeline import shards, storage
from pipeline.packing import Row, Span
from trainer.data import Manifest, TrainStream, ValidationSet

from helpers import write_dataset
from jpeglm.devtools.s3proxy import S3Proxy

pytestmark = pytest.mark.timeout(300)

ROW = 12288  # the 7b preset's row: amplification figures depend on the tar overhead per row


def _rows(n: int, row_len: int, first: int = 0) -> list[Row]:
    """Rows with a varying number of image spans, so json members (and rows) differ in size."""
    rng = np.random.default_rng(first)
    out = []
    for i in range(first, first + n):
        cuts = sorted(set(rng.integers(1, row_len, i % 40).tolist()))
        bounds = [0, *cuts, row_len]
        spans = tuple(Span(f"image-{i}-{j}-" + "x" * (j * 7 % 50), a, b, j > 0, j < len(bounds) - 2)
                      for j, (a, b) in enumerate(zip(bounds, bounds[1:])))
        out.append(Row(i, rng.integers(3, 320, row_len).astype(np.uint16), row_len, spans))
    return out


def test_row_index_gives_each_samples_tar_bytes(tmp_path):
    rows = _rows(45, 300, first=100)
    path = tmp_path / "train-000003.tar"
    info = shards.write_shard(path, "train", rows)
    assert info.index == "train-000003.index.npy" and info.rows == 45
    assert sorted(os.listdir(tmp_path)) == ["train-000003.index.npy", "train-000003.tar"]
    offsets = np.load(tmp_path / info.index)
    assert offsets.dtype == np.dtype("<u8") and offsets.shape == (46,)
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    # row i = its two members, headers and padding included: [off[i], off[i+1])
    assert offsets[:-1].tolist() == [m.offset for m in members[::2]]
    last = members[-1]
    assert offsets[-1] == last.offset_data + -(-last.size // 512) * 512
    assert data[offsets[-1]:] == b"\0" * (len(data) - offsets[-1])  # only the end-of-archive blocks follow
    for i in (0, 7, 44):
        with tarfile.open(fileobj=io.BytesIO(data[offsets[i] : offsets[i + 1]])) as one:
            assert one.getnames() == [f"train-{100 + i:09d}.tokens.npy", f"train-{100 + i:09d}.json"]
    got = shards.read_row_range(path, offsets, "train", 100, 3, 41)
    assert [k for k, _, _ in got] == [shards.sample_key("train", 100 + i) for i in range(3, 41)]
    assert all(np.array_equal(t, rows[3 + j].tokens) and m["images"] == [s.to_json() for s in rows[3 + j].spans]
               for j, (_, t, m) in enumerate(got))


def test_row_index_on_s3_is_the_same_and_written_with_the_shard(tmp_path, s3_bucket):
    rows = _rows(12, 200)
    local = shards.write_shard(tmp_path / "validation-000000.tar", "validation", rows)
    remote = shards.write_shard(f"{s3_bucket}/s/validation-000000.tar", "validation", rows)
    assert local == remote
    assert storage.read_bytes(f"{s3_bucket}/s/{remote.index}") == (tmp_path / local.index).read_bytes()
    offsets = shards.read_index(f"{s3_bucket}/s/{remote.index}", 12)
    got = shards.read_row_range(f"{s3_bucket}/s/validation-000000.tar", offsets, "validation", 0, 5, 6)
    assert got[0][0] == "validation-000000005" and np.array_equal(got[0][1], rows[5].tokens)


def test_ranged_reads_check_what_they_parse(tmp_path):
    rows = _rows(6, 200)
    path = tmp_path / "train-000000.tar"
    shards.write_shard(path, "train", rows)
    offsets = shards.read_index(tmp_path / "train-000000.index.npy", 6)
    with pytest.raises(shards.ShardError, match="expected 'train-000000004.tokens.npy'"):
        shards.read_row_range(path, offsets, "train", 1, 3, 4)  # the manifest placed the shard one row off
    with pytest.raises(shards.ShardError, match="expected uint64 \\(6,\\)"):
        shards.read_index(tmp_path / "train-000000.index.npy", 5)
    path.write_bytes(path.read_bytes()[: int(offsets[5]) + 100])  # cut inside row 5
    with pytest.raises(shards.ShardError, match="truncated shard"):
        shards.read_row_range(path, offsets, "train", 0, 4, 6)
    (tmp_path / "train-000000.index.npy").unlink()
    with pytest.raises(shards.ShardError, match="is missing"):
        shards.read_index(tmp_path / "train-000000.index.npy", 6)


def test_a_failed_write_leaves_no_index_and_stale_index_temporaries_are_removed(tmp_path):
    def rows_then_crash():
        yield from _rows(2, 100)
        raise RuntimeError("worker died mid-shard")

    with pytest.raises(RuntimeError):
        shards.write_shard(tmp_path / "train-000000.tar", "train", rows_then_crash())
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".train-000000.index.npy.deadbeef.tmp").write_bytes(b"partial")
    (tmp_path / ".train-000001.index.npy.deadbeef.tmp").write_bytes(b"another shard's, still being written")
    shards.write_shard(tmp_path / "train-000000.tar", "train", _rows(2, 100))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".train-000001.index.npy.deadbeef.tmp",
                                                          "train-000000.index.npy", "train-000000.tar"]


# ---------------------------------------------------------------------------------------------------------------
# what the loader reads


@pytest.fixture(scope="module")
def full_rows(tmp_path_factory) -> dict[str, str]:
    """8 train shards x 48 rows of 12,288 tokens (13 MB), 4 validation rows; with and without row indexes."""
    base = tmp_path_factory.mktemp("full-rows")
    layout = {"train": [48] * 8, "validation": [4]}
    return {"v2": write_dataset(str(base / "v2"), layout, row_len=ROW),
            "v1": write_dataset(str(base / "v1"), layout, row_len=ROW, row_index=False)}


def _epoch(manifest: Manifest, rank: int, world: int, **kwargs) -> tuple[list, dict]:
    """One epoch of this rank (micro-batch 1, 8 samples per step): (sample ids and inputs, io stats once every
    read put in flight has finished)."""
    stream = TrainStream(manifest, seq_len=ROW, seed=5, global_batch=8, micro_batch=1, rank=rank, world=world,
                         block_shards=4, **kwargs)
    try:
        batches = [stream.next_batch() for _ in range(stream.order.num_samples // world)]
        deadline = time.monotonic() + 60
        while stream.ready() < len(stream._ahead) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [(b.sample_ids[0], b.inputs[0, :8].tolist()) for b in batches], stream.io_stats()
    finally:
        stream.close()


def _amplification(stats: dict) -> float:
    """Bytes fetched per byte of the samples fetched (seq_len uint16 tokens each)."""
    return stats["bytes"] / (stats["samples"] * ROW * 2)


def test_each_rank_reads_only_its_rows_and_old_outputs_still_load(full_rows, caplog):
    v2 = Manifest.load(full_rows["v2"])
    with caplog.at_level(logging.WARNING, logger="trainer"):
        v1 = Manifest.load(full_rows["v1"])
    assert [r.getMessage() for r in caplog.records if "no row index" in r.getMessage()] != []
    seen = []
    for rank in range(8):
        samples, stats = _epoch(v2, rank, 8)
        old_samples, old_stats = _epoch(v1, rank, 8)
        assert samples == old_samples  # the same samples, in the same order, with the same tokens
        seen += [s for s, _ in samples]
        assert _amplification(stats) <= 1.25, stats  # 26,624 tar bytes per 24,576-byte row + index reads
        assert _amplification(old_stats) > 8  # every shard of the epoch, whole
        # one ranged read per row (a rank's rows of a shuffled block are rarely adjacent) + 8 index reads
        assert stats["requests"] <= stats["samples"] + 2 * 8
    assert sorted(seen) == list(range(384))
    val = [ValidationSet(m, seq_len=ROW, micro_batch=1, rank=0, world=1, max_samples=3) for m in (v2, v1)]
    assert [b.sample_ids for b in val[0].batches] == [b.sample_ids for b in val[1].batches] == [[0], [1], [2]]
    assert all(np.array_equal(a.inputs, b.inputs) for a, b in zip(val[0].batches, val[1].batches))


def test_on_s3_a_rank_gets_only_its_rows_in_ranged_gets(full_rows, s3_bucket, s3_proxy):
    root = f"{s3_bucket}/data"
    write_dataset(root, {"train": [48] * 8, "validation": [4]}, row_len=ROW)
    local = Manifest.load(full_rows["v2"])
    remote = Manifest.load(root)
    for rank in (0, 5):
        s3_proxy.reset_stats()
        samples, stats = _epoch(remote, rank, 8, read_threads=3)
        assert [s for s, _ in samples] == [s for s, _ in _epoch(local, rank, 8)[0]]
        served = s3_proxy.stats()
        # what the loader counts is what S3 served: one GET per read, no HEAD, no read-ahead of whole blocks
        assert served["by_method"] == {"GET": stats["requests"]}, served
        assert served["response_bytes"] == stats["bytes"]
        assert _amplification(stats) <= 1.25, stats
    s3_proxy.reset_stats()
    val = ValidationSet(remote, seq_len=ROW, micro_batch=1, rank=0, world=1, max_samples=100)
    assert val.num_samples == 4 and s3_proxy.stats()["by_method"] == {"GET": 2}  # the index, then 4 rows in one read


_PEAK_MEMORY = r"""
import json, sys
from trainer.data import Manifest, TrainStream
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
manifest = Manifest.load(sys.argv[1])
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak RSS := current RSS
stream = TrainStream(manifest, seq_len=12288, seed=0, global_batch=1, micro_batch=1, rank=0, world=1, block_shards=4,
                     prefetch_micro_batches=8, read_threads=4)
for _ in range(stream.order.num_samples):
    stream.next_batch()
print(json.dumps({"extra": status("VmHWM") - base, **stream.io_stats()}))
"""


@pytest.mark.slow
def test_loader_memory_is_bounded_by_read_ahead_not_shards(tmp_path):
    """One epoch over 4 shards of 700 rows (18.6 MB each; a block of 74 MB): the loader's peak extra RSS stays a few
    MB. The same data without row indexes (read the old way, a block at a time) holds the block: the measurement
    does see a loader that holds rows."""
    layout = {"train": [700] * 4, "validation": [1]}
    roots = {"v2": write_dataset(str(tmp_path / "v2"), layout, row_len=ROW),
             "v1": write_dataset(str(tmp_path / "v1"), layout, row_len=ROW, row_index=False)}
    extra = {}
    for name, root in roots.items():
        proc = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, root], capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        extra[name] = json.loads(proc.stdout.strip().splitlines()[-1])["extra"]
    print("peak extra RSS (MB):", {k: round(v / 1e6, 1) for k, v in extra.items()})
    block_tokens = 4 * 700 * ROW * 2
    assert extra["v1"] > 0.8 * block_tokens  # the old way holds the rank's rows of the block (uint16)
    assert extra["v2"] < 32 << 20  # 8 micro-batches read ahead, 196 KB each as int64: bounded, whatever the block
