"""Local paths and s3:// URIs behind one small API (fsspec / s3fs; whole-object S3 GETs through pipeline/s3get.py).

S3 endpoint and credentials come from the usual AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, or an instance role), so any S3-compatible store works. Every public
function taking a path accepts a str or an os.PathLike.

Atomicity: `write_bytes` and `atomic_writer` make an object visible under its final name only when complete.
Locally that is a temporary sibling + os.replace; on S3 a PutObject or a multipart upload only becomes visible
when it completes, so writing the final key directly is already atomic.

Retries: one layer, ours, so that every retry is counted. botocore's and s3fs's own retry loops are switched off
(they retry 503 SlowDown silently); each S3 request is retried here on throttling (503 SlowDown, 429), server
errors (500/502/503/504), timeouts and dropped connections, with jittered exponential backoff, and a whole
operation (`retry`) is retried on the same errors raised outside a request (a connection reset mid-body, a flaky
NFS read). Permanent errors (missing, exists, not a directory, permission, bad value, any other 4xx) are never
retried. `take_retry_counts()` returns the retries of this process by kind since its last call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import random
import threading
import time
import uuid
from typing import IO, Callable, Iterator, TypeVar, Union

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")
PathLike = Union[str, "os.PathLike[str]"]

# Per S3 request (inside s3fs): attempts and backoff. 10 attempts wait up to ~40 s in all: an S3 prefix being
# re-partitioned answers SlowDown for seconds, not minutes.
S3_ATTEMPTS = 10
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 10.0
# Concurrent connections per process: a unit reads sources.READ_WINDOW images at once, plus uploads.
S3_MAX_POOL_CONNECTIONS = 64


def _fspath(uri: PathLike) -> str:
    return os.fspath(uri)


def is_remote(uri: PathLike) -> bool:
    uri = _fspath(uri)
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it). For S3 the path is 'bucket/key'."""
    uri = _fspath(uri)
    if uri.startswith("s3://"):
        return _s3(), uri[len("s3://") :]
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


_S3_FS = None


def _s3():
    # One instance per process; s3fs reads the usual credential chain itself.
    global _S3_FS
    if _S3_FS is None:
        endpoint = _s3_endpoint()
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        # No listings cache: resume logic must see objects other processes wrote a moment ago.
        # total_max_attempts=1 (and retries=1 in the class): botocore and s3fs try once; _call_s3 retries and counts.
        _S3_FS = _counting_s3_class()(
            use_listings_cache=False, client_kwargs=client_kwargs,
            config_kwargs={"retries": {"total_max_attempts": 1}, "max_pool_connections": S3_MAX_POOL_CONNECTIONS})
    return _S3_FS


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")


def reset_s3() -> None:
    """Forget this process's S3 clients, so the next call reads AWS_ENDPOINT_URL again (benchmarks and tests that
    put a proxy in front of the store)."""
    global _S3_FS, _S3_GETTER
    _S3_FS = _S3_GETTER = None


_S3_GETTER = None
_S3_GETTER_LOCK = threading.Lock()


def _s3_getter():
    """The process's GET client (pipeline/s3get.py: ~1/4 of s3fs's CPU per GET), or None where it cannot be used
    (an HTTP proxy in the environment): then s3fs GETs."""
    global _S3_GETTER
    from pipeline import s3get

    if not s3get.usable():
        return None
    with _S3_GETTER_LOCK:
        if _S3_GETTER is None:
            _S3_GETTER = s3get.S3Getter(_s3_endpoint(), S3_MAX_POOL_CONNECTIONS)
        return _S3_GETTER


_S3_CLASS = None


def _counting_s3_class():
    """s3fs.S3FileSystem whose every request is retried (and counted) by us; defined lazily (importing s3fs
    costs ~0.3 s)."""
    global _S3_CLASS
    if _S3_CLASS is None:
        import s3fs
        from fsspec.asyn import sync_wrapper

        class CountingS3FileSystem(s3fs.S3FileSystem):
            retries = 1  # s3fs's own loop (_error_wrapper): one try

            async def _call_s3(self, method, *akwarglist, **kwargs):
                for attempt in range(S3_ATTEMPTS):
                    try:
                        return await super()._call_s3(method, *akwarglist, **kwargs)
                    except Exception as e:  # noqa: BLE001 - classified below, re-raised unless transient
                        kind = transient_kind(e)
                        if kind is None:
                            raise
                        what = f"S3 {getattr(method, '__name__', method)} {kwargs.get('Bucket', '')}/{kwargs.get('Key', '')}"
                        if attempt == S3_ATTEMPTS - 1:
                            _mark_exhausted(e)
                            raise
                        delay = _backoff(attempt)
                        _note_retry(kind, what, e, attempt, delay)
                        await asyncio.sleep(delay)
                raise AssertionError("unreachable")

            # s3fs binds its sync call_s3 to the base class's coroutine: rebind to ours.
            call_s3 = sync_wrapper(_call_s3)

        _S3_CLASS = CountingS3FileSystem
    return _S3_CLASS


def join(base: PathLike, *parts: str) -> str:
    out = _fspath(base).rstrip("/")
    for p in parts:
        out += "/" + _fspath(p).strip("/")
    return out


# ---------------------------------------------------------------------------------------------------------------
# transient vs permanent errors, retries and their counts

PERMANENT_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
                    ValueError)
_THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                             "TooManyRequests", "TooManyRequestsException", "RequestThrottled"})
_SERVER_CODES = frozenset({"InternalError", "ServiceUnavailable", "BadGateway", "GatewayTimeout"})
# Local/NFS errors worth another try; any other errno (ENOSPC, EROFS, ENAMETOOLONG, ...) needs the user.
_TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE, errno.EBUSY,
                               errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE,
                               errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETRESET})
_EXHAUSTED = "_jpeglm_retries_exhausted"


def _http_response(exc: BaseException) -> dict | None:
    """The botocore error response of an S3 error (s3fs puts the ClientError in __cause__), or None."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            return response
    return None


_NETWORK_ERRORS: tuple | None = None


def _network_errors() -> tuple[tuple, tuple, tuple]:
    """(timeout classes, connection classes, TLS classes: never transient) of the HTTP stacks under s3fs and
    pipeline/s3get.py (urllib3), imported on first use."""
    global _NETWORK_ERRORS
    if _NETWORK_ERRORS is None:
        import http.client
        import ssl

        timeouts: list = [TimeoutError]
        connections: list = [ConnectionError, http.client.IncompleteRead]
        never: list = [ssl.SSLCertVerificationError]
        with contextlib.suppress(ImportError):
            import botocore.exceptions as be

            timeouts += [be.ReadTimeoutError, be.ConnectTimeoutError]
            connections += [be.HTTPClientError, be.ConnectionError, be.IncompleteReadError]
            never += [be.SSLError]
        with contextlib.suppress(ImportError):
            import urllib3.exceptions as ue

            timeouts += [ue.TimeoutError]  # NewConnectionError is one too (urllib3 2.x)
            connections += [ue.ProtocolError, ue.NewConnectionError, ue.ProxyError]
            never += [ue.SSLError]
        with contextlib.suppress(ImportError):
            import aiohttp

            timeouts += [aiohttp.ServerTimeoutError]
            connections += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
            never += [aiohttp.ClientSSLError]
        _NETWORK_ERRORS = (tuple(timeouts), tuple(connections), tuple(never))
    return _NETWORK_ERRORS


def transient_kind(exc: BaseException, exhausted_too: bool = False) -> str | None:
    """Why an I/O error may go away on its own ("throttled", "server_error", "timeout", "connection",
    "io_error"), or None if retrying cannot help. An S3 request already retried to its limit counts as permanent,
    unless exhausted_too (an enclosing task's retry, much later, names its kind)."""
    if isinstance(exc, PERMANENT_ERRORS) or (getattr(exc, _EXHAUSTED, False) and not exhausted_too):
        return None
    response = _http_response(exc)
    if response is not None:
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(response.get("Error", {}).get("Code", ""))
        if code in _THROTTLE_CODES or status == 429:
            return "throttled"
        if status == 408 or code == "RequestTimeout":
            return "timeout"
        if status >= 500 or code in _SERVER_CODES or code in ("500", "502", "503", "504"):
            return "server_error"
        return None  # any other 4xx: the request itself is wrong
    timeouts, connections, never = _network_errors()
    if isinstance(exc, never):
        return None
    if isinstance(exc, timeouts):
        return "timeout"
    if isinstance(exc, connections):
        return "connection"
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return "io_error"
    return None


def _mark_exhausted(exc: BaseException) -> None:
    # Retried to the limit at the request level: an enclosing `retry` must not multiply the attempts.
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _EXHAUSTED, True)


_RETRY_COUNTS: collections.Counter = collections.Counter()
_RETRY_LOCK = threading.Lock()  # S3 requests retry on s3fs's event-loop thread, reads on a thread pool


def _backoff(attempt: int, base: float = BACKOFF_BASE_S) -> float:
    return min(BACKOFF_CAP_S, base * 2**attempt) * (0.5 + random.random())


def _note_retry(kind: str, what: str, exc: BaseException, attempt: int, delay: float) -> None:
    with _RETRY_LOCK:
        _RETRY_COUNTS[kind] += 1
    # One transient error is routine at scale (counted, summed in the job summary); a third in a row is news.
    level = logging.WARNING if attempt >= 2 else logging.DEBUG
    log.log(level, "%s failed (%s: %s: %s); retry %d in %.1f s", what, kind, type(exc).__name__, exc, attempt + 1, delay)


def take_retry_counts() -> dict[str, int]:
    """Retries by kind ("throttled", "server_error", "timeout", "connection", "io_error") made in this process
    since the previous call, then reset to zero. An encode task calls it at its end for its done record."""
    with _RETRY_LOCK:
        counts = dict(sorted(_RETRY_COUNTS.items()))
        _RETRY_COUNTS.clear()
    return counts


def retry(fn: Callable[[], T], what: str, attempts: int = 6, base_delay: float = 0.5) -> T:
    """Call fn, retrying transient errors (see transient_kind) with jittered exponential backoff; each retry is
    counted. Permanent errors, and S3 requests already retried to their limit, propagate at once."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified, re-raised unless transient
            kind = transient_kind(e)
            if kind is None or attempt == attempts - 1:
                raise
            delay = _backoff(attempt, base_delay)
            _note_retry(kind, what, e, attempt, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------------------
# operations


def exists(uri: PathLike) -> bool:
    fs, path = filesystem(uri)
    return retry(lambda: fs.exists(path), f"exists {uri}")


def read_bytes(uri: PathLike) -> bytes:
    """A whole object or file, in one request on S3 (pipeline/s3get.py; s3fs's cat_file would HEAD it first to
    size it, and costs ~4x the client CPU per GET)."""
    uri = _fspath(uri)
    getter = _s3_getter() if uri.startswith("s3://") else None
    if getter is not None:
        bucket, _, key = uri[len("s3://") :].partition("/")
        return _s3_request(lambda: getter.get(bucket, key), f"S3 GetObject {uri}")
    fs, path = filesystem(uri)
    if uri.startswith("s3://"):
        return retry(lambda: fs.cat_file(path, max_concurrency=1), f"read {uri}")
    return retry(lambda: fs.cat_file(path), f"read {uri}")


def _s3_request(fn: Callable[[], T], what: str) -> T:
    """One S3 request made outside s3fs, retried and counted as CountingS3FileSystem._call_s3 retries s3fs's."""
    try:
        return retry(fn, what, attempts=S3_ATTEMPTS, base_delay=BACKOFF_BASE_S)
    except Exception as e:  # noqa: BLE001 - re-raised; marked so that an enclosing retry() does not multiply
        _mark_exhausted(e)
        raise


def read_range(uri: PathLike, start: int, end: int | None = None) -> bytes:
    """Bytes [start, end) of an object or file in one (ranged) request; a negative start with end None reads the
    last -start bytes (an S3 suffix range: no HEAD). Past the end, the result is shorter."""
    fs, path = filesystem(uri)
    return retry(lambda: fs.cat_file(path, start=start, end=end), f"read {uri} [{start}:{end}]")


def write_bytes(uri: PathLike, data: bytes) -> None:
    """Write a whole object atomically (see module docstring)."""

    def _write():
        with atomic_writer(uri) as f:
            f.write(data)

    retry(_write, f"write {uri}")


def _name_the_path(exc: OSError, uri: str) -> None:
    # A failed write() (ENOSPC) or S3 upload names no file, the temporary's open() names the temporary: say which
    # object it was, so the one-line message (pipeline/environment.py) can name it.
    name = exc.filename
    if name is None or os.path.basename(str(name)).startswith(".") and str(name).endswith(".tmp"):
        exc.filename = uri


@contextlib.contextmanager
def atomic_writer(uri: PathLike) -> Iterator[IO[bytes]]:
    """A binary file handle whose content appears at `uri` only if the block exits without error (an OSError
    raised on the way names `uri` as its filename)."""
    uri = _fspath(uri)
    try:
        with _atomic_writer(uri) as f:
            yield f
    except OSError as e:
        _name_the_path(e, uri)
        raise


@contextlib.contextmanager
def _atomic_writer(uri: str) -> Iterator[IO[bytes]]:
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


def open_read(uri: PathLike) -> IO[bytes]:
    fs, path = filesystem(uri)
    return retry(lambda: fs.open(path, "rb"), f"open {uri}")


def listdir(uri: PathLike) -> list[str]:
    """Names (not URIs) directly under a folder/prefix, sorted; [] if it does not exist."""
    fs, path = filesystem(uri)
    if not retry(lambda: fs.exists(path), f"exists {uri}"):
        return []
    entries = retry(lambda: fs.ls(path, detail=False), f"list {uri}")
    return sorted(os.path.basename(e.rstrip("/")) for e in entries)


def walk_files(uri: PathLike) -> Iterator[str]:
    """Every file below a folder/prefix as a full URI (absolute path locally), streamed in a deterministic order.

    Local: depth-first, each folder's entries sorted by name (a file and a folder interleave by name); only one
    folder's names are held at a time. S3: key order, paged 1,000 keys at a time through ListObjectsV2, so a flat
    prefix of millions of keys is never held in memory. Names starting with "." (temporaries, markers) are skipped.
    """
    uri = _fspath(uri)
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


def folder_problem(path: PathLike) -> str | None:
    """Why a local path cannot be a folder this process creates or writes into (it is a file, lies under a file, or
    its nearest existing parent is read-only), in words that follow the path; None when it can. URIs: None (an S3
    prefix is not probed: least-privilege roles may write a prefix without being allowed to HEAD the bucket)."""
    path = _fspath(path)
    if is_remote(path):
        return None
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return "is a file, not a folder" if existing == path else f"is inside {existing}, which is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written: {existing} is not writable by this user"
    return None


@contextlib.contextmanager
def local_folder(uri: PathLike) -> Iterator[str]:
    """A local folder with the files directly under `uri`: the folder itself, or a temporary copy of an
    s3:// prefix (removed on exit). For loaders that need real paths (safetensors, SentencePiece, DeepSpeed)."""
    uri = _fspath(uri)
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


def remove(uri: PathLike, recursive: bool = False) -> None:
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
