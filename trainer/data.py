"""The training data stream: deterministic, resumable, equal work on every rank, read ahead from local disk or S3.

Samples. A data row (the manifest's seq_len tokens, 12,288 by default) is cut into `windows_per_row =
row_len / seq_len` windows of the model's context `seq_len` (it must divide). A sample is one (row, window), with
id `row * windows_per_row + window` (row = the row's index in its split). The model reads the window's seq_len
tokens and predicts, at each position, the row's next token; the last position of the last window has no next
token in the row and is masked, as are targets at or beyond the row's `valid_tokens` (padding of a split's last
row). So every token of a row after the first is a target exactly once, whatever the window size.

Order and ranks (trainer/order.py): position -> sample is a pure function of (seed, epoch) with a block-local
shuffle; step s takes the next global_batch_size positions and rank r of W a contiguous slice of them, as equal
micro-batches. Within an epoch every sample is used exactly once across all ranks; nothing is dropped or padded. The
whole loader state is `consumed` (positions used so far), saved with every checkpoint.

Reading (trainer/rows.py). Each rank fetches only the rows of its own positions: the next `prefetch_micro_batches`
micro-batches are always being read (ranged reads through each shard's row index, adjacent rows coalesced, on
`read_threads` threads), so the host memory of the loader is O(read-ahead x micro-batch), whatever the shard size
or world size. Rows stay uint16 until a micro-batch is built; only the batch arrays are int64. Data without row
indexes (format_version 1) is read the old way: each shard of a block whole, keeping this rank's rows of the block.

Validation (ValidationSet): `max_samples` samples spread evenly over the whole validation split, the same ones on
any world size, and an exact, order-free sum over them (`ValidationSet.total`).
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

# Manifest, ShardRef, SampleOrder, read_rows: re-exported (the trainer and tests import the loader's names from here)
from pipeline.manifest import DataError, Manifest, ShardRef  # noqa: F401
from trainer.order import SampleOrder, micro_batch_positions, rank_positions
from trainer.rows import RowReader, Rows, read_rows  # noqa: F401

IGNORE_INDEX = -100  # target value masked out of the loss (torch's cross_entropy default)


def windows_per_row(row_len: int, seq_len: int) -> int:
    """Training windows of seq_len tokens in a data row of row_len (the manifest's seq_len); DataError unless it
    divides it."""
    if seq_len > row_len or row_len % seq_len:
        raise DataError(
            f"train.seq_len={seq_len} must divide the data's row length {row_len} (the manifest's seq_len): "
            f"rows are cut into equal windows. Use e.g. train.seq_len={_divisor_hint(row_len, seq_len)}"
        )
    return row_len // seq_len


def _divisor_hint(n: int, near: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - near))


def window_slice(row_tokens: np.ndarray, valid_tokens: int, window: int, seq_len: int) -> tuple[np.ndarray, int]:
    """(the window's tokens plus the next one, uint16, a view; how many of its targets are real): all a sample
    needs, at 2 bytes per token."""
    lo = window * seq_len
    return row_tokens[lo : lo + seq_len + 1], max(0, min(seq_len, valid_tokens - lo - 1, len(row_tokens) - lo - 1))


def batch_arrays(slices: Sequence[tuple[np.ndarray, int]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 (inputs, targets) of shape (len(slices), seq_len) from window slices: inputs = the window's tokens,
    targets = each one's next token, IGNORE_INDEX where that is past the row or its valid part. An empty slice is
    a padding row: inputs 0, every target masked."""
    inputs = np.zeros((len(slices), seq_len), dtype=np.int64)
    targets = np.full((len(slices), seq_len), IGNORE_INDEX, dtype=np.int64)
    for i, (tokens, n_valid) in enumerate(slices):
        inputs[i, : min(seq_len, len(tokens))] = tokens[:seq_len]
        targets[i, :n_valid] = tokens[1 : n_valid + 1]
    return inputs, targets


@dataclass
class Batch:
    inputs: np.ndarray  # (micro, seq_len) int64
    targets: np.ndarray  # (micro, seq_len) int64, IGNORE_INDEX = masked
    positions: list[int]  # train: stream positions; validation: sample slots (-1 = a padding row)
    sample_ids: list[int]  # -1 = a padding row


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
        prefetch_micro_batches: int = 8,
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
        self.prefetch = max(1, prefetch_micro_batches)
        # indexes of the current block's shards and the next block's
        self.reader = RowReader(self.order.shards, self.row_len, read_threads, f"data-read-rank{rank}",
                                keep_indexes=2 * block_shards)
        self._ahead: deque[tuple[np.ndarray, np.ndarray, list[Future]]] = deque()
        self._submitted = 0  # micro-batches of this rank put in flight
        self._whole: OrderedDict[tuple[int, int], Future] = OrderedDict()  # (epoch, shard) -> rows (no index)
        self._micro_in_step = 0
        self._fill()

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // (self.micro_batch * self.world)

    def state(self) -> dict:
        return {"consumed": self.consumed, "order_fingerprint": self.order.fingerprint(),
                "global_batch": self.global_batch, "samples_per_epoch": self.order.num_samples}

    def io_stats(self) -> dict:
        """Reads issued and bytes fetched by this rank so far (ranged reads, row indexes, whole shards), and the
        samples they were for (consumed and read ahead)."""
        return {"requests": self.reader.requests, "bytes": self.reader.bytes,
                "samples": self._submitted * self.micro_batch}

    def ready(self) -> int:
        """Micro-batches read ahead and ready (all their reads done)."""
        return sum(all(f.done() for f in parts) for _, _, parts in self._ahead)

    def next_batch(self) -> Batch:
        """The next micro-batch of this rank; `consumed` advances by G after the step's last micro-batch."""
        positions, sample_ids, parts = self._ahead.popleft()
        self._fill()
        needed = set((sample_ids // self.windows).tolist())
        rows: Rows = {}
        for f in parts:
            got = f.result()  # a whole-shard read holds more rows than this micro-batch's
            rows.update({r: got[r] for r in needed if r in got})
        slices = [window_slice(*rows[sid // self.windows], sid % self.windows, self.seq_len)
                  for sid in sample_ids.tolist()]
        inputs, targets = batch_arrays(slices, self.seq_len)
        self._micro_in_step += 1
        if self._micro_in_step == self.micro_batches_per_step:
            self._micro_in_step = 0
            self.consumed += self.global_batch
        return Batch(inputs, targets, positions.tolist(), sample_ids.tolist())

    def close(self, timeout: float = 10.0) -> None:
        """Stop reading; a read stuck on storage is abandoned after `timeout` (the threads are daemons)."""
        self._ahead.clear()
        self._whole.clear()
        self.reader.close(timeout)

    def _fill(self) -> None:
        """Put micro-batches in flight until `prefetch` are."""
        while len(self._ahead) < self.prefetch:
            positions = micro_batch_positions(self.start, self._submitted, self.global_batch, self.micro_batch,
                                              self.rank, self.world)
            sample_ids = self.order.samples_at(positions)
            rows = sample_ids // self.windows
            owners = self.reader.shard_of(rows)
            parts: list[Future] = []
            for k in np.unique(owners).tolist():
                if self.reader.indexed(k):
                    parts += self.reader.read(k, rows[owners == k])
                else:  # a micro-batch may straddle two epochs, where the shard is in other blocks
                    epochs, blocks = self.order.locate(positions[owners == k])
                    parts += [self._whole_shard(k, e, b) for e, b in sorted(set(zip(epochs.tolist(), blocks.tolist())))]
            self._ahead.append((positions, sample_ids, parts))
            self._submitted += 1

    def _whole_shard(self, k: int, epoch: int, block: int) -> Future:
        """Rows of shard k (no index) that this rank uses in `epoch`, where the shard is in `block`: the rank's rows
        of the block, read once per epoch; kept for two blocks."""
        key = (epoch, k)
        if key not in self._whole:
            n = self.order.num_samples
            starts, _ = self.order.blocks(epoch)
            mine = rank_positions(epoch * n + int(starts[block]), epoch * n + int(starts[block + 1]), self.start,
                                  self.global_batch, self.rank, self.world)
            self._whole[key] = self.reader.read_whole(k, self.order.samples_at(mine) // self.windows)
            while len(self._whole) > 2 * self.order.block_shards:
                self._whole.popitem(last=False)
        return self._whole[key]


class ValidationSet:
    """`max_samples` validation samples spread evenly over the whole split (sample ids floor(i * available / n),
    i < n), the same on any world size. Micro-batch b holds samples [b*micro, (b+1)*micro) (the last one padded with
    masked rows); rank r runs micro-batches r, r+W, ..., and a rank with none left runs a fully masked one, so every
    rank runs the same number of forward passes. Only this rank's windows are kept, as uint16 (a validation pass
    must never wait on storage); the int64 batches are built when iterated."""

    def __init__(self, manifest: Manifest, seq_len: int, micro_batch: int, rank: int, world: int, max_samples: int,
                 read_threads: int = 4):
        self.seq_len, self.micro_batch = seq_len, micro_batch
        windows = windows_per_row(manifest.seq_len, seq_len)
        shards = manifest.split("validation")
        available = sum(s.rows for s in shards) * windows
        n = self.num_samples = min(available, max_samples)
        self.sample_ids = (np.arange(n, dtype=np.int64) * available) // max(n, 1)
        per_rank = -(-math.ceil(n / micro_batch) // world)  # forward passes per rank
        # this rank's slots (index into sample_ids; -1 = padding), one list per micro-batch
        self._slots = [[s if s < n else -1 for s in range(b * micro_batch, (b + 1) * micro_batch)]
                       for b in range(rank, per_rank * world, world)]
        mine = [self.sample_ids[s] for slots in self._slots for s in slots if s >= 0]
        self._windows: dict[int, tuple[np.ndarray, int]] = {}
        if mine:
            reader = RowReader(shards, manifest.seq_len, read_threads, f"validation-read-rank{rank}")
            try:
                rows = reader.read_all(sid // windows for sid in mine)
            finally:
                reader.close()
            for sid in mine:
                tokens, n_valid = window_slice(*rows[sid // windows], sid % windows, seq_len)
                self._windows[int(sid)] = (tokens.copy(), n_valid)  # a copy: the row itself is not kept

    @property
    def batches(self) -> "ValidationBatches":
        return ValidationBatches(self)

    def batch(self, i: int) -> Batch:
        slots = self._slots[i]
        ids = [int(self.sample_ids[s]) if s >= 0 else -1 for s in slots]
        padding = (np.empty(0, np.uint16), 0)
        inputs, targets = batch_arrays([self._windows[sid] if sid >= 0 else padding for sid in ids], self.seq_len)
        return Batch(inputs, targets, list(slots), ids)

    def total(self, per_sample) -> list[float]:
        """Sums over the whole validation sample of per-sample values, equal to the last bit on any world size.

        `per_sample`: a float tensor (rows, k), one row per row of this rank's batches in order (padding rows
        included, ignored). Each value is put in its sample's slot of a (num_samples, k) zero tensor; an all-reduce
        of those adds only zeros to each value, so it is exact; math.fsum then sums each column correctly rounded,
        whatever the order."""
        import torch
        import torch.distributed as dist

        slots = torch.tensor([s for slots in self._slots for s in slots], dtype=torch.long)
        if per_sample.shape[0] != len(slots):
            raise ValueError(f"{per_sample.shape[0]} per-sample rows for {len(slots)} rows of this rank's batches")
        full = torch.zeros((self.num_samples, per_sample.shape[1]), dtype=torch.float64, device=per_sample.device)
        keep = slots >= 0
        full[slots[keep].to(full.device)] = per_sample[keep.to(per_sample.device)].to(torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(full)
        return [math.fsum(column) for column in full.cpu().T.tolist()]


class ValidationBatches(Sequence):
    """This rank's validation micro-batches, built (int64) when accessed."""

    def __init__(self, val: ValidationSet):
        self._val = val

    def __len__(self) -> int:
        return len(self._val._slots)

    def __getitem__(self, i: int) -> Batch:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self._val.batch(i % len(self))

    def __iter__(self) -> Iterator[Batch]:
        return (self._val.batch(i) for i in range(len(self)))


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
