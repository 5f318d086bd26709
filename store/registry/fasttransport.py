"""An httpx transport that serves plain-HTTP range GETs on raw sockets, big bodies off-loop.

Why: blob range reads are the store's hot path. Through httpcore/h11 every 64 KiB of body is
parsed and copied several times on the event loop, which caps a ranged read at about half of
what curl gets from the same local registry. Here the request is sent and the head read on the
event loop (non-blocking calls, no thread hop for small answers); the head is consumed exactly
(found with MSG_PEEK) so that a large body is received in a worker thread with one
`recv(n, MSG_WAITALL)` straight into a single bytes object: one copy, no per-chunk Python work,
and the event loop (the FUSE loop, in the store) stays free while the kernel copies.

Only `GET` requests with a `Range` header to `http://` URLs take this path; everything else
(TLS, pushes, manifests, auth) goes through httpx's own transport, and auth, redirects,
retries and timeouts stay in `RegistryClient` above it. Errors are raised as the httpx
exceptions the client already maps (ConnectError/Timeout, ReadTimeout, WriteError, ...).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import httpx

T = TypeVar("T")
MAX_HEAD = 64 * 1024
RECEIVE = 1024 * 1024
LOOP_MAX = 1024 * 1024  # bodies up to this size are read on the event loop (no thread hop)
EAGER_MAX = 64 * 1024 * 1024  # 206/error bodies up to this size are read with the head
PIECE = 16 * 1024 * 1024  # other bodies are yielded in pieces of at most this size
MAX_IDLE_PER_HOST = 16


def _timeouts(request: httpx.Request) -> dict[str, float | None]:
    t = request.extensions.get("timeout") or {}
    return {k: t.get(k) for k in ("connect", "read", "write", "pool")}


def _timeval(seconds: float | None) -> bytes:
    if not seconds:
        return struct.pack("ll", 0, 0)
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    return struct.pack("ll", whole, micro if (whole or micro) else 1)


class _NoAnswer(httpx.RemoteProtocolError):
    """The connection failed before any byte of a response (safe to resend a GET)."""


class _Conn:
    """A blocking socket: `*_async` methods run on the event loop (MSG_DONTWAIT), the others
    in a worker thread (blocking, bounded by SO_RCVTIMEO/SO_SNDTIMEO)."""

    def __init__(self, sock: socket.socket, key: tuple[str, int]) -> None:
        self.sock = sock
        self.key = key
        self.buffer = b""  # bytes received beyond the head (only on the slow head path)
        self.lock = threading.Lock()
        self.busy = False  # a worker thread is using the socket
        self.dead = False

    @classmethod
    def connect(cls, key: tuple[str, int], timeout: float | None, request: httpx.Request) -> _Conn:
        try:
            sock = socket.create_connection(key, timeout=timeout)
        except TimeoutError as e:
            raise httpx.ConnectTimeout(
                f"connect to {key[0]}:{key[1]} timed out", request=request
            ) from e
        except OSError as e:
            raise httpx.ConnectError(str(e) or type(e).__name__, request=request) from e
        sock.settimeout(None)  # blocking; timeouts come from SO_RCVTIMEO/SO_SNDTIMEO
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, key)

    def set_timeouts(self, read: float | None, write: float | None) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(read))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(write))

    def _recv(self, n: int, flags: int, request: httpx.Request) -> bytes:
        try:
            return self.sock.recv(n, flags)
        except (BlockingIOError, TimeoutError) as e:
            raise httpx.ReadTimeout("timed out reading the response", request=request) from e
        except OSError as e:
            raise httpx.ReadError(str(e) or type(e).__name__, request=request) from e

    async def _wait(self, readable: bool, timeout: float | None, request: httpx.Request) -> None:
        try:
            with anyio.fail_after(timeout):
                if readable:
                    await anyio.wait_readable(self.sock)
                else:
                    await anyio.wait_writable(self.sock)
        except TimeoutError as e:
            cls = httpx.ReadTimeout if readable else httpx.WriteTimeout
            raise cls("timed out waiting for the registry", request=request) from e

    async def _recv_async(
        self, n: int, flags: int, timeout: float | None, request: httpx.Request
    ) -> bytes:
        """recv without blocking the event loop (MSG_DONTWAIT, then wait for readability)."""
        while True:
            try:
                return self.sock.recv(n, flags | socket.MSG_DONTWAIT)
            except BlockingIOError:
                await self._wait(True, timeout, request)
            except OSError as e:
                raise httpx.ReadError(str(e) or type(e).__name__, request=request) from e

    async def send_head_async(
        self, head: bytes, t: dict[str, float | None], request: httpx.Request
    ) -> None:
        view = memoryview(head)
        while view:
            try:
                view = view[self.sock.send(view, socket.MSG_DONTWAIT) :]
            except BlockingIOError:
                await self._wait(False, t["write"], request)
            except OSError as e:
                raise _NoAnswer(f"send failed: {e}", request=request) from e

    async def read_head_async(self, timeout: float | None, request: httpx.Request) -> bytes:
        """The response head without its blank line, found with MSG_PEEK so the body stays in
        the socket for one recv(MSG_WAITALL); a head split across segments (rare) is consumed
        and the overshoot buffered."""
        peek = await self._recv_async(MAX_HEAD, socket.MSG_PEEK, timeout, request)
        if not peek:
            raise _NoAnswer("server closed the connection without a response", request=request)
        end = peek.find(b"\r\n\r\n")
        if end >= 0:
            return (await self.recv_exact_async(end + 4, timeout, request))[:-4]
        buf = b""
        while True:
            data = await self._recv_async(RECEIVE, 0, timeout, request)
            if not data:
                raise httpx.RemoteProtocolError(
                    "connection closed inside the head", request=request
                )
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                self.buffer = buf[end + 4 :]
                return buf[:end]
            if len(buf) > MAX_HEAD:
                raise httpx.RemoteProtocolError("response head too long", request=request)

    async def recv_exact_async(
        self, n: int, timeout: float | None, request: httpx.Request
    ) -> bytes:
        parts: list[bytes] = []
        got = 0
        if self.buffer:
            parts.append(self.buffer[:n])
            got = len(parts[0])
            self.buffer = self.buffer[n:]
        while got < n:
            data = await self._recv_async(min(n - got, RECEIVE), 0, timeout, request)
            if not data:
                raise httpx.RemoteProtocolError(
                    f"peer closed connection without sending complete message body "
                    f"(received {got} of {n} bytes)",
                    request=request,
                )
            parts.append(data)
            got += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def recv_exact(self, n: int, request: httpx.Request) -> bytes:
        """Exactly n bytes: usually one recv(MSG_WAITALL) straight into the result."""
        parts: list[bytes] = []
        got = 0
        if self.buffer:
            parts.append(self.buffer[:n])
            got = len(parts[0])
            self.buffer = self.buffer[n:]
        while got < n:
            data = self._recv(n - got, socket.MSG_WAITALL, request)
            if not data:
                raise httpx.RemoteProtocolError(
                    f"peer closed connection without sending complete message body "
                    f"(received {got} of {n} bytes)",
                    request=request,
                )
            parts.append(data)
            got += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readline(self, request: httpx.Request) -> bytes:
        while b"\r\n" not in self.buffer:
            data = self._recv(RECEIVE, 0, request)
            if not data:
                raise httpx.RemoteProtocolError(
                    "connection closed inside chunked body", request=request
                )
            self.buffer += data
            if len(self.buffer) > MAX_HEAD and b"\r\n" not in self.buffer:
                raise httpx.RemoteProtocolError("chunk header too long", request=request)
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def read_chunked(self, request: httpx.Request) -> bytes:
        parts = []
        while True:
            size_line = self.readline(request).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError as e:
                raise httpx.RemoteProtocolError(
                    f"bad chunk size {size_line!r}", request=request
                ) from e
            if size == 0:
                while self.readline(request):  # trailers
                    pass
                return b"".join(parts)
            parts.append(self.recv_exact(size, request))
            self.recv_exact(2, request)

    def read_some(self, request: httpx.Request) -> bytes:
        if self.buffer:
            data, self.buffer = self.buffer, b""
            return data
        return self._recv(RECEIVE, 0, request)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on this connection in a worker thread. On cancellation the task
        returns at once: the socket is shut down, which ends the thread's blocking call, and
        the thread closes it when it leaves (never two threads closing one descriptor)."""
        with self.lock:
            self.busy = True
        try:
            return await anyio.to_thread.run_sync(
                self._in_thread, fn, *args, abandon_on_cancel=True
            )
        except anyio.get_cancelled_exc_class():
            self.close()
            raise

    def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        finally:
            with self.lock:
                self.busy = False
                if self.dead:
                    with contextlib.suppress(OSError):
                        self.sock.close()

    def close(self) -> None:
        """Close now, or, while a worker thread is inside a call, wake it to close it."""
        with self.lock:
            self.dead = True
            with contextlib.suppress(OSError):
                if self.busy:
                    self.sock.shutdown(socket.SHUT_RDWR)
                else:
                    self.sock.close()


class _Body(httpx.AsyncByteStream):
    """The body of one response: already read, Content-Length, chunked, or until close."""

    def __init__(
        self,
        transport: FastRangeTransport,
        conn: _Conn,
        request: httpx.Request,
        length: int | None,
        chunked: bool,
        reusable: bool,
        eager: bytes | None,
    ) -> None:
        self.transport = transport
        self.conn: _Conn | None = conn
        self.request = request
        self.length = length
        self.chunked = chunked
        self.reusable = reusable
        self.eager = eager
        self.done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn, req = self.conn, self.request
        assert conn is not None
        run = conn.call
        if self.eager is not None:
            data, self.eager = self.eager, None
            if data:
                yield data
        elif self.length is not None:
            remaining = self.length
            while remaining > 0:
                piece = await run(conn.recv_exact, min(remaining, PIECE), req)
                remaining -= len(piece)
                yield piece
        elif self.chunked:
            data = await run(conn.read_chunked, req)
            if data:
                yield data
        else:  # until the server closes
            self.reusable = False
            while data := await run(conn.read_some, req):
                yield data
        self.done = True

    async def aclose(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.done and self.reusable and not conn.buffer and not conn.dead:
            self.transport._release(conn)
        else:
            conn.close()


class FastRangeTransport(httpx.AsyncBaseTransport):
    """Blocking-socket HTTP/1.1 for plain-HTTP range GETs; delegates every other request."""

    def __init__(self, fallback: httpx.AsyncBaseTransport) -> None:
        self.fallback = fallback
        self._idle: dict[tuple[str, int], list[_Conn]] = {}

    @staticmethod
    def handles(request: httpx.Request) -> bool:
        return (
            request.method == "GET" and request.url.scheme == "http" and "range" in request.headers
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.handles(request):
            return await self.fallback.handle_async_request(request)
        key = (request.url.host, request.url.port or 80)
        head = self._serialize(request)
        t = _timeouts(request)
        # A kept-alive connection the server closed meanwhile fails before any answer: resend
        # once on a fresh connection (the request is an idempotent GET).
        for attempt in range(2):
            idle = self._idle.get(key)
            reused = bool(idle)
            if idle:
                conn = idle.pop()
            else:
                conn = await anyio.to_thread.run_sync(
                    _Conn.connect, key, t["connect"], request, abandon_on_cancel=True
                )
            try:
                return await self._exchange(conn, request, head, t)
            except _NoAnswer:
                conn.close()
                if not (reused and attempt == 0):
                    raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    @staticmethod
    def _serialize(request: httpx.Request) -> bytes:
        lines = [b"GET " + request.url.raw_path + b" HTTP/1.1"]
        for name, value in request.headers.raw:
            if name.lower() in (b"connection", b"keep-alive", b"transfer-encoding"):
                continue
            lines.append(name + b": " + value)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def _exchange(
        self,
        conn: _Conn,
        request: httpx.Request,
        head: bytes,
        t: dict[str, float | None],
    ) -> httpx.Response:
        """Send and read the head on the event loop; a 206/error body up to LOOP_MAX bytes too,
        a larger one in a worker thread with one recv(MSG_WAITALL)."""
        conn.set_timeouts(t["read"], t["write"])  # for the worker-thread reads
        await conn.send_head_async(head, t, request)
        raw_head = await conn.read_head_async(t["read"], request)
        status_line, *header_lines = raw_head.split(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise httpx.RemoteProtocolError(
                f"bad status line {status_line[:80]!r}", request=request
            )
        status = int(parts[1])
        headers: list[tuple[bytes, bytes]] = []
        for line in header_lines:
            name, sep, value = line.partition(b":")
            if not sep:
                raise httpx.RemoteProtocolError(f"bad header line {line[:80]!r}", request=request)
            headers.append((name.strip(), value.strip()))
        lower = {n.lower(): v for n, v in headers}
        reusable = parts[0] == b"HTTP/1.1" and lower.get(b"connection", b"").lower() != b"close"
        chunked = b"chunked" in lower.get(b"transfer-encoding", b"").lower()
        length: int | None = None
        if status in (204, 304) or 100 <= status < 200:
            length = 0
        elif not chunked and b"content-length" in lower:
            try:
                length = int(lower[b"content-length"])
            except ValueError as e:
                raise httpx.RemoteProtocolError("bad Content-Length", request=request) from e
        eager = None
        if length is not None and length <= EAGER_MAX and (status == 206 or status >= 300):
            if length <= LOOP_MAX:
                eager = await conn.recv_exact_async(length, t["read"], request)
            else:
                eager = await conn.call(conn.recv_exact, length, request)
        body = _Body(self, conn, request, length, chunked, reusable, eager)
        if eager is not None:
            body.done = True
        return httpx.Response(
            status,
            headers=headers,
            stream=body,
            request=request,
            extensions={"http_version": parts[0]},
        )

    def _release(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) < MAX_IDLE_PER_HOST:
            idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        await self.fallback.aclose()
