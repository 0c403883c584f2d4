"""Builders shared by several test modules: input containers (tar, Parquet) and preprocess-like datasets."""

from __future__ import annotations

import http.client
import io
import json
import socket
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


class S3Proxy(ThreadingHTTPServer):
    """An HTTP proxy on 127.0.0.1 in front of the moto server that counts what clients ask and get: requests per
    method and the body bytes of GET answers (what a real S3 bills as requests and egress). With fail_every=N it
    answers every N-th request with 503 SlowDown, as S3 does under load; delay_s adds latency to every request.
    Use as a context manager; `endpoint` is its URL (set AWS_ENDPOINT_URL to it in a fresh process: s3fs keeps one
    client per process)."""

    daemon_threads = True

    def __init__(self, upstream: str, fail_every: int = 0, delay_s: float = 0.0):
        self.upstream = upstream.removeprefix("http://")
        self.fail_every, self.delay_s, self.count, self.failed = fail_every, delay_s, 0, 0
        self.methods: Counter = Counter()
        self.get_bytes = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _S3ProxyHandler)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "S3Proxy":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _S3ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else Nagle + delayed ACKs add ~40 ms

    def _handle(self):
        server: S3Proxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if server.delay_s:
            time.sleep(server.delay_s)
        with server.lock:
            server.count += 1
            server.methods[self.command] += 1
            fail = bool(server.fail_every) and server.count % server.fail_every == 0
            server.failed += fail
        if fail:
            payload = (b"<?xml version='1.0'?><Error><Code>SlowDown</Code>"
                       b"<Message>Reduce your request rate.</Message></Error>")
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "transfer-encoding")}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if self.command == "GET":
            with server.lock:
                server.get_bytes += len(data)
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                self.send_header(k, v)
        # a HEAD answer has no body but tells the object's size
        length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle
