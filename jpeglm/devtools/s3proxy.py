"""A loopback HTTP proxy in front of an S3 API (the moto server in tests) that adds latency and throttling.

    with S3Proxy("http://127.0.0.1:5000", delay_s=0.02, fault_fraction=0.05) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint   # then storage.reset_s3()
        ...
        proxy.stats()   # requests, by method, faults, response bytes, in-flight high-water mark

Out of process (so that its work does not share the GIL with what is measured):

    python -m jpeglm.devtools.s3proxy --upstream http://127.0.0.1:5000 [--delay-s 0.02] [--fault-fraction F]
    # prints "endpoint http://127.0.0.1:PORT"; ProxyControl(endpoint) reads stats and changes the settings

Each request waits `delay_s` before it is forwarded (a fixed round trip, as S3 at 20-50 ms per request), and a
`fault_fraction` of requests is answered `503 SlowDown` instead (the body S3 sends when it throttles).
`deny_writes` (a path prefix such as "/bucket/out/_work/encoded/") answers every write (PUT, POST) under it
`403 AccessDenied`, as a bucket policy or a read-only role does. Which
attempts fail is a pure function of (seed, method, path, attempt number of that request), so a run is
reproducible however the requests interleave. TCP_NODELAY on both sides: without it Nagle's algorithm and
delayed ACKs add ~40 ms to a ~70 KB GET. Binds 127.0.0.1 only. HTTP/1.1 with keep-alive, Content-Length or
chunked bodies, and `Expect: 100-continue` (answered by the proxy itself).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import socket
import socketserver
import threading
import time
import urllib.request
from typing import BinaryIO
from urllib.parse import parse_qs, urlsplit

CONTROL_PREFIX = "/_s3proxy/"  # answered by the proxy itself, never counted or forwarded
ACCESS_DENIED_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                      b"<Message>Access Denied</Message></Error>")
SLOW_DOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message></Error>")
_MAX_HEADER_BYTES = 1 << 16


class _Closed(Exception):
    """The peer closed the connection between requests."""


def _read_head(f: BinaryIO) -> tuple[bytes, list[tuple[str, str]], bytes] | None:
    """(start line, headers, raw head bytes) of the next HTTP message, or None at a clean end of stream."""
    raw = bytearray()
    line = f.readline(_MAX_HEADER_BYTES)
    if not line:
        return None
    while line in (b"\r\n", b"\n"):  # tolerate stray blank lines between messages
        line = f.readline(_MAX_HEADER_BYTES)
        if not line:
            return None
    raw += line
    start = line.rstrip(b"\r\n")
    headers = []
    while True:
        line = f.readline(_MAX_HEADER_BYTES)
        if not line:
            raise _Closed("connection closed inside a message head")
        raw += line
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return start, headers, bytes(raw)


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _read_body(f: BinaryIO, headers: list[tuple[str, str]], until_close: bool) -> bytes:
    """The raw body bytes (chunked framing kept as is, so it can be forwarded unchanged)."""
    if (_header(headers, "transfer-encoding") or "").lower().endswith("chunked"):
        out = bytearray()
        while True:
            size_line = f.readline(_MAX_HEADER_BYTES)
            if not size_line:
                raise _Closed("connection closed inside a chunked body")
            out += size_line
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    trailer = f.readline(_MAX_HEADER_BYTES)
                    out += trailer
                    if trailer in (b"\r\n", b"\n", b""):
                        return bytes(out)
            out += f.read(size + 2)
    length = _header(headers, "content-length")
    if length is not None:
        return f.read(int(length))
    return f.read() if until_close else b""


class S3Proxy:
    """See the module docstring. `endpoint` is the URL to give clients; `stats()` and `reset_stats()` read and
    clear the counters; `delay_s` and `fault_fraction` may be changed while it runs."""

    def __init__(self, upstream: str, delay_s: float = 0.0, fault_fraction: float = 0.0, seed: int = 0,
                 deny_writes: str | None = None):
        parts = urlsplit(upstream)
        self.deny_writes = deny_writes
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.delay_s = delay_s
        self.fault_fraction = fault_fraction
        self.seed = seed
        self._lock = threading.Lock()
        self._attempts: collections.Counter = collections.Counter()
        self.reset_stats()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._serve_connection(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> "S3Proxy":
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "S3Proxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- counters --------------------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        with self._lock:
            self._requests: collections.Counter = collections.Counter()
            self._faults = 0
            self._response_bytes = 0
            self._request_bytes = 0
            self._in_flight = 0
            self._max_in_flight = 0

    def stats(self) -> dict:
        """requests (total and by method), faults (503s and 403s sent), response_bytes (bodies sent to clients: bytes read
        from storage), request_bytes (bodies received: bytes written), max_in_flight (most requests between
        arrival and the end of their response at any moment)."""
        with self._lock:
            return {"requests": sum(self._requests.values()), "by_method": dict(sorted(self._requests.items())),
                    "faults": self._faults, "response_bytes": self._response_bytes,
                    "request_bytes": self._request_bytes, "max_in_flight": self._max_in_flight}

    def _control(self, target: str) -> dict:
        """/_s3proxy/stats; /_s3proxy/reset; /_s3proxy/config?delay_s=X&fault_fraction=Y (then the stats)."""
        parts = urlsplit(target)
        action = parts.path[len(CONTROL_PREFIX) :]
        if action == "reset":
            self.reset_stats()
        elif action == "config":
            query = parse_qs(parts.query)
            if "delay_s" in query:
                self.delay_s = float(query["delay_s"][0])
            if "fault_fraction" in query:
                self.fault_fraction = float(query["fault_fraction"][0])
        return {**self.stats(), "delay_s": self.delay_s, "fault_fraction": self.fault_fraction}

    def _fault(self, method: str, target: str) -> bool:
        if self.fault_fraction <= 0:
            return False
        with self._lock:
            self._attempts[(method, target)] += 1
            attempt = self._attempts[(method, target)]
        digest = hashlib.blake2b(f"{self.seed}|{method}|{target}|{attempt}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < self.fault_fraction

    # -- one client connection ---------------------------------------------------------------------------------

    def _serve_connection(self, client: socket.socket) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client_in = client.makefile("rb")
        upstream: socket.socket | None = None
        upstream_in = None
        try:
            while True:
                head = _read_head(client_in)
                if head is None:
                    return
                start, headers, raw_head = head
                method, target = start.decode("latin-1").split(" ")[:2]
                if (_header(headers, "expect") or "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    raw_head = b"".join(line for line in raw_head.splitlines(keepends=True)
                                        if not line.lower().startswith(b"expect:"))
                body = _read_body(client_in, headers, until_close=False)
                if target.startswith(CONTROL_PREFIX):
                    reply = json.dumps(self._control(target)).encode()
                    client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                                   % len(reply) + reply)
                    continue
                with self._lock:
                    self._requests[method] += 1
                    self._request_bytes += len(body)
                    self._in_flight += 1
                    self._max_in_flight = max(self._max_in_flight, self._in_flight)
                try:
                    if self.delay_s > 0:
                        time.sleep(self.delay_s)
                    if self.deny_writes and method in ("PUT", "POST") and target.startswith(self.deny_writes):
                        with self._lock:
                            self._faults += 1
                        client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\n"
                                       b"Content-Length: %d\r\n\r\n" % len(ACCESS_DENIED_BODY) + ACCESS_DENIED_BODY)
                        continue
                    if self._fault(method, target):
                        with self._lock:
                            self._faults += 1
                        response = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                    b"Content-Length: %d\r\n\r\n" % len(SLOW_DOWN_BODY))
                        client.sendall(response if method == "HEAD" else response + SLOW_DOWN_BODY)
                        continue
                    if upstream is None:
                        upstream = socket.create_connection(self.upstream)
                        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        upstream_in = upstream.makefile("rb")
                    upstream.sendall(raw_head + body)
                    reusable = self._relay_response(upstream_in, client, method)
                finally:
                    with self._lock:
                        self._in_flight -= 1
                if not reusable:
                    upstream_in.close()
                    upstream.close()
                    upstream = upstream_in = None
        except (_Closed, ConnectionError, OSError):
            return  # a client or the server went away: drop this connection, as a real endpoint would
        finally:
            if upstream is not None:
                upstream.close()
            client_in.close()

    def _relay_response(self, upstream_in: BinaryIO, client: socket.socket, method: str) -> bool:
        """Forward one response (after any 1xx); True if the upstream connection can serve another request.

        When the upstream closes after each response (moto's server does), the client's connection still stays
        open, as S3 keeps it: the proxy reconnects upstream instead, so the client does not pay a TCP connect per
        request that it would not pay against S3. Only a body delimited by closing closes the client's too."""
        while True:
            head = _read_head(upstream_in)
            if head is None:
                raise _Closed("upstream closed before answering")
            status_line, headers, raw_head = head
            status = int(status_line.split(b" ")[1])
            if status >= 200:
                break
            client.sendall(raw_head)  # an interim 1xx from upstream
        no_body = method == "HEAD" or status in (204, 304)
        delimited = no_body or _header(headers, "content-length") is not None or \
            "chunked" in (_header(headers, "transfer-encoding") or "").lower()
        upstream_closes = (_header(headers, "connection") or "").lower() == "close" or \
            status_line.startswith(b"HTTP/1.0")
        body = b"" if no_body else _read_body(upstream_in, headers, until_close=True)
        with self._lock:
            self._response_bytes += len(body)
        if not delimited:
            client.sendall(raw_head + body)
            raise _Closed("the body ended with the connection")
        if upstream_closes:  # keep the client's connection: drop the header, reconnect upstream next time
            raw_head = b"".join(line for line in raw_head.splitlines(keepends=True)
                                if not line.lower().startswith(b"connection:"))
        client.sendall(raw_head + body)
        return not upstream_closes


class ProxyControl:
    """The counters and settings of a proxy running in another process (see `main`)."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def _call(self, action: str) -> dict:
        with urllib.request.urlopen(self.endpoint + CONTROL_PREFIX + action, timeout=30) as r:
            return json.loads(r.read())

    def stats(self) -> dict:
        return self._call("stats")

    def reset_stats(self) -> dict:
        return self._call("reset")

    def configure(self, delay_s: float | None = None, fault_fraction: float | None = None) -> dict:
        query = "&".join(f"{k}={v}" for k, v in (("delay_s", delay_s), ("fault_fraction", fault_fraction))
                         if v is not None)
        return self._call(f"config?{query}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Loopback S3 delay/fault proxy (see the module docstring).")
    parser.add_argument("--upstream", required=True, help="the S3 endpoint to forward to, e.g. http://127.0.0.1:5000")
    parser.add_argument("--delay-s", type=float, default=0.0, help="added per request (default 0)")
    parser.add_argument("--fault-fraction", type=float, default=0.0, help="requests answered 503 SlowDown")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    proxy = S3Proxy(args.upstream, args.delay_s, args.fault_fraction, args.seed)
    print(f"endpoint {proxy.endpoint}", flush=True)
    try:
        proxy._server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
