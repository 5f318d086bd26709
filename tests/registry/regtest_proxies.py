"""Loopback servers that misbehave on purpose, in front of a real registry.

- `CuttingProxy`: raw TCP relay that closes the connection after relaying `cut_after` bytes of
  a response, for the first `cuts` connections (or all of them).
- `SilentListener`: accepts TCP connections and never answers (a hung registry).
- `HttpFaultProxy`: HTTP reverse proxy whose `policy(handler)` may answer instead of
  forwarding (5xx, redirects, a 200 to multi-range); it records the headers it saw.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
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

        self._server = ThreadingHTTPServer((bind, 0), Handler)
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
        headers = dict(h.headers.items())
        headers.update(extra_headers or {})
        conn.request(h.command, h.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
        conn.close()

    def __enter__(self) -> HttpFaultProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def answer(h: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k.replace("_", "-"), v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)
