"""Loopback servers that misbehave on purpose, in front of a real registry.

- `CuttingProxy`: raw TCP relay that closes the connection after relaying `cut_after` bytes of
  a response, for the first `cuts` connections (or all of them).
- `SilentListener`: accepts TCP connections and never answers (a hung registry).
- `HttpFaultProxy`: HTTP reverse proxy whose `policy(handler)` may answer instead of
  forwarding (5xx, redirects, a 200 to multi-range); it records the headers it saw.
- `BlobFaults`: a policy for `HttpFaultProxy` that breaks blob range GETs on a schedule —
  connection resets, 5xx bursts, truncated bodies, stalls, a slow drip, a wrong
  Content-Range, 200 with the whole blob — or plays a registry that is gone; or answers them
  in ways a client must refuse (`HOSTILE`): gzip-encoded, a body longer than the range, one
  that never ends.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class CuttingProxy:
    def __init__(self, upstream: tuple[str, int], cut_after: int, cuts: int | None = 1) -> None:
        self.upstream = upstream
        self.cut_after = cut_after
        self.cuts_left = cuts  # None: cut every connection
        self.connections = 0
        self.cut_count = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> CuttingProxy:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                cut = self.cuts_left is None or self.cuts_left > 0
                if cut and self.cuts_left is not None:
                    self.cuts_left -= 1
            threading.Thread(target=self._serve, args=(client, cut), daemon=True).start()

    def _serve(self, client: socket.socket, cut: bool) -> None:
        upstream = socket.create_connection(self.upstream)

        def pump_up() -> None:
            try:
                while data := client.recv(65536):
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=pump_up, daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(65536):
                if cut and sent + len(data) >= self.cut_after:
                    client.sendall(data[: max(0, self.cut_after - sent)])
                    with self._lock:
                        self.cut_count += 1
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


class SilentListener:
    """Listens (so connects succeed) but never reads or answers."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self._sock.getsockname()[1]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> SilentListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


Policy = Callable[[BaseHTTPRequestHandler], bool]  # True: the policy answered


class HttpFaultProxy:
    def __init__(
        self, upstream: tuple[str, int], policy: Policy | None = None, bind: str = "127.0.0.1"
    ) -> None:
        self.upstream = upstream
        self.policy = policy
        self.seen: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                owner.seen.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers)}
                )
                if owner.policy is not None and owner.policy(self):
                    return
                owner.forward(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _any

            def log_message(self, *args: object) -> None:
                pass

        self._server = _QuietServer((bind, 0), Handler)
        self.port = self._server.server_address[1]
        self.bind = bind

    @property
    def host(self) -> str:
        return f"{self.bind}:{self.port}"

    def forward(
        self, h: BaseHTTPRequestHandler, extra_headers: dict[str, str] | None = None
    ) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        conn = http.client.HTTPConnection(*self.upstream, timeout=10)
        # Keep Host: the registry builds upload Locations from it (they must name the proxy).
        # Repeated headers (podman sends one Accept per media type) stay repeated.
        extra = extra_headers or {}
        headers = [(k, v) for k, v in h.headers.items() if k not in extra] + list(extra.items())
        resp = _request(conn, h.command, h.path, headers, body)
        data = resp.read()
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                h.send_header(k, v)
        # A HEAD answer carries the length a GET would have (RFC 9110 §9.3.2): clients size
        # the manifest they fetch next from it (containerd's resolver does).
        upstream_length = resp.getheader("Content-Length") if h.command == "HEAD" else None
        h.send_header("Content-Length", upstream_length or str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
        conn.close()

    def __enter__(self) -> HttpFaultProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        stop = getattr(self.policy, "stop", None)
        if stop is not None:
            stop.set()  # wake stalled handlers
        self._server.shutdown()
        self._server.server_close()

    def refuse(self) -> None:
        """Stop listening: new connections are refused (a registry that is gone); requests on
        connections kept alive are answered with a reset when the policy is `BlobFaults`."""
        if isinstance(self.policy, BlobFaults):
            self.policy.gone = "refused"
        self._server.shutdown()
        self._server.server_close()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the faults break connections on purpose


FAULTS = ("reset", "5xx", "truncate", "stall", "drip", "wrong_range", "full200")
# Answers to refuse, not to read: the right Content-Range with Content-Encoding: gzip (the body
# gzipped, as an nginx with `gzip on` would send it); with a Content-Length of 1 GiB (the right
# bytes, then zeros until the client hangs up); with no Content-Length and a body that never
# ends (until the client hangs up). Each counts the body bytes it got to send in `sent`.
HOSTILE = ("gzip", "long_body", "endless_body")
LONG_BODY = 1 << 30


class BlobFaults:
    """Misbehave on blob range GETs (``GET /v2/<repo>/blobs/<digest>`` with ``Range``).

    ``schedule`` is a cycle of fault names (see :data:`FAULTS`) or ``"ok"``: the n-th blob range
    GET gets ``schedule[n % len(schedule)]``. ``gone = "stall"`` makes every request (blob or
    not) hang until the proxy stops — a registry that accepts connections and never answers;
    ``gone = "refused"`` resets every request (see `HttpFaultProxy.refuse`).
    Counts what it did in ``done`` (fault name → number of requests), and the body bytes of
    the :data:`HOSTILE` answers in ``sent`` (fault name → bytes).
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        schedule: tuple[str, ...] = ("ok",),
        drip_bytes_per_sec: int = 1024 * 1024,
    ) -> None:
        self.upstream = upstream
        self.schedule = schedule
        self.drip_rate = drip_bytes_per_sec
        self.gone: str | None = None
        self.stop = threading.Event()
        self.done: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self._n = 0
        self._lock = threading.Lock()

    def _next(self) -> str:
        with self._lock:
            fault = self.schedule[self._n % len(self.schedule)]
            self._n += 1
            self.done[fault] = self.done.get(fault, 0) + 1
        return fault

    def __call__(self, h: BaseHTTPRequestHandler) -> bool:
        if self.gone == "stall":
            self.stop.wait(600)
        if self.gone is not None:
            _reset(h)
            return True
        if h.command != "GET" or "/blobs/" not in h.path or "Range" not in h.headers:
            return False
        fault = self._next()
        if fault == "ok":
            return False
        if fault == "reset":
            _reset(h)
        elif fault == "5xx":
            answer(h, 503, b'{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}')
        elif fault == "full200":
            status, headers, body = self._upstream(h, drop_range=True)
            _send(h, status, headers, body)
        else:
            status, headers, body = self._upstream(h)
            if fault == "wrong_range":
                headers, body = _shift_content_range(headers, body)
                _send(h, status, headers, body)
            elif fault == "truncate":
                _send(h, status, headers, body[: len(body) // 2], length=len(body))
                _reset(h)
            elif fault == "stall":
                _send(h, status, headers, body[: len(body) // 3], length=len(body))
                self.stop.wait(600)
                _reset(h)
            elif fault in HOSTILE:
                self._hostile(h, fault, headers, body)
            elif fault == "drip":
                _send(h, status, headers, b"", length=len(body))
                piece = max(1, self.drip_rate // 100)
                for i in range(0, len(body), piece):
                    h.wfile.write(body[i : i + piece])
                    h.wfile.flush()
                    time.sleep(0.01)
            else:
                raise ValueError(f"unknown fault {fault!r}")
        return True

    def _hostile(
        self, h: BaseHTTPRequestHandler, fault: str, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        if fault == "gzip":
            encoded = gzip.compress(body, 1)
            _send(h, 206, [*headers, ("Content-Encoding", "gzip")], encoded)
            self._count(fault, len(encoded))
            return
        h.send_response(206)
        for k, v in headers:
            if k.lower() not in ("transfer-encoding", "connection"):
                h.send_header(k, v)
        if fault == "long_body":
            h.send_header("Content-Length", str(LONG_BODY))
        else:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        sent = 0
        junk = bytes(64 * 1024)
        try:
            h.wfile.write(body)
            sent += len(body)
            while sent < LONG_BODY and not self.stop.is_set():
                h.wfile.write(junk)
                sent += len(junk)
        except OSError:
            pass  # the client hung up: what it should do
        finally:
            self._count(fault, sent)
            _reset(h)

    def _count(self, fault: str, sent: int) -> None:
        with self._lock:
            self.sent[fault] = self.sent.get(fault, 0) + sent

    def _upstream(
        self, h: BaseHTTPRequestHandler, drop_range: bool = False
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        headers = [
            (k, v) for k, v in h.headers.items() if not (drop_range and k.lower() == "range")
        ]
        resp = _request(conn, "GET", h.path, headers, None)
        body = resp.read()
        conn.close()
        return resp.status, resp.getheaders(), body


def _request(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes | None,
) -> http.client.HTTPResponse:
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for k, v in headers:
        if k.lower() != "content-length":
            conn.putheader(k, v)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    return conn.getresponse()


def _send(
    h: BaseHTTPRequestHandler,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    length: int | None = None,
) -> None:
    h.send_response(status)
    for k, v in headers:
        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
            h.send_header(k, v)
    h.send_header("Content-Length", str(len(body) if length is None else length))
    h.end_headers()
    h.wfile.write(body)
    h.wfile.flush()


def _reset(h: BaseHTTPRequestHandler) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), whatever was sent so far."""
    with contextlib.suppress(OSError):
        h.wfile.flush()
    with contextlib.suppress(OSError):
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()
    h.close_connection = True


_RANGE = re.compile(rb"(Content-Range:\s*bytes )(\d+)-(\d+)", re.I)


def _shift_content_range(
    headers: list[tuple[str, str]], body: bytes
) -> tuple[list[tuple[str, str]], bytes]:
    """Claim the answer starts one byte later than it does (first part of a multipart)."""
    out = []
    for k, v in headers:
        if k.lower() == "content-range":
            m = re.match(r"bytes (\d+)-(\d+)/(\S+)", v)
            assert m, v
            v = f"bytes {int(m[1]) + 1}-{int(m[2]) + 1}/{m[3]}"
        out.append((k, v))
    body = _RANGE.sub(lambda m: m[1] + b"%d-%d" % (int(m[2]) + 1, int(m[3]) + 1), body, count=1)
    return out, body


def answer(h: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k.replace("_", "-"), v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)
