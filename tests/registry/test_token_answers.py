"""What a token server answers is bounded: a body too big is refused unread, one json cannot
decode is an authentication error (not a RecursionError out of the resolve), and the cache
keeps a lock only for the keys being fetched."""

from __future__ import annotations

import json
import tracemalloc
import zlib

import httpx
import pytest
import zstandard

from store.registry.auth import TOKEN_MAX_BYTES, Challenge, TokenCache, parse_challenge
from store.registry.credentials import Credentials
from store.registry.errors import AuthenticationError

CHALLENGE = Challenge("bearer", {"realm": "http://auth.test/token", "service": "reg"})


class _Sent(httpx.AsyncByteStream):
    """A body as a server sends it, in 64 KiB pieces (``content=`` would have httpx read, and
    decode, all of it when the answer is made)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for i in range(0, len(self.body), 65536):
            yield self.body[i : i + 65536]


def _client(body: bytes, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_Sent(body), headers=headers)

    return httpx.AsyncClient(transport=httpx.MockTransport(answer))


async def _fetch(cache: TokenCache, body: bytes, scope: str = "repository:a:pull") -> str:
    async with _client(body) as http:
        return await cache.fetch(http, CHALLENGE, (scope,), None, 5.0, "reg.test")


@pytest.mark.anyio
async def test_a_token_answer_over_the_limit_is_refused():
    body = b'{"token": "' + b"x" * (TOKEN_MAX_BYTES + 1) + b'"}'
    with pytest.raises(AuthenticationError, match="more than"):
        await _fetch(TokenCache(), body)


@pytest.mark.anyio
@pytest.mark.parametrize("coding", ["zstd", "gzip"])
async def test_a_content_encoded_token_answer_is_refused_not_decoded(coding: str) -> None:
    """A token answer sent content-encoded (asked as identity) is refused unread, naming the
    coding: decoding it first, a few KB of zstd or gzip took hundreds of MB before the size
    cap saw a byte (256 MiB of zeros: 8 KB of zstd, peak 557 MB)."""
    size = 256 << 20
    if coding == "zstd":
        co = zstandard.ZstdCompressor().compressobj(size=size)
    else:
        co = zlib.compressobj(9, zlib.DEFLATED, 31)
    zero = bytes(1 << 20)
    bomb = b"".join(co.compress(zero) for _ in range(size >> 20)) + co.flush()
    async with _client(bomb, {"Content-Encoding": coding}) as http:
        tracemalloc.start()
        try:
            with pytest.raises(AuthenticationError, match=f"Content-Encoding: {coding}"):
                await TokenCache().fetch(http, CHALLENGE, ("repository:a:pull",), None, 5.0, "r")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 16 << 20, peak


@pytest.mark.anyio
async def test_a_deeply_nested_token_answer_is_an_authentication_error():
    with pytest.raises(AuthenticationError, match="unreadable"):
        await _fetch(TokenCache(), b"[" * 200_000)


@pytest.mark.anyio
@pytest.mark.parametrize("token", ["abc\r\nX-Injected: 1", "tok\u20ac", "a\x00b"])
async def test_a_token_that_cannot_go_in_a_header_is_an_authentication_error(token: str):
    """A token with a control or non-ASCII character is refused where it arrives, naming the
    token server, not left to fail every request with a ValueError naming no host."""
    body = json.dumps({"token": token}).encode()
    with pytest.raises(AuthenticationError, match="cannot go in an HTTP header") as exc:
        await _fetch(TokenCache(), body)
    assert "auth.test/token" in str(exc.value)
    assert token not in str(exc.value)


@pytest.mark.anyio
async def test_the_cache_keeps_no_lock_per_key_it_fetched():
    cache = TokenCache()
    for i in range(50):
        assert await _fetch(cache, b'{"token": "t"}', f"repository:r{i}:pull") == "t"
    assert cache._locks == {}
    assert cache.fetches == 50


@pytest.mark.parametrize(
    ("header", "scheme", "realm"),
    [
        # Two challenges (two headers joined, or one header): the realm is the first one's.
        (
            'Bearer realm="http://auth.test/token",service="reg", Basic realm="proxy"',
            "bearer",
            "http://auth.test/token",
        ),
        ('Negotiate, Bearer realm="http://auth.test/token"', "bearer", "http://auth.test/token"),
        ('Basic realm="reg", Bearer realm="http://auth.test/token"', "basic", "reg"),
        ('Bearer\trealm="http://auth.test/t?a=1&b=2"', "bearer", "http://auth.test/t?a=1&b=2"),
    ],
)
def test_each_challenge_keeps_its_own_realm(header: str, scheme: str, realm: str) -> None:
    challenge = parse_challenge(header)
    assert challenge is not None
    assert (challenge.scheme, challenge.realm) == (scheme, realm)


@pytest.mark.anyio
async def test_a_realm_keeps_its_own_query_and_an_invalid_one_is_refused() -> None:
    """A realm with a query (``…/token?tenant=x``) keeps it, our parameters added; a realm
    that is no URL is an AuthenticationError, not httpx.InvalidURL; so is a token that is no
    string."""
    seen: list[httpx.URL] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, stream=_Sent(b'{"token": "t"}'))

    challenge = Challenge("bearer", {"realm": "http://auth.test/token?tenant=x", "service": "reg"})
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        token = await TokenCache().fetch(
            http, challenge, ("repository:a:pull",), None, 5.0, "reg.test"
        )
        assert token == "t"
        assert seen[0].params.get("tenant") == "x"
        assert seen[0].params.get_list("scope") == ["repository:a:pull"]
        bad = Challenge("bearer", {"realm": "http://\x01/token"})
        with pytest.raises(AuthenticationError, match="invalid realm"):
            await TokenCache().fetch(http, bad, (), None, 5.0, "reg.test")
    with pytest.raises(AuthenticationError, match="unreadable"):
        await _fetch(TokenCache(), b'{"token": ["t"]}')


def _token_per_asker() -> httpx.AsyncClient:
    """A token server answering each asker with its own token: the refresh token's, the Basic
    user's and password's, or an anonymous one."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            form = dict(x.split("=", 1) for x in request.content.decode().split("&"))
            token = f"refresh-{form['refresh_token']}"
        elif auth := request.headers.get("authorization"):
            token = "basic-" + auth.removeprefix("Basic ")
        else:
            token = "anonymous"
        return httpx.Response(200, stream=_Sent(json.dumps({"token": token}).encode()))

    return httpx.AsyncClient(transport=httpx.MockTransport(answer))


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("given", "other"),
    [
        # podman's helper hands an identity token with no user name; the other host has none.
        (Credentials(identity_token="secret"), None),
        # The same user name at two registries (the other's password differs).
        (Credentials("alice", "secret-a"), Credentials("alice", "secret-b")),
    ],
)
async def test_a_token_goes_only_to_the_host_it_was_fetched_for(
    given: Credentials, other: Credentials | None
) -> None:
    """A host whose challenge names another registry's realm, service and scope (a mirror,
    or any registry an image reference names) gets a token of its own: the cache was keyed
    without the host, and handed it the token bought with the other registry's credentials."""
    scope = ("repository:private/app:pull",)
    cache = TokenCache()
    async with _token_per_asker() as http:
        mine = await cache.fetch(http, CHALLENGE, scope, given, 5.0, "reg.test")
        assert "anonymous" not in mine
        theirs = await cache.fetch(http, CHALLENGE, scope, other, 5.0, "evil.test")
        assert theirs != mine
        assert await cache.fetch(http, CHALLENGE, scope, given, 5.0, "reg.test") == mine
        # An identity token is not anonymous access on its own host either.
        anonymous = await cache.fetch(http, CHALLENGE, scope, None, 5.0, "reg.test")
        assert anonymous == "anonymous"
    assert cache.fetches == 3


@pytest.mark.anyio
async def test_a_registry_naming_anothers_realm_is_sent_no_token_of_the_other() -> None:
    """End to end through the client, over loopback: registry A, whose private repository
    the store was given an identity token for, then registry B (no credentials) whose
    challenge copies A's realm and service. B used to get A's token in its Authorization."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs

    from store.registry import RegistryClient
    from store.registry.credentials import CredentialStore

    class Quiet(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

    class Tokens(Quiet):
        def _token(self, token: str) -> None:
            self._send(200, {}, json.dumps({"token": token, "expires_in": 300}).encode())

        def do_POST(self) -> None:
            form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
            self._token("A-PRIVATE" if form.get("refresh_token") == ["refresh-a"] else "x")

        def do_GET(self) -> None:
            self._token("ANONYMOUS")

    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Tokens)]
    realm = f"http://127.0.0.1:{servers[0].server_port}/token"
    seen_by_b: list[str | None] = []

    def registry(seen: list[str | None] | None) -> type[Quiet]:
        class Registry(Quiet):
            def do_HEAD(self) -> None:
                auth = self.headers.get("Authorization")
                if seen is not None:
                    seen.append(auth)
                elif auth == "Bearer A-PRIVATE":
                    return self._send(200, {"Content-Length": "10"})
                challenge = f'Bearer realm="{realm}",service="registry-a"'
                self._send(401, {"WWW-Authenticate": challenge})

        return Registry

    servers += [ThreadingHTTPServer(("127.0.0.1", 0), registry(s)) for s in (None, seen_by_b)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        a, b = (f"127.0.0.1:{s.server_port}" for s in servers[1:])
        digest = "sha256:" + "0" * 64
        store = CredentialStore(auth_files=[])
        given = {"username": "", "password": "", "identityToken": "refresh-a"}
        store.add_for_references({f"{a}/private/app:v1": given})
        async with RegistryClient(credentials=store, timeout=5, retries=0) as c:
            assert await c.blob_size(f"{a}/private/app:v1", digest) == 10
            with pytest.raises(AuthenticationError):
                await c.blob_size(f"{b}/private/app:v1", digest)
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
    assert seen_by_b == [None, "Bearer ANONYMOUS"]
