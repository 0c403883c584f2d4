"""pipeline/storage.py against local disk and a real S3 API (moto server)."""

from __future__ import annotations

import os

import pytest

from pipeline import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_write_read_list_remove(root):
    storage.write_bytes(storage.join(root, "a/one.bin"), b"1")
    storage.write_bytes(storage.join(root, "a/two.bin"), b"22")
    storage.write_bytes(storage.join(root, "b.bin"), b"333")
    assert storage.read_bytes(storage.join(root, "a/two.bin")) == b"22"
    assert storage.exists(storage.join(root, "b.bin"))
    assert not storage.exists(storage.join(root, "missing.bin"))
    assert storage.listdir(storage.join(root, "a")) == ["one.bin", "two.bin"]
    assert storage.listdir(storage.join(root, "nothing-here")) == []
    walked = list(storage.walk_files(root))
    # sorted by path: folder "a" and file "b.bin" interleave by name, on disk and on S3 alike
    assert [w.rsplit("/", 2)[-2:] for w in walked] == [["a", "one.bin"], ["a", "two.bin"], ["root", "b.bin"]]
    assert all(w.startswith("s3://") == root.startswith("s3://") for w in walked)
    storage.remove(storage.join(root, "a"), recursive=True)
    assert storage.listdir(storage.join(root, "a")) == []


def test_walk_pages_through_large_s3_prefixes(s3_bucket):
    names = [f"many/k{i:05d}.bin" for i in range(1_203)]  # more than one ListObjectsV2 page of 1,000
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = s3_bucket[len("s3://") :]
    for name in names:
        client.put_object(Bucket=bucket, Key=name, Body=b"")
    client.put_object(Bucket=bucket, Key="many/.hidden", Body=b"")
    assert list(storage.walk_files(f"{s3_bucket}/many")) == [f"{s3_bucket}/{n}" for n in names]


def test_local_folder_copies_s3_prefix_and_cleans_up(s3_bucket):
    storage.write_bytes(f"{s3_bucket}/ckpt/config.json", b"{}")
    storage.write_bytes(f"{s3_bucket}/ckpt/model.bin", b"w" * 10)
    with storage.local_folder(f"{s3_bucket}/ckpt") as path:
        assert sorted(os.listdir(path)) == ["config.json", "model.bin"]
        assert open(os.path.join(path, "model.bin"), "rb").read() == b"w" * 10
    assert not os.path.exists(path)
    with pytest.raises(FileNotFoundError):
        with storage.local_folder(f"{s3_bucket}/absent"):
            pass


def test_atomic_writer_leaves_nothing_on_error(root):
    target = storage.join(root, "partial.bin")
    with pytest.raises(RuntimeError):
        with storage.atomic_writer(target) as f:
            f.write(b"x" * 1000)
            raise RuntimeError("killed mid-write")
    assert not storage.exists(target)
    if not storage.is_remote(root):
        assert os.listdir(os.path.dirname(target)) == []  # no temporary left behind


def test_read_missing_raises_file_not_found(root):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "nope"))


def test_retry_recovers_from_transient_errors_and_not_from_missing_files():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("transient")
        return "ok"

    assert storage.retry(flaky, "flaky", base_delay=0.001) == "ok"
    assert len(calls) == 3

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.retry(missing, "missing", base_delay=0.001)
    assert len(calls) == 1


def test_webdataset_reads_s3_urls(s3_bucket, tmp_path):
    import io
    import tarfile

    import webdataset as wds

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key in ("k0", "k1"):
            data = key.encode()
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    url = f"{s3_bucket}/shard-000000.tar"
    storage.write_bytes(url, buf.getvalue())
    storage.register_webdataset_s3()
    keys = [s["__key__"] for s in wds.WebDataset(url, shardshuffle=False)]
    assert keys == ["k0", "k1"]
