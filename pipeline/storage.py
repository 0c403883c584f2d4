"""Local paths and s3:// URIs behind one small API (fsspec / s3fs).

S3 endpoint and credentials come from the usual AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, or an instance role), so any S3-compatible store works.

Atomicity: `write_bytes` and `atomic_writer` make an object visible under its final name only when complete.
Locally that is a temporary sibling + os.replace; on S3 a PutObject or a multipart upload only becomes visible
when it completes, so writing the final key directly is already atomic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import uuid
from typing import IO, Callable, Iterator, TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it). For S3 the path is 'bucket/key'."""
    if uri.startswith("s3://"):
        return _s3(), uri[len("s3://") :]
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


_S3_FS = None


def _s3():
    # One instance per process; s3fs reads AWS_ENDPOINT_URL and the usual credential chain itself.
    global _S3_FS
    if _S3_FS is None:
        import s3fs

        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        kwargs = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
        # No listings cache: resume logic must see objects other processes wrote a moment ago.
        _S3_FS = s3fs.S3FileSystem(use_listings_cache=False, **kwargs)
    return _S3_FS


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def retry(fn: Callable[[], T], what: str, attempts: int = 6, base_delay: float = 0.5) -> T:
    """Call fn, retrying transient I/O errors with jittered exponential backoff.

    FileNotFoundError, PermissionError and ValueError are not transient and propagate at once.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, ValueError):
            raise
        except OSError as e:  # botocore/aiohttp errors surface as OSError subclasses through s3fs
            if attempt == attempts - 1:
                raise
            delay = base_delay * (2**attempt) * (0.5 + random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__, e, attempt + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return retry(lambda: fs.exists(path), f"exists {uri}")


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return retry(lambda: fs.cat_file(path), f"read {uri}")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically (see module docstring)."""

    def _write():
        with atomic_writer(uri) as f:
            f.write(data)

    retry(_write, f"write {uri}")


@contextlib.contextmanager
def atomic_writer(uri: str) -> Iterator[IO[bytes]]:
    """A binary file handle whose content appears at `uri` only if the block exits without error."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            # Abort the multipart upload so nothing (not even a partial object) becomes visible.
            with contextlib.suppress(Exception):
                f.discard()
            f.closed = True  # discard() leaves the handle open; close() at GC would then fail in s3fs
            raise
        f.close()
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def open_read(uri: str) -> IO[bytes]:
    fs, path = filesystem(uri)
    return retry(lambda: fs.open(path, "rb"), f"open {uri}")


def listdir(uri: str) -> list[str]:
    """Names (not URIs) directly under a folder/prefix, sorted; [] if it does not exist."""
    fs, path = filesystem(uri)
    if not retry(lambda: fs.exists(path), f"exists {uri}"):
        return []
    entries = retry(lambda: fs.ls(path, detail=False), f"list {uri}")
    return sorted(os.path.basename(e.rstrip("/")) for e in entries)


def walk_files(uri: str) -> Iterator[str]:
    """Every file below a folder/prefix as a full URI (absolute path locally), streamed in a deterministic order.

    Local: depth-first, each folder's entries sorted by name (a file and a folder interleave by name); only one
    folder's names are held at a time. S3: key order, paged 1,000 keys at a time through ListObjectsV2, so a flat
    prefix of millions of keys is never held in memory. Names starting with "." (temporaries, markers) are skipped.
    """
    if uri.startswith("s3://"):
        yield from _walk_s3(uri[len("s3://") :])
        return
    fs, path = filesystem(uri)
    if not is_remote(uri):
        yield from _walk_local(os.path.abspath(path))
        return
    for root, dirs, files in fs.walk(path):  # other fsspec stores: their own walk
        dirs.sort()
        for name in sorted(files):
            if not name.startswith("."):
                yield uri.split("://", 1)[0] + "://" + join(root, name)


def _walk_local(path: str) -> Iterator[str]:
    with os.scandir(path) as it:
        entries = sorted((e.name, e.is_dir()) for e in it if not e.name.startswith("."))
    for name, is_dir in entries:
        full = os.path.join(path, name)
        if is_dir:
            yield from _walk_local(full)
        else:
            yield full


def _walk_s3(path: str) -> Iterator[str]:
    fs = _s3()
    bucket, _, prefix = path.strip("/").partition("/")
    prefix = prefix + "/" if prefix else ""
    request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
    while True:
        page = retry(lambda: fs.call_s3("list_objects_v2", **request), f"list s3://{bucket}/{prefix}")
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if not key.endswith("/") and not key.rsplit("/", 1)[-1].startswith("."):
                yield f"s3://{bucket}/{key}"
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


@contextlib.contextmanager
def local_folder(uri: str) -> Iterator[str]:
    """A local folder with the files directly under `uri`: the folder itself, or a temporary copy of an
    s3:// prefix (removed on exit). For loaders that need real paths (safetensors, SentencePiece, DeepSpeed)."""
    if not is_remote(uri):
        if not os.path.isdir(uri):
            raise FileNotFoundError(f"{uri}: no such folder")
        yield uri
        return
    import shutil
    import tempfile

    fs, remote = filesystem(uri)
    names = listdir(uri)
    if not names:
        raise FileNotFoundError(f"{uri}: empty or missing")
    tmp = tempfile.mkdtemp(prefix="jpeglm-")
    try:
        for name in names:
            src = join(remote, name)
            if retry(lambda: fs.isfile(src), f"stat {uri}/{name}"):
                retry(lambda: fs.get_file(src, os.path.join(tmp, name)), f"download {uri}/{name}")
        log.info("copied %s to %s (%d files)", uri, tmp, len(os.listdir(tmp)))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    if retry(lambda: fs.exists(path), f"exists {uri}"):
        retry(lambda: fs.rm(path, recursive=recursive), f"remove {uri}")


def register_webdataset_s3() -> None:
    """Let plain `webdataset.WebDataset("s3://...")` open S3 URLs through fsspec (webdataset 1.0 has no s3:)."""
    # `import webdataset.gopen` would give the gopen *function* (webdataset/__init__ re-exports it).
    from webdataset.gopen import gopen_schemes

    def _gopen_s3(url, mode="rb", bufsize=8192, **kw):
        return open_read(url)

    gopen_schemes.setdefault("s3", _gopen_s3)
