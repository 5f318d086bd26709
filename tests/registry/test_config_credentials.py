"""Resolver config from the Go stargz-store TOML keys, and credentials files."""

from __future__ import annotations

import base64
import json
import tomllib
from pathlib import Path

import pytest

from store.registry import (
    ConfigError,
    Credentials,
    CredentialStore,
    Platform,
    default_auth_files,
    is_local_host,
    parse_resolver_config,
)

TOML = """
[[resolver.host."docker.io".mirrors]]
host = "mirror-a.example:5000"
insecure = true
request_timeout_sec = 3

[[resolver.host."docker.io".mirrors]]
host = "mirror-b.example"

[[resolver.host."10.0.0.2:5000".mirrors]]
host = "10.0.0.2:5000"
insecure = true
"""


def test_mirrors_in_order_then_origin() -> None:
    cfg = parse_resolver_config(tomllib.loads(TOML))
    eps = cfg.endpoints("docker.io")
    assert [(e.host, e.scheme, e.request_timeout, e.is_mirror) for e in eps] == [
        ("mirror-a.example:5000", "http", 3.0, True),
        ("mirror-b.example", "https", 30.0, True),
        ("registry-1.docker.io", "https", 30.0, False),
    ]
    # Listing the origin itself as an insecure mirror makes the origin plain HTTP.
    assert [(e.host, e.scheme, e.is_mirror) for e in cfg.endpoints("10.0.0.2:5000")] == [
        ("10.0.0.2:5000", "http", False)
    ]
    assert [e.base_url for e in cfg.endpoints("127.0.0.1:5000")] == ["http://127.0.0.1:5000"]
    assert parse_resolver_config({}).endpoints("quay.io")[0].base_url == "https://quay.io"


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ({"resolver": {"host": {"docker.io": {"mirrors": [{"insecure": True}]}}}}, "host"),
        (
            {"resolver": {"host": {"d": {"mirrors": [{"host": "m", "insecure": "yes"}]}}}},
            "insecure",
        ),
        (
            {
                "resolver": {
                    "host": {"d": {"mirrors": [{"host": "m", "request_timeout_sec": "10"}]}}
                }
            },
            "request_timeout_sec",
        ),
        ({"resolver": {"host": {"d": {"mirrors": {"host": "m"}}}}}, "mirrors"),
        # A wrong type that is falsy is as wrong: the Go store refuses `host = ""` too.
        ({"resolver": {"host": ""}}, r"resolver\.host must"),
        ({"resolver": {"host": []}}, r"resolver\.host must"),
        ({"resolver": {"host": {"d": {"mirrors": 0}}}}, r"mirrors must"),
        ({"resolver": {"host": {"d": {"mirrors": [{"host": "m", "header": ""}]}}}}, "header"),
    ],
)
def test_bad_config_names_key(table: dict, where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        parse_resolver_config(table)


def test_local_hosts() -> None:
    for h in ("localhost", "localhost:5000", "127.0.0.1:1", "127.1.2.3", "[::1]:5000", "::1"):
        assert is_local_host(h), h
    for h in ("example.com", "10.0.0.1:5000", "[fe80::1]:5"):
        assert not is_local_host(h), h


def _auth_file(path: Path, entries: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    auths = {k: {"auth": base64.b64encode(v.encode()).decode()} for k, v in entries.items()}
    path.write_text(json.dumps({"auths": auths}))


def test_credentials_lookup_order(isolated_auth_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = isolated_auth_env
    _auth_file(home / ".docker/config.json", {"https://index.docker.io/v1/": "d:1", "q.io": "x:2"})
    _auth_file(home / "run/containers/auth.json", {"q.io": "xdg:3", "q.io/org/app": "ns:4"})
    store = CredentialStore()
    assert store.lookup("docker.io", "library/python") == Credentials("d", "1")
    assert store.lookup("q.io", "org/app") == Credentials("ns", "4")
    assert store.lookup("q.io", "other/app") == Credentials("xdg", "3")
    assert store.lookup("nothing.io", "x") is None
    env_file = home / "env-auth.json"
    _auth_file(env_file, {"q.io": "env:5"})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(env_file))
    assert default_auth_files()[0] == env_file
    assert CredentialStore().lookup("q.io", "other/app") == Credentials("env", "5")
    explicit = CredentialStore(explicit={"q.io": Credentials("given", "6")})
    assert explicit.lookup("q.io", "org/app") == Credentials("given", "6")
    assert "6" not in repr(Credentials("given", "6"))


def test_a_login_or_logout_while_the_store_runs_is_seen_at_the_next_lookup(
    isolated_auth_env: Path,
) -> None:
    """The auth files are read again when one appears, changes or goes (``podman login``
    writes a new file and renames it over the old one); unchanged, they are not re-read."""
    auth = isolated_auth_env / "run/containers/auth.json"
    later = isolated_auth_env / ".docker/config.json"
    store = CredentialStore(auth_files=[auth, later])
    assert store.lookup("q.io", "org/app") is None
    _auth_file(auth, {"q.io": "first:1"})
    assert store.lookup("q.io", "org/app") == Credentials("first", "1")
    fresh = auth.with_name("auth.json.tmp")
    _auth_file(fresh, {"q.io": "second:2"})
    fresh.rename(auth)
    assert store.lookup("q.io", "org/app") == Credentials("second", "2")
    _auth_file(later, {"r.io": "other:3"})
    assert store.lookup("r.io") == Credentials("other", "3")
    auth.unlink()
    assert store.lookup("q.io", "org/app") is None
    # an unchanged file is not read again
    loaded = store._load()
    assert store._load() is loaded


def test_an_auth_file_caught_half_written_keeps_the_credentials_read_before(
    isolated_auth_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file rewritten in place (not renamed over) reads as broken JSON until its writer is
    done: a lookup then keeps what the files said before, and says why once (before, every
    lookup of every registry failed meanwhile: each of the store's blob reads looks
    credentials up, so running containers got EIO). The finished file counts at the next
    lookup; a file that never read well fails as ever."""
    auth = isolated_auth_env / "run/containers/auth.json"
    _auth_file(auth, {"q.io": "first:1"})
    store = CredentialStore(auth_files=[auth])
    assert store.lookup("q.io") == Credentials("first", "1")
    whole = auth.read_bytes()
    with auth.open("r+b") as f:  # in place: truncated, then the first bytes written
        f.truncate(0)
        f.write(whole[:10])
    for _ in range(3):
        assert store.lookup("q.io") == Credentials("first", "1")
    warned = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith(f"cannot read credentials file {auth}:")
    _auth_file(auth, {"q.io": "second:22"})
    assert store.lookup("q.io") == Credentials("second", "22")
    auth.write_text("{")
    with pytest.raises(ConfigError, match="cannot read credentials file"):
        CredentialStore(auth_files=[auth]).lookup("q.io")


def test_bad_auth_file(isolated_auth_env: Path) -> None:
    bad = isolated_auth_env / "bad.json"
    bad.write_text(json.dumps({"auths": {"q.io": {"auth": "!!notbase64"}}}))
    with pytest.raises(ConfigError, match=r"bad\.json"):
        CredentialStore(auth_files=[bad]).lookup("q.io")


def test_auth_file_entries_decoded_as_containers_do(isolated_auth_env: Path) -> None:
    """A broken entry fails only its own registry; an entry without credentials (docker's
    `{}` beside a credsStore, `auth` without a colon) means none, and the next file is asked;
    a URL key names its host whatever its path; a password's newlines are trimmed."""
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    first = isolated_auth_env / "first.json"
    second = isolated_auth_env / "second.json"
    first.write_text(
        json.dumps(
            {
                "auths": {
                    "broken.io": {"auth": "!!notbase64"},
                    "https://index.docker.io/v1/": {},
                    "nocolon.io": {"auth": b64("justatoken")},
                    "https://q.io/some/path": {"auth": b64("url:1")},
                    "nl.io": {"auth": b64("nl:pw\n")},
                },
                "credsStore": "desktop",
            }
        )
    )
    _auth_file(second, {"docker.io": "hub:2"})
    store = CredentialStore(auth_files=[first, second])
    assert store.lookup("docker.io", "library/python") == Credentials("hub", "2")
    assert store.lookup("nocolon.io", "x") is None
    assert store.lookup("q.io", "org/app") == Credentials("url", "1")
    assert store.lookup("nl.io", "x") == Credentials("nl", "pw")
    with pytest.raises(ConfigError, match=r"first\.json \[broken\.io\]"):
        store.lookup("broken.io", "x")
    # Empty strings handed over by podman's auth helper are no credentials: the files answer.
    store.add_for_references({"docker.io/library/python:3": {"username": "", "password": ""}})
    assert store.lookup("docker.io", "library/python") == Credentials("hub", "2")


def test_platform_parse_and_match() -> None:
    p = Platform.parse("linux/arm64/v8")
    assert p.matches({"os": "linux", "architecture": "arm64"})
    arm7 = {"os": "linux", "architecture": "arm", "variant": "v7"}
    assert Platform.parse("linux/arm/v7").matches(arm7)
    assert not Platform.parse("linux/arm/v6").matches(
        {"os": "linux", "architecture": "arm", "variant": "v7"}
    )
    assert Platform.host().os == "linux"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Linux/AMD64", Platform("linux", "amd64")),
        ("linux/x86_64", Platform("linux", "amd64")),
        ("linux/aarch64", Platform("linux", "arm64")),
        ("linux/armhf", Platform("linux", "arm", "v7")),
        ("linux/ARM/V6", Platform("linux", "arm", "v6")),
        ("linux/i386", Platform("linux", "386")),
    ],
)
def test_platform_names_are_normalized_as_containerd_does(text: str, parsed: Platform) -> None:
    """`Linux/AMD64` gave "no manifest for platform Linux/AMD64" where docker's and nerdctl's
    --platform (containerd's platforms.Parse) pick linux/amd64."""
    assert Platform.parse(text) == parsed
