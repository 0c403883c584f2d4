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


def _client_error(status: int, code: str):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


@pytest.mark.parametrize("error", [
    NotADirectoryError(20, "Not a directory"), FileExistsError(17, "File exists"), IsADirectoryError(21, "dir"),
    PermissionError(13, "denied"), FileNotFoundError(2, "gone"), ValueError("bad"), OSError(28, "No space left"),
    _client_error(403, "AccessDenied"), _client_error(400, "InvalidArgument"), _client_error(404, "NoSuchKey"),
], ids=lambda e: type(e).__name__ + (f"-{e.response['Error']['Code']}" if hasattr(e, "response") else ""))
def test_retry_never_retries_permanent_errors(error):
    storage.take_retry_counts()
    calls = []

    def fail():
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        storage.retry(fail, "permanent", base_delay=0.001)
    assert len(calls) == 1 and storage.take_retry_counts() == {}


@pytest.mark.parametrize("error, kind", [
    (ConnectionResetError(104, "reset"), "connection"), (TimeoutError("timed out"), "timeout"),
    (OSError(5, "Input/output error"), "io_error"), (_client_error(503, "SlowDown"), "throttled"),
    (_client_error(429, "TooManyRequests"), "throttled"), (_client_error(500, "InternalError"), "server_error"),
    (_client_error(503, "503"), "server_error"), (_client_error(408, "RequestTimeout"), "timeout"),
    # urllib3, under pipeline/s3get.py's GETs
    (__import__("urllib3").exceptions.ProtocolError("Connection broken: IncompleteRead"), "connection"),
    (__import__("urllib3").exceptions.ReadTimeoutError(None, "/k", "Read timed out."), "timeout"),
])
def test_retry_counts_transient_errors_by_kind(error, kind):
    storage.take_retry_counts()
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) <= 2:
            raise error
        return "ok"

    assert storage.retry(flaky, "flaky", base_delay=0.001) == "ok"
    assert storage.take_retry_counts() == {kind: 2}
    assert storage.take_retry_counts() == {}  # taken: reset


def test_s3_error_translated_by_s3fs_keeps_its_kind():
    """s3fs turns a ClientError into an OSError whose __cause__ is the ClientError: classified by the cause."""
    from s3fs.errors import translate_boto_error

    assert storage.transient_kind(translate_boto_error(_client_error(503, "SlowDown"))) == "throttled"
    assert storage.transient_kind(translate_boto_error(_client_error(404, "NoSuchKey"))) is None
    assert storage.transient_kind(translate_boto_error(_client_error(400, "InvalidRequest"))) is None


def test_output_below_a_file_fails_at_once(tmp_path):
    """`--output FILE/sub` used to retry NotADirectoryError for 13 s before a traceback."""
    (tmp_path / "file").write_bytes(b"x")
    storage.take_retry_counts()
    with pytest.raises(NotADirectoryError):
        storage.write_bytes(tmp_path / "file" / "sub" / "config.json", b"{}")
    assert storage.take_retry_counts() == {}


def test_every_path_function_accepts_pathlike(tmp_path):
    root = tmp_path / "r"
    storage.write_bytes(root / "a" / "x.bin", b"0123456789")
    with storage.atomic_writer(root / "b.bin") as f:
        f.write(b"b")
    assert storage.read_bytes(root / "a" / "x.bin") == b"0123456789"
    assert storage.read_range(root / "a" / "x.bin", 2, 5) == b"234"
    assert storage.read_range(root / "a" / "x.bin", -3) == b"789"
    assert storage.exists(root / "b.bin") and not storage.is_remote(root)
    assert storage.listdir(root) == ["a", "b.bin"]
    assert list(storage.walk_files(root)) == [str(root / "a" / "x.bin"), str(root / "b.bin")]
    assert storage.join(root, "a") == str(root / "a")
    with storage.open_read(root / "b.bin") as f:
        assert f.read() == b"b"
    with storage.local_folder(root / "a") as folder:
        assert os.listdir(folder) == ["x.bin"]
    storage.remove(root / "a", recursive=True)
    assert storage.listdir(root) == ["b.bin"]


def test_s3_read_is_one_request_and_ranges_need_no_head(s3_bucket, s3_proxy):
    storage.write_bytes(f"{s3_bucket}/obj.bin", bytes(range(256)) * 100)
    s3_proxy.reset_stats()
    assert storage.read_bytes(f"{s3_bucket}/obj.bin") == bytes(range(256)) * 100
    assert storage.read_range(f"{s3_bucket}/obj.bin", 10, 20) == bytes(range(10, 20))
    assert storage.read_range(f"{s3_bucket}/obj.bin", -4) == bytes(range(252, 256))
    assert s3_proxy.stats()["by_method"] == {"GET": 3}


def test_s3_get_of_keys_needing_escapes_and_of_a_missing_bucket(s3_bucket, s3_proxy):
    """read_bytes GETs through pipeline/s3get.py (its own URL quoting and signing): keys with spaces, '+', '%',
    '#', '?', '~', '=' and non-ASCII letters read back exactly, in one GET each; a missing key or bucket is
    FileNotFoundError at once (no retry)."""
    names = ["a b+c.jpg", "100%/x#y?.png", "caf\u00e9/~t=1&u.jpg", "k" * 300]
    for i, name in enumerate(names):
        storage.write_bytes(f"{s3_bucket}/{name}", bytes([i]) * 1000)
    s3_proxy.reset_stats()
    storage.take_retry_counts()
    assert [storage.read_bytes(f"{s3_bucket}/{n}") for n in names] == [bytes([i]) * 1000 for i in range(len(names))]
    for missing in (f"{s3_bucket}/nope.jpg", "s3://no-such-bucket-jpeglm/x.jpg"):
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(missing)
    assert s3_proxy.stats()["by_method"] == {"GET": len(names) + 2}
    assert storage.take_retry_counts() == {}


def test_s3_reads_keep_s3fs_behind_an_http_proxy(s3_bucket, s3_proxy, monkeypatch):
    """urllib3's pool ignores HTTP(S)_PROXY: with one configured, GETs go through s3fs (which honours it; here
    NO_PROXY exempts the loopback endpoint), still one GET per read."""
    storage.write_bytes(f"{s3_bucket}/p.bin", b"via s3fs")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    storage.reset_s3()
    s3_proxy.reset_stats()
    assert storage.read_bytes(f"{s3_bucket}/p.bin") == b"via s3fs"
    assert storage._S3_GETTER is None and s3_proxy.stats()["by_method"] == {"GET": 1}
