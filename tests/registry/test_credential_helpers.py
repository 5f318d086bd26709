"""Credential helpers named by auth files: ``credHelpers`` per registry, ``credsStore`` as the
default, run as docker and containers/image run them (``docker-credential-NAME get``)."""

from __future__ import annotations

import json
import os
import random
import stat
import time
from pathlib import Path

import pytest
from regtest_tokens import USERS

from harness.registry_server import RegistryServer
from store.registry import Credentials, CredentialStore, RegistryClient
from store.registry.credentials import (
    HELPER_NOT_FOUND,
    HelperCall,
    _AuthFile,
    find_credentials,
    run_credential_helper,
)
from store.registry.errors import AuthenticationError, ConfigError

pytestmark = [pytest.mark.timeout(120)]

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'


# ---- which helper is asked, with which server (pure) -------------------------------------
def _file(name: str, auths: dict, helpers: dict | None = None, store: str = "") -> _AuthFile:
    from store.registry.credentials import _normalize_key

    return _AuthFile(
        Path(name),
        {_normalize_key(k): (k, v) for k, v in auths.items()},
        {_normalize_key(k): (k, v) for k, v in (helpers or {}).items()},
        store,
    )


def _asked(files: list[_AuthFile], registry: str, repo: str, answers: dict) -> tuple:
    calls: list[tuple[str, str]] = []

    def run(call: HelperCall) -> Credentials | None:
        calls.append((call.helper, call.server))
        return answers.get((call.helper, call.server))

    return find_credentials(files, registry, repo, run), calls


def test_which_helper_for_which_registry() -> None:
    hub = Credentials("hub", "1")
    first = _file(
        "first.json",
        {"https://index.docker.io/v1/": {}, "q.io": {}, "inline.io": {"auth": "dTpw"}},
        helpers={"ecr.example": "ecr-login"},
        store="desktop",
    )
    second = _file("second.json", {"q.io": {"auth": "c2Vjb25kOjI="}})
    files = [first, second]
    # credHelpers decide for their registry, asked with the registry name.
    assert _asked(files, "ecr.example", "a/b", {("ecr-login", "ecr.example"): hub}) == (
        hub,
        [("ecr-login", "ecr.example")],
    )
    # An entry without credentials asks the credsStore with the key as docker wrote it.
    assert (
        _asked(files, "docker.io", "library/x", {("desktop", "https://index.docker.io/v1/"): hub})[
            0
        ]
        == hub
    )
    # Inline credentials win over the credsStore (containers/image reads them; no helper run).
    assert _asked(files, "inline.io", "", {}) == (Credentials("u", "p"), [])
    # The credsStore says "not found": the next file answers.
    assert _asked(files, "q.io", "x", {}) == (Credentials("second", "2"), [("desktop", "q.io")])
    # No entry at all: the credsStore is still asked for the registry (docker's default).
    assert _asked(files, "other.io", "x", {}) == (None, [("desktop", "other.io")])
    assert _asked(files, "docker.io", "", {})[1] == [("desktop", "https://index.docker.io/v1/")]
    # Without a credsStore nothing runs.
    assert _asked([second], "other.io", "x", {}) == (None, [])
    with pytest.raises(ConfigError, match=r"credHelpers\['x.io'\]: .*string"):
        find_credentials([_file("f.json", {}, helpers={"x.io": 3})], "x.io", "", lambda c: None)


# ---- real helper programs ----------------------------------------------------------------
def _helper(bin_dir: Path, name: str, body: str) -> Path:
    """A ``docker-credential-NAME`` shell script; it logs each server it was asked for."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / f"docker-credential-{name}"
    log = bin_dir / f"{name}.log"
    path.write_text(
        f'#!/bin/sh\n[ "$1" = get ] || exit 9\nread -r server\necho "$server" >> "{log}"\n{body}\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def helper_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_helper_answers(helper_bin: Path) -> None:
    _helper(helper_bin, "good", 'echo \'{"ServerURL":"x","Username":"alice","Secret":"s3"}\'')
    _helper(helper_bin, "token", 'echo \'{"ServerURL":"x","Username":"<token>","Secret":"rt"}\'')
    _helper(helper_bin, "none", f'echo "{HELPER_NOT_FOUND}"; exit 1')
    _helper(helper_bin, "broken", 'echo "keychain locked" >&2; exit 3')
    _helper(helper_bin, "garbage", "echo not-json-with-a-secret")
    _helper(helper_bin, "slow", "sleep 30 & sleep 30")
    call = lambda n: HelperCall(n, "reg.example", "auth.json credHelpers['reg.example']")  # noqa: E731
    assert run_credential_helper(call("good")) == Credentials("alice", "s3")
    assert run_credential_helper(call("token")) == Credentials(identity_token="rt")
    assert run_credential_helper(call("none")) is None
    assert (helper_bin / "good.log").read_text() == "reg.example\n"
    with pytest.raises(ConfigError, match=r"docker-credential-broken .*exit status 3.*locked"):
        run_credential_helper(call("broken"))
    with pytest.raises(ConfigError, match=r"docker-credential-garbage .*without a JSON") as info:
        run_credential_helper(call("garbage"))
    assert "not-json" not in str(info.value)  # what a helper printed may be a secret
    with pytest.raises(ConfigError, match=r"docker-credential-missing .*not on PATH"):
        run_credential_helper(call("missing"))
    assert run_credential_helper(HelperCall("missing", "r", "w", required=False)) is None
    with pytest.raises(ConfigError, match=r"'\.\./x' is not a credential helper name"):
        run_credential_helper(call("../x"))
    with pytest.raises(ConfigError, match=r"'a\\x00b' is not a credential helper name"):
        run_credential_helper(call("a\0b"))  # a JSON "\u0000": no program name holds one
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"docker-credential-slow .*no answer .*within 0.5s"):
        run_credential_helper(call("slow"), timeout=0.5)
    assert time.monotonic() - start < 5  # the sleeping grandchild held no pipe open


@pytest.mark.anyio
async def test_a_failing_helper_runs_once_for_a_burst(helper_bin: Path, tmp_path: Path) -> None:
    """A helper that fails (or hangs until HELPER_TIMEOUT) is not run again by each of the
    lookups queued behind it: they get its failure at once, for HELPER_CACHE_TTL seconds.
    Run again each, a burst of an image's layer reads behind a hanging helper waited
    HELPER_TIMEOUT once per read, in turn."""
    import trio

    _helper(helper_bin, "failing", 'echo "no dbus" >&2; exit 1')
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"credHelpers": {"reg.example": "failing"}}))
    store = CredentialStore(auth_files=[auth])
    errors: list[str] = []

    async def one() -> None:
        with pytest.raises(ConfigError, match=r"docker-credential-failing .*no dbus") as info:
            await store.alookup("reg.example", "app")
        errors.append(str(info.value))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    with pytest.raises(ConfigError, match=r"docker-credential-failing .*no dbus"):
        store.lookup("reg.example", "app")
    assert len(errors) == 5
    assert (helper_bin / "failing.log").read_text() == "reg.example\n"


@pytest.mark.e2e
@pytest.mark.anyio
async def test_registry_credentials_from_helpers(isolated_auth_env: Path, helper_bin: Path) -> None:
    """A Basic-auth registry whose credentials only helpers know: through ``credHelpers``, and
    through a ``credsStore`` behind docker's ``{}`` entry; run once for a burst of reads."""
    data = random.Random(5).randbytes(30_000)
    with RegistryServer(htpasswd_users=USERS) as reg:
        ref = f"{reg.host}/helped/app:v1"
        async with RegistryClient(
            credentials={reg.host: Credentials("alice", USERS["alice"])}
        ) as c:
            digest = (await c.push_image(ref, CONFIG, [(data, LAYER)])).layers[0].digest

        answer = json.dumps({"ServerURL": reg.host, "Username": "alice", "Secret": USERS["alice"]})
        _helper(helper_bin, "store", f"echo '{answer}'")
        auth = isolated_auth_env / "config.json"
        auth.write_text(json.dumps({"auths": {reg.host: {}}, "credsStore": "store"}))
        async with RegistryClient(credentials=CredentialStore(auth_files=[auth])) as c:
            got = await c.read_ranges(ref, digest, [(i * 100, 10) for i in range(40)])
            assert got == [data[i * 100 : i * 100 + 10] for i in range(40)]
        assert (helper_bin / "store.log").read_text() == f"{reg.host}\n"

        _helper(helper_bin, "wrong", 'echo \'{"Username":"alice","Secret":"nope"}\'')
        _helper(helper_bin, "failing", 'echo "no dbus" >&2; exit 1')
        for name, error, match in [
            ("wrong", AuthenticationError, "authentication failed with user 'alice'"),
            ("failing", ConfigError, r"docker-credential-failing .*credHelpers.*exit status 1"),
        ]:
            auth.write_text(json.dumps({"credHelpers": {reg.host: name}, "credsStore": "store"}))
            async with RegistryClient(
                credentials=CredentialStore(auth_files=[auth]), retries=0
            ) as c:
                with pytest.raises(error, match=match):
                    await c.get_manifest(ref)
