"""Auth against real registries: htpasswd Basic, and `auth: token` with our token endpoint."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from regtest_tokens import USERS, TokenServer

from harness.registry_server import RegistryServer
from store.registry import (
    AuthenticationError,
    Credentials,
    RegistryClient,
    parse_resolver_config,
)

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = b'{"architecture":"amd64","os":"linux"}'


def creds(host: str, user: str, password: str) -> dict[str, Credentials]:
    return {host: Credentials(user, password)}


async def _round_trip(c: RegistryClient, ref: str) -> None:
    pushed = await c.push_image(ref, CONFIG, [(b"auth layer " * 5000, LAYER)], chunk_size=20000)
    pulled = await c.get_manifest(ref)
    assert pulled.digest == pushed.digest
    layer = pulled.layers[0]
    assert await c.read_range(ref, layer.digest, 5, 6) == b"layer "
    assert await c.get_blob(ref, layer.digest) == b"auth layer " * 5000


async def test_basic_auth_pull_push(
    basic_registry: RegistryServer, isolated_auth_env: Path
) -> None:
    host = basic_registry.host
    async with RegistryClient(timeout=10, credentials=creds(host, "alice", USERS["alice"])) as c:
        await c.ping(host)
        await _round_trip(c, f"{host}/basic/app:v1")


async def test_basic_auth_from_auth_json(
    basic_registry: RegistryServer, isolated_auth_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = basic_registry.host
    auth_file = isolated_auth_env / "auth.json"
    token = base64.b64encode(f"bob:{USERS['bob']}".encode()).decode()
    auth_file.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    async with RegistryClient(timeout=10) as c:
        await _round_trip(c, f"{host}/basic/fromfile:v1")


async def test_basic_auth_wrong_or_missing(
    basic_registry: RegistryServer, isolated_auth_env: Path
) -> None:
    host = basic_registry.host
    async with RegistryClient(timeout=10, credentials=creds(host, "alice", "nope")) as c:
        with pytest.raises(AuthenticationError, match=rf"{host}.*user 'alice'.*401"):
            await c.get_manifest(f"{host}/basic/app:v1")
        with pytest.raises(AuthenticationError):
            await c.ping(host)
    async with RegistryClient(timeout=10) as c:
        with pytest.raises(AuthenticationError, match="no credentials are configured"):
            await c.get_manifest(f"{host}/basic/app:v1")


async def test_token_auth_with_credentials(
    token_registry: tuple[RegistryServer, TokenServer], isolated_auth_env: Path
) -> None:
    reg, tokens = token_registry
    async with RegistryClient(timeout=10, credentials=creds(reg.host, "alice", "wonderland")) as c:
        await c.ping(reg.host)
        await _round_trip(c, f"{reg.host}/private/app:v1")
        # Tokens are cached per scope: many reads of one repository ask the endpoint once.
        ref = f"{reg.host}/private/app:v1"
        layer = (await c.get_manifest(ref)).layers[0]
        before = c.tokens.fetches
        for i in range(20):
            await c.read_range(ref, layer.digest, i, 10)
        assert c.tokens.fetches == before
    assert any(r.get("user") == "alice" and r.get("ok") for r in tokens.requests)


async def test_token_auth_anonymous(
    token_registry: tuple[RegistryServer, TokenServer], isolated_auth_env: Path
) -> None:
    reg, _ = token_registry
    ref = f"{reg.host}/public/app:v1"
    async with RegistryClient(timeout=10, credentials=creds(reg.host, "bob", "builder")) as c:
        pushed = await c.push_image(ref, CONFIG, [(b"public layer", LAYER)])
    async with RegistryClient(timeout=10) as anon:
        pulled = await anon.get_manifest(ref)
        assert pulled.digest == pushed.digest
        assert await anon.get_blob(ref, pulled.layers[0].digest) == b"public layer"
        # Anonymous tokens carry no push right: the registry refuses, we say so clearly.
        with pytest.raises(AuthenticationError, match=r"public/app"):
            await anon.push_blob(ref, b"not allowed")
        with pytest.raises(AuthenticationError):
            await anon.get_manifest(f"{reg.host}/private/app:v1")


async def test_token_auth_anonymous_with_empty_auth_entry(
    token_registry: tuple[RegistryServer, TokenServer],
    isolated_auth_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docker's config.json beside a `credsStore` holds `{}` per registry: that is no
    credentials, so the token is asked for anonymously, not with an empty Basic login (which
    the token server refuses)."""
    reg, tokens = token_registry
    ref = f"{reg.host}/public/app:empty"
    async with RegistryClient(timeout=10, credentials=creds(reg.host, "bob", "builder")) as c:
        pushed = await c.push_image(ref, CONFIG, [(b"public empty-entry layer", LAYER)])
    config = isolated_auth_env / ".docker" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"auths": {reg.host: {}}, "credsStore": "desktop"}))
    async with RegistryClient(timeout=10) as anon:
        assert (await anon.get_manifest(ref)).digest == pushed.digest
        assert await anon.get_blob(ref, pushed.layers[0].digest) == b"public empty-entry layer"
    assert tokens.requests[-1] == {"user": "", "ok": True, "scope": tokens.requests[-1]["scope"]}


async def test_token_auth_wrong_password(
    token_registry: tuple[RegistryServer, TokenServer], isolated_auth_env: Path
) -> None:
    reg, _ = token_registry
    async with RegistryClient(timeout=10, credentials=creds(reg.host, "alice", "bad")) as c:
        with pytest.raises(AuthenticationError, match=r"refused user 'alice' \(HTTP 401\)"):
            await c.get_manifest(f"{reg.host}/private/app:v1")


@contextlib.asynccontextmanager
async def _short_lived_tokens(
    token_registry: tuple[RegistryServer, TokenServer],
) -> AsyncIterator[RegistryClient]:
    """A client of alice's on the token registry, whose tokens are cached for 1 s (they
    expire in 2, less a margin)."""
    reg, tokens = token_registry
    old = tokens.expires_in
    tokens.expires_in = 2
    try:
        async with RegistryClient(
            timeout=10, credentials=creds(reg.host, "alice", "wonderland")
        ) as c:
            yield c
    finally:
        tokens.expires_in = old


async def test_token_refetched_after_expiry(
    token_registry: tuple[RegistryServer, TokenServer], isolated_auth_env: Path
) -> None:
    ref = f"{token_registry[0].host}/private/expiring:v1"
    async with _short_lived_tokens(token_registry) as c:
        await c.push_image(ref, CONFIG, [(b"short-lived", LAYER)])
        await c.get_manifest(ref)
        fetched = c.tokens.fetches
        await c.get_manifest(ref)
        assert c.tokens.fetches == fetched
        await trio.sleep(1.2)
        await c.get_manifest(ref)
        assert c.tokens.fetches == fetched + 1


async def test_expired_tokens_of_repositories_not_asked_again_are_dropped(
    token_registry: tuple[RegistryServer, TokenServer], isolated_auth_env: Path
) -> None:
    """A token is kept per registry, scope (repository) and user until it expires; an
    expired one was dropped only when its own key was asked for again, so a store that
    pulled from many repositories over its life kept one token for each, for good."""
    host = token_registry[0].host
    async with _short_lived_tokens(token_registry) as c:
        for i in range(6):
            ref = f"{host}/private/many{i}:v1"
            await c.push_image(ref, CONFIG, [(b"one of many", LAYER)])
            await c.get_manifest(ref)
        assert len(c.tokens._tokens) >= 6
        await trio.sleep(1.2)
        await c.get_manifest(f"{host}/private/many0:v1")
        assert len(c.tokens._tokens) == 1  # the one just fetched


async def test_origin_credentials_not_sent_to_mirror(
    basic_registry: RegistryServer, isolated_auth_env: Path
) -> None:
    """A mirror that asks for Basic auth gets nothing from the origin's credentials; the pull
    falls through to the origin, which gets them."""
    from regtest_proxies import HttpFaultProxy, answer

    def challenge(h) -> bool:  # type: ignore[no-untyped-def]
        answer(h, 401, b"", WWW_Authenticate='Basic realm="mirror"')
        return True

    host, port = basic_registry.host.rsplit(":", 1)
    with HttpFaultProxy((host, int(port)), challenge) as mirror:
        cfg = parse_resolver_config(
            {"resolver": {"host": {basic_registry.host: {"mirrors": [{"host": mirror.host}]}}}}
        )
        user = creds(basic_registry.host, "alice", "wonderland")
        async with RegistryClient(resolver=cfg, timeout=10, credentials=user) as c:
            ref = f"{basic_registry.host}/mirrored/app:v1"
            pushed = await c.push_image(ref, CONFIG, [(b"m", LAYER)])
            assert (await c.get_manifest(ref)).digest == pushed.digest
        assert mirror.seen and all("Authorization" not in s["headers"] for s in mirror.seen)


async def test_an_upload_location_on_another_host_gets_no_credentials(
    basic_registry: RegistryServer, isolated_auth_env: Path
) -> None:
    """A registry that names another host (its storage, or anyone's) as a blob upload's
    Location: the PUT there carries no Authorization, as containerd's pusher strips its
    authorizer for another host (the registry's Basic credentials went there, and the push
    succeeded with them)."""
    from regtest_proxies import HttpFaultProxy

    from store.registry import RegistryError

    upstream = basic_registry.host.rsplit(":", 1)
    registry = (upstream[0], int(upstream[1]))
    with HttpFaultProxy(registry) as storage:

        def elsewhere(h) -> bool:  # type: ignore[no-untyped-def]
            if h.command != "POST":
                return False
            front.forward(h, extra_headers={"Host": storage.host})  # its Location names it
            return True

        with HttpFaultProxy(registry, elsewhere) as front:
            user = creds(front.host, "alice", USERS["alice"])
            async with RegistryClient(timeout=10, retries=0, credentials=user) as c:
                with pytest.raises(RegistryError):
                    await c.push_blob(f"{front.host}/upload/elsewhere:v1", b"blob" * 100)
            assert any(s["method"] == "POST" for s in front.seen)
    assert [s["method"] for s in storage.seen] == ["PUT"]
    assert "Authorization" not in storage.seen[0]["headers"]


async def test_token_auth_with_identity_token(
    token_registry: tuple[RegistryServer, TokenServer], isolated_auth_env: Path
) -> None:
    """docker's `identitytoken` is exchanged by an OAuth2 refresh-token POST."""
    reg, tokens = token_registry
    assert tokens.refresh_tokens
    good = {reg.host: Credentials("<token>", "", identity_token="refresh-for-alice")}
    async with RegistryClient(timeout=10, credentials=good) as c:
        await _round_trip(c, f"{reg.host}/private/oauth:v1")
    bad = {reg.host: Credentials("<token>", "", identity_token="stale")}
    async with RegistryClient(timeout=10, credentials=bad) as c:
        with pytest.raises(AuthenticationError, match="refused"):
            await c.get_manifest(f"{reg.host}/private/oauth:v1")


async def test_concurrent_first_reads_share_one_token(
    token_registry: tuple[RegistryServer, TokenServer], isolated_auth_env: Path
) -> None:
    reg, _ = token_registry
    ref = f"{reg.host}/private/burst:v1"
    alice = creds(reg.host, "alice", "wonderland")
    async with RegistryClient(timeout=10, credentials=alice) as c:
        layer = (await c.push_image(ref, CONFIG, [(b"0123456789" * 100, LAYER)])).layers[0]
    async with RegistryClient(timeout=10, credentials=alice) as c:
        await c.ping(reg.host)  # learn the challenge (costs one unscoped token)
        before = c.tokens.fetches
        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(c.read_range, ref, layer.digest, i, 10)
        assert c.tokens.fetches == before + 1


def test_a_refused_token_is_forgotten_alone() -> None:
    """A 401 to a token we sent drops that token only; it used to clear every registry's and
    every scope's tokens (each then fetched again)."""
    import time

    from store.registry.auth import TokenCache, _CachedToken

    cache = TokenCache()
    later = time.monotonic() + 60
    refused = ("https://auth/token", "reg", ("repository:a:pull",), "alice")
    kept = ("https://auth/token", "reg", ("repository:b:pull",), "alice")
    other = ("https://other/token", "other", ("repository:a:pull",), "")
    cache._tokens.update(
        {refused: _CachedToken("t1", later), kept: _CachedToken("t2", later)}
        | {other: _CachedToken("t3", later)}
    )
    cache.forget("t1")
    assert cache.get(refused) is None
    assert (cache.get(kept), cache.get(other)) == ("t2", "t3")
