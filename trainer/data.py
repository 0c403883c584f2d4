"""The training data stream: deterministic, resumable, equal work on every rank, prefetched from local disk or S3.

Samples. A data row (the manifest's seq_len tokens, 12,288 by default) is cut into `windows_per_row =
row_len / seq_len` windows of the model's context `seq_len` (it must divide). A sample is one (row, window), with
id `row * windows_per_row + window` (row = the row's index in its split). The model reads the window's seq_len
tokens and predicts, at each position, the row's next token; the last position of the last window has no next
token in the row and is masked, as are targets at or beyond the row's `valid_tokens` (padding of a split's last
row). So every token of a row after the first is a target exactly once, whatever the window size.

Order. For each epoch a permutation is a pure function of (seed, epoch): the train shards are permuted, grouped
into blocks of `block_shards` consecutive shards, and the samples of each block are permuted. Epochs are
concatenated into one endless stream of positions: position p is sample order(p // N)[p % N] (N = samples per
epoch). Nothing is dropped or padded: a step that straddles an epoch boundary takes the end of one epoch and the
start of the next, so within an epoch every sample is used exactly once across all ranks. Reading a block of a few
whole shards sequentially (one GET each on S3) is what keeps I/O cheap; the shuffle is block-local by design.

Steps and ranks. An optimizer step consumes the next G = global_batch_size positions, whatever the world size;
of those, rank r of W takes the contiguous slice [r*G/W, (r+1)*G/W), as G/W/micro consecutive micro-batches. Every
rank therefore does the same number of forward passes (uneven shards cannot deadlock ZeRO-3), and the samples of
a step do not depend on the world size, so a run resumed on another number of processes continues the same order.
The whole loader state is `consumed` (positions used so far), saved with every checkpoint.

Reading. A background thread walks this rank's future positions block by block, reads the block's shards
(concurrently, each sequentially, with retries) keeping only the rows this rank needs, and queues the block's
samples, `prefetch_blocks` blocks ahead of training. Each rank reads every shard of a block but keeps ~1/W of it:
rows are 24 KB and a large-model step takes seconds, so this costs little bandwidth and needs no random access.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from jpeglm.errors import UserError
from pipeline import storage
from pipeline.shards import manifest_format_problem

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
IGNORE_INDEX = -100  # target value masked out of the loss (torch's cross_entropy default)


class DataError(UserError, ValueError):
    """The data (manifest, shards) cannot be used as asked; the message says why."""


@dataclass(frozen=True)
class ShardRef:
    uri: str
    path: str  # as in the manifest, relative to it
    split: str
    rows: int
    first_row: int  # index (within its split) of the shard's first row


@dataclass
class Manifest:
    root: str
    raw: dict
    seq_len: int
    shards: list[ShardRef]

    @classmethod
    def load(cls, uri: str) -> "Manifest":
        """`uri` is a preprocess output folder (local or s3://) or its manifest.json."""
        root = uri[: -len(MANIFEST_NAME)].rstrip("/") if uri.endswith(MANIFEST_NAME) else uri.rstrip("/")
        path = storage.join(root, MANIFEST_NAME)
        try:
            raw = json.loads(storage.read_bytes(path))
        except FileNotFoundError:
            raise DataError(f"no {MANIFEST_NAME} under {root}: not a finished `jpeglm preprocess` output") from None
        problem = manifest_format_problem(raw)
        if problem:
            raise DataError(f"{path}: {problem}")
        if raw.get("token_dtype", "uint16") != "uint16":
            raise DataError(f"{path}: token_dtype {raw.get('token_dtype')!r} is not uint16")
        shards, next_row = [], {}
        for entry in raw["shards"]:
            split = entry["split"]
            first = next_row.get(split, 0)
            if entry.get("first_row", first) != first:
                raise DataError(f"{path}: shard {entry['path']} says first_row {entry['first_row']}, but the shards "
                                f"listed before it hold {first} {split} rows")
            shards.append(ShardRef(storage.join(root, entry["path"]), entry["path"], split, int(entry["rows"]), first))
            next_row[split] = first + int(entry["rows"])
        return cls(root=root, raw=raw, seq_len=int(raw["seq_len"]), shards=shards)

    def split(self, name: str) -> list[ShardRef]:
        return [s for s in self.shards if s.split == name and s.rows > 0]

    @property
    def tokenizer(self) -> dict:
        return self.raw["tokenizer"]

    @property
    def fingerprint(self) -> str:
        """The tokenizer fingerprint: data made with another tokenizer is another language to the model."""
        return self.raw["tokenizer"]["fingerprint"]

    @property
    def tokenizer_uri(self) -> str:
        return storage.join(self.root, self.raw["tokenizer"].get("path", "tokenizer.model"))


def windows_per_row(row_len: int, seq_len: int) -> int:
    if seq_len > row_len or row_len % seq_len:
        raise DataError(
            f"train.seq_len={seq_len} must divide the data's row length {row_len} (the manifest's seq_len): "
            f"rows are cut into equal windows. Use e.g. train.seq_len={_divisor_hint(row_len, seq_len)}"
        )
    return row_len // seq_len


def _divisor_hint(n: int, near: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - near))


def permutation(n: int, *seed_words: int) -> np.ndarray:
    """A permutation of range(n) that depends only on the seed words: argsort of PCG64 raw outputs, whose stream
    NumPy guarantees across versions (Generator.permutation's algorithm may change, which would break resume)."""
    keys = np.random.PCG64(np.random.SeedSequence([int(w) for w in seed_words])).random_raw(n)
    return np.argsort(keys, kind="stable")


class SampleOrder:
    """Position -> sample id for the train split: a pure function of (shards, windows, seed, block size)."""

    def __init__(self, shards: list[ShardRef], windows: int, seed: int, block_shards: int):
        if not shards:
            raise DataError("the data has no train rows")
        self.shards, self.windows, self.seed, self.block_shards = shards, windows, seed, block_shards
        self.num_samples = sum(s.rows for s in shards) * windows
        self._cache: dict[int, tuple[np.ndarray, list[tuple[int, int, list[int]]]]] = {}

    def fingerprint(self) -> str:
        """Changes whenever the same position would map to another sample (other data, window, seed, blocks)."""
        desc = {
            "shards": [(s.path, s.rows) for s in self.shards],
            "windows": self.windows,
            "seed": self.seed,
            "block_shards": self.block_shards,
            "algorithm": 1,
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

    def epoch(self, epoch: int) -> tuple[np.ndarray, list[tuple[int, int, list[int]]]]:
        """(order: sample id of each position of the epoch, blocks: (start, end, shard indices) in positions)."""
        if epoch not in self._cache:
            shard_order = permutation(len(self.shards), self.seed, epoch, 0)
            parts, blocks, start = [], [], 0
            for b, i in enumerate(range(0, len(shard_order), self.block_shards)):
                members = [int(k) for k in shard_order[i : i + self.block_shards]]
                ids = np.concatenate(
                    [
                        np.arange(self.shards[k].first_row * self.windows,
                                  (self.shards[k].first_row + self.shards[k].rows) * self.windows, dtype=np.int64)
                        for k in members
                    ]
                )
                parts.append(ids[permutation(len(ids), self.seed, epoch, 1, b)])
                blocks.append((start, start + len(ids), members))
                start += len(ids)
            if len(self._cache) >= 2:  # current and next epoch
                self._cache.pop(min(self._cache))
            self._cache[epoch] = (np.concatenate(parts), blocks)
        return self._cache[epoch]

    def samples_at(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty(len(positions), dtype=np.int64)
        epochs = positions // self.num_samples
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = self.epoch(int(e))[0][positions[mask] - e * self.num_samples]
        return out


def rank_positions(lo: int, hi: int, start: int, global_batch: int, rank: int, world: int) -> np.ndarray:
    """This rank's positions in [lo, hi), for steps taking global_batch positions each from `start` on."""
    per_rank = global_batch // world
    p = np.arange(max(lo, start), hi, dtype=np.int64)
    slot = (p - start) % global_batch
    return p[(slot >= rank * per_rank) & (slot < (rank + 1) * per_rank)]


def window_arrays(row_tokens: np.ndarray, valid_tokens: int, window: int,
                  seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one window of a row: inputs = row[w*T : (w+1)*T], targets = the next token of each,
    IGNORE_INDEX where that next token is past the row or its valid part."""
    lo = window * seq_len
    inputs = row_tokens[lo : lo + seq_len].astype(np.int64)
    targets = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    nxt = row_tokens[lo + 1 : lo + seq_len + 1].astype(np.int64)
    n_valid = max(0, min(len(nxt), valid_tokens - lo - 1))
    targets[:n_valid] = nxt[:n_valid]
    return inputs, targets


@dataclass
class Batch:
    inputs: np.ndarray  # (micro, seq_len) int64
    targets: np.ndarray  # (micro, seq_len) int64, IGNORE_INDEX = masked
    positions: list[int]
    sample_ids: list[int]


def read_rows(shard: ShardRef, row_len: int, wanted: set[int] | None = None) -> dict[int, tuple[np.ndarray, int]]:
    """{row: (tokens, valid_tokens)} for the wanted rows (default: all) of one shard, read sequentially, checked
    against the manifest; the whole read is retried on transient I/O errors."""
    from pipeline.shards import read_samples

    def _read() -> dict[int, tuple[np.ndarray, int]]:
        out, seen = {}, 0
        for key, tokens, meta in read_samples(shard.uri):
            row = int(meta["row"])
            if not shard.first_row <= row < shard.first_row + shard.rows or meta.get("split") != shard.split:
                raise DataError(
                    f"{shard.uri}: sample {key} is {meta.get('split')} row {row}, but the manifest places rows "
                    f"[{shard.first_row}, {shard.first_row + shard.rows}) of {shard.split} in this shard"
                )
            if tokens.shape != (row_len,) or tokens.dtype != np.uint16:
                raise DataError(f"{shard.uri}: sample {key} has tokens {tokens.dtype}{tokens.shape}, "
                                f"expected uint16 ({row_len},)")
            seen += 1
            if wanted is None or row in wanted:
                out[row] = (tokens, int(meta["valid_tokens"]))
        if seen != shard.rows:
            raise DataError(f"{shard.uri}: {seen} rows, but the manifest says {shard.rows}")
        return out

    return storage.retry(_read, f"read shard {shard.uri}")


class TrainStream:
    """This rank's micro-batches, in order, from position `consumed` on; see the module docstring."""

    def __init__(
        self,
        manifest: Manifest,
        seq_len: int,
        seed: int,
        global_batch: int,
        micro_batch: int,
        rank: int,
        world: int,
        consumed: int = 0,
        block_shards: int = 4,
        prefetch_blocks: int = 2,
        read_threads: int = 4,
    ):
        if global_batch % (micro_batch * world):
            raise DataError(f"global batch {global_batch} is not a multiple of micro batch x world = "
                            f"{micro_batch} x {world}")
        self.row_len = manifest.seq_len
        self.seq_len = seq_len
        self.windows = windows_per_row(self.row_len, seq_len)
        self.order = SampleOrder(manifest.split("train"), self.windows, seed, block_shards)
        self.global_batch, self.micro_batch, self.rank, self.world = global_batch, micro_batch, rank, world
        self.start = consumed
        self.consumed = consumed  # positions of whole steps handed out (the resumable state)
        self._pending: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch_blocks)
        self._stop = threading.Event()
        self._read_threads = read_threads
        self._micro_in_step = 0
        self._thread = threading.Thread(target=self._produce, name=f"data-prefetch-rank{rank}", daemon=True)
        self._thread.start()

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // (self.micro_batch * self.world)

    def state(self) -> dict:
        return {"consumed": self.consumed, "order_fingerprint": self.order.fingerprint(),
                "global_batch": self.global_batch, "samples_per_epoch": self.order.num_samples}

    def next_batch(self) -> Batch:
        """The next micro-batch of this rank; `consumed` advances by G after the step's last micro-batch."""
        while len(self._pending) < self.micro_batch:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            self._pending.extend(item)
        take, self._pending = self._pending[: self.micro_batch], self._pending[self.micro_batch :]
        self._micro_in_step += 1
        if self._micro_in_step == self.micro_batches_per_step:
            self._micro_in_step = 0
            self.consumed += self.global_batch
        return Batch(
            inputs=np.stack([t[2] for t in take]),
            targets=np.stack([t[3] for t in take]),
            positions=[t[0] for t in take],
            sample_ids=[t[1] for t in take],
        )

    def close(self, timeout: float = 10.0) -> None:
        """Stop the prefetch thread; a read stuck on storage is abandoned after `timeout` (the thread is a daemon)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:  # unblock a producer waiting on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            n = self.order.num_samples
            epoch = self.start // n
            with ThreadPoolExecutor(self._read_threads, thread_name_prefix=f"shard-read-rank{self.rank}") as pool:
                while not self._stop.is_set():
                    order, blocks = self.order.epoch(epoch)
                    for lo, hi, members in blocks:
                        positions = rank_positions(epoch * n + lo, epoch * n + hi, self.start, self.global_batch,
                                                   self.rank, self.world)
                        if len(positions) == 0:
                            continue
                        samples = self._read_block(pool, positions, order[positions - epoch * n], members)
                        if not self._put(samples):
                            return
                    epoch += 1
        except BaseException as e:  # noqa: BLE001 - handed to the training loop, which raises it
            self._put(e)

    def _read_block(self, pool, positions, sample_ids, members) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        rows = sample_ids // self.windows
        wanted = set(int(r) for r in rows)
        shards = [self.order.shards[k] for k in members]
        needed = [s for s in shards if any(s.first_row <= r < s.first_row + s.rows for r in wanted)]
        loaded: dict[int, tuple[np.ndarray, int]] = {}
        for part in pool.map(lambda s: read_rows(s, self.row_len, wanted), needed):
            loaded.update(part)
        out = []
        for pos, sid in zip(positions.tolist(), sample_ids.tolist()):
            tokens, valid = loaded[sid // self.windows]
            inputs, targets = window_arrays(tokens, valid, sid % self.windows, self.seq_len)
            out.append((pos, sid, inputs, targets))
        return out


class ValidationSet:
    """The first `max_samples` validation samples (rows x windows, in order), truncated to a multiple of
    world x micro so every rank runs the same number of forward passes; rank r takes every W-th micro-batch.
    Read once, kept in memory (a validation pass must never wait on storage)."""

    def __init__(self, manifest: Manifest, seq_len: int, micro_batch: int, rank: int, world: int, max_samples: int):
        windows = windows_per_row(manifest.seq_len, seq_len)
        shards = manifest.split("validation")
        available = sum(s.rows for s in shards) * windows
        per_round = micro_batch * world
        self.num_samples = min(available, max_samples) // per_round * per_round
        self.batches: list[Batch] = []
        if self.num_samples == 0:
            return
        mine = [i for i in range(self.num_samples) if (i // micro_batch) % world == rank]
        wanted = {i // windows for i in mine}
        loaded: dict[int, tuple[np.ndarray, int]] = {}
        for shard in shards:
            if shard.first_row <= max(wanted) and shard.first_row + shard.rows > min(wanted):
                loaded.update(read_rows(shard, manifest.seq_len, wanted))
        for b in range(0, len(mine), micro_batch):
            ids = mine[b : b + micro_batch]
            arrays = [window_arrays(*loaded[i // windows], i % windows, seq_len) for i in ids]
            self.batches.append(Batch(np.stack([a[0] for a in arrays]), np.stack([a[1] for a in arrays]), ids, ids))


class SampleRecord:
    """What each rank trained on: one JSON line per optimizer step in RUN/samples/rank-NNNNN.jsonl:
    {"attempt", "step", "rank", "world", "positions": [...], "samples": [...]}. A resumed run appends under a new
    attempt number and replays the steps after its checkpoint; the last attempt's lines for a step are the truth."""

    def __init__(self, run_dir: str, rank: int, world: int, attempt: int):
        self.rank, self.world, self.attempt = rank, world, attempt
        self.path = os.path.join(run_dir, "samples", f"rank-{rank:05d}.jsonl")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._positions: list[int] = []
        self._samples: list[int] = []

    def add(self, batch: Batch) -> None:
        self._positions.extend(batch.positions)
        self._samples.extend(batch.sample_ids)

    def end_step(self, step: int) -> None:
        line = {"attempt": self.attempt, "step": step, "rank": self.rank, "world": self.world,
                "positions": self._positions, "samples": self._samples}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        self._positions, self._samples = [], []


def read_sample_records(run_dir: str) -> dict[int, list[dict]]:
    """{step: the lines of the last attempt that ran that step} from every rank's record."""
    by_step: dict[int, list[dict]] = {}
    folder = os.path.join(run_dir, "samples")
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            for line in f:
                rec = json.loads(line)
                by_step.setdefault(rec["step"], []).append(rec)
    out = {}
    for step, recs in by_step.items():
        last = max(r["attempt"] for r in recs)
        out[step] = sorted((r for r in recs if r["attempt"] == last), key=lambda r: r["rank"])
    return out
