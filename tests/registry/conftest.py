"""Registry fixtures: real docker-registry processes on loopback ports, always stopped."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from regtest_tokens import USERS, TokenServer, make_signing_cert

from harness.registry_server import RegistryServer, TokenAuthConfig


@pytest.fixture(scope="module")
def registry() -> Iterator[RegistryServer]:
    """An anonymous registry shared by a test module."""
    with RegistryServer() as reg:
        yield reg


@pytest.fixture
def fresh_registry() -> Iterator[RegistryServer]:
    with RegistryServer() as reg:
        yield reg


@pytest.fixture(scope="module")
def basic_registry() -> Iterator[RegistryServer]:
    with RegistryServer(htpasswd_users=USERS) as reg:
        yield reg


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RegistryServer, TokenServer]]:
    """A registry with `auth: token` trusting our cert, and the token endpoint that signs."""
    key, cert = make_signing_cert(tmp_path_factory.mktemp("token"))
    with TokenServer(
        key=key,
        issuer="lazybench-test-issuer",
        service="lazybench-test-registry",
        users=USERS,
        anonymous_pull=("public/app",),
        refresh_tokens={"refresh-for-alice": "alice"},
    ) as tokens:
        auth = TokenAuthConfig(
            realm=tokens.realm,
            service=tokens.service,
            issuer=tokens.issuer,
            rootcertbundle=cert,
        )
        with RegistryServer(token_auth=auth) as reg:
            yield reg, tokens


@pytest.fixture(scope="session")
def big_blob() -> bytes:
    """6 MiB of deterministic pseudo-random bytes (not compressible, not all zero)."""
    return random.Random(1234).randbytes(6 * 1024 * 1024 + 12345)


@pytest.fixture
def isolated_auth_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No credentials leak in from the machine: HOME, XDG and REGISTRY_AUTH_FILE point here."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    os.makedirs(tmp_path / "run", exist_ok=True)
    return tmp_path
