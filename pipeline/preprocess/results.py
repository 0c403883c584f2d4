"""Done records: what each task reports when its outputs are complete, and how the driver finds them again.

A task's done record is small metadata (counts, offsets; never image data). The task writes it last, as
FOLDER/NNNNNN.json: its presence means the task's outputs are complete. The driver folds every RESULT_CHUNK
consecutive records into FOLDER/chunk-NNNNNN.json as soon as all of them are done, so a resume costs one listing
of FOLDER, the chunk files (n / RESULT_CHUNK reads) and the few records not folded yet (the tasks that were in
flight, at most about one chunk plus --max-in-flight), not one read per task: 23k units resume in ~100 reads.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Callable, Iterator

from pipeline import storage
from pipeline.preprocess.config import canonical_json

RESULT_CHUNK = 256
_RECORD = re.compile(r"(\d{6,})\.json")


def record_path(folder: str, index: int) -> str:
    return storage.join(folder, f"{index:06d}.json")


def chunk_path(folder: str, first: int) -> str:
    return storage.join(folder, f"chunk-{first:06d}.json")


def write_record(folder: str, index: int, record: dict) -> None:
    """Called by a task once everything else it writes is complete."""
    storage.write_bytes(record_path(folder, index), canonical_json(record))


def retry_counts() -> dict[str, int]:
    """Storage retries by kind in this process since the last call, for the task's done record ("retries"); the
    driver sums them into the summary and warns."""
    return dict(storage.take_retry_counts())


def add_retries(total: Counter, record: dict) -> None:
    total.update(record.get("retries") or {})


class ResultLog:
    """The done records of one phase's tasks 0..n-1, as the driver sees them.

    keep(record) -> what a chunk stores of a record (drop what only on_chunk needs); on_chunk(first, records) runs
    before a chunk is written, with the full records (e.g. to write the bucket index)."""

    def __init__(self, folder: str, n: int, chunk: int = RESULT_CHUNK, keep: Callable[[dict], dict] | None = None,
                 on_chunk: Callable[[int, list[dict]], None] | None = None):
        self.folder, self.n, self.chunk = folder, n, chunk
        self.keep = keep or (lambda r: r)
        self.on_chunk = on_chunk
        self.done = bytearray(n)  # 1 byte per task: 23k units = 23 KB
        self._pending: dict[int, dict] = {}  # done records of chunks not complete yet

    def load(self) -> Iterator[tuple[int, dict]]:
        """(index, record) of every task done before, from one listing of the folder; also folds complete chunks."""
        names = set(storage.listdir(self.folder))
        for first in range(0, self.n, self.chunk):
            if f"chunk-{first:06d}.json" in names:
                records = json.loads(storage.read_bytes(chunk_path(self.folder, first)))["records"]
                for i, record in enumerate(records, first):
                    self.done[i] = 1
                    yield i, record
        for name in sorted(names):
            m = _RECORD.fullmatch(name)
            if m and int(m.group(1)) < self.n and not self.done[int(m.group(1))]:
                i = int(m.group(1))
                record = json.loads(storage.read_bytes(record_path(self.folder, i)))
                self.add(i, record)
                yield i, record

    def add(self, index: int, record: dict) -> None:
        """A finished task's record (returned by the task, or read by load)."""
        self.done[index] = 1
        self._pending[index] = record
        first = index - index % self.chunk
        last = min(first + self.chunk, self.n)
        if all(i in self._pending for i in range(first, last)):
            records = [self._pending.pop(i) for i in range(first, last)]
            if self.on_chunk is not None:
                self.on_chunk(first, records)
            storage.write_bytes(chunk_path(self.folder, first),
                                canonical_json({"first": first, "records": [self.keep(r) for r in records]}))

    def todo(self) -> list[int]:
        return [i for i in range(self.n) if not self.done[i]]
