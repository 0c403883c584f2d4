"""Builders shared by several test modules: input containers (tar, Parquet) and preprocess-like datasets."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.packing import Row
from pipeline.shards import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION, shard_name, write_shard

EOS = 2


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A plain tar (as img2dataset / WebDataset write them) with the given (member name, bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def parquet_bytes(table: pa.Table, row_group_size: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def write_dataset(root: str, shard_rows: dict[str, list[int]], row_len: int, seed: int = 0,
                  last_valid: int | None = None, fingerprint: str = "f" * 64, rows_source=None,
                  row_index: bool = True) -> str:
    """A preprocess-like output: shards of the given row counts per split, manifest.json last.

    Rows hold random tokens (or rows_source(split, index) -> (tokens, valid_tokens)); the last train row has
    `last_valid` valid tokens and EOS padding when given. row_index=False writes what an older jpeglm wrote:
    format_version 1, no row index files and no "index" in the manifest."""
    rng = np.random.default_rng(seed)
    entries, totals = [], {}
    for split, counts in shard_rows.items():
        total_rows = sum(counts)
        first = 0
        for k, n in enumerate(counts):
            padding = [0]

            def rows(first=first, n=n, padding=padding):  # streamed: a 1 GB shard is never held
                for index in range(first, first + n):
                    if rows_source is not None:
                        tokens, valid = rows_source(split, index)
                    else:
                        tokens = rng.integers(3, 320, row_len).astype(np.uint16)
                        valid = row_len
                        if split == "train" and index == total_rows - 1 and last_valid is not None:
                            valid = last_valid
                            tokens[valid:] = EOS
                    padding[0] += row_len - valid
                    yield Row(index=index, tokens=tokens, valid_tokens=valid, spans=())

            path = f"shards/{shard_name(split, k)}"
            info = write_shard(storage.join(root, path), split, rows())
            entry = {"path": path, "split": split, "first_row": first, "rows": info.rows,
                     "tokens": info.rows * row_len, "padding_tokens": padding[0], "bytes": info.bytes,
                     "sha256": info.sha256}
            if row_index:
                entry["index"] = f"shards/{info.index}"
            else:
                storage.remove(storage.join(root, "shards", info.index))
            entries.append(entry)
            first += n
        totals[split] = {"images": 0, "rows": total_rows, "tokens": total_rows * row_len, "padding_tokens": 0}
    manifest = {
        "format": MANIFEST_FORMAT, "format_version": MANIFEST_FORMAT_VERSION if row_index else 1,
        "seq_len": row_len, "token_dtype": "uint16",
        "tokenizer": {"path": "tokenizer.model", "fingerprint": fingerprint, "vocab_size": 320, "bos_id": 1,
                      "eos_id": EOS},
        "codec": {"size": 256, "quality": 25, "subsampling": "4:2:0", "restart_interval_mcus": 1},
        "config": {}, "shards": entries, "totals": totals, "last_row_policy": "pad",
    }
    storage.write_bytes(storage.join(root, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return root


def write_image_dataset(root: str, images: dict[str, list[tuple[str, bytes]]], tokenizer, seq_len: int = 4096,
                        size: int = 64, quality: int = 25) -> str:
    """A preprocess output of real canonical bodies ({split: [(id, body)]}), tokenized, packed and sharded as
    `jpeglm preprocess` does (pipeline.packing, pipeline.shards), without Ray; manifest.json last."""
    from pipeline import packing

    tokenizer.save(storage.join(root, "tokenizer.model"))
    entries, totals = [], {}
    for split, items in images.items():
        rows = packing.pack([(i, tokenizer.encode(b)) for i, b in items], seq_len, tokenizer.bos_id,
                            tokenizer.eos_id)
        path = f"shards/{shard_name(split, 0)}"
        info = write_shard(storage.join(root, path), split, rows)
        entries.append({"path": path, "split": split, "rows": info.rows, "first_row": 0,
                        "tokens": info.rows * seq_len, "bytes": info.bytes, "sha256": info.sha256,
                        "index": f"shards/{info.index}"})
        totals[split] = {"images": len(items), "rows": len(rows), "tokens": len(rows) * seq_len,
                         "padding_tokens": 0, "dropped_tokens": 0}
    manifest = {
        "format": MANIFEST_FORMAT, "format_version": MANIFEST_FORMAT_VERSION, "seq_len": seq_len, "token_dtype": "uint16",
        "tokenizer": {"path": "tokenizer.model", **tokenizer.metadata()},
        "codec": {"size": size, "quality": quality, "subsampling": "4:2:0", "restart_interval_mcus": 1},
        "config": {}, "shards": entries, "totals": totals, "last_row_policy": "pad",
    }
    storage.write_bytes(storage.join(root, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return root


def load_bench(name: str):
    """bench/NAME.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
