"""containers-registries.conf(5) as containers/image reads it: prefix matching, location
rewriting, mirrors by tag or digest, blocked registries, v1 lists, drop-ins, bad files, and
the endpoints the client is given for a pull."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store.cli import main, open_registries_conf
from store.registry.errors import ConfigError, RegistryError
from store.registry.hosts import parse_resolver_config
from store.registry.registriesconf import (
    Locations,
    PullSource,
    RegistriesBlocked,
    RegistriesConf,
    RegistriesConfError,
    RegistriesConfFiles,
    config_locations,
    merge,
    parse_text,
    prefix_match,
)


def conf(text: str, source: str = "r.conf") -> RegistriesConf:
    return merge([parse_text(text.encode(), source)], [source])


def sources(c: RegistriesConf, name: str, digested: bool = False) -> list[str]:
    registry, _, repository = name.partition("/")
    return [f"{s.registry}/{s.repository}" for s in c.pull_sources(registry, repository, digested)]


# -- matching ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "prefix", "matched"),
    [
        ("example.com/a/b", "example.com", 11),
        ("example.com/a/b", "example.com/a", 13),
        ("example.com/a/b", "example.com/a/b", 15),
        ("example.com/ab", "example.com/a", -1),  # not on a component boundary
        ("example.community/a", "example.com", -1),
        ("example.com:5000/a", "example.com", 11),  # as containers/image (its FIXME)
        ("a.example.com/x", "*.example.com", 13),
        ("a.b.example.com/x", "*.example.com", 15),
        ("example.com/x", "*.example.com", -1),
        ("a.example.community/x", "*.example.com", -1),
        ("x.io/a.example.com/x", "*.example.com", -1),  # the wildcard is for the host only
    ],
)
def test_prefix_match_on_boundaries(name: str, prefix: str, matched: int) -> None:
    assert prefix_match(name, prefix) == matched


_COMPONENT = st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True)


@given(
    host=st.from_regex(r"[a-z]{1,6}\.[a-z]{2,3}(:[0-9]{2,4})?", fullmatch=True),
    path=st.lists(_COMPONENT, min_size=1, max_size=4),
    cut=st.integers(min_value=0, max_value=4),
    extra=_COMPONENT,
)
def test_a_prefix_matches_exactly_at_component_boundaries(host, path, cut, extra) -> None:
    name = "/".join([host, *path])
    prefix = "/".join([host, *path[: min(cut, len(path))]])
    assert prefix_match(name, prefix) == len(prefix)
    # The same prefix cut inside a component matches nothing.
    assert prefix_match(name, prefix + extra) in (-1, len(prefix + extra))
    if prefix_match(name, prefix + extra) != -1:
        assert name.startswith(prefix + extra) and name[len(prefix + extra) :][:1] in ("", "/")
    # A table whose location is its prefix sends the name where it is.
    c = conf(f'[[registry]]\nlocation = "{prefix}"\n')
    assert sources(c, name) == [name]


def test_the_longest_prefix_decides_whatever_the_order() -> None:
    c = conf(
        '[[registry]]\nprefix = "example.com/a"\nlocation = "deep.io/x"\n'
        '[[registry]]\nlocation = "example.com"\ninsecure = true\n'
        '[[registry]]\nprefix = "*.com"\nlocation = "wild.io"\n'
    )
    assert sources(c, "example.com/a/img") == ["deep.io/x/img"]
    assert sources(c, "example.com/b/img") == ["example.com/b/img"]
    assert c.find("example.com/b/img").insecure  # type: ignore[union-attr]
    assert sources(c, "other.com/img") == ["wild.io/img"]
    assert sources(c, "other.org/img") == ["other.org/img"]  # no table: as named


def test_location_rewrites_the_prefix() -> None:
    c = conf('[[registry]]\nprefix = "example.com/foo"\nlocation = "internal:5000/bar/baz"\n')
    assert sources(c, "example.com/foo/app") == ["internal:5000/bar/baz/app"]
    assert sources(c, "example.com/foo") == ["internal:5000/bar/baz"]
    assert sources(c, "example.com/foobar/app") == ["example.com/foobar/app"]


def test_a_wildcard_without_location_keeps_the_name_and_its_mirrors_rewrite_it() -> None:
    c = conf(
        '[[registry]]\nprefix = "*.corp.io"\ninsecure = true\n'
        '[[registry.mirror]]\nlocation = "cache:5000/corp"\n'
    )
    assert sources(c, "a.corp.io/team/img") == ["cache:5000/corp/team/img", "a.corp.io/team/img"]
    assert [s.insecure for s in c.pull_sources("a.corp.io", "img", False)] == [False, True]


MIRRORS = """
[[registry]]
location = "origin.io"
[[registry.mirror]]
location = "all.io"
[[registry.mirror]]
location = "digest.io"
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "tag.io"
pull-from-mirror = "tag-only"
[[registry.mirror]]
location = "also-all.io"
pull-from-mirror = "all"
"""


def test_mirrors_in_order_the_reference_kind_deciding() -> None:
    c = conf(MIRRORS)
    assert sources(c, "origin.io/img") == [
        "all.io/img",
        "tag.io/img",
        "also-all.io/img",
        "origin.io/img",
    ]
    assert sources(c, "origin.io/img", digested=True) == [
        "all.io/img",
        "digest.io/img",
        "also-all.io/img",
        "origin.io/img",
    ]
    mirrors = [s.mirror for s in c.pull_sources("origin.io", "img", False)]
    assert mirrors == [True, True, True, False]


def test_mirror_by_digest_only_keeps_tags_at_the_origin() -> None:
    c = conf(
        '[[registry]]\nlocation = "origin.io"\nmirror-by-digest-only = true\n'
        '[[registry.mirror]]\nlocation = "m.io"\n'
    )
    assert sources(c, "origin.io/img") == ["origin.io/img"]
    assert sources(c, "origin.io/img", digested=True) == ["m.io/img", "origin.io/img"]


def test_blocked_registry_and_blocked_sources() -> None:
    c = conf(
        '[[registry]]\nlocation = "bad.io"\nblocked = true\n'
        '[[registry]]\nlocation = "origin.io"\n'
        '[[registry.mirror]]\nlocation = "bad.io/cache"\n'
        '[[registry.mirror]]\nlocation = "good.io"\n',
        source="/etc/x.conf",
    )
    with pytest.raises(RegistriesBlocked, match=r"registry bad.io is blocked in /etc/x.conf"):
        c.pull_sources("bad.io", "img", False)
    # A mirror under a blocked name is passed over, as containers/image refuses to use it.
    assert sources(c, "origin.io/img") == ["good.io/img", "origin.io/img"]


def test_a_rewrite_to_no_image_name_names_the_file() -> None:
    c = conf('[[registry]]\nprefix = "example.com"\nlocation = "nohost"\n', source="/r.conf")
    with pytest.raises(ConfigError, match=r"/r.conf: .*example.com/img rewritten to nohost/img"):
        c.pull_sources("example.com", "img", False)


@pytest.mark.parametrize(
    ("location", "pulled"),
    [
        ("registry-1.docker.io", "docker.io/library/app"),
        ("registry-1.docker.io/team", "docker.io/team/library/app"),
        ("index.docker.io", None),  # not canonical
        ("index.docker.io/team", None),
    ],
)
def test_docker_hubs_endpoint_host_as_a_location_is_docker_hub(
    location: str, pulled: str | None
) -> None:
    """``registry-1.docker.io`` is a canonical name for containers/image (only
    ``index.docker.io`` is not): podman pulls through such a location, and so does the store,
    at Docker Hub; a location that is not canonical is still refused."""
    c = conf(f'[[registry]]\nprefix = "docker.io"\nlocation = "{location}"\n')
    if pulled is None:
        with pytest.raises(ConfigError, match="which is not a fully qualified image name"):
            sources(c, "docker.io/library/app")
        return
    assert sources(c, "docker.io/library/app") == [pulled]
    resolver = dataclasses.replace(parse_resolver_config({}), registries_conf=lambda: c)
    eps = resolver.endpoints("docker.io", "library/app")
    # The repository there, when not the reference's own.
    repository = "" if pulled == "docker.io/library/app" else pulled.removeprefix("docker.io/")
    assert [(e.base_url, e.repository, e.certs_host) for e in eps] == [
        ("https://registry-1.docker.io", repository, "docker.io")
    ]


# -- the v1 format, drop-ins, bad files -------------------------------------------------------


def test_v1_lists() -> None:
    c = conf(
        '[registries.search]\nregistries = ["docker.io"]\n'
        '[registries.insecure]\nregistries = ["10.0.0.2:5000", "both.io"]\n'
        '[registries.block]\nregistries = ["both.io", "bad.io/"]\n'
    )
    assert c.find("10.0.0.2:5000/x").insecure  # type: ignore[union-attr]
    assert c.find("bad.io/x").blocked  # type: ignore[union-attr]
    both = c.find("both.io/x")
    assert both is not None and both.insecure and both.blocked
    assert c.find("docker.io/library/x") is None  # search is not where a pull goes


@pytest.mark.parametrize(
    ("text", "drop_in", "message"),
    [
        ("[[registry]\nlocation = 1", False, "not valid TOML"),
        ('[[registry]]\nlocation = "x.io"\ninsecure = "yes"\n', False, "insecure must be"),
        ('[[registry]]\nlocation = "https://x.io"\n', False, "URI schemes are not supported"),
        ("[[registry]]\ninsecure = true\n", False, "needs a 'location' or a 'prefix'"),
        ('[[registry]]\nprefix = "x.io/a"\n', False, "'location' is unset"),
        ('[[registry]]\nprefix = "*.x.io/a"\n', False, "wildcard prefix"),
        (
            '[[registry]]\nlocation = "x.io"\n[[registry.mirror]]\nlocation = "m.io"\n'
            'pull-from-mirror = "sometimes"\n',
            False,
            "pull-from-mirror must be one of",
        ),
        (
            '[[registry]]\nlocation = "x.io"\nmirror-by-digest-only = true\n'
            '[[registry.mirror]]\nlocation = "m.io"\npull-from-mirror = "all"\n',
            False,
            "cannot both be set",
        ),
        ('[[registry]]\nlocation = "x.io"\npull-from-mirror = "all"\n', False, "belongs in"),
        ('[[registry]]\nlocation = "x.io"\n[[registry.mirror]]\ninsecure = true\n', False, "unset"),
        (
            '[[registry]]\nlocation = "x.io"\n[[registry]]\nprefix = "y.io"\n'
            'location = "x.io"\ninsecure = true\n',
            False,
            "conflicting 'insecure'",
        ),
        (
            '[registries.insecure]\nregistries = ["x.io"]\n[[registry]]\nlocation = "y.io"\n',
            False,
            "mixes the v1",
        ),
        ('[registries.insecure]\nregistries = ["x.io"]\n', True, "drop-in file must be in the v2"),
        ('[registries.block]\nregistries = "x.io"\n', False, "must be an array of strings"),
        (b"\xff\xfe", False, "not UTF-8"),
    ],
)
def test_a_malformed_file_is_named_with_what_is_wrong(text, drop_in, message) -> None:
    raw = text if isinstance(text, bytes) else text.encode()
    with pytest.raises(RegistriesConfError) as err:
        parse_text(raw, "/etc/containers/registries.conf.d/50-x.conf", drop_in=drop_in)
    assert str(err.value).startswith("/etc/containers/registries.conf.d/50-x.conf")
    assert message in str(err.value)


def test_one_prefix_twice_in_a_file_the_first_counts_a_later_file_replaces_it() -> None:
    main_file = parse_text(
        b'[[registry]]\nlocation = "x.io"\n[[registry]]\nlocation = "x.io"\n'
        b'[[registry.mirror]]\nlocation = "ignored.io"\n',
        "main",
    )
    assert [r.mirrors for r in main_file] == [()]
    drop_in = parse_text(b'[[registry]]\nlocation = "x.io"\ninsecure = true\n', "10.conf")
    other = parse_text(b'[[registry]]\nlocation = "z.io"\n', "20.conf")
    c = merge([main_file, drop_in, other], ["main", "10.conf", "20.conf"])
    assert [(r.prefix, r.insecure, r.source) for r in c.registries] == [
        ("x.io", True, "10.conf"),
        ("z.io", False, "20.conf"),
    ]


def test_where_the_files_are() -> None:
    home = Path("/home/u")
    env = {"CONTAINERS_REGISTRIES_CONF": "/tmp/r.conf"}
    system = Path("/etc/containers/registries.conf.d")
    user_dir = home / ".config/containers/registries.conf.d"
    assert config_locations(None, env, home) == Locations(Path("/tmp/r.conf"), (system, user_dir))
    assert config_locations(None, {}, home, exists=lambda p: True) == Locations(
        home / ".config/containers/registries.conf", (user_dir,)
    )
    assert config_locations(None, {}, home, exists=lambda p: False) == Locations(
        Path("/etc/containers/registries.conf"), (system, user_dir)
    )
    assert config_locations("/x.conf", env, home) == Locations(Path("/x.conf"), required=True)
    assert config_locations("", env, home) is None


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_files_are_read_again_when_they_change_a_bad_change_keeps_the_reading(
    tmp_path: Path, caplog
) -> None:
    main_file, drop_ins = tmp_path / "registries.conf", tmp_path / "d"
    drop_ins.mkdir()
    main_file.write_text('[[registry]]\nlocation = "a.io"\n')
    (drop_ins / "20-b.conf").write_text('[[registry]]\nlocation = "a.io"\ninsecure = true\n')
    (drop_ins / "10-a.conf").write_text('[[registry]]\nlocation = "a.io"\nblocked = true\n')
    (drop_ins / "notes.txt").write_text("not a drop-in")
    clock = Clock()
    files = RegistriesConfFiles(Locations(main_file, (drop_ins,)), clock=clock)
    first = files.load()
    # Drop-ins in name order: 20-b.conf's table replaced 10-a.conf's.
    assert [(r.insecure, r.blocked) for r in first.registries] == [(True, False)]
    assert first.files == (str(main_file), str(drop_ins / "10-a.conf"), str(drop_ins / "20-b.conf"))
    (drop_ins / "30-c.conf").write_text('[[registry]]\nlocation = "c.io"\n')
    assert files() is first  # within a second: not looked at
    clock.now += 2
    assert [r.prefix for r in files().registries] == ["a.io", "c.io"]
    good = files()
    (drop_ins / "30-c.conf").write_text('[[registry]]\nlocation = "c.io"\ninsecure = ')
    clock.now += 2
    with caplog.at_level(logging.WARNING):
        assert files() is good
        clock.now += 2
        assert files() is good
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(drop_ins / "30-c.conf") in warnings[0]
    assert "not valid TOML" in warnings[0]
    (drop_ins / "30-c.conf").unlink()
    clock.now += 2
    assert [r.prefix for r in files().registries] == ["a.io"]


# -- the endpoints of a pull --------------------------------------------------------------------


def test_endpoints_store_mirrors_then_registries_conf_mirrors_then_location() -> None:
    c = conf(
        '[[registry]]\nprefix = "example.com/team"\nlocation = "10.0.0.9:5000/mirror/team"\n'
        "insecure = true\n"
        '[[registry.mirror]]\nlocation = "cache.io/x"\n'
    )
    resolver = dataclasses.replace(
        parse_resolver_config(
            {"resolver": {"host": {"example.com": {"mirrors": [{"host": "own:5000"}]}}}}
        ),
        registries_conf=lambda: c,
    )
    eps = resolver.endpoints("example.com", "team/app")
    assert [(e.base_url, e.repository, e.is_mirror, e.verify) for e in eps] == [
        ("https://own:5000", "", True, True),
        ("https://cache.io", "x/app", True, True),
        ("http://10.0.0.9:5000", "mirror/team/app", True, True),
        ("https://10.0.0.9:5000", "mirror/team/app", True, False),
    ]
    # A push (no repository): the origin as named, the store's mirrors aside.
    assert [e.base_url for e in resolver.endpoints("example.com")] == [
        "https://own:5000",
        "https://example.com",
    ]


def test_endpoints_insecure_from_either_source_and_docker_hub() -> None:
    c = conf(
        '[[registry]]\nlocation = "10.0.0.2:5000"\ninsecure = true\n'
        '[[registry]]\nlocation = "docker.io"\n[[registry.mirror]]\nlocation = "docker.io/cache"\n'
    )
    resolver = dataclasses.replace(parse_resolver_config({}), registries_conf=lambda: c)
    eps = resolver.endpoints("10.0.0.2:5000", "x")
    assert [(e.base_url, e.verify, e.is_mirror) for e in eps] == [
        ("http://10.0.0.2:5000", True, False),
        ("https://10.0.0.2:5000", False, False),
    ]
    assert [e.base_url for e in resolver.endpoints("10.0.0.2:5000")] == [
        "http://10.0.0.2:5000",
        "https://10.0.0.2:5000",
    ]
    # The store's own insecure host: plain HTTP only, as before.
    own = dataclasses.replace(resolver, insecure_hosts=frozenset({"10.0.0.3:5000"}))
    assert [e.base_url for e in own.endpoints("10.0.0.3:5000", "x")] == ["http://10.0.0.3:5000"]
    hub = resolver.endpoints("docker.io", "library/alpine")
    assert [(e.base_url, e.repository, e.certs_host) for e in hub] == [
        ("https://registry-1.docker.io", "cache/library/alpine", "docker.io"),
        ("https://registry-1.docker.io", "", "docker.io"),
    ]
    assert [s.mirror for s in c.pull_sources("docker.io", "library/alpine", False)] == [True, False]
    assert PullSource("docker.io", "cache/library/alpine", False, True) in c.pull_sources(
        "docker.io", "library/alpine", False
    )


@pytest.mark.parametrize("host", ["127.0.0.1:5000", "10.200.0.2:5000"])
def test_the_bench_harness_registry_keeps_one_plain_http_endpoint(host: str) -> None:
    """lazybench gives its plain-HTTP registry (loopback, or a namespace address) both a
    store ``[resolver]`` mirror (``insecure``) and podman's registries.conf ``insecure``
    table: the store reaches it as before, over plain HTTP once, with no TLS try after it
    (a read is one request)."""
    import tomllib

    from harness.store_proc import store_config_text

    resolver = parse_resolver_config(tomllib.loads(store_config_text([host])))
    podman = conf(
        'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
        f'\n[[registry]]\nlocation = "{host}"\ninsecure = true\n'
    )
    for registries_conf in (None, lambda: podman):
        r = dataclasses.replace(resolver, registries_conf=registries_conf)
        for repository, digested in (("bench/python", False), ("bench/python", True), ("", False)):
            eps = r.endpoints(host, repository, digested=digested)
            assert [(e.base_url, e.verify, e.repository, e.is_mirror) for e in eps] == [
                (f"http://{host}", True, "", False)
            ]


@pytest.mark.e2e
@pytest.mark.anyio
async def test_an_insecure_registry_speaking_tls_with_a_certificate_nobody_trusts(
    tmp_path: Path, recwarn, caplog
) -> None:
    """``insecure = true`` lets TLS go unverified too: plain HTTP is answered 400 by the
    registry, then TLS without a certificate check reads the image; from then on TLS is
    asked first, so a read is one request (it was two, the first a 400). The store's log
    says once that the host's certificate is not verified; urllib3 prints no warning on
    stderr at each request."""
    import random

    from harness.registry_server import RegistryServer
    from store.registry import RegistryClient
    from tests.tls import make_tls_files

    tls = make_tls_files(tmp_path / "tls")
    data = random.Random(5).randbytes(50_000)
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    layer = "application/vnd.oci.image.layer.v1.tar+gzip"
    with RegistryServer(tls_cert=tls.cert, tls_key=tls.key) as reg:
        ref = f"{reg.host}/conf/tls:1"
        https = parse_resolver_config(
            {"resolver": {"host": {reg.host: {"mirrors": [{"host": f"https://{reg.host}"}]}}}}
        )
        async with RegistryClient(resolver=https, verify=str(tls.ca), retries=0) as c:
            digest = (await c.push_image(ref, config, [(data, layer)])).layers[0].digest
        c_conf = conf(f'[[registry]]\nlocation = "{reg.host}"\ninsecure = true\n')
        resolver = dataclasses.replace(parse_resolver_config({}), registries_conf=lambda: c_conf)
        async with RegistryClient(resolver=resolver, retries=0, timeout=10) as c:
            assert (await c.get_manifest(ref)).layers[0].digest == digest
            sent = c.stats.requests
            for offset in (10, 1000, 20_000):
                assert await c.read_ranges(ref, digest, [(offset, 20)]) == [
                    data[offset : offset + 20]
                ]
            assert c.stats.requests - sent == 3
        said = [r.getMessage() for r in caplog.records if "not verified" in r.getMessage()]
        assert said == [
            f"{reg.host}: TLS certificate not verified (insecure = true in registries.conf)"
        ]
        assert [str(w.message) for w in recwarn] == []
        plain = dataclasses.replace(resolver, registries_conf=None)
        async with RegistryClient(resolver=plain, retries=0, timeout=10) as c:
            with pytest.raises(RegistryError, match="HTTP 400"):
                await c.get_manifest(ref)


# -- the store's startup ----------------------------------------------------------------------


def test_a_named_file_that_does_not_read_stops_the_store_before_anything_is_made(
    tmp_path: Path, capsys
) -> None:
    bad = tmp_path / "registries.conf"
    bad.write_text('[[registry]]\nlocation = "x.io"\nblocked = "no"\n')
    config = tmp_path / "config.toml"
    config.write_text(f'registries_conf = "{bad}"\n')
    root, mnt = tmp_path / "root", tmp_path / "mnt"
    assert main(["--config", str(config), "--root", str(root), str(mnt)]) == 1
    err = capsys.readouterr().err
    assert f"registries_conf: {bad}: [[registry]] prefix 'x.io'.blocked must be true" in err
    assert "Traceback" not in err
    assert not root.exists() and not mnt.exists()
    config.write_text(f'registries_conf = "{tmp_path / "missing.conf"}"\n')
    assert main(["--config", str(config), "--root", str(root), str(mnt)]) == 1
    assert f"{tmp_path / 'missing.conf'}: registries.conf file does not exist" in (
        capsys.readouterr().err
    )


def test_a_default_file_that_does_not_read_is_left_out_with_a_warning(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    bad = tmp_path / "registries.conf"
    bad.write_text("[[registry]\n")
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(bad))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with caplog.at_level(logging.WARNING):
        files = open_registries_conf(None)
    assert files is not None and files().registries == ()
    assert any(str(bad) in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)
    assert open_registries_conf("") is None


def test_a_home_file_made_or_removed_while_the_store_runs_switches_as_podman_does(
    tmp_path: Path, monkeypatch
) -> None:
    """Podman reads ``~/.config/containers/registries.conf`` instead of the system file when
    it exists, looking at each run: one created after the store started counts, and once
    removed the system file counts again."""
    from store.registry import registriesconf

    system, home = tmp_path / "etc-registries.conf", tmp_path / "home"
    system.write_text('[[registry]]\nlocation = "system.io"\n')
    monkeypatch.setattr(registriesconf, "SYSTEM_FILE", system)
    monkeypatch.setattr(registriesconf, "SYSTEM_DROP_IN_DIR", tmp_path / "no-drop-ins")
    monkeypatch.setattr(registriesconf, "RECHECK", 0.0)
    monkeypatch.delenv("CONTAINERS_REGISTRIES_CONF", raising=False)
    monkeypatch.setenv("HOME", str(home))
    files = open_registries_conf(None)
    assert files is not None and [r.prefix for r in files().registries] == ["system.io"]
    user = home / ".config/containers/registries.conf"
    user.parent.mkdir(parents=True)
    user.write_text('[[registry]]\nlocation = "home.io"\n')
    assert [r.prefix for r in files().registries] == ["home.io"]
    assert files().files == (str(user),)
    user.unlink()
    assert [r.prefix for r in files().registries] == ["system.io"]
