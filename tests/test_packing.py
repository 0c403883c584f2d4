"""pipeline/packing.py and pipeline/shards.py: BOS+tokens+EOS rows, spans, padding, deterministic tar shards."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import packing, shards

BOS, EOS = 1, 2


def _images(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"img-{i}", rng.integers(3, 320, size=n).astype(np.uint16)) for i, n in enumerate(lengths)]


def test_rows_are_the_chunked_stream_of_bos_tokens_eos():
    images = _images([5, 3, 9])
    rows = packing.pack(images, seq_len=8, bos_id=BOS, eos_id=EOS)
    stream = np.concatenate([[BOS, *t, EOS] for _, t in images])  # 7 + 5 + 11 = 23 tokens
    assert len(rows) == 3
    assert all(r.tokens.dtype == np.dtype("<u2") and len(r.tokens) == 8 for r in rows)
    assert [r.valid_tokens for r in rows] == [8, 8, 7]
    assert np.array_equal(np.concatenate([r.tokens[: r.valid_tokens] for r in rows]), stream)
    assert rows[-1].tokens[-1] == EOS  # padding is EOS
    # row 0: img-0 whole [0,7), img-1 starts at 7 and continues
    assert [s.to_json() for s in rows[0].spans] == [
        {"id": "img-0", "start": 0, "end": 7, "bos": True, "eos": True},
        {"id": "img-1", "start": 7, "end": 8, "bos": True, "eos": False},
    ]
    assert [s.to_json() for s in rows[1].spans] == [
        {"id": "img-1", "start": 0, "end": 4, "bos": False, "eos": True},
        {"id": "img-2", "start": 4, "end": 8, "bos": True, "eos": False},
    ]
    assert [s.to_json() for s in rows[2].spans] == [{"id": "img-2", "start": 0, "end": 7, "bos": False, "eos": True}]


def test_an_image_longer_than_a_row_spans_several_rows():
    images = _images([20])
    rows = packing.pack(images, seq_len=8, bos_id=BOS, eos_id=EOS)
    assert [(s.start, s.end, s.bos, s.eos) for r in rows for s in r.spans] == [
        (0, 8, True, False), (0, 8, False, False), (0, 6, False, True)
    ]
    got = packing.image_tokens(((r.tokens, [s.to_json() for s in r.spans]) for r in rows), "img-0")
    assert np.array_equal(got, images[0][1])


def test_count_rows_pad_and_drop():
    assert packing.count_rows(24, 8, "pad") == (3, 0, 0)
    assert packing.count_rows(23, 8, "pad") == (3, 1, 0)
    assert packing.count_rows(23, 8, "drop") == (2, 0, 7)
    assert packing.count_rows(0, 8, "pad") == (0, 0, 0)
    with pytest.raises(ValueError, match="last_row"):
        packing.count_rows(3, 8, "truncate")


def test_drop_policy_leaves_out_only_the_last_partial_row():
    images = _images([5, 3, 9])
    rows = packing.pack(images, seq_len=8, bos_id=BOS, eos_id=EOS, last_row="drop")
    assert len(rows) == 2 and all(r.valid_tokens == 8 for r in rows)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=12), seq_len=st.integers(2, 33),
       split_at=st.integers(0, 100))
def test_any_row_range_equals_the_same_rows_of_the_whole_packing(lengths, seq_len, split_at):
    """What a shard task produces from a slice of the stream is exactly what packing everything would give, and
    every image is recovered from the rows."""
    images = _images(lengths, seed=len(lengths))
    whole = packing.pack(images, seq_len, BOS, EOS)
    refs, offset = [], 0
    for image_id, t in images:
        refs.append(packing.ImageRef(image_id, offset, len(t) + 2))
        offset += len(t) + 2
    stream = np.concatenate([packing.image_sequence(t, BOS, EOS) for _, t in images])
    first = split_at % len(whole)
    n = len(whole) - first
    lo = first * seq_len
    part = list(packing.rows_in_range(stream[lo:], lo, refs, first, n, seq_len, offset, EOS))
    for a, b in zip(part, whole[first:]):
        assert a.index == b.index and a.valid_tokens == b.valid_tokens and a.spans == b.spans
        assert np.array_equal(a.tokens, b.tokens)
    as_json = [(r.tokens, [s.to_json() for s in r.spans]) for r in whole]
    for image_id, t in images:
        assert np.array_equal(packing.image_tokens(as_json, image_id), t)
    assert packing.image_tokens(as_json, "absent") is None


def test_rows_in_range_rejects_a_too_short_slice():
    images = _images([10])
    stream = packing.image_sequence(images[0][1], BOS, EOS)
    refs = [packing.ImageRef("img-0", 0, 12)]
    with pytest.raises(ValueError, match="too short"):
        list(packing.rows_in_range(stream[:5], 0, refs, 0, 2, 8, 12, EOS))


def _shard_bytes(rows, split="train"):
    buf = io.BytesIO()
    shards.write_tar(buf, split, rows)
    return buf.getvalue()


def test_shard_tar_members_and_determinism(tmp_path):
    rows = packing.pack(_images([5, 3, 9]), seq_len=8, bos_id=BOS, eos_id=EOS)
    data = _shard_bytes(rows)
    assert data == _shard_bytes(packing.pack(_images([5, 3, 9]), 8, BOS, EOS))  # same rows, same bytes
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [
            "train-000000000.tokens.npy", "train-000000000.json",
            "train-000000001.tokens.npy", "train-000000001.json",
            "train-000000002.tokens.npy", "train-000000002.json",
        ]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
        meta = json.loads(tar.extractfile("train-000000002.json").read())
        assert meta == {"split": "train", "row": 2, "valid_tokens": 7,
                        "images": [{"id": "img-2", "start": 0, "end": 7, "bos": False, "eos": True}]}
        tokens = np.load(io.BytesIO(tar.extractfile("train-000000002.tokens.npy").read()))
        assert tokens.dtype == np.dtype("<u2") and np.array_equal(tokens, rows[2].tokens)

    info = shards.write_shard(str(tmp_path / "s" / "train-000000.tar"), "train", rows)
    written = (tmp_path / "s" / "train-000000.tar").read_bytes()
    assert written == data and info.bytes == len(data) and info.rows == 3
    import hashlib

    assert info.sha256 == hashlib.sha256(data).hexdigest()
    got = list(shards.read_samples(str(tmp_path / "s" / "train-000000.tar")))
    assert [k for k, _, _ in got] == ["train-000000000", "train-000000001", "train-000000002"]
    assert all(np.array_equal(t, r.tokens) for (_, t, _), r in zip(got, rows))


def test_plain_webdataset_reads_a_shard(tmp_path):
    import webdataset as wds

    rows = packing.pack(_images([30, 4, 17]), seq_len=16, bos_id=BOS, eos_id=EOS)
    path = tmp_path / "train-000000.tar"
    shards.write_shard(str(path), "train", rows)
    samples = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [shards.sample_key("train", r.index) for r in rows]
    for s, r in zip(samples, rows):
        assert isinstance(s["tokens.npy"], np.ndarray) and np.array_equal(s["tokens.npy"], r.tokens)
        assert s["json"]["valid_tokens"] == r.valid_tokens


def test_a_failed_shard_write_leaves_no_shard_and_stale_temporaries_are_removed(tmp_path):
    target = tmp_path / "train-000000.tar"

    def rows_then_crash():
        yield from packing.pack(_images([30]), seq_len=8, bos_id=BOS, eos_id=EOS)[:2]
        raise RuntimeError("worker died mid-shard")

    with pytest.raises(RuntimeError):
        shards.write_shard(str(target), "train", rows_then_crash())
    assert list(tmp_path.iterdir()) == []
    stale = tmp_path / ".train-000000.tar.deadbeef.tmp"  # what a SIGKILLed writer leaves behind
    stale.write_bytes(b"partial")
    shards.write_shard(str(target), "train", packing.pack(_images([3]), 8, BOS, EOS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.index.npy", "train-000000.tar"]
