"""RangeTransport against canned raw HTTP answers: framing, keep-alive, stale connections."""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from store.registry.rangetransport import BODY_LIMIT, ERROR_BODY_MAX, RangeTransport

pytestmark = pytest.mark.anyio

Script = Callable[[socket.socket, int], None]  # (connection, connection number)


class CannedServer:
    """Accepts connections; `script(conn, n)` answers on each (in its own thread)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []

    def read_request(self, conn: socket.socket) -> bytes:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return b""
            buf += data
        self.requests.append(buf)
        return buf

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            n = self.connections
            threading.Thread(target=self._serve, args=(conn, n), daemon=True).start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        with conn, contextlib.suppress(OSError):
            self.script(conn, n)

    def __enter__(self) -> CannedServer:
        threading.Thread(target=self._loop, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


@pytest.fixture
def client_factory() -> Iterator[Callable[[], httpx.AsyncClient]]:
    def make() -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=RangeTransport(httpx.AsyncHTTPTransport()), timeout=2.0)

    yield make


def _url(server: CannedServer) -> str:
    return f"http://127.0.0.1:{server.port}/v2/x/blobs/sha256:00"


async def test_content_length_keepalive_and_split_head(client_factory) -> None:
    def script(conn: socket.socket, n: int) -> None:
        srv.read_request(conn)
        conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Ra")
        time.sleep(0.05)  # head split across segments
        conn.sendall(b"nge: bytes 0-4/10\r\nContent-Length: 5\r\n\r\nhel")
        time.sleep(0.05)
        conn.sendall(b"lo")
        srv.read_request(conn)
        conn.sendall(
            b"HTTP/1.1 206 OK\r\nContent-Range: bytes 5-9/10\r\nContent-Length: 5\r\n\r\nworld"
        )
        time.sleep(0.5)

    with CannedServer(script) as srv:
        async with client_factory() as c:
            r1 = await c.get(_url(srv), headers={"Range": "bytes=0-4"})
            r2 = await c.get(_url(srv), headers={"Range": "bytes=5-9"})
    assert (r1.status_code, r1.content, r2.content) == (206, b"hello", b"world")
    assert r1.headers["content-range"] == "bytes 0-4/10"
    assert srv.connections == 1  # kept alive
    assert b"Range: bytes=0-4" in srv.requests[0] or b"range: bytes=0-4" in srv.requests[0]


async def test_chunked_and_read_until_close(client_factory) -> None:
    def script(conn: socket.socket, n: int) -> None:
        srv.read_request(conn)
        if n == 1:
            conn.sendall(
                b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"4\r\nnot \r\n5;x=y\r\nfound\r\n0\r\nTrailer: 1\r\n\r\n"
            )
            srv.read_request(conn)
        conn.sendall(b"HTTP/1.0 206 OK\r\nContent-Range: bytes 0-2/3\r\n\r\nabc")

    with CannedServer(script) as srv:
        async with client_factory() as c:
            r1 = await c.get(_url(srv), headers={"Range": "bytes=0-2"})
            r2 = await c.get(_url(srv), headers={"Range": "bytes=0-2"})
    assert (r1.status_code, r1.content) == (404, b"not found")
    assert (r2.status_code, r2.content) == (206, b"abc")


async def test_stale_keepalive_connection_is_replaced(client_factory) -> None:
    def script(conn: socket.socket, n: int) -> None:
        srv.read_request(conn)
        conn.sendall(b"HTTP/1.1 206 OK\r\nContent-Length: 2\r\n\r\nok")
        # then close: the client's idle connection is stale

    with CannedServer(script) as srv:
        async with client_factory() as c:
            assert (await c.get(_url(srv), headers={"Range": "bytes=0-1"})).content == b"ok"
            time.sleep(0.1)
            assert (await c.get(_url(srv), headers={"Range": "bytes=0-1"})).content == b"ok"
    assert srv.connections == 2


async def test_short_body_and_silence(client_factory) -> None:
    def script(conn: socket.socket, n: int) -> None:
        srv.read_request(conn)
        if n == 1:
            conn.sendall(b"HTTP/1.1 206 OK\r\nContent-Length: 10\r\n\r\nabc")
        else:
            time.sleep(3)

    with CannedServer(script) as srv:
        async with client_factory() as c:
            with pytest.raises(httpx.RemoteProtocolError, match="received 3 of 10"):
                await c.get(_url(srv), headers={"Range": "bytes=0-9"})
            start = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await c.get(_url(srv), headers={"Range": "bytes=0-9"})
            assert time.monotonic() - start < 2.9


async def test_refused_connect(client_factory) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    async with client_factory() as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(f"http://127.0.0.1:{port}/x", headers={"Range": "bytes=0-1"})


async def test_cancellation_returns_promptly(client_factory) -> None:
    """A read stuck on a silent server is cancelled at once, not after the read timeout."""
    import trio

    def script(conn: socket.socket, n: int) -> None:
        srv.read_request(conn)
        conn.sendall(b"HTTP/1.1 206 OK\r\nContent-Length: 100\r\n\r\nabc")
        time.sleep(3)

    with CannedServer(script) as srv:
        async with httpx.AsyncClient(
            transport=RangeTransport(httpx.AsyncHTTPTransport()), timeout=10.0
        ) as c:
            start = time.monotonic()
            with trio.move_on_after(0.3):
                await c.get(_url(srv), headers={"Range": "bytes=0-99"})
            assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("head", ["continues", "dripped"])
async def test_a_read_cancelled_before_an_endless_head_gives_its_thread_back(head: str) -> None:
    """A read cancelled while the server sends a head that never ends (``100 Continue`` heads
    one after another, or a head dripped a byte at a time), each byte inside the read timeout,
    ends its worker thread at once: before, the thread read on for as long as the server went
    on, keeping its place under the host's limiter, and the host's next read waited for it."""
    import trio

    stop = threading.Event()

    def script(conn: socket.socket, n: int) -> None:
        while srv.read_request(conn):
            if n > 1:
                conn.sendall(
                    b"HTTP/1.1 206 OK\r\nContent-Range: bytes 0-1/2\r\nContent-Length: 2\r\n\r\nok"
                )
                continue
            piece = b"HTTP/1.1 100 Continue\r\n\r\n" if head == "continues" else b"X"
            if head == "dripped":
                conn.sendall(b"HTTP/1.1 206 OK\r\nX-Pad: ")
            while not stop.is_set():
                conn.sendall(piece)
                stop.wait(0.2)
            return

    transport = RangeTransport(httpx.AsyncHTTPTransport(), max_connections=1)
    with CannedServer(script) as srv:
        try:
            async with httpx.AsyncClient(transport=transport, timeout=5.0) as c:
                with trio.move_on_after(0.5):
                    await c.get(_url(srv), headers={"Range": "bytes=0-1"})
                start = time.monotonic()
                with trio.move_on_after(3):
                    resp = await c.get(_url(srv), headers={"Range": "bytes=0-1"})
                    assert resp.content == b"ok"
                elapsed = time.monotonic() - start
        finally:
            stop.set()
    assert elapsed < 1, elapsed


async def test_warm_opens_connections_that_requests_then_reuse() -> None:
    """``warm`` opens connections without sending anything; the range reads that follow
    take them (the server sees no new connection), and a refused host is a count of 0."""
    import anyio

    def script(conn: socket.socket, n: int) -> None:
        while srv.read_request(conn):
            conn.sendall(
                b"HTTP/1.1 206 OK\r\nContent-Range: bytes 0-1/2\r\nContent-Length: 2\r\n\r\nok"
            )

    transport = RangeTransport(httpx.AsyncHTTPTransport())
    with CannedServer(script) as srv:
        async with httpx.AsyncClient(transport=transport, timeout=2.0) as c:
            assert await transport.warm(f"http://127.0.0.1:{srv.port}", 3, 2.0) == 3
            for _ in range(50):  # the server thread counts accepted connections
                if srv.connections == 3:
                    break
                time.sleep(0.01)
            assert (srv.connections, srv.requests) == (3, [])
            got: list[bytes] = []

            async def read() -> None:
                got.append((await c.get(_url(srv), headers={"Range": "bytes=0-1"})).content)

            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(read)
            assert got == [b"ok"] * 3
            assert srv.connections == 3 and len(srv.requests) == 3
            # already open: counted, none opened anew
            assert await transport.warm(f"http://127.0.0.1:{srv.port}", 2, 2.0) == 2
            assert srv.connections == 3
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    assert (
        await RangeTransport(httpx.AsyncHTTPTransport()).warm(f"http://127.0.0.1:{port}", 2, 1.0)
        == 0
    )


async def test_warms_at_once_open_no_more_than_the_pool_keeps(caplog) -> None:
    """Two images resolved at once warm their host at once: the connections out of the pool
    (another warm's, or requests') count as open, so no more are opened than asked for in
    all, none past the pool's size, and none is discarded ("Connection pool is full"
    warnings, one per connection: 64 of them for four pulls at once)."""
    import anyio

    def script(conn: socket.socket, n: int) -> None:
        while srv.read_request(conn):
            pass

    transport = RangeTransport(httpx.AsyncHTTPTransport(), max_connections=4)
    with CannedServer(script) as srv:
        url = f"http://127.0.0.1:{srv.port}"
        opened: list[int] = []

        async def warm() -> None:
            opened.append(await transport.warm(url, 3, 2.0))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(warm)
        for _ in range(50):  # the server thread counts accepted connections
            if srv.connections >= 3:
                break
            time.sleep(0.01)
        time.sleep(0.1)
        assert srv.connections == 3
        assert sorted(opened) == [3, 3, 3]
        await transport.aclose()
    assert [r.getMessage() for r in caplog.records if "pool is full" in r.getMessage()] == []


async def test_body_limit_reads_no_more_than_asked_plus_one(client_factory) -> None:
    """With the BODY_LIMIT extension a 206 whose Content-Length is over the limit is not read
    with the head, and an endless body yields limit + 1 bytes, then nothing more is read."""
    sent = {"long": 0, "endless": 0}

    def script(conn: socket.socket, n: int) -> None:
        srv.read_request(conn)
        long = n == 1
        head = b"HTTP/1.1 206 OK\r\nContent-Range: bytes 0-9/10\r\n"
        head += b"Content-Length: 1073741824\r\n\r\n" if long else b"Connection: close\r\n\r\n"
        conn.sendall(head)
        with contextlib.suppress(OSError):
            while sent["long" if long else "endless"] < 1 << 30:
                conn.sendall(bytes(65536))
                sent["long" if long else "endless"] += 65536

    with CannedServer(script) as srv:
        async with client_factory() as c:
            for _ in ("long", "endless"):
                req = c.build_request(
                    "GET", _url(srv), headers={"Range": "bytes=0-9"}, extensions={BODY_LIMIT: 10}
                )
                resp = await c.send(req, stream=True)
                got = b"".join([piece async for piece in resp.aiter_raw()])
                await resp.aclose()
                assert got == bytes(11)
    assert sent["long"] < 64 << 20 and sent["endless"] < 64 << 20, sent


async def test_an_error_body_is_read_no_further_than_its_start(client_factory) -> None:
    """An error answer to a range GET (a 503 with a 60 MiB body, said by its Content-Length
    or not) yields at most ERROR_BODY_MAX + 1 bytes: the client reads its first 64 KiB for the
    detail, and a registry's long error body costs neither memory nor the time to receive it
    (read whole with the head before: 8 reads at once held 393 MB)."""
    sent = {1: 0, 2: 0}

    def script(conn: socket.socket, n: int) -> None:
        srv.read_request(conn)
        head = b"HTTP/1.1 503 Busy\r\nContent-Type: text/plain\r\n"
        head += b"Content-Length: 62914560\r\n\r\n" if n == 1 else b"Connection: close\r\n\r\n"
        conn.sendall(head)
        with contextlib.suppress(OSError):
            while sent[n] < 60 << 20:
                conn.sendall(b"e" * 65536)
                sent[n] += 65536

    with CannedServer(script) as srv:
        async with client_factory() as c:
            for _ in sent:
                req = c.build_request(
                    "GET", _url(srv), headers={"Range": "bytes=0-9"}, extensions={BODY_LIMIT: 10}
                )
                resp = await c.send(req, stream=True)
                got = b"".join([piece async for piece in resp.aiter_raw()])
                await resp.aclose()
                assert resp.status_code == 503
                assert got == b"e" * (ERROR_BODY_MAX + 1)
    assert sent[1] < 16 << 20 and sent[2] < 16 << 20, sent


async def test_a_silent_host_keeps_its_threads_to_itself() -> None:
    """Range reads waiting on a host that accepts them and never answers take at most
    ``max_connections`` worker threads, under the host's own limiter: another host's reads and
    the process's other worker threads (anyio's and trio's default limiter, 40 threads) go on
    at once. In the default limiter, 40 such reads (the footers and TOCs of one image's
    layers, in the store) held every thread until their timeout."""
    import anyio
    import anyio.to_thread
    import trio

    stop = threading.Event()

    def silent(conn: socket.socket, n: int) -> None:
        hung.read_request(conn)
        stop.wait(30)

    def answers(conn: socket.socket, n: int) -> None:
        while ok.read_request(conn):
            conn.sendall(
                b"HTTP/1.1 206 OK\r\nContent-Range: bytes 0-1/2\r\nContent-Length: 2\r\n\r\nok"
            )

    transport = RangeTransport(httpx.AsyncHTTPTransport(), max_connections=8)
    with CannedServer(silent) as hung, CannedServer(answers) as ok:
        async with httpx.AsyncClient(transport=transport, timeout=20.0) as c:
            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(
                        functools.partial(c.get, _url(hung), headers={"Range": "bytes=0-1"})
                    )
                for _ in range(100):  # the silent host has all it may have
                    if len(hung.requests) >= 8:
                        break
                    await trio.sleep(0.02)
                start = time.monotonic()
                with trio.fail_after(5):
                    resp = await c.get(_url(ok), headers={"Range": "bytes=0-1"})
                    assert resp.content == b"ok"
                    assert await anyio.to_thread.run_sync(lambda: 42) == 42
                    assert await trio.to_thread.run_sync(lambda: 43) == 43
                elapsed = time.monotonic() - start
                assert len(hung.requests) == 8, len(hung.requests)
                nursery.cancel_scope.cancel()
            stop.set()
    assert elapsed < 1, elapsed
