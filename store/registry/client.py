"""The async OCI distribution client: pull (manifests, configs, ranged blob reads) and push.

One `httpx.AsyncClient` underneath, so it runs on trio (the store) and asyncio alike. Every
request has a timeout; connection errors, cut bodies, 5xx and range answers that do not match
the request (wrong ``Content-Range``, short part) are retried with backoff. A timeout is not
retried (it is the answer the caller configured) unless the client is made with
``retry_timeouts=True``: then a GET or HEAD that stalls is sent again — the store does so, and
bounds the whole read by its own deadline instead; mirrors are tried in order
before the origin; redirects are followed by hand so Authorization never goes to another origin
(scheme, host and port). Where a blob GET was redirected (a registry in front of a CDN or an
object store: Docker Hub, ghcr.io, Quay, ECR, GCR do so) the client reads that blob from the
last location for ``redirect_ttl`` seconds without asking the registry again, as the Go store
reads a blob from its resolved URL for ``[blob] valid_interval``; an answer other than the one
asked for from there (an expired signature's 403) sends the request to the registry at once;
a redirect from there is followed, and where it went is kept instead.
Every request made for an endpoint over HTTPS (to the registry, its
token server, a host it redirects to) uses that endpoint's TLS settings: the CAs and client
certificate of its certs.d directory (:func:`hosts.read_certs_dir`), as containers/image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import re
import ssl
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import anyio
import httpx
import urllib3.exceptions

from .auth import Challenge, TokenCache, basic_header, parse_challenge, scope_for
from .credentials import Credentials, CredentialStore
from .errors import (
    RETRY_AFTER_MAX,
    RETRY_STATUSES,
    AuthenticationError,
    ConfigError,
    ContentEncodingError,
    DigestMismatch,
    ManifestError,
    NotFoundError,
    RangeError,
    RangeNotHonoured,
    RegistryError,
    RegistryTimeout,
    RegistryUnavailable,
    TooLargeError,
    is_tls_failure,
    retry_after,
)
from .hosts import DEFAULT_REQUEST_TIMEOUT, Endpoint, HostTls, ResolverConfig, read_certs_dir
from .manifest import (
    ACCEPT,
    INDEX_TYPES,
    Descriptor,
    ManifestResult,
    Platform,
    parse_manifest,
    select_platform,
    sha256_digest,
)
from .ranges import (
    Span,
    body_limit,
    coalesce,
    covers,
    parse_content_range,
    parse_multipart_byteranges,
    range_body,
    range_header,
    slice_from,
)
from .rangetransport import BODY_LIMIT, SSL_CONTEXT, RangeTransport
from .reference import Reference, validate_digest

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# The largest image config read, as containers/image reads one (internal/iolimits:
# MaxConfigBodySize, 4 MiB; a body of exactly the limit is accepted there too).
MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_REDIRECTS = 5
# A blob HEAD answered so (Method Not Allowed, Not Implemented) is asked as a one-byte GET.
HEAD_REFUSED = frozenset({405, 501})
# Blob locations a registry redirected to, kept (least recently used go first).
REDIRECTS_KEPT = 4096
DEFAULT_REDIRECT_TTL = 60.0  # seconds; the Go store's default [blob] valid_interval
# The start of an error answer's body read for its JSON detail; the rest is never read.
MAX_ERROR_BODY = 64 * 1024
DOWN_FOR = 10.0  # seconds an endpoint that failed to connect is skipped (if others remain)
# Seconds an endpoint that accepted a request and did not answer in time goes last: asking it
# first again costs the whole request timeout, where a refused connection costs nothing.
STALLED_FOR = 60.0
DEFAULT_CHUNK = 8 * 1024 * 1024
USER_AGENT = "lazybench-registry/0.1"
# Every request asks for the stored bytes: blobs, their ranges and manifests are hashed or
# sliced as sent, never content-decoded (see _check_identity). The Go stargz-snapshotter sends
# the same header on its range requests (fs/remote/resolver.go, httpFetcher.fetch).
ACCEPT_ENCODING = "identity"
# Seconds a host's certs.d reading is used before the directory is looked at again (a CA or
# client certificate added while the store runs is taken within this long).
TLS_RECHECK = 10.0

Reader = Callable[[httpx.Response], Awaitable[T]]


@dataclass(frozen=True)
class BlobPushResult:
    digest: str
    size: int
    how: str  # "exists" (skipped after HEAD), "mounted" (cross-repo), "uploaded"


@dataclass
class ClientStats:
    """Counters the harness and tests read (requests sent, retries, bytes of bodies)."""

    requests: int = 0
    retries: int = 0
    body_bytes: int = 0
    auth_round_trips: int = 0
    redirects_reused: int = 0  # blob GETs sent straight to a location the registry gave before


# An object store's XML error (S3, GCS, Azure Blob, CloudFront: <Error><Code>…</Code>
# <Message>…</Message></Error>), as a storage host a registry redirected to answers.
_XML_CODE = re.compile(rb"<Code>([^<]{1,200})</Code>")
_XML_MESSAGE = re.compile(rb"<Message>([^<]{1,200})</Message>")


def _error_detail(resp: httpx.Response, body: bytes) -> str:
    """The server's own error code/message: a registry's standard JSON, or an object store's
    XML ``Code`` and ``Message``; empty when it sent neither."""
    try:
        errs = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip() for e in errs)
    except Exception:
        pass
    code, message = _XML_CODE.search(body), _XML_MESSAGE.search(body)
    found = [m[1].decode("utf-8", "replace").strip() for m in (code, message) if m]
    return ": ".join(found)


async def _read_all(resp: httpx.Response) -> bytes:
    """The default reader, for answers whose body is not used (``/v2/``, pushes): the first
    :data:`MAX_ERROR_BODY` bytes as sent, the rest left unread, so a registry that streams
    an endless or encoded body costs neither memory nor time."""
    return await _read_raw(resp, MAX_ERROR_BODY)


class _TlsContexts:
    """The SSL context for each HTTPS host: ``verify``'s trust (True: the system's CAs, a
    path: that CA bundle alone, False: none checked) plus the host's certs.d directory under
    ``roots`` (None: containers/image's). An SSLContext given as ``verify`` is used for every
    host as it is (certs.d is not read). A host's context replaced after its directory
    changed is handed to ``retire`` (its connections are closed)."""

    def __init__(
        self,
        verify: ssl.SSLContext | str | bool,
        roots: Sequence[Path] | None,
        retire: Callable[[ssl.SSLContext], None] | None = None,
    ) -> None:
        self._verify = verify
        self._roots = roots
        self._retire = retire
        # (host, verify) -> (until when, its certs.d reading, its context)
        self._by_host: dict[tuple[str, bool], tuple[float, HostTls, ssl.SSLContext]] = {}
        if isinstance(verify, ssl.SSLContext):
            self.default = verify
        else:
            self.default = HostTls("", ()).context(self._cafile, verify is not False)

    @functools.cached_property
    def unverified(self) -> ssl.SSLContext:
        """For an endpoint registries.conf calls ``insecure`` without a certs.d directory of
        its own: no certificate checked, none shown."""
        return HostTls("", ()).context(verify=False)

    @property
    def _cafile(self) -> str | None:
        return self._verify if isinstance(self._verify, str) else None

    def for_host(self, host: str, verify: bool = True) -> ssl.SSLContext:
        """``host``'s context; ``verify=False`` (registries.conf ``insecure``): no certificate
        checked, the client certificate of its certs.d directory still shown, as
        containers/image does. Raises ConfigError for a certs.d directory that cannot be
        used."""
        if isinstance(self._verify, ssl.SSLContext):
            return self._verify if verify else self.unverified
        now = time.monotonic()
        held = self._by_host.get((host, verify))
        if held is not None and now < held[0]:
            return held[2]
        tls = read_certs_dir(host, self._roots)
        base = self.default if verify else self.unverified
        if held is not None and held[1] == tls:
            ctx = held[2]
        elif not tls.ca_files and tls.client_cert is None:
            ctx = base
        else:
            ctx = tls.context(self._cafile, verify and self._verify is not False)
        self._by_host[host, verify] = (now + TLS_RECHECK, tls, ctx)
        if held is not None and held[2] not in (ctx, base) and self._retire is not None:
            self._retire(held[2])  # the host's own: no other host uses it
        return ctx

    def describe(self, host: str) -> str:
        """Where ``host``'s trust comes from, for an error about its certificate."""
        if isinstance(self._verify, ssl.SSLContext):
            return "the client's own SSL context"
        held = self._by_host.get((host, True))
        tls = held[1] if held is not None else read_certs_dir(host, self._roots)
        base = f"CA bundle {self._verify}" if self._cafile else "the system's CAs"
        return f"trusting {base}; {tls.describe()}"


class _TransportPerContext(httpx.AsyncBaseTransport):
    """One httpx transport per SSL context a request carries (:data:`SSL_CONTEXT`; none: the
    default one): httpx takes its TLS settings per transport, not per request.

    The transport of a context given to :meth:`retire` (its host's certs.d changed) is
    closed once no response of it is open: closing it earlier would cut a body being read,
    never closing it would keep its connections open for the life of the client."""

    def __init__(
        self,
        make: Callable[[ssl.SSLContext], httpx.AsyncBaseTransport],
        default: ssl.SSLContext,
    ) -> None:
        self._make = make
        self._default = default
        # id -> (context, transport): the context is held, so its id is never reused meanwhile.
        self._by_id: dict[int, tuple[ssl.SSLContext, httpx.AsyncBaseTransport]] = {}
        self._open: dict[httpx.AsyncBaseTransport, int] = {}  # responses not closed yet
        self._retired: set[httpx.AsyncBaseTransport] = set()  # closed when none is open
        # Contexts retired (weakly: a request built before may still carry one).
        self._retired_contexts: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()

    def prepare(self) -> None:
        """Make the default context's transport now, not on the first request."""
        if id(self._default) not in self._by_id:
            self._by_id[id(self._default)] = (self._default, self._make(self._default))

    def retire(self, ctx: ssl.SSLContext) -> None:
        self._retired_contexts.add(ctx)
        held = self._by_id.pop(id(ctx), None)
        if held is not None:
            self._retired.add(held[1])

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await self._close_retired()
        ctx = request.extensions.get(SSL_CONTEXT) or self._default
        held = self._by_id.get(id(ctx))
        if held is not None:
            transport = held[1]
        elif ctx in self._retired_contexts:
            transport = self._make(ctx)  # for this request only
            self._retired.add(transport)
        else:
            transport = self._make(ctx)
            self._by_id[id(ctx)] = (ctx, transport)
        self._open[transport] = self._open.get(transport, 0) + 1
        try:
            resp = await transport.handle_async_request(request)
        except BaseException:
            await self._closed(transport)
            raise
        resp.stream = _ClosedCall(resp.stream, functools.partial(self._closed, transport))
        return resp

    async def _closed(self, transport: httpx.AsyncBaseTransport) -> None:
        self._open[transport] -= 1
        if not self._open[transport]:
            del self._open[transport]
        await self._close_retired()

    async def _close_retired(self) -> None:
        for transport in [t for t in self._retired if t not in self._open]:
            self._retired.discard(transport)
            with anyio.CancelScope(shield=True):
                await transport.aclose()

    async def aclose(self) -> None:
        for transport in [*(t for _, t in self._by_id.values()), *self._retired]:
            await transport.aclose()
        self._by_id.clear()
        self._retired.clear()


class _ClosedCall(httpx.AsyncByteStream):
    """A response body that calls ``closed`` once, when it is closed."""

    def __init__(
        self, stream: httpx.AsyncByteStream, closed: Callable[[], Awaitable[None]]
    ) -> None:
        self._stream = stream
        self._closed: Callable[[], Awaitable[None]] | None = closed

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            closed, self._closed = self._closed, None
            if closed is not None:
                await closed()


class RegistryClient:
    """Async context manager: `async with RegistryClient() as c: await c.get_manifest(ref)`."""

    def __init__(
        self,
        *,
        resolver: ResolverConfig | None = None,
        credentials: CredentialStore | Mapping[str, Credentials] | None = None,
        timeout: float | None = None,
        retries: int = 3,
        backoff: float = 0.1,
        max_ranges_per_request: int = 32,
        coalesce_gap: int = 0,
        user_agent: str = USER_AGENT,
        max_connections: int = 32,
        fast_ranges: bool = True,
        verify: ssl.SSLContext | str | bool = True,
        retry_timeouts: bool = False,
        certs_roots: Sequence[Path] | None = None,
        redirect_ttl: float = DEFAULT_REDIRECT_TTL,
    ) -> None:
        self.resolver = resolver or ResolverConfig(
            default_timeout=timeout or DEFAULT_REQUEST_TIMEOUT
        )
        if timeout is not None and resolver is not None:
            self.resolver = dataclasses.replace(resolver, default_timeout=timeout)
        if isinstance(credentials, CredentialStore):
            self.credentials = credentials
        else:
            self.credentials = CredentialStore(explicit=credentials)
        self.retries = retries
        self.retry_timeouts = retry_timeouts
        self.backoff = backoff
        self.max_ranges_per_request = max(1, max_ranges_per_request)
        self.coalesce_gap = coalesce_gap
        self.stats = ClientStats()
        self.tokens = TokenCache()
        self._user_agent = user_agent
        self._max_connections = max_connections
        self._fast_ranges = fast_ranges
        self._verify = verify  # TLS: True (system CAs), a CA bundle path, or an SSLContext
        # Where HOST[:PORT] directories of CAs and client certificates are looked for (None:
        # containers/image's certs.d places, see hosts.default_certs_roots).
        self._certs_roots = certs_roots
        self._tls: _TlsContexts | None = None  # made on entering
        self._per_context: _TransportPerContext | None = None
        self._http: httpx.AsyncClient | None = None
        self._fast: RangeTransport | None = None
        self._challenges: dict[str, Challenge | None] = {}
        self._down_until: dict[str, float] = {}  # by base URL: a host's two schemes apart
        # HOST[:PORT] -> the scheme it answered on after the other failed (a registries.conf
        # ``insecure`` registry is listed over both): that one is tried first from then on.
        self._answers_on: dict[str, str] = {}
        self._no_multirange: set[str] = set()
        self._said_unverified: set[str] = set()  # hosts reached over unverified TLS, logged
        # (registry URL of a blob GET) -> (where it was redirected last, time.monotonic()
        # until which that location is used without asking the registry); 0 s: never.
        self.redirect_ttl = redirect_ttl
        self._redirects: OrderedDict[str, tuple[str, float]] = OrderedDict()

    # ---- lifetime ------------------------------------------------------------------------
    async def __aenter__(self) -> RegistryClient:
        # The system's CAs as OpenSSL finds them, SSL_CERT_FILE / SSL_CERT_DIR honoured (as
        # the Go store's crypto/x509 does), for both transports: httpx's own default would
        # be certifi's bundle, which no private registry's CA is in. Plus, per host, its
        # certs.d directory.
        self._tls = _TlsContexts(self._verify, self._certs_roots, self._retire_context)
        limits = httpx.Limits(
            max_connections=self._max_connections,
            max_keepalive_connections=self._max_connections,
        )

        def plain(ctx: ssl.SSLContext) -> httpx.AsyncBaseTransport:
            return httpx.AsyncHTTPTransport(limits=limits, trust_env=False, verify=ctx)

        transport: httpx.AsyncBaseTransport
        transport = self._per_context = _TransportPerContext(plain, self._tls.default)
        self._fast = None
        if self._fast_ranges:
            transport = self._fast = RangeTransport(
                transport,
                ssl_context=self._tls.default,
                max_connections=self._max_connections,
            )
        self._http = httpx.AsyncClient(
            follow_redirects=False,
            timeout=self.resolver.default_timeout,
            transport=transport,
            headers={"User-Agent": self._user_agent, "Accept-Encoding": ACCEPT_ENCODING},
            trust_env=False,
        )
        # Made and loaded now, not by the first request: the default transport imports
        # httpcore and h11, and anyio loads its trio backend on first use (the range
        # transport's limiters). Left to the first request, that was 25-45 ms before its
        # connection was even opened, on the critical path of the first pull after start.
        self._per_context.prepare()
        await anyio.sleep(0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _retire_context(self, ctx: ssl.SSLContext) -> None:
        """A host's SSL context was replaced (its certs.d changed): its connections go."""
        if self._per_context is not None:
            self._per_context.retire(ctx)
        if self._fast is not None:
            self._fast.retire(ctx)

    def _tls_extensions(self, ep: Endpoint, url: str | httpx.URL) -> dict[str, Any]:
        """The request extension carrying ``ep``'s SSL context for an ``https://`` ``url``
        (the registry, its token server, where it redirects), none for ``http://``."""
        if str(url).startswith("https:") and self._tls is not None:
            if not ep.verify and ep.host not in self._said_unverified:
                self._say_unverified(ep)
            return {SSL_CONTEXT: self._tls.for_host(ep.certs_host, ep.verify)}
        return {}

    def _say_unverified(self, ep: Endpoint) -> None:
        """Log once per host that its TLS certificate goes unchecked, as the user asked
        (registries.conf ``insecure``), in place of urllib3's InsecureRequestWarning, which
        it prints on stderr at every request."""
        self._said_unverified.add(ep.host)
        warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
        log.warning(
            "%s: TLS certificate not verified (insecure = true in registries.conf)", ep.host
        )

    def _tls_note(self, ep: Endpoint) -> str:
        return self._tls.describe(ep.certs_host) if self._tls is not None else ""

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("RegistryClient used outside 'async with'")
        return self._http

    # ---- endpoints -----------------------------------------------------------------------
    def endpoints(
        self, registry: str, repository: str = "", *, digested: bool = False
    ) -> list[Endpoint]:
        """Mirrors then origin (:meth:`ResolverConfig.endpoints`); endpoints that recently
        refused connections or stalled go last (for :data:`DOWN_FOR` or :data:`STALLED_FOR`
        seconds)."""
        eps = self.resolver.endpoints(registry, repository, digested=digested)
        for i, ep in enumerate(eps):  # a host's scheme that answered goes before its other one
            scheme = self._answers_on.get(ep.host)
            if scheme is None or ep.scheme == scheme:
                continue
            for j in range(i + 1, len(eps)):
                if eps[j].host == ep.host and eps[j].scheme == scheme:
                    eps[i], eps[j] = eps[j], eps[i]
                    break
        now = time.monotonic()
        up = [e for e in eps if self._down_until.get(e.base_url, 0) <= now]
        down = [e for e in eps if self._down_until.get(e.base_url, 0) > now]
        return up + down

    async def _on_endpoints(
        self, ref: Reference, op: Callable[[Endpoint], Awaitable[T]], *, origin_only: bool = False
    ) -> T:
        """Run `op` on each endpoint in turn until one succeeds. Pushes go to the origin only.
        A host that answers on one scheme after failing on the other (registries.conf's
        ``insecure``: plain HTTP, then TLS unverified) is asked on that scheme first from then
        on, so each later request does not pay the failed one again.

        A mirror's failure of any registry kind (down, stalled, missing, refused) falls through
        to the next; the last endpoint's error is the one raised. With several endpoints, one
        that failed to connect goes last for :data:`DOWN_FOR` seconds, one that timed out for
        :data:`STALLED_FOR`.
        """
        if origin_only:
            eps = [e for e in self.endpoints(ref.registry) if not e.is_mirror]
        else:
            eps = self.endpoints(ref.registry, ref.repository, digested=ref.digest is not None)
        last: RegistryError | None = None
        failed: set[tuple[str, str]] = set()
        for ep in eps:
            try:
                result = await op(ep)
            except RegistryError as e:
                last = e
                failed.add((ep.host, ep.scheme))
                if isinstance(e, RegistryUnavailable) and len(eps) > 1:
                    down = STALLED_FOR if isinstance(e, RegistryTimeout) else DOWN_FOR
                    self._down_until[ep.base_url] = time.monotonic() + down
                if isinstance(e, DigestMismatch | RangeError) and not ep.is_mirror:
                    raise
            else:
                if any(h == ep.host and sch != ep.scheme for h, sch in failed):
                    self._answers_on[ep.host] = ep.scheme
                return result
        assert last is not None
        raise last

    # ---- auth ----------------------------------------------------------------------------
    async def _creds_for(self, ep: Endpoint, registry: str, repo: str) -> Credentials | None:
        """The origin's credentials go to the origin only; a mirror gets its own, if any
        (credential helpers run off the event loop)."""
        if ep.is_mirror:
            return await self.credentials.alookup(ep.certs_host, repo, origin=False)
        return await self.credentials.alookup(registry, repo)

    async def _auth_header(
        self, ep: Endpoint, ref_registry: str, scopes: tuple[str, ...], repo: str
    ) -> str | None:
        # By scheme too: a challenge met over TLS never sends credentials over plain HTTP.
        challenge = self._challenges.get(ep.base_url)
        if challenge is None:
            return None
        creds = await self._creds_for(ep, ref_registry, repo)
        if challenge.scheme == "basic":
            if creds is None or not creds.username:
                raise AuthenticationError(
                    f"{ep.host} requires Basic authentication and no credentials are "
                    f"configured for {ref_registry}",
                    host=ep.host,
                    repository=repo or None,
                )
            return basic_header(creds)
        if challenge.scheme == "bearer":
            token = await self.tokens.fetch(
                self.http,
                challenge,
                scopes,
                creds,
                ep.request_timeout,
                ep.host,
                extensions=self._tls_extensions(ep, challenge.realm or ""),
                tls_note=functools.partial(self._tls_note, ep),
            )
            return f"Bearer {token}"
        raise AuthenticationError(
            f"{ep.host} asks for unsupported auth scheme {challenge.scheme!r}", host=ep.host
        )

    # ---- the one request path ------------------------------------------------------------
    async def _call(
        self,
        ep: Endpoint,
        method: str,
        path: str,
        *,
        registry: str,
        repo: str = "",
        actions: tuple[str, ...] = ("pull",),
        extra_scopes: tuple[str, ...] = (),
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
        reader: Reader[T] = _read_all,  # type: ignore[assignment]
        ok: Sequence[int] = (200,),
        digest: str | None = None,
        retry: bool = True,
        max_body: int | None = None,
    ) -> tuple[httpx.Response, T]:
        """Send one logical request: auth, redirects, retries, status → typed errors.

        ``max_body``: the most body bytes the answer may have; the range transport reads no
        more than that plus one (``RangeTransport``'s ``body_limit`` request extension), the
        reader enforces it."""
        scopes = ((scope_for(repo, actions),) if repo else ()) + extra_scopes
        attempts = (self.retries + 1) if retry else 1
        what = f"{ep.host}/{repo}" if repo else ep.host
        if digest:
            what += f"@{digest}"
        last_exc: RegistryError | None = None
        for attempt in range(attempts):
            if attempt:
                self.stats.retries += 1
                delay = self.backoff * (2 ** (attempt - 1))
                if isinstance(last_exc, RegistryUnavailable) and last_exc.retry_after:
                    delay = max(delay, min(last_exc.retry_after, RETRY_AFTER_MAX))
                await anyio.sleep(delay)
            try:
                return await self._send_once(
                    ep,
                    method,
                    path,
                    registry,
                    repo,
                    scopes,
                    headers,
                    content,
                    params,
                    reader,
                    ok,
                    what,
                    digest,
                    max_body,
                )
            except RegistryTimeout as e:
                # A mirror that stalls is not asked again: the next endpoint is (the origin
                # comes after every mirror), within the caller's deadline.
                if not (self.retry_timeouts and method in ("GET", "HEAD")) or ep.is_mirror:
                    raise
                last_exc = e
            except RegistryUnavailable as e:
                last_exc = e
            except RangeError as e:
                if e.status == 416:  # the range itself is wrong: asking again cannot help
                    raise
                last_exc = e  # an answer that does not match the request: ask again
        assert last_exc is not None
        raise last_exc

    async def _send_once(
        self,
        ep: Endpoint,
        method: str,
        path: str,
        registry: str,
        repo: str,
        scopes: tuple[str, ...],
        headers: Mapping[str, str] | None,
        content: bytes | None,
        params: Mapping[str, str] | None,
        reader: Reader[T],
        ok: Sequence[int],
        what: str,
        digest: str | None,
        max_body: int | None = None,
    ) -> tuple[httpx.Response, T]:
        hdrs = dict(ep.headers)
        hdrs.update(headers or {})
        url = path if path.startswith(("http://", "https://")) else ep.base_url + path
        # Authorization goes to the endpoint's host and port only, and never from https://
        # down to http:// (it would go out in clear text); http:// up to https:// keeps it, as
        # Python requests' rule (should_strip_auth) has it. Also for a URL the registry named
        # (an upload's Location): one on another host gets none, as containerd's pusher
        # strips its authorizer there (it got the registry's credentials).
        origin = urlsplit(ep.base_url)
        authed_once = False
        redirects = 0
        cur_method = method
        timeout = httpx.Timeout(ep.request_timeout)
        extensions = {} if max_body is None else {BODY_LIMIT: max_body}
        # A blob GET the registry redirected before goes where it went then (no params: the
        # location carries its own query); what comes back other than asked sends it to the
        # registry again, a failure to get there leaves the retry to the registry too. A
        # blob's path ends so (a repository may be named ``…/blobs``: its manifests' paths
        # have ``/blobs/`` in them, and a tag may name another manifest a moment later).
        start = url
        blob_get = method == "GET" and bool(digest) and path.endswith(f"/blobs/{digest}")
        kept_key = url if blob_get and not params else None
        kept = self._kept_redirect(kept_key)
        if kept is not None:
            url, redirects = kept, 1
            self.stats.redirects_reused += 1
        while True:
            send_headers = dict(hdrs)
            target = urlsplit(url)
            same_host = target.netloc == origin.netloc and not (
                origin.scheme == "https" and target.scheme == "http"
            )
            # Whom a transport failure is about: the registry, or the host it redirected to.
            peer = (
                ep.base_url
                if same_host
                else f"{target.scheme}://{target.netloc}, where the registry redirected"
            )
            auth = None
            if same_host:
                auth = await self._auth_header(ep, registry, scopes, repo)
                if auth:
                    send_headers["Authorization"] = auth
            req = self.http.build_request(
                cur_method,
                url,
                headers=send_headers,
                content=content if cur_method not in ("GET", "HEAD") else None,
                params=params if redirects == 0 else None,
                timeout=timeout,
                extensions={**extensions, **self._tls_extensions(ep, url)},
            )
            self.stats.requests += 1
            try:
                with _transport_errors(
                    ep,
                    repo,
                    digest,
                    f"{what}: no answer from {peer} within {ep.request_timeout:g}s",
                    f"{what}: cannot connect to {peer}",
                    tls_note=functools.partial(self._tls_note, ep),
                    on_broken=f"{what}: connection to {peer} broke off",
                ):
                    if self._fast is not None and self._fast.handles(req):
                        # Range GETs skip AsyncClient.send (auth flow, cookies, hooks: none
                        # used here) and go straight to the transport: less work per request.
                        resp = await self._fast.handle_async_request(req)
                        resp.request = req
                    else:
                        resp = await self.http.send(req, stream=True)
            except Exception:  # not a cancellation: the caller's, not the location's doing
                if kept is not None:
                    self._forget_redirect(kept_key)
                raise
            try:
                status = resp.status_code
                if status in (301, 302, 303, 307, 308) and "location" in resp.headers:
                    redirects += 1
                    if redirects > MAX_REDIRECTS:
                        raise RegistryError(f"{what}: too many redirects", host=ep.host)
                    try:
                        url = urljoin(str(resp.request.url), resp.headers["location"])
                        httpx.URL(url)  # what build_request would refuse, refused here
                    except (ValueError, httpx.InvalidURL) as e:
                        raise RegistryError(
                            f"{what}: HTTP {status} to an invalid Location "
                            f"{resp.headers['location']!r}: {e}",
                            host=ep.host,
                            status=status,
                        ) from None
                    if status == 303 or (
                        status in (301, 302) and cur_method not in ("GET", "HEAD")
                    ):
                        cur_method = "GET"
                    continue
                if status == 401 and same_host and not authed_once:
                    challenge = parse_challenge(resp.headers.get("www-authenticate"))
                    if challenge is not None:
                        # A Bearer challenge may name a scope we did not know; use ours plus it.
                        extra = challenge.params.get("scope")
                        if extra and extra not in scopes:
                            scopes = (*scopes, extra)
                        if auth and auth.startswith("Bearer "):
                            # The token we sent was refused — one the registry calls expired
                            # (its challenge then adds error="invalid_token") while the
                            # expiry it came with says otherwise: that one is fetched afresh.
                            self.tokens.forget(auth.removeprefix("Bearer "))
                        self._challenges[ep.base_url] = challenge
                        authed_once = True
                        self.stats.auth_round_trips += 1
                        continue
                if status in ok:
                    try:
                        with _transport_errors(
                            ep,
                            repo,
                            digest,
                            f"{what}: body from {peer} stalled for {ep.request_timeout:g}s",
                            f"{what}: connection to {peer} lost while reading the body",
                            tls_note=functools.partial(self._tls_note, ep),
                        ):
                            result = await reader(resp)
                    except Exception:
                        if kept is not None:
                            self._forget_redirect(kept_key)
                        raise
                    if redirects and url != kept:  # a location the kept one moved to, too
                        self._keep_redirect(kept_key, url)
                    return resp, result
                if kept is not None:  # an expired signature, a moved object: ask the registry
                    self._forget_redirect(kept_key)
                    kept, url, redirects, cur_method = None, start, 0, method
                    continue
                body = b""
                if cur_method != "HEAD":
                    try:
                        body = await _read_raw(resp, MAX_ERROR_BODY)
                    except httpx.HTTPError:
                        body = b""
                raise self._status_error(
                    resp, body, what, ep, registry, repo, digest, redirected=not same_host
                )
            finally:
                await resp.aclose()

    def _kept_redirect(self, key: str | None) -> str | None:
        """Where the blob GET of registry URL ``key`` was redirected last, while that is
        fresh (``redirect_ttl``), else None."""
        if key is None:
            return None
        held = self._redirects.get(key)
        if held is None:
            return None
        if time.monotonic() >= held[1]:
            del self._redirects[key]
            return None
        self._redirects.move_to_end(key)
        return held[0]

    def _keep_redirect(self, key: str | None, location: str) -> None:
        if key is None or self.redirect_ttl <= 0:
            return
        self._redirects[key] = (location, time.monotonic() + self.redirect_ttl)
        self._redirects.move_to_end(key)
        while len(self._redirects) > REDIRECTS_KEPT:
            self._redirects.popitem(last=False)

    def _forget_redirect(self, key: str | None) -> None:
        if key is not None:
            self._redirects.pop(key, None)

    def _status_error(
        self,
        resp: httpx.Response,
        body: bytes,
        what: str,
        ep: Endpoint,
        registry: str,
        repo: str,
        digest: str | None,
        redirected: bool = False,
    ) -> RegistryError:
        """The typed error for an answer with a status not asked for.

        ``redirected``: the answer is from the host the registry redirected to (a storage
        host, a CDN), which the message names; a 401/403 there is about the signed URL the
        registry gave (expired, or refused), not the client's credentials, so it is retried
        — the registry gives a new URL — as a 5xx is."""
        status = resp.status_code
        detail = _error_detail(resp, body)
        detail = f" ({detail})" if detail else ""
        kw: dict[str, Any] = {
            "host": ep.host,
            "repository": repo or None,
            "digest": digest,
            "status": status,
        }
        if redirected:
            where = resp.request.url.netloc.decode("ascii", "replace")
            detail += f" from {where}, where the registry redirected"
        if status == 401 and not redirected:
            # What was sent: a helper's answer is cached by now (never run here, on the loop).
            host, origin = (ep.host, False) if ep.is_mirror else (registry, True)
            creds = self.credentials.lookup(host, repo, origin=origin, helpers=False)
            who = f"user {creds.username!r}" if creds and creds.username else "no credentials"
            return AuthenticationError(
                f"{what}: authentication failed with {who} (HTTP 401){detail}", **kw
            )
        if status == 403 and not redirected:
            return AuthenticationError(f"{what}: access denied (HTTP 403){detail}", **kw)
        if status == 404:
            return NotFoundError(f"{what}: not found (HTTP 404){detail}", **kw)
        if status == 416:
            return RangeError(f"{what}: range not satisfiable (HTTP 416){detail}", **kw)
        if status in RETRY_STATUSES or status in (401, 403):
            kind = "server error" if status in RETRY_STATUSES else "refused:"
            err = RegistryUnavailable(f"{what}: {kind} HTTP {status}{detail}", **kw)
            err.retry_after = retry_after(resp.headers.get("retry-after"))
            return err
        return RegistryError(f"{what}: unexpected HTTP {status}{detail}", **kw)

    async def _blob_call(
        self, ep: Endpoint, ref: Reference, digest: str, method: str, **kw: Any
    ) -> tuple[httpx.Response, Any]:
        """A request on `/v2/<repo>/blobs/<digest>` of the origin or a mirror (the repository
        there, as registries.conf may rewrite it)."""
        repo = ep.repository or ref.repository
        return await self._call(
            ep,
            method,
            f"/v2/{repo}/blobs/{digest}",
            registry=ref.registry,
            repo=repo,
            digest=digest,
            **kw,
        )

    # ---- pull ----------------------------------------------------------------------------
    async def ping(self, registry: str) -> None:
        """GET /v2/ (answering an auth challenge); raises if no endpoint speaks v2."""

        async def op(ep: Endpoint) -> None:
            await self._call(ep, "GET", "/v2/", registry=registry)

        await self._on_endpoints(Reference(registry, "x", "latest"), op)

    async def warm(self, ref: Reference | str, connections: int) -> int:
        """Open up to ``connections`` connections for ``ref``'s blob range reads ahead of
        them (:meth:`RangeTransport.warm`), on the first endpoint; how many are open. A
        no-op (0) without the fast range path."""
        ref = _ref(ref)
        try:
            eps = self.endpoints(ref.registry, ref.repository, digested=ref.digest is not None)
        except RegistryError:  # registries.conf blocks it, or names nothing: fetches report it
            return 0
        if self._fast is None or not eps or connections <= 0:
            return 0
        ep = eps[0]
        count = min(connections, self._max_connections)
        try:
            ctx = self._tls_extensions(ep, ep.base_url).get(SSL_CONTEXT)
        except ConfigError:
            return 0  # the requests that follow report it
        return await self._fast.warm(ep.base_url, count, ep.request_timeout, ctx)

    async def _fetch_manifest(
        self, ref: Reference, reference: str, *, origin_only: bool = False
    ) -> ManifestResult:
        async def op(ep: Endpoint) -> ManifestResult:
            repo = ep.repository or ref.repository  # as registries.conf may rewrite it
            resp, raw = await self._call(
                ep,
                "GET",
                f"/v2/{repo}/manifests/{reference}",
                registry=ref.registry,
                repo=repo,
                headers={"Accept": ACCEPT},
                reader=_limited_reader(MAX_MANIFEST_BYTES),
                digest=reference if ":" in reference else None,
            )
            # Up to 4 MiB hashed and decoded: in a worker thread, off the caller's event loop
            # (the store answers FUSE requests there).
            return await anyio.to_thread.run_sync(
                _checked_manifest, raw, resp.headers.get("content-type"), reference, ep.host, ref
            )

        return await self._on_endpoints(ref, op, origin_only=origin_only)

    async def get_index(self, ref: Reference | str) -> ManifestResult:
        """The manifest as tagged, without platform selection (may be a plain manifest)."""
        ref = _ref(ref)
        return await self._fetch_manifest(ref, ref.reference)

    async def get_manifest(
        self, ref: Reference | str, platform: Platform | str | None = None
    ) -> ManifestResult:
        """An image manifest; an index is resolved to `platform` (default: this host)."""
        ref = _ref(ref)
        result = await self._fetch_manifest(ref, ref.reference)
        if result.media_type in INDEX_TYPES:
            want = Platform.parse(platform) if isinstance(platform, str) else platform
            desc = select_platform(result, want or Platform.host())
            result = await self._fetch_manifest(ref, desc.digest)
            if result.media_type in INDEX_TYPES:
                raise ManifestError(f"{ref}: nested index {desc.digest} is not supported")
        return result

    async def get_config(
        self, ref: Reference | str, platform: Platform | str | None = None
    ) -> dict[str, Any]:
        manifest = await self.get_manifest(ref, platform)
        raw = await self.get_blob(ref, manifest.config.digest, max_bytes=MAX_CONFIG_BYTES)
        try:
            parsed = json.loads(raw)
        except ValueError as e:
            raise ManifestError(f"{ref}: config {manifest.config.digest} is not JSON") from e
        if not isinstance(parsed, dict):
            raise ManifestError(f"{ref}: config {manifest.config.digest} is not a JSON object")
        return parsed

    async def blob_size(
        self, ref: Reference | str, digest: str, *, origin_only: bool = False
    ) -> int:
        """Size by HEAD (no body transferred); `origin_only` skips mirrors (push checks).

        A registry or storage host that refuses HEAD (405, 501) or answers it without a
        ``Content-Length`` is asked ``GET`` with ``Range: bytes=0-0`` instead, and the size
        read from its ``Content-Range`` (a 200: its ``Content-Length``; the body is not
        read), as the Go stargz-snapshotter does (fs/remote/resolver.go ``getSize``)."""
        ref = _ref(ref)
        validate_digest(digest)

        def size_from(resp: httpx.Response) -> int | None:
            try:
                if resp.status_code == 206:  # bytes 0-0/TOTAL ("*": unknown, None)
                    return parse_content_range(resp.headers.get("content-range"))[2]
                return int(resp.headers["content-length"])
            except (KeyError, ValueError, RangeError):
                return None

        async def op(ep: Endpoint) -> int:
            where = f"{ep.host}/{ref.repository}@{digest}"
            try:
                resp, _ = await self._blob_call(ep, ref, digest, "HEAD", reader=_no_body)
            except RegistryError as e:
                if e.status not in HEAD_REFUSED:
                    raise
                how = f"HEAD refused (HTTP {e.status})"
            else:
                size = size_from(resp)
                if size is not None:
                    return size
                how = "HEAD without Content-Length"
            resp, _ = await self._blob_call(
                ep,
                ref,
                digest,
                "GET",
                headers={"Range": "bytes=0-0"},
                reader=_no_body,
                ok=(200, 206),
                max_body=1,
            )
            size = size_from(resp)
            if size is None:
                raise RegistryError(
                    f"{where}: {how}, and a GET of its first byte told no size (HTTP "
                    f"{resp.status_code}, Content-Range {resp.headers.get('content-range')!r}, "
                    f"Content-Length {resp.headers.get('content-length')!r})",
                    host=ep.host,
                    repository=ref.repository,
                    digest=digest,
                )
            return size

        return await self._on_endpoints(ref, op, origin_only=origin_only)

    async def blob_exists(
        self, ref: Reference | str, digest: str, *, origin_only: bool = False
    ) -> bool:
        try:
            await self.blob_size(ref, digest, origin_only=origin_only)
            return True
        except NotFoundError:
            return False

    async def get_blob(
        self, ref: Reference | str, digest: str, *, max_bytes: int | None = None
    ) -> bytes:
        """The whole blob, verified against its digest (never returns unverified bytes).

        With ``max_bytes``, a body longer than that raises :class:`TooLargeError` as soon as
        it is read past the limit (nothing more is kept): for small metadata blobs (an image
        config) whose size the caller bounds. A body sent content-encoded raises
        :class:`ContentEncodingError` before any of it is read."""
        ref = _ref(ref)
        validate_digest(digest)
        reader = _limited_reader(max_bytes, "blob")

        async def op(ep: Endpoint) -> bytes:
            _, data = await self._blob_call(ep, ref, digest, "GET", reader=reader)
            self.stats.body_bytes += len(data)
            _verify(data, digest, ep.host, ref.repository)
            return data

        return await self._on_endpoints(ref, op)

    async def download_blob(self, ref: Reference | str, digest: str, dest: Path) -> int:
        """Stream a blob to `dest` atomically, verifying the digest before it appears."""
        ref = _ref(ref)
        validate_digest(digest)
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.part")

        async def reader(resp: httpx.Response) -> int:
            _check_identity(resp)
            h = hashlib.new(digest.split(":", 1)[0])
            n = 0
            with open(tmp, "wb") as f:
                async for chunk in resp.aiter_raw(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
                    n += len(chunk)
            got = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
            if got != digest:
                tmp.unlink(missing_ok=True)
                raise DigestMismatch(
                    f"{ref.registry}/{ref.repository}: blob {digest} hashes to {got}",
                    host=ref.registry,
                    repository=ref.repository,
                    digest=digest,
                )
            return n

        async def op(ep: Endpoint) -> int:
            _, n = await self._blob_call(
                ep,
                ref,
                digest,
                "GET",
                reader=reader,
            )
            self.stats.body_bytes += n
            return n

        try:
            n = await self._on_endpoints(ref, op)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(dest)
        return n

    async def read_range(self, ref: Reference | str, digest: str, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a blob by one Range request (unverified: the
        caller verifies chunks against the TOC's chunk digests)."""
        if offset < 0 or size < 0:
            raise RangeError(f"invalid range offset={offset} size={size}", digest=digest)
        if size == 0:
            return b""
        return (await self.read_ranges(ref, digest, [(offset, size)]))[0]

    async def read_ranges(
        self, ref: Reference | str, digest: str, ranges: Sequence[tuple[int, int]]
    ) -> list[bytes]:
        """Several (offset, size) ranges; results in the order asked.

        Overlapping and adjacent ranges are coalesced; up to `max_ranges_per_request` spans go
        in one multi-range request; a server that does not answer multi-range requests as
        such (200, 416, or a single-part 206 that covers only some of the spans, as S3 may
        send) is remembered and then asked one range at a time.
        """
        ref = _ref(ref)
        validate_digest(digest)
        for o, s in ranges:
            if o < 0 or s < 0:
                raise RangeError(f"invalid range offset={o} size={s}", digest=digest)
        spans = coalesce(ranges, self.coalesce_gap)
        parts: dict[tuple[int, int], bytes] = {}

        async def op(ep: Endpoint) -> None:
            batch = self.max_ranges_per_request if ep.host not in self._no_multirange else 1
            groups = [spans[i : i + batch] for i in range(0, len(spans), batch)]
            await _run_all(
                [
                    functools.partial(self._fetch_spans, ep, ref, digest, group, parts)
                    for group in groups
                    if not all((s.start, s.end) in parts for s in group)
                ]
            )

        await self._on_endpoints(ref, op)
        return [slice_from(parts, o, s) if s else b"" for o, s in ranges]

    async def _fetch_spans(
        self,
        ep: Endpoint,
        ref: Reference,
        digest: str,
        group: list[Span],
        parts: dict[tuple[int, int], bytes],
    ) -> None:
        multi = len(group) > 1

        async def reader(resp: httpx.Response) -> dict[tuple[int, int], bytes]:
            if resp.status_code == 200 and multi:
                return {}  # server ignores multi-range; we fall back below
            _check_identity(resp)

            def bad(message: str, kind: type[RangeError] = RangeError) -> RangeError:
                return fault(message, kind, _redirected_host(resp, ep))

            try:
                plan = range_body(group, resp.status_code, resp.headers)
            except RangeNotHonoured as e:
                raise bad(str(e), RangeNotHonoured) from e
            except RangeError as e:
                raise bad(str(e)) from e

            def too_long(n: int) -> RangeError:
                if resp.status_code == 200:  # no Content-Length said so before the body did
                    return bad(
                        f"ignores Range requests (answered 200 with more than {plan.limit} "
                        f"bytes to {range_header(group)}): the blob cannot be pulled lazily "
                        "from it",
                        RangeNotHonoured,
                    )
                return bad(
                    f"answer to {range_header(group)} longer than the {plan.limit} bytes "
                    f"expected (received {n} and stopped reading)"
                )

            body = await _read_raw(resp, plan.limit, too_long)
            if plan.boundary is not None:
                try:
                    got = parse_multipart_byteranges(body, plan.boundary)
                except RangeError as e:
                    raise bad(str(e)) from e
                return covered(got, bad)
            if len(body) != plan.limit:
                raise bad(
                    f"range {plan.start}-{plan.start + plan.limit - 1} body has {len(body)} bytes"
                )
            got = {(plan.start, plan.start + plan.limit): body}
            # One part to several spans: all of them when the server merged them (RFC 9110
            # §14.2 lets it), some when it answers the first range only (S3 may): the spans
            # it left out are asked one at a time below.
            return got if multi else covered(got, bad)

        def fault(
            message: str, kind: type[RangeError] = RangeError, redirected: str | None = None
        ) -> RangeError:
            """The error for an answer unlike the request; ``redirected``: the host that
            answered, where the registry redirected (a CDN, an object store), is the one
            named as doing so — the registry answered as it should."""
            if kind is RangeNotHonoured:  # the message says what the server does
                who = (
                    f"storage host {redirected}, where the registry redirected,"
                    if redirected
                    else f"registry {ep.host}"
                )
                message = f"{who} {message}"
            elif redirected:
                message += f" (from {redirected}, where the registry redirected)"
            return kind(
                f"{ep.host}/{ref.repository}@{digest}: {message}",
                host=ep.host,
                repository=ref.repository,
                digest=digest,
            )

        def covered(
            got: dict[tuple[int, int], bytes], bad: Callable[[str], RangeError] = fault
        ) -> dict[tuple[int, int], bytes]:
            # Checked inside the request so that an answer for other bytes is retried.
            for s in group:
                try:
                    slice_from(got, s.start, s.size)
                except RangeError as e:
                    raise bad(str(e)) from e
            return got

        try:
            _, got = await self._blob_call(
                ep,
                ref,
                digest,
                "GET",
                headers={"Range": range_header(group)},
                reader=reader,
                ok=(200, 206),
                max_body=body_limit(group),
            )
        except RangeError as e:
            if not (multi and e.status == 416):
                raise
            got = {}  # the multi-range request refused as such: each range is asked alone
        missing = [s for s in group if not covers(got, s.start, s.size)]
        if multi and missing:
            self._no_multirange.add(ep.host)
            for s in group:
                if s not in missing:
                    parts[(s.start, s.end)] = slice_from(got, s.start, s.size)
                    self.stats.body_bytes += s.size
            await _run_all(
                [functools.partial(self._fetch_spans, ep, ref, digest, [s], parts) for s in missing]
            )
            return
        for s in group:
            try:
                data = slice_from(got, s.start, s.size)
            except RangeError as e:
                raise fault(str(e)) from e
            self.stats.body_bytes += len(data)
            parts[(s.start, s.end)] = data

    # ---- push ----------------------------------------------------------------------------
    async def push_blob(
        self,
        ref: Reference | str,
        data: bytes,
        *,
        digest: str | None = None,
        chunk_size: int | None = None,
        mount_from: Reference | str | None = None,
    ) -> BlobPushResult:
        """Upload a blob unless it exists; mount it from `mount_from` (same registry) if it
        can; otherwise monolithic, or chunked PATCHes of `chunk_size` bytes."""
        ref = _ref(ref)
        actual = sha256_digest(data)
        if digest is not None and digest != actual:
            raise DigestMismatch(
                f"{ref.name}: blob to push was named {digest} but hashes to {actual}",
                host=ref.registry,
                repository=ref.repository,
                digest=digest,
            )
        digest = actual
        if await self.blob_exists(ref, digest, origin_only=True):
            return BlobPushResult(digest, len(data), "exists")
        src = None
        if isinstance(mount_from, Reference):
            src = mount_from
        elif mount_from:  # a repository of the same registry
            src = Reference(ref.registry, mount_from, "latest")

        async def op(ep: Endpoint) -> BlobPushResult:
            base = f"/v2/{ref.repository}/blobs/uploads/"
            kw: dict[str, Any] = {
                "registry": ref.registry,
                "repo": ref.repository,
                "actions": ("pull", "push"),
                "digest": digest,
            }
            params = None
            extra: tuple[str, ...] = ()
            if src is not None and src.registry == ref.registry:
                params = {"mount": digest, "from": src.repository}
                extra = (scope_for(src.repository, ("pull",)),)
            resp, _ = await self._call(
                ep, "POST", base, params=params, extra_scopes=extra, ok=(201, 202), **kw
            )
            if resp.status_code == 201:
                return BlobPushResult(digest, len(data), "mounted")
            location = _location(resp, ep)
            if chunk_size and len(data) > chunk_size:
                for start in range(0, len(data), chunk_size):
                    chunk = data[start : start + chunk_size]
                    resp, _ = await self._call(
                        ep,
                        "PATCH",
                        location,
                        content=chunk,
                        ok=(202,),
                        retry=False,
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Range": f"{start}-{start + len(chunk) - 1}",
                            "Content-Length": str(len(chunk)),
                        },
                        **kw,
                    )
                    location = _location(resp, ep)
                await self._call(
                    ep,
                    "PUT",
                    _with_digest(location, digest),
                    content=b"",
                    ok=(201,),
                    retry=False,
                    headers={"Content-Length": "0"},
                    **kw,
                )
            else:
                await self._call(
                    ep,
                    "PUT",
                    _with_digest(location, digest),
                    content=data,
                    ok=(201,),
                    retry=False,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(len(data)),
                    },
                    **kw,
                )
            return BlobPushResult(digest, len(data), "uploaded")

        # An upload session broken by a connection error is started again from scratch.
        for attempt in range(self.retries + 1):
            try:
                return await self._on_endpoints(ref, op, origin_only=True)
            except RegistryTimeout:
                raise
            except RegistryUnavailable:
                if attempt == self.retries:
                    raise
                self.stats.retries += 1
                await anyio.sleep(self.backoff * (2**attempt))
        raise AssertionError("unreachable")

    async def push_manifest(self, ref: Reference | str, raw: bytes, media_type: str) -> str:
        """PUT a manifest or index under ref's tag (or digest); returns its digest."""
        ref = _ref(ref)
        digest = sha256_digest(raw)
        if ref.digest and ref.digest != digest and not ref.tag:
            raise DigestMismatch(
                f"{ref.name}: manifest to push under {ref.digest} hashes to {digest}",
                host=ref.registry,
                repository=ref.repository,
                digest=ref.digest,
            )
        target = ref.tag or digest

        async def op(ep: Endpoint) -> str:
            resp, _ = await self._call(
                ep,
                "PUT",
                f"/v2/{ref.repository}/manifests/{target}",
                registry=ref.registry,
                repo=ref.repository,
                actions=("pull", "push"),
                content=raw,
                headers={"Content-Type": media_type},
                ok=(201,),
            )
            served = resp.headers.get("docker-content-digest")
            if served and served != digest:
                raise DigestMismatch(
                    f"{ep.host}/{ref.repository}: registry stored manifest as {served}, "
                    f"we sent {digest}",
                    host=ep.host,
                    repository=ref.repository,
                    digest=digest,
                )
            return digest

        return await self._on_endpoints(ref, op, origin_only=True)

    async def tag(self, ref: Reference | str, new_tag: str) -> str:
        """Point `new_tag` at what `ref` names (same repository); returns the digest."""
        ref = _ref(ref)
        m = await self._fetch_manifest(ref, ref.reference, origin_only=True)
        return await self.push_manifest(ref.with_tag(new_tag), m.raw, m.media_type)

    async def push_image(
        self,
        ref: Reference | str,
        config: bytes,
        layers: Sequence[tuple[bytes, str] | tuple[bytes, str, Mapping[str, str]]],
        *,
        annotations: Mapping[str, str] | None = None,
        media_type: str = "application/vnd.oci.image.manifest.v1+json",
        config_media_type: str | None = None,
        chunk_size: int | None = None,
    ) -> ManifestResult:
        """Push layers (bytes, media type[, annotations]), config and manifest; returns it."""
        from .manifest import build_manifest

        ref = _ref(ref)
        descs = []
        for item in layers:
            blob, mt = item[0], item[1]
            ann = dict(item[2]) if len(item) > 2 else None  # type: ignore[misc]
            await self.push_blob(ref, blob, chunk_size=chunk_size)
            descs.append(Descriptor.of(blob, mt, annotations=ann))
        await self.push_blob(ref, config)
        raw, mt = build_manifest(
            config,
            descs,
            annotations=annotations,
            media_type=media_type,
            config_media_type=config_media_type,
        )
        digest = await self.push_manifest(ref, raw, mt)
        return parse_manifest(raw, mt, digest)


@contextlib.contextmanager
def _transport_errors(
    ep: Endpoint,
    repo: str,
    digest: str | None,
    on_timeout: str,
    on_error: str,
    tls_note: Callable[[], str] | None = None,
    on_broken: str | None = None,
) -> Iterator[None]:
    """httpx transport failures → RegistryTimeout (not retried) / RegistryUnavailable; a TLS
    failure says where the host's CAs and client certificate were looked for (``tls_note``).
    ``on_broken``, if given, opens the message of a failure after the connection was made (a
    connection reset, a body shorter than its Content-Length), so that it does not read
    "cannot connect"; ``on_error`` opens the others."""
    where = {"host": ep.host, "repository": repo or None, "digest": digest}
    try:
        yield
    except httpx.TimeoutException as e:
        raise RegistryTimeout(f"{on_timeout} ({type(e).__name__})", **where) from e
    except (httpx.TransportError, ConnectionError) as e:
        note = f" ({tls_note()})" if tls_note is not None and is_tls_failure(e) else ""
        connected = isinstance(e, httpx.ReadError | httpx.WriteError | httpx.RemoteProtocolError)
        opening = on_broken if on_broken is not None and connected and not note else on_error
        raise RegistryUnavailable(f"{opening}: {_describe(e)}{note}", **where) from e


def _describe(exc: BaseException) -> str:
    """The first non-empty message along the cause chain (httpx often wraps a silent one)."""
    seen: BaseException | None = exc
    while seen is not None:
        if str(seen):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


async def _run_all(jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run jobs concurrently; on failure raise the first RegistryError itself, not a group,
    so callers see the same typed errors whether one request or many went out."""
    if len(jobs) == 1:
        await jobs[0]()
        return
    try:
        async with anyio.create_task_group() as tg:
            for job in jobs:
                tg.start_soon(job)
    except BaseExceptionGroup as group:
        for exc in _leaves(group):
            if isinstance(exc, RegistryError):
                raise exc from None
        raise


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _ref(ref: Reference | str) -> Reference:
    return ref if isinstance(ref, Reference) else Reference.parse(ref)


def _verify(data: bytes, digest: str, host: str, repo: str) -> None:
    algo = digest.split(":", 1)[0]
    try:
        got = f"{algo}:{hashlib.new(algo, data).hexdigest()}"
    except ValueError as e:
        raise DigestMismatch(f"unsupported digest algorithm in {digest}", digest=digest) from e
    if got != digest:
        raise DigestMismatch(
            f"{host}/{repo}: blob {digest} hashes to {got}",
            host=host,
            repository=repo,
            digest=digest,
        )


def _checked_manifest(
    raw: bytes, content_type: str | None, reference: str, host: str, ref: Reference
) -> ManifestResult:
    """``raw`` parsed, after checking it hashes to ``reference`` when that is a digest."""
    digest = sha256_digest(raw)
    if ":" in reference and reference != digest:
        raise DigestMismatch(
            f"{host}/{ref.repository}: manifest asked as {reference} hashes to {digest}",
            host=host,
            repository=ref.repository,
            digest=reference,
        )
    return parse_manifest(raw, content_type, digest)


def _limited_reader(limit: int | None, what: str = "manifest") -> Reader[bytes]:
    """Reads a body as sent (:func:`_check_identity`) of at most ``limit`` bytes (None: no
    limit); past it, :class:`ManifestError` (``what`` ``"manifest"``) or
    :class:`TooLargeError`, naming the URL and the limit."""
    error = ManifestError if what == "manifest" else TooLargeError

    async def reader(resp: httpx.Response) -> bytes:
        _check_identity(resp)
        return await _read_raw(
            resp, limit, lambda n: error(f"{resp.request.url}: {what} larger than {limit} bytes")
        )

    return reader


def _redirected_host(resp: httpx.Response, ep: Endpoint) -> str | None:
    """The host (``HOST[:PORT]``) that sent ``resp`` when it is not ``ep``'s — one the
    registry redirected the request to — else None."""
    where = resp.request.url.netloc.decode("ascii", "replace")
    return None if where == urlsplit(ep.base_url).netloc else where


def _check_identity(resp: httpx.Response) -> None:
    """Refuse a body sent with a content coding (gzip, br, …): :class:`ContentEncodingError`
    naming the URL (host, repository, blob) and the header, before any of the body is read.

    The bytes wanted are the stored ones — a blob, a range of one, a manifest — which are
    checked against a digest (the blob's, a TOC chunk's, the manifest's), so a decoded body is
    of no use, and decoding one can expand a small answer without bound (a 1 MB gzip body
    inflates to 1 GiB). The client asks for ``identity`` (RFC 9110 §12.5.3), as the Go
    stargz-snapshotter does on its range requests; a server that encodes anyway is refused
    rather than decoded."""
    coding = resp.headers.get("content-encoding", "").strip().lower()
    if coding not in ("", "identity"):
        url = resp.request.url
        raise ContentEncodingError(
            f"{url}: answered with Content-Encoding: {coding} (asked for identity); the body "
            "must be the stored bytes, verified against their digest, so it is refused, not "
            "decoded",
            host=url.netloc.decode("ascii", "replace"),
            status=resp.status_code,
        )


async def _read_raw(
    resp: httpx.Response, limit: int | None, too_big: Callable[[int], Exception] | None = None
) -> bytes:
    """The body as sent (``aiter_raw``: no content decoding), read in the pieces the
    transport yields, joined once (one piece is returned as it is: no copy).

    Past ``limit`` bytes (None: no limit) reading stops: ``too_big(bytes received)`` is
    raised, or, without ``too_big``, the first ``limit`` bytes are returned (an error body
    whose start is enough)."""
    pieces: list[bytes] = []
    n = 0
    async for piece in resp.aiter_raw():
        n += len(piece)
        if limit is not None and n > limit:
            if too_big is not None:
                raise too_big(n)
            pieces.append(piece[: len(piece) - (n - limit)])
            break
        pieces.append(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


async def _no_body(resp: httpx.Response) -> None:
    return None


def _location(resp: httpx.Response, ep: Endpoint) -> str:
    loc = resp.headers.get("location")
    if not loc:
        raise RegistryError(f"{ep.host}: upload answer without Location", host=ep.host)
    return urljoin(str(resp.request.url), loc)


def _with_digest(location: str, digest: str) -> str:
    sep = "&" if "?" in location else "?"
    return f"{location}{sep}digest={digest}"
