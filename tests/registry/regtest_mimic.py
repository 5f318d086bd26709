"""A small registry written here, to play the registries and CDNs docker-registry is not.

`Mimic` serves ``/v2/``, manifests and blobs from memory over a real socket (HTTP/1.1, keep-alive,
Range with single and multipart/byteranges answers, as Go's ``http.ServeContent`` does), and
lets a test's ``policy(handler, path)`` answer any request its own way first: a redirect to
another `Mimic` playing the storage host, a 401 with a challenge, a multi-range answered with
the first range only, a Content-Type of its choosing. It records every request in ``seen``
and counts the connections its clients have open in ``open_connections``.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Policy = Callable[[BaseHTTPRequestHandler, str], bool]  # True: the policy answered
_BYTES = re.compile(r"(\d*)-(\d*)")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up on purpose in these tests


class Mimic:
    """``blobs``: digest → bytes (any repository); ``manifests``: ``repo:reference`` →
    (bytes, Content-Type). ``bind`` may be ``"::1"`` (then ``host`` is ``[::1]:port``). With
    ``tls`` (a server context) the port speaks HTTPS, and plain HTTP as well."""

    def __init__(
        self,
        policy: Policy | None = None,
        bind: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.policy = policy
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[bytes, str]] = {}
        self.seen: list[dict[str, Any]] = []
        self.connections = 0  # accepted so far
        self.open_connections = 0  # not yet closed by the client (or by the server)
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with owner.lock:
                    owner.connections += 1
                    owner.open_connections += 1

            def finish(self) -> None:
                with owner.lock:
                    owner.open_connections -= 1
                super().finish()

            def _any(self) -> None:
                with owner.lock:
                    owner.seen.append(
                        {"method": self.command, "path": self.path, "headers": dict(self.headers)}
                    )
                path = self.path.split("?", 1)[0]
                if owner.policy is not None and owner.policy(self, path):
                    return
                owner.serve(self, path)

            do_GET = do_HEAD = do_POST = _any

            def log_message(self, *args: object) -> None:
                pass

        class Server(_Server):
            address_family = socket.AF_INET6 if ":" in bind else socket.AF_INET

            def get_request(self) -> tuple[socket.socket, Any]:
                conn, addr = super().get_request()
                # With ``tls``, TLS and plain HTTP on one port: a TLS ClientHello starts 0x16.
                if tls is not None and conn.recv(1, socket.MSG_PEEK) == b"\x16":
                    conn = tls.wrap_socket(conn, server_side=True)
                return conn, addr

        self._server = Server((bind, 0), Handler)
        self.port = self._server.server_address[1]
        self.bind = bind

    @property
    def host(self) -> str:
        return f"[{self.bind}]:{self.port}" if ":" in self.bind else f"{self.bind}:{self.port}"

    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def serve(self, h: BaseHTTPRequestHandler, path: str) -> None:
        """The well-behaved answer to ``path``."""
        if path in ("/v2/", "/v2"):
            send(h, 200, b"{}", content_type="application/json")
            return
        m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", path)
        if m and m[2] == "manifests" and f"{m[1]}:{m[3]}" in self.manifests:
            raw, ctype = self.manifests[f"{m[1]}:{m[3]}"]
            send(h, 200, raw, content_type=ctype, docker_content_digest=digest_of(raw))
            return
        if m and m[2] == "blobs" and m[3] in self.blobs:
            serve_bytes(h, self.blobs[m[3]])
            return
        send(h, 404, b'{"errors":[{"code":"NOT_FOUND","message":"not here"}]}')

    def __enter__(self) -> Mimic:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def send(h: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    """One answer with a Content-Length (headers by keyword: ``content_type=`` …)."""
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k.replace("_", "-").title(), v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def ranges_asked(h: BaseHTTPRequestHandler, size: int) -> list[tuple[int, int]] | None:
    """The request's ``Range`` as [start, end) pairs clipped to ``size`` (None: no Range)."""
    value = h.headers.get("Range")
    if not value or not value.startswith("bytes="):
        return None
    out = []
    for spec in value[6:].split(","):
        m = _BYTES.fullmatch(spec.strip())
        assert m, value
        if m[1] == "":
            out.append((max(0, size - int(m[2])), size))
        else:
            out.append((int(m[1]), min(size, int(m[2]) + 1 if m[2] else size)))
    return out


def serve_bytes(h: BaseHTTPRequestHandler, data: bytes, *, first_only: bool = False) -> None:
    """``data`` as Go's ServeContent answers: 200 without Range, 206 with one range, a
    multipart/byteranges 206 with several (``first_only``: a 206 of the first range only)."""
    asked = ranges_asked(h, len(data))
    if asked is None:
        send(h, 200, data, content_type="application/octet-stream")
        return
    if len(asked) == 1 or first_only:
        lo, hi = asked[0]
        send(h, 206, data[lo:hi], content_range=f"bytes {lo}-{hi - 1}/{len(data)}")
        return
    boundary = "MIMICBOUNDARY"
    body = b""
    for lo, hi in asked:
        body += (
            f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {lo}-{hi - 1}/{len(data)}\r\n\r\n"
        ).encode() + data[lo:hi]
    body += f"\r\n--{boundary}--\r\n".encode()
    send(h, 206, body, content_type=f"multipart/byteranges; boundary={boundary}")
