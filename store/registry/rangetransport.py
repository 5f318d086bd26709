"""An httpx transport that sends range GETs through urllib3 in worker threads (HTTP and TLS).

Why: blob range reads are the store's hot path. Through httpcore/h11 on the event loop every
64 KiB of body is parsed and copied several times, which caps a ranged read at about half of
what curl gets from the same registry, and keeps the event loop (the FUSE loop, in the store)
busy meanwhile. Here urllib3 (``http.client`` underneath: C-level buffered reads, the
standard ``ssl`` module for ``https://``) sends the request and reads the answer in a worker
thread: one thread hop per request for a 206 or error body up to ``EAGER_MAX`` bytes (read
whole), one per ``PIECE`` for bigger or unframed bodies. Connections are kept alive per host
by urllib3's pool; one the server closed while idle is noticed before reuse and replaced.

The worker threads of one host's requests are that host's own: at most ``max_connections`` at
once (its kept-alive connections), under a limiter of its own, never anyio's and trio's default
one (40 threads for the whole process). A registry that accepts requests and never answers
keeps each of its threads for up to the request's timeout; in the default limiter 40 such
requests (the footers and TOCs of one image's layers) left no thread to the rest of the
process — another registry's reads, and the store's chunk inflating, cache writes and
manifest checks — until they timed out.

Cancellation returns at once: the response's socket is shut down
(``HTTPResponse.shutdown()``, urllib3 ≥ 2.3), which ends the worker thread's blocking read,
and the connection is discarded. A request cancelled while its answer's head is awaited has
its connection's socket shut down the same way (the thread is told which connection through
:data:`_SENDING`): a head that never ends — ``100 Continue`` heads one after another, or one
dripped a byte at a time, each inside the read timeout — kept the thread, and its place under
the host's limiter, for as long as the server went on. One cancelled before it was sent
leaves its thread to finish within the connect timeout; the response is then closed unused.

A request may carry the extension :data:`BODY_LIMIT`: the most body bytes its 2xx answer may
have (the client knows it from the ranges it asked for). Then such a body is read with the head
only when its ``Content-Length`` is within that limit, and never more than the limit plus one
byte of it is read (the caller sees the byte too many and refuses the answer): a hostile or
broken registry that sends a longer, or endless, body than asked costs no more memory than the
answer asked for.

Only ``GET`` requests with a ``Range`` header take this path; everything else (pushes,
manifests, auth) goes through the httpx transport given as ``fallback``, and auth, redirects,
retries and timeouts stay in ``RegistryClient`` above it (urllib3's own retries and redirects
are off). Errors are raised as the httpx exceptions the client already maps: ``ConnectError``
/ ``ConnectTimeout``, ``ReadTimeout``, ``ReadError``, ``RemoteProtocolError``.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import httpx
import urllib3
import urllib3.connection
import urllib3.exceptions as u3

T = TypeVar("T")
EAGER_MAX = 64 * 1024 * 1024  # 206/error bodies up to this size are read with the head
PIECE = 16 * 1024 * 1024  # other bodies are yielded in pieces of at most this size
MAX_HOSTS = 16  # connection pools kept (one per scheme/host/port)
BODY_LIMIT = "lazybench.body_limit"  # request extension: the most body bytes to expect
# The most of an answer's body other than 2xx (an error, a redirect) that is read: the client
# reads no more of one than its first 64 KiB (client.MAX_ERROR_BODY), for its JSON detail.
ERROR_BODY_MAX = 64 * 1024
# Request extension: the ssl.SSLContext an https:// request is made with (the registry's own,
# from its certs.d directory); absent: the transport's default.
SSL_CONTEXT = "lazybench.ssl_context"


# The worker thread's exchange while it sends a request and reads its answer's head: the
# connection records itself there (:class:`_Watched`), so a cancellation can shut it down.
_SENDING = threading.local()


class _Watched:
    """A urllib3 connection that tells the worker thread's exchange it is the one awaiting
    the answer's head (:meth:`_Exchange.watch`)."""

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        exchange = getattr(_SENDING, "exchange", None)
        if exchange is not None:
            exchange.watch(self)
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _timeouts(request: httpx.Request) -> urllib3.Timeout:
    t = request.extensions.get("timeout") or {}
    return urllib3.Timeout(connect=t.get("connect"), read=t.get("read"))


@contextlib.contextmanager
def _as_httpx(request: httpx.Request) -> Iterator[None]:
    """urllib3 / socket failures → the httpx exception of the same meaning."""
    try:
        yield
    except (u3.NewConnectionError, u3.SSLError, u3.LocationParseError) as e:
        # before ConnectTimeoutError: NewConnectionError is one of its subclasses
        raise httpx.ConnectError(str(e), request=request) from e
    except u3.ConnectTimeoutError as e:
        raise httpx.ConnectTimeout(str(e), request=request) from e
    except u3.ReadTimeoutError as e:
        raise httpx.ReadTimeout(f"timed out reading the response: {e}", request=request) from e
    except TimeoutError as e:
        raise httpx.ReadTimeout("timed out reading the response", request=request) from e
    except u3.ProtocolError as e:
        short = next((a for a in e.args if isinstance(a, http.client.IncompleteRead)), None)
        if short is not None:
            got = short.partial if isinstance(short.partial, int) else len(short.partial)
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body (received "
                f"{got} of {got + (short.expected or 0)} bytes)",
                request=request,
            ) from e
        raise httpx.RemoteProtocolError(str(e), request=request) from e
    except (u3.HTTPError, OSError) as e:
        raise httpx.ReadError(str(e) or type(e).__name__, request=request) from e


class _Exchange:
    """One request's urllib3 response, shared by the task and its worker thread, whose
    thread runs under ``limiter`` (its host's)."""

    def __init__(self, request: httpx.Request, limiter: anyio.CapacityLimiter) -> None:
        self.request = request
        self.limiter = limiter
        self.resp: urllib3.BaseHTTPResponse | None = None
        self.conn: Any = None  # the connection awaiting the head (before ``resp``)
        self.lock = threading.Lock()
        self.abandoned = False
        self.done = False  # the body was read to its end and the connection released

    def adopt(self, resp: urllib3.BaseHTTPResponse) -> None:
        """Worker thread: hold ``resp``, or drop it if the task gave up meanwhile."""
        with self.lock:
            if not self.abandoned:
                self.resp = resp
                return
        resp.close()
        raise httpx.ReadError("request cancelled", request=self.request)

    def watch(self, conn: Any) -> None:
        """Worker thread: ``conn`` awaits the answer's head; refused if the task gave up."""
        with self.lock:
            if not self.abandoned:
                self.conn = conn
                return
        raise httpx.ReadError("request cancelled", request=self.request)

    def abandon(self) -> None:
        """Event loop: the task gives up; a thread blocked reading the head or the body wakes
        at once."""
        with self.lock:
            self.abandoned = True
            resp, conn = self.resp, self.conn
        if resp is not None and not self.done:
            with contextlib.suppress(Exception):
                resp.shutdown()  # type: ignore[attr-defined]  # HTTPResponse, urllib3 ≥ 2.3
        elif resp is None and conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def read(self, amt: int | None) -> bytes:
        """Worker thread: up to ``amt`` bytes of the raw body (all with None); the connection
        goes back to the pool once the body is read to its end."""
        assert self.resp is not None
        with _as_httpx(self.request):
            data = self.resp.read(amt, decode_content=False)
        if amt is None or not data or _drained(self.resp):
            self.done = True
            self.resp.release_conn()
        return data

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await anyio.to_thread.run_sync(
                fn, *args, abandon_on_cancel=True, limiter=self.limiter
            )
        except anyio.get_cancelled_exc_class():
            self.abandon()
            raise

    def close(self) -> None:
        resp = self.resp
        if resp is None:
            return
        if self.done:
            resp.release_conn()
        else:  # not read to its end: the connection cannot be reused
            self.abandon()
            resp.close()


def _body_limit(request: httpx.Request, status: int) -> int | None:
    """The request's ``BODY_LIMIT`` for a 2xx answer; :data:`ERROR_BODY_MAX` for any other (an
    error body's size has nothing to do with the ranges asked: a 503 with a 64 MiB body was
    read whole with its head, where the client wanted its first 64 KiB)."""
    if not 200 <= status < 300:
        return ERROR_BODY_MAX
    limit = request.extensions.get(BODY_LIMIT)
    return limit if isinstance(limit, int) and limit >= 0 else None


def _drained(resp: urllib3.BaseHTTPResponse) -> bool:
    length = resp.length_remaining
    return length is not None and length <= 0


class _Body(httpx.AsyncByteStream):
    """The body of one response: already read with the head, or read in pieces of at most
    ``PIECE`` bytes, ``limit + 1`` bytes in all with a ``limit`` (None: to its end)."""

    def __init__(self, exchange: _Exchange, eager: bytes | None, limit: int | None) -> None:
        self.exchange = exchange
        self.eager = eager
        self.left = None if limit is None else limit + 1

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.eager is not None:
            data, self.eager = self.eager, None
            if data:
                yield data
            return
        ex = self.exchange
        while not ex.done and self.left != 0:
            amt = PIECE if self.left is None else min(PIECE, self.left)
            data = await ex.call(ex.read, amt)
            if self.left is not None:
                self.left -= len(data)
            if data:
                yield data

    async def aclose(self) -> None:
        self.exchange.close()


class RangeTransport(httpx.AsyncBaseTransport):
    """urllib3 in worker threads for range GETs; delegates every other request.

    ``ssl_context`` verifies ``https://`` registries (None: the system's CAs) unless a request
    carries its own (:data:`SSL_CONTEXT`); ``max_connections`` bounds the kept-alive
    connections per host, and its requests' worker threads at once (see the module doc)."""

    def __init__(
        self,
        fallback: httpx.AsyncBaseTransport,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 16,
    ) -> None:
        self.fallback = fallback
        self._pool = urllib3.PoolManager(
            num_pools=MAX_HOSTS,
            maxsize=max_connections,
            block=False,
            retries=False,
            ssl_context=ssl_context,
        )
        self._pool.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        self._max_connections = max(1, max_connections)
        self._limiters: dict[tuple[str, str, int | None], anyio.CapacityLimiter] = {}

    @staticmethod
    def handles(request: httpx.Request) -> bool:
        return (
            request.method == "GET"
            and request.url.scheme in ("http", "https")
            and "range" in request.headers
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.handles(request):
            return await self.fallback.handle_async_request(request)
        exchange = _Exchange(request, self._limiter(request.url))
        try:
            status, headers, version, eager = await exchange.call(self._open, exchange)
        except BaseException:
            exchange.close()
            raise
        return httpx.Response(
            status,
            headers=headers,
            stream=_Body(exchange, eager, _body_limit(request, status)),
            request=request,
            extensions={"http_version": version},
        )

    def _open(
        self, exchange: _Exchange
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes, bytes | None]:
        """Worker thread: send the request, read the head, and a 206/error body up to
        EAGER_MAX bytes (and the request's ``BODY_LIMIT``) with it."""
        request = exchange.request
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in request.headers.raw
            if k.lower() not in (b"connection", b"keep-alive", b"transfer-encoding", b"host")
        }
        url = str(request.url)
        _SENDING.exchange = exchange
        try:
            with _as_httpx(request):
                resp = self._pool_for(url, request.extensions.get(SSL_CONTEXT)).urlopen(
                    "GET",
                    urllib3.util.parse_url(url).request_uri,
                    headers=headers,
                    redirect=False,
                    retries=False,
                    preload_content=False,
                    decode_content=False,
                    timeout=_timeouts(request),
                    assert_same_host=False,
                )
        finally:
            _SENDING.exchange = None
        exchange.adopt(resp)
        status = resp.status
        length = resp.length_remaining
        no_body = status in (204, 304) or 100 <= status < 200 or length == 0
        limit = _body_limit(request, status)
        small = (
            length is not None
            and length <= (EAGER_MAX if limit is None else min(EAGER_MAX, limit))
            and (status == 206 or status >= 300)
        )
        eager = exchange.read(None) if no_body or small else None
        raw_headers = [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.iteritems()
        ]
        version = b"HTTP/1.0" if resp.version == 10 else b"HTTP/1.1"
        return status, raw_headers, version, eager

    def _limiter(self, url: httpx.URL) -> anyio.CapacityLimiter:
        """The worker-thread limiter of ``url``'s scheme, host and port (made on first use;
        those of hosts with no thread out are forgotten past :data:`MAX_HOSTS` hosts)."""
        key = (url.scheme, url.host, url.port)
        limiter = self._limiters.get(key)
        if limiter is None:
            if len(self._limiters) >= MAX_HOSTS:
                for old in [k for k, v in self._limiters.items() if not v.borrowed_tokens]:
                    del self._limiters[old]
            limiter = self._limiters[key] = anyio.CapacityLimiter(self._max_connections)
        return limiter

    def _pool_for(self, url: str, ssl_context: ssl.SSLContext | None) -> Any:
        """The connection pool for ``url``'s host made with ``ssl_context`` (one per context:
        urllib3 keys its pools by it)."""
        kw = {"ssl_context": ssl_context} if ssl_context and url.startswith("https:") else None
        return self._pool.connection_from_url(url, pool_kwargs=kw)

    async def warm(
        self,
        url: str,
        connections: int,
        timeout: float | None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> int:
        """Open up to ``connections`` kept-alive connections to ``url``'s host (TCP, and TLS
        for ``https://``) without sending a request; returns how many are open afterwards.

        Why no request: a connection is ready after one round trip (two or three with TLS),
        before the manifest fetched beside it has arrived, so the layer loads that follow
        the manifest skip their handshakes. A request would keep the connection busy one
        round trip longer, and the first ranged reads would open new ones meanwhile.
        Connections already open count, those out of the pool too (a request's, or another
        warm's: images resolved at once warm their host at once), and none is opened past
        the pool's size: urllib3 would close it when it came back ("Connection pool is
        full" warnings, one per connection). Failures are not errors (the real requests
        report them). urllib3 has no public call to open a pool's connection ahead of a
        request, so this takes and returns them through the pool's ``_get_conn``/``_put_conn``.
        """
        pool = self._pool_for(url, ssl_context)
        limiter = self._limiter(httpx.URL(url))
        # The pool's queue holds its idle connections and a placeholder per one never made:
        # what is not in it is out.
        free = pool.pool.qsize()
        out = pool.pool.maxsize - free
        # Take them all first (never blocks: the pool does not), so that one connected here
        # and put back is not taken again as another. Each goes back to the pool once, by
        # whoever claims it first: its worker thread (after connecting, even when the task
        # was cancelled and abandoned it) or the cleanup below (a thread that never ran).
        conns = [pool._get_conn() for _ in range(max(0, min(connections - out, free)))]
        claimed = [False] * len(conns)
        lock = threading.Lock()

        def claim(i: int) -> bool:
            with lock:
                first, claimed[i] = not claimed[i], True
            return first

        def connect(i: int) -> bool:
            if not claim(i):
                return False
            conn = conns[i]
            try:
                if not conn.is_connected:
                    conn.timeout = timeout
                    conn.connect()
                return True
            except (OSError, u3.HTTPError):
                conn.close()
                return False
            finally:
                pool._put_conn(conn)

        opened = 0

        async def run(i: int) -> None:
            nonlocal opened
            ok = await anyio.to_thread.run_sync(connect, i, abandon_on_cancel=True, limiter=limiter)
            opened += ok  # not `opened += await ...`: that reads `opened` before the await

        try:
            async with anyio.create_task_group() as tg:
                for i in range(len(conns)):
                    tg.start_soon(run, i)
        finally:
            for i, conn in enumerate(conns):
                if claim(i):
                    pool._put_conn(conn)
        return min(connections, out + opened)

    def retire(self, ssl_context: ssl.SSLContext) -> None:
        """Close the pools made with ``ssl_context`` (a host's certs.d changed): their idle
        connections now, a connection still reading a body when it is done."""
        for key in self._pool.pools.keys():  # noqa: SIM118 - the container refuses iteration
            if key.key_ssl_context is ssl_context:
                with contextlib.suppress(KeyError):
                    del self._pool.pools[key]  # the PoolManager's dispose_func closes it

    async def aclose(self) -> None:
        # PoolManager.clear() only forgets its pools (urllib3 2): their kept-alive connections
        # would stay open until the pools are garbage, which anything holding a response —
        # an exception's traceback — delays. Closed here, each pool closes its idle ones.
        # (keys(): the container refuses iteration)
        pools = [self._pool.pools.get(key) for key in self._pool.pools.keys()]  # noqa: SIM118
        self._pool.clear()
        for pool in pools:
            if pool is not None:
                pool.close()
        await self.fallback.aclose()
