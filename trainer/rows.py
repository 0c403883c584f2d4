"""Fetching rows of a split's shards, local or S3, on a small pool of daemon threads.

Indexed shards (format_version 2): a shard's row index is read once (and kept for the few shards in use), then the
wanted rows are fetched with ranged reads, adjacent rows coalesced into one read of at most MAX_READ_BYTES
(`pipeline.shards.read_row_range`, which checks member names and sizes). Shards without an index (format_version 1)
are read whole and sequentially, keeping only the wanted rows: the old way, W x the bytes at world size W.

Rows stay uint16 as on disk. Reads are futures; a task may wait on a future submitted before it (an index): the
pool is FIFO, so that future is already running or done and this cannot deadlock. Threads are daemons so a read stuck
on storage never keeps a finished process alive.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, Iterable

import numpy as np

from pipeline import shards as shard_io
from pipeline import storage
from pipeline.manifest import DataError, ShardRef

log = logging.getLogger(__name__)

MAX_READ_BYTES = 8 << 20  # one coalesced ranged read at most (bounds memory whatever the run of wanted rows)

Rows = dict[int, tuple[np.ndarray, int]]  # split row -> (tokens uint16, valid_tokens)


class DaemonPool:
    """A FIFO thread pool of daemon threads: submit(fn) -> Future."""

    def __init__(self, threads: int, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable) -> Future:
        future: Future = Future()
        self._queue.put((future, fn))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(e)

    def close(self, timeout: float) -> None:
        """Cancel what has not started; wait up to `timeout` for running reads, then abandon them (daemons)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)


class RowReader:
    """Rows of one split's shards (`shards`, in split row order) for one process, with I/O counters."""

    def __init__(self, shards: list[ShardRef], row_len: int, threads: int, name: str, keep_indexes: int = 8):
        self.shards, self.row_len = shards, row_len
        self._first_rows = np.array([s.first_row for s in shards], dtype=np.int64)
        self._pool = DaemonPool(threads, name)
        self._indexes: OrderedDict[int, Future] = OrderedDict()
        self._keep_indexes = keep_indexes
        self._lock = threading.Lock()
        self.requests = 0  # reads issued (ranged reads, index reads, whole-shard reads)
        self.bytes = 0  # bytes those reads returned
        row_bytes = 2 * row_len + 2048  # ~ a row's tar bytes (tokens + 128-byte npy header, json, two headers)
        self._max_run_rows = max(1, MAX_READ_BYTES // row_bytes)

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        """Position in `shards` of the shard holding each split row."""
        return np.searchsorted(self._first_rows, rows, side="right") - 1

    def indexed(self, k: int) -> bool:
        return self.shards[k].index_uri is not None

    def read(self, k: int, rows: Iterable[int]) -> list[Future]:
        """Futures of Rows for the given rows of indexed shard k: one ranged read per run of adjacent rows."""
        index = self._index(k)
        wanted = sorted(set(int(r) for r in rows))
        futures, i = [], 0
        while i < len(wanted):
            j = i + 1
            while j < len(wanted) and wanted[j] == wanted[j - 1] + 1 and j - i < self._max_run_rows:
                j += 1
            futures.append(self._pool.submit(lambda a=wanted[i], b=wanted[j - 1] + 1: self._read_run(k, index, a, b)))
            i = j
        return futures

    def read_whole(self, k: int, keep: Iterable[int] | None = None) -> Future:
        """Future of Rows for the `keep` rows (default: all) of shard k, read whole and sequentially (no index)."""
        keep = None if keep is None else set(int(r) for r in keep)
        return self._pool.submit(lambda: self._read_whole(k, keep))

    def read_all(self, rows: Iterable[int]) -> Rows:
        """The given split rows, from whichever shards hold them, concurrently; waits for them."""
        rows = np.unique(np.fromiter(rows, dtype=np.int64))
        owners = self.shard_of(rows)
        futures = []
        for k in np.unique(owners).tolist():
            mine = rows[owners == k]
            futures += self.read(k, mine) if self.indexed(k) else [self.read_whole(k, mine)]
        out: Rows = {}
        for f in futures:
            out.update(f.result())
        return out

    def close(self, timeout: float = 10.0) -> None:
        self._pool.close(timeout)

    def alive(self) -> bool:
        return self._pool.alive()

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += nbytes

    def _index(self, k: int) -> Future:
        """Future of shard k's row index; the last `keep_indexes` are kept (a block's shards, and the next's)."""
        if k not in self._indexes:
            shard = self.shards[k]

            def load() -> np.ndarray:
                offsets = shard_io.read_index(shard.index_uri, shard.rows)
                self._count(offsets.nbytes + 128)  # + the .npy header
                return offsets

            self._indexes[k] = self._pool.submit(load)
            while len(self._indexes) > self._keep_indexes:
                self._indexes.popitem(last=False)
        self._indexes.move_to_end(k)
        return self._indexes[k]

    def _read_run(self, k: int, index: Future, a: int, b: int) -> Rows:
        shard = self.shards[k]
        offsets = index.result()
        lo, hi = a - shard.first_row, b - shard.first_row
        samples = shard_io.read_row_range(shard.uri, offsets, shard.split, shard.first_row, lo, hi)
        self._count(int(offsets[hi]) - int(offsets[lo]))
        return {int(meta["row"]): (self._checked(shard, key, tokens), int(meta["valid_tokens"]))
                for key, tokens, meta in samples}

    def _read_whole(self, k: int, keep: set[int] | None) -> Rows:
        shard = self.shards[k]

        def read() -> Rows:
            out, seen = {}, 0
            for key, tokens, meta in shard_io.read_samples(shard.uri):
                row = int(meta["row"])
                if not shard.first_row <= row < shard.first_row + shard.rows or meta.get("split") != shard.split:
                    raise DataError(
                        f"{shard.uri}: sample {key} is {meta.get('split')} row {row}, but the manifest places rows "
                        f"[{shard.first_row}, {shard.first_row + shard.rows}) of {shard.split} in this shard"
                    )
                tokens = self._checked(shard, key, tokens)
                seen += 1
                if keep is None or row in keep:
                    out[row] = (tokens, int(meta["valid_tokens"]))
            if seen != shard.rows:
                raise DataError(f"{shard.uri}: {seen} rows, but the manifest says {shard.rows}")
            return out

        out = storage.retry(read, f"read shard {shard.uri}")
        self._count(shard.bytes)
        return out

    def _checked(self, shard: ShardRef, key: str, tokens: np.ndarray) -> np.ndarray:
        if tokens.shape != (self.row_len,) or tokens.dtype != np.uint16:
            raise DataError(f"{shard.uri}: sample {key} has tokens {tokens.dtype}{tokens.shape}, "
                            f"expected uint16 ({self.row_len},)")
        return tokens


def read_rows(shard: ShardRef, row_len: int, wanted: set[int] | None = None) -> Rows:
    """{row: (tokens, valid_tokens)} for the wanted rows (default: all) of one shard, checked; blocks until read."""
    reader = RowReader([shard], row_len, threads=1, name="read-rows")
    try:
        if wanted is None:
            wanted = range(shard.first_row, shard.first_row + shard.rows)
        return reader.read_all(wanted)
    finally:
        reader.close()
