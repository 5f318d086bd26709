"""What a token server answers is bounded: a body too big is refused unread, one json cannot
decode is an authentication error (not a RecursionError out of the resolve), and the cache
keeps a lock only for the keys being fetched."""

from __future__ import annotations

import httpx
import pytest

from store.registry.auth import TOKEN_MAX_BYTES, Challenge, TokenCache, parse_challenge
from store.registry.errors import AuthenticationError

CHALLENGE = Challenge("bearer", {"realm": "http://auth.test/token", "service": "reg"})


def _client(body: bytes) -> httpx.AsyncClient:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body)

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
async def test_a_deeply_nested_token_answer_is_an_authentication_error():
    with pytest.raises(AuthenticationError, match="unreadable"):
        await _fetch(TokenCache(), b"[" * 200_000)


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
        return httpx.Response(200, content=b'{"token": "t"}')

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
