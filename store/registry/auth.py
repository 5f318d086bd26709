"""Answering registry auth challenges: Basic, and Bearer tokens cached per host and scope.

The flow is distribution's token spec: a 401 carries `WWW-Authenticate: Bearer realm=…,
service=…,scope=…`; we GET the realm with those parameters (Basic credentials if we have any,
anonymous otherwise; a refresh token goes by POST) and send `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from .credentials import Credentials
from .errors import (
    RETRY_STATUSES,
    AuthenticationError,
    RegistryTimeout,
    RegistryUnavailable,
    is_tls_failure,
    retry_after,
)

_PARAM = re.compile(
    r'[\s,]*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*(?:,|$)'
)
_SCHEME = re.compile(r"[\s,]*([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?:\s+|(?=,)|$)")
TOKEN_DEFAULT_EXPIRY = 60.0
TOKEN_EXPIRY_MARGIN = 5.0
# A token answer is a small JSON object (real ones: a few KB); a bigger one is refused unread.
TOKEN_MAX_BYTES = 1 << 20
# Redirects a token request follows (the registry client's own MAX_REDIRECTS).
TOKEN_REDIRECTS = 5


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic" or "bearer"
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


def parse_challenge(value: str | None) -> Challenge | None:
    """The challenge to answer from a WWW-Authenticate header (several headers arrive joined
    by commas): the first Basic or Bearer one, as containers/image picks, else the first.
    Each challenge's parameters are its own (a later challenge's realm is not taken)."""
    challenges = parse_challenges(value)
    for c in challenges:
        if c.scheme in ("basic", "bearer"):
            return c
    return challenges[0] if challenges else None


def parse_challenges(value: str | None) -> list[Challenge]:
    """Every challenge of a WWW-Authenticate value (RFC 9110 §11.6.1: ``scheme param=v, …``,
    challenges separated by commas)."""
    out: list[Challenge] = []
    text, pos = value or "", 0
    while (m := _SCHEME.match(text, pos)) is not None and m.end() > pos:
        scheme, pos = m[1].lower(), m.end()
        params: dict[str, str] = {}
        while (p := _PARAM.match(text, pos)) is not None:
            raw = p[2].replace('\\"', '"') if p[2] is not None else p[3]
            params.setdefault(p[1].lower(), raw)
            pos = p.end()
        out.append(Challenge(scheme, params))
    return out


def basic_header(creds: Credentials) -> str:
    return "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()


def scope_for(repository: str, actions: tuple[str, ...]) -> str:
    return f"repository:{repository}:{','.join(actions)}"


@dataclass
class _CachedToken:
    token: str
    expires_at: float


# (registry host the token is sent to, realm, service, scopes, whose credentials)
TokenKey = tuple[str, str, str, tuple[str, ...], str]


def _holder(creds: Credentials | None) -> str:
    """Whose token the realm gives, as :meth:`TokenCache._fetch_new` asks for it: a refresh
    token's, a user's (Basic), or anonymous (``""``) — a refresh token with no user name is
    not taken for anonymous access."""
    if creds and creds.identity_token:
        return f"refresh:{creds.username}"
    if creds and creds.username and creds.password:
        return f"user:{creds.username}"
    return ""


class TokenCache:
    """Bearer tokens keyed by (registry host, realm, service, scopes, whose credentials);
    dropped when they expire.

    The registry host is in the key, as containers/image and containerd keep tokens per
    registry client: a token goes only to the host whose challenge it was fetched for. Any
    host may name another's realm, service and scope in its challenge; keyed without the
    host, a registry (or mirror) doing so got the token another registry's credentials had
    bought (an identity token's, keyed as anonymous, went to every anonymous host)."""

    def __init__(self) -> None:
        self._tokens: dict[TokenKey, _CachedToken] = {}
        self._locks: dict[TokenKey, anyio.Lock] = {}
        self.fetches = 0  # how many times a token endpoint was asked (tests check caching)

    def get(self, key: TokenKey) -> str | None:
        entry = self._tokens.get(key)
        if entry is None:
            return None
        if time.monotonic() >= entry.expires_at:
            del self._tokens[key]
            return None
        return entry.token

    def clear(self) -> None:
        self._tokens.clear()

    def invalidate(self, key: TokenKey) -> None:
        self._tokens.pop(key, None)

    def forget(self, token: str) -> None:
        """Drop every cached entry holding ``token`` (one a registry refused), and only those:
        the other registries' and scopes' tokens stay."""
        for key in [k for k, entry in self._tokens.items() if entry.token == token]:
            del self._tokens[key]

    async def fetch(
        self,
        http: httpx.AsyncClient,
        challenge: Challenge,
        scopes: tuple[str, ...],
        creds: Credentials | None,
        timeout: float,
        registry_host: str,
        *,
        extensions: Mapping[str, Any] | None = None,
        tls_note: Callable[[], str] | None = None,
    ) -> str:
        """A token for ``scopes``, cached or fetched from the challenge's realm; the request
        carries ``extensions`` (the registry's TLS settings), a TLS failure says
        ``tls_note()``."""
        realm = challenge.realm
        if not realm:
            raise AuthenticationError(
                f"{registry_host}: Bearer challenge without a realm", host=registry_host
            )
        service = challenge.params.get("service", "")
        key = (registry_host, realm, service, scopes, _holder(creds))
        if token := self.get(key):
            return token
        # One fetch per key at a time: a burst of first reads must not ask the server N times.
        lock = self._locks.setdefault(key, anyio.Lock())
        try:
            async with lock:
                if token := self.get(key):
                    return token
                return await self._fetch_new(
                    http,
                    challenge,
                    key,
                    scopes,
                    creds,
                    timeout,
                    registry_host,
                    dict(extensions or {}),
                    tls_note,
                )
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(key, None)  # one lock per key in use, not per key ever seen

    async def _fetch_new(
        self,
        http: httpx.AsyncClient,
        challenge: Challenge,
        key: TokenKey,
        scopes: tuple[str, ...],
        creds: Credentials | None,
        timeout: float,
        registry_host: str,
        extensions: dict[str, Any],
        tls_note: Callable[[], str] | None,
    ) -> str:
        _, realm, service, _, _ = key
        user = creds.username if creds else ""
        self.fetches += 1
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL as e:
            raise AuthenticationError(
                f"{registry_host}: Bearer challenge names an invalid realm {realm!r}: {e}",
                host=registry_host,
            ) from None
        try:
            if creds and creds.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "service": service,
                    "scope": " ".join(scopes),
                    "client_id": "lazybench",
                }
                request = http.build_request(
                    "POST", url, data=form, timeout=timeout, extensions=extensions
                )
            else:
                # The realm's own query is kept, ours added to it (httpx's params= replaces it).
                params = list(url.params.multi_items())
                if service:
                    params.append(("service", service))
                params += [("scope", s) for s in scopes]
                # As containers/image: Basic only with a user and a password (credentials
                # without them, e.g. podman's helper's empty strings, mean anonymous).
                login = creds if creds and creds.username and creds.password else None
                if login:
                    params.append(("account", login.username))
                headers = {"Authorization": basic_header(login)} if login else {}
                request = http.build_request(
                    "GET",
                    url.copy_with(query=None),
                    params=params,
                    headers=headers,
                    timeout=timeout,
                    extensions=extensions,
                )
            resp = await _send_following(http, request)
            try:
                # Asked as identity (the client's Accept-Encoding): a content-coded answer is
                # refused unread, not decoded: a 32 KB zstd body inflates to 1 GiB in one
                # decode, long before the size cap below could see it.
                coding = resp.headers.get("content-encoding", "").strip().lower()
                if coding not in ("", "identity"):
                    raise AuthenticationError(
                        f"{registry_host}: token server {realm} answered with "
                        f"Content-Encoding: {coding} (asked for identity); refused, not decoded",
                        host=registry_host,
                        status=resp.status_code,
                    )
                raw = await _read_capped(resp, TOKEN_MAX_BYTES)
            finally:
                await resp.aclose()
        except httpx.TimeoutException as e:
            raise RegistryTimeout(
                f"token server {realm} for {registry_host} timed out after {timeout:g}s",
                host=registry_host,
            ) from e
        except httpx.TransportError as e:
            note = f" ({tls_note()})" if tls_note is not None and is_tls_failure(e) else ""
            raise RegistryUnavailable(
                f"token server {realm} for {registry_host} unreachable: {e}{note}",
                host=registry_host,
            ) from e
        if resp.status_code in (401, 403):
            who = f"user {user!r}" if user else "anonymous access"
            raise AuthenticationError(
                f"{registry_host}: token server {realm} refused {who} "
                f"(HTTP {resp.status_code}) for {' '.join(scopes) or 'registry access'}",
                host=registry_host,
                status=resp.status_code,
            )
        if resp.status_code in RETRY_STATUSES:
            # Busy or failing for a moment (a 503, a 429 with Retry-After): the request that
            # needed the token is sent again, after the wait asked for, as one the registry
            # itself answered so. An AuthenticationError here is never retried: a token that
            # expired mid-pull, renewed while the token server was busy, failed the read.
            busy = RegistryUnavailable(
                f"{registry_host}: token server {realm} answered HTTP {resp.status_code}",
                host=registry_host,
                status=resp.status_code,
            )
            busy.retry_after = retry_after(resp.headers.get("retry-after"))
            raise busy
        if resp.status_code != 200:
            raise AuthenticationError(
                f"{registry_host}: token server {realm} answered HTTP {resp.status_code}",
                host=registry_host,
                status=resp.status_code,
            )
        if raw is None:
            raise AuthenticationError(
                f"{registry_host}: token server {realm} sent more than {TOKEN_MAX_BYTES} bytes",
                host=registry_host,
            )
        try:
            body = json.loads(raw)
            token = body.get("token") or body.get("access_token")
            if token and not isinstance(token, str):
                raise TypeError("token is not a string")
            expires_in = float(body.get("expires_in") or TOKEN_DEFAULT_EXPIRY)
        except (ValueError, AttributeError, TypeError, RecursionError) as e:
            raise AuthenticationError(
                f"{registry_host}: token server {realm} sent an unreadable answer",
                host=registry_host,
            ) from e
        if not token:
            raise AuthenticationError(
                f"{registry_host}: token server {realm} sent no token", host=registry_host
            )
        if not all(" " <= ch <= "~" for ch in token):
            # It goes in an Authorization header: a CR, LF, NUL or non-ASCII character there
            # failed each request as a bare ValueError/UnicodeEncodeError naming no host (or
            # as "cannot connect", retried), the token echoed in the message.
            raise AuthenticationError(
                f"{registry_host}: token server {realm} sent a token that cannot go in an HTTP "
                "header (control or non-ASCII characters)",
                host=registry_host,
            )
        expires_in = max(expires_in, 1.0)
        margin = min(TOKEN_EXPIRY_MARGIN, expires_in / 2)
        now = time.monotonic()
        # The other keys' expired tokens go too: one nobody asks for again (a repository
        # pulled once) was otherwise kept for the life of the client.
        for stale in [k for k, t in self._tokens.items() if now >= t.expires_at]:
            del self._tokens[stale]
        self._tokens[key] = _CachedToken(token, now + expires_in - margin)
        return token


async def _send_following(http: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    """``request`` sent with its redirects followed, at most :data:`TOKEN_REDIRECTS`, as Go's
    ``http.Client`` follows them for containers/image's and containerd's token requests: a
    realm that moved (``http://`` up to ``https://``, a new path) still gives its token, where
    its 301 was an AuthenticationError. A redirect's body is not read. A 303, and a 301 or
    302 of a POST, go on as a GET without the form (RFC 9110 §15.4); after a 307 or 308 the
    form is posted again wherever the realm sent it, a refresh token with it, as Go's client
    does (the token server chose the place); the Authorization header goes to the realm's
    own origin only, and up from ``http://`` to ``https://`` on the same host and port (as
    the registry client's rule); the request's extensions (its TLS settings,
    its timeout) go along. The answer after the last redirect allowed, or one to an invalid or
    non-HTTP Location, is returned as it is (the caller refuses it as any answer but 200)."""
    for hop in range(TOKEN_REDIRECTS + 1):
        resp = await http.send(request, stream=True)
        location = resp.headers.get("location")
        if resp.status_code not in (301, 302, 303, 307, 308) or not location:
            return resp
        try:
            url = request.url.join(location)
        except httpx.InvalidURL:
            return resp  # answered as a refusal: "answered HTTP 30x"
        if hop == TOKEN_REDIRECTS or url.scheme not in ("http", "https"):
            return resp
        await resp.aclose()
        method, content = request.method, request.content
        if resp.status_code == 303 or (resp.status_code in (301, 302) and method == "POST"):
            method, content = "GET", b""
        drop = {"host", "content-length"} | ({"content-type"} if not content else set())
        was, now = request.url, url
        if (was.scheme, was.host, was.port) != (now.scheme, now.host, now.port) and not (
            was.scheme == "http" and now.scheme == "https" and was.netloc == now.netloc
        ):
            drop.add("authorization")
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() not in drop]
        request = http.build_request(
            method, url, headers=headers, content=content or None, extensions=request.extensions
        )
    raise AssertionError("unreachable")


async def _read_capped(resp: httpx.Response, limit: int) -> bytes | None:
    """The body of ``resp`` as sent, or None once it passes ``limit`` bytes (the rest is not
    read)."""
    out = bytearray()
    async for piece in resp.aiter_raw():
        out += piece
        if len(out) > limit:
            return None
    return bytes(out)
