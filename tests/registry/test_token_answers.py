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
