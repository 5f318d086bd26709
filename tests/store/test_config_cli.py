"""Config keys (Go-compatible, ours, unknown), and CLI startup errors as one line."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from store.cli import is_mounted, main, prepare, request_timeout
from store.config import ConfigError, StoreConfig, load_config, parse_config

GO_CONFIG = """
noprefetch = true
prefetch_size = 1048576
prefetch_timeout_sec = 5
no_background_fetch = true
max_concurrency = 4
http_cache_type = "memory"
[blob]
chunk_size = 100000
fetching_timeout_sec = 60
max_retries = 2
check_always = true
[fuse]
attr_timeout = 3
entry_timeout = 4
[directory_cache]
direct = true
[[resolver.host."docker.io".mirrors]]
host = "mirror.example:5000"
insecure = true
"""


def test_go_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('metrics_address = "127.0.0.1:9999"\ncache_max_bytes = 1000\n' + GO_CONFIG)
    cfg = load_config(path)
    assert cfg.noprefetch and cfg.no_background_fetch
    assert (cfg.max_concurrency, cfg.chunk_size) == (4, 100000)
    assert (cfg.fetching_timeout_sec, cfg.max_retries) == (60, 2)
    assert cfg.check_always and cfg.valid_interval == 60  # Go's default interval
    assert (cfg.attr_timeout, cfg.entry_timeout) == (3, 4)
    assert parse_config({"blob": {"valid_interval": 0}}).valid_interval == 60  # 0: default
    assert parse_config({"blob": {"valid_interval": 15}}).valid_interval == 15
    assert cfg.resolver["host"]["docker.io"]["mirrors"][0]["host"] == "mirror.example:5000"
    assert cfg.metrics_address == "127.0.0.1:9999" and cfg.cache_max_bytes == 1000


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"no_such_key": 1}, "unknown key 'no_such_key'"),
        ({"blob": {"chunksize": 1}}, "unknown key 'blob.chunksize'"),
        ({"noprefetch": "yes"}, "'noprefetch' must be bool"),
        ({"blob": {"chunk_size": -1}}, "must be positive"),
        ({"blob": {"check_always": "yes"}}, "'blob.check_always' must be bool"),
        ({"max_concurrency": True}, "must be a number"),
        ({"overlay_opaque_type": "both"}, "'overlay_opaque_type' must be one of 'auto', 'trusted'"),
        ({"toc_max_bytes": 0}, "'toc_max_bytes' must be positive"),
        ({"toc_max_entries": "many"}, "'toc_max_entries' must be int"),
        ({"metrics_address": "notaport"}, "'metrics_address': expected HOST:PORT"),
        ({"metrics_address": "127.0.0.1:99999"}, "numeric port 0..65535"),
        ({"metrics_address": ":http"}, "numeric port 0..65535"),
        ({"noprefetchh": True}, r"unknown key 'noprefetchh' \(did you mean 'noprefetch'\?\)"),
        ({"blob": {"chunksize": 1}}, r"'blob.chunksize' \(did you mean 'blob.chunk_size'\?\)"),
        ({"serve_all_user": True}, r"'serve_all_user' \(did you mean 'serve_all_users'\?\)"),
        ({"fuse": {"serve_all_users": True}}, r"did you mean 'serve_all_users'"),
        ({"serve_all_users": "yes"}, "'serve_all_users' must be bool"),
    ],
)
def test_bad_keys_are_named(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data, source="c.toml")


@pytest.mark.parametrize(
    "key",
    [
        "prefetch_timeout_sec",
        "resolve_result_entry_ttl_sec",
        "resolve_timeout_sec",
        "blob.fetching_timeout_sec",
        "blob.valid_interval",
        "fuse.attr_timeout",
    ],
)
def test_a_nan_number_is_refused_before_anything_is_mounted(tmp_path: Path, key: str) -> None:
    """TOML's ``nan`` loaded (``nan <= 0`` is false), the store mounted, and the first layer
    lookup ended it with a traceback (``prefetch_timeout_sec``,
    ``resolve_result_entry_ttl_sec``: trio's "`seconds` must not be NaN") or answered EIO to
    every lookup or read (``resolve_timeout_sec``, ``blob.fetching_timeout_sec``)."""
    section, _, name = key.rpartition(".")
    conf = tmp_path / "c.toml"
    conf.write_text((f"[{section}]\n" if section else "") + f"{name} = nan\n")
    mnt = tmp_path / "mnt"
    # A process of its own: a store that took the config would mount and serve until stopped.
    argv = [sys.executable, "-m", "store", "--config", str(conf), "--root", str(tmp_path / "r")]
    proc = subprocess.Popen([*argv, str(mnt)], stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.terminate()  # it serves: SIGTERM unmounts
            proc.communicate(timeout=15)
    assert proc.returncode == 1
    assert err.strip().splitlines() == [
        f"stargz-store: {conf}: key {key!r} must be a number, got nan"
    ]
    assert not mnt.exists() and not (tmp_path / "r").exists()
    # inf is no bound, and loads.
    conf.write_text((f"[{section}]\n" if section else "") + f"{name} = inf\n")
    load_config(conf)


@pytest.mark.parametrize(
    "key",
    [
        "prefetch_timeout_sec",
        "fuse.attr_timeout",
        "fuse.entry_timeout",
    ],
)
def test_a_negative_number_is_refused_naming_the_key(key: str) -> None:
    """A negative count or number of seconds loaded: ``[blob] max_retries = -1`` made every
    registry request fail with an empty error (podman then pulled every layer itself), and
    ``prefetch_timeout_sec = -1`` ended the store with a traceback at its first prefetch."""
    section, _, name = key.rpartition(".")
    data: dict = {section: {name: -1}} if section else {name: -1}
    with pytest.raises(ConfigError) as err:
        parse_config(data, source="c.toml")
    assert (
        str(err.value) == f"c.toml: key {key!r} must not be negative, got -1 (0 means the default)"
    )


def test_negative_numbers_the_go_store_gives_a_meaning_load_with_it() -> None:
    """A Go config may say ``[blob] max_retries = -1`` (0 is the default there: go-retryablehttp
    then makes one attempt, no retry) and ``valid_interval = -1`` (a check at every read). The
    refusal of negative numbers refused both, so such a config no longer started the store;
    before it, -1 retries failed every registry request."""
    cfg = parse_config({"blob": {"max_retries": -1, "valid_interval": -1}}, source="c.toml")
    assert cfg.max_retries == 0 and cfg.valid_interval == 0


def test_overlay_opaque_type_defaults_to_rootful_overlayfs() -> None:
    assert StoreConfig().opaque_xattrs == (b"trusted.overlay.opaque",)
    assert parse_config({"overlay_opaque_type": "user"}).opaque_xattrs == (b"user.overlay.opaque",)
    assert len(parse_config({"overlay_opaque_type": "all"}).opaque_xattrs) == 2


def test_missing_default_is_fine_missing_explicit_is_not(tmp_path: Path, monkeypatch) -> None:
    import store.config

    monkeypatch.setattr(store.config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert load_config(None) == StoreConfig()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "other.toml")


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["--config", str(tmp_path / "nope.toml"), str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"stargz-store: config file {tmp_path / 'nope.toml'} does not exist"]
    bad = tmp_path / "bad.toml"
    bad.write_text("typo_key = 1\n")
    assert main(["--config", str(bad), str(tmp_path)]) == 1
    assert "unknown key 'typo_key'" in capsys.readouterr().err
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    (tmp_path / "file").write_text("")
    assert (
        main(["--config", str(empty), "--root", str(tmp_path / "r"), str(tmp_path / "file" / "m")])
        == 1
    )
    assert f"file/m: {tmp_path / 'file'} is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.e2e
def test_stale_mount_is_cleaned_and_sigterm_unmounts(tmp_path: Path) -> None:
    from tests.store.conftest import StoreProcess, _mounted

    sp = StoreProcess(tmp_path / "s").start()
    try:
        assert sp.proc is not None
        sp.proc.kill()  # a crash: the FUSE mount stays, dead
        sp.proc.wait(10)
        assert _mounted(sp.mnt)
        with pytest.raises(OSError):
            os.listdir(sp.mnt)  # ENOTCONN: the mount is dead
        sp.proc = None
        sp.start()  # cleans the stale mount and mounts again
        assert (sp.mnt / "status").read_text().startswith("{")
        sp.proc.terminate()
        assert sp.proc.wait(15) == 0
        assert not _mounted(sp.mnt)
    finally:
        sp.stop()


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) not installed")
def test_a_mount_libfuse_refuses_is_one_line(tmp_path: Path) -> None:
    """A store in a user namespace that does not own its mount namespace (``unshare --user``
    without ``--mount``): libfuse cannot mount there, nor can fusermount3. The store said so
    in a traceback of trio's exception group; now in one line, after libfuse's reason."""
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-m", "store",
         "--config", os.devnull, "--root", str(tmp_path / "root"), str(tmp_path / "mnt")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"stargz-store: cannot mount {tmp_path / 'mnt'}: "), proc.stderr
    assert "libfuse's reason is on the line above" in last
    assert not is_mounted(tmp_path / "mnt")


def _serving(mnt: Path) -> bool:
    try:
        return (mnt / "status").read_bytes().startswith(b"{")
    except OSError:
        return False


@pytest.mark.e2e
def test_two_stores_started_at_once_on_one_mountpoint_leave_one_mount(tmp_path: Path) -> None:
    """Two stores started together on one mountpoint (each with its own root): one serves,
    the other exits 1 with one line naming the mountpoint, and once the one serving stops
    nothing is left mounted. Before, both passed the mount check before either mounted,
    both mounted (stacked), and a mount stayed behind after both exited."""
    from tests.store.conftest import _mounted

    mnt = tmp_path / "mnt"
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    for attempt in range(3):
        store = [sys.executable, "-m", "store", "--config", str(empty)]
        procs = [
            subprocess.Popen(
                [*store, "--root", str(tmp_path / f"root{attempt}-{i}"), str(mnt)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for i in range(2)
        ]
        try:
            deadline = time.monotonic() + 20
            while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.1)
            refused = [p for p in procs if p.poll() is not None]
            assert len(refused) == 1, "both stores are serving on one mountpoint"
            assert refused[0].returncode == 1
            err = refused[0].communicate(timeout=5)[1].decode()
            assert f"stargz-store: {mnt}" in err and "Traceback" not in err, err
            (serving,) = [p for p in procs if p.poll() is None]
            while not _serving(mnt) and time.monotonic() < deadline:
                time.sleep(0.1)
            serving.terminate()
            assert serving.wait(15) == 0
            assert not _mounted(mnt)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.wait(15)
            while _mounted(mnt):
                subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_module_entry_point_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "store", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "MOUNTPOINT" in out.stdout


def test_toc_caps_are_read() -> None:
    cfg = parse_config({"toc_max_bytes": 1 << 20, "toc_max_entries": 500})
    assert (cfg.toc_max_bytes, cfg.toc_max_entries) == (1 << 20, 500)
    assert StoreConfig().toc_max_entries == 1_000_000


def test_resolved_layer_ttl_is_gos_key() -> None:
    """``resolve_result_entry_ttl_sec``: honoured, 0 means Go's default of 120 s
    (fs/layer/layer.go), a negative TTL is refused."""
    assert parse_config({"resolve_result_entry_ttl_sec": 30}).resolve_result_entry_ttl_sec == 30
    assert parse_config({"resolve_result_entry_ttl_sec": 0}).resolve_result_entry_ttl_sec == 120
    assert StoreConfig().resolve_result_entry_ttl_sec == 120
    with pytest.raises(ConfigError, match="'resolve_result_entry_ttl_sec' must not be negative"):
        parse_config({"resolve_result_entry_ttl_sec": -1})


GO_ZEROS = """
max_concurrency = 0
prefetch_timeout_sec = 0
resolve_result_entry_ttl_sec = 0
[blob]
chunk_size = 0
fetching_timeout_sec = 0
max_retries = 0
[fuse]
attr_timeout = 0
entry_timeout = 0
"""


def test_go_zero_values_mean_the_defaults(tmp_path: Path) -> None:
    """A Go config that spells keys out with Go's zero values (upstream: ``if cfg.X == 0``
    then the default, in fs/remote/resolver.go, fs/fs.go, fs/layer/layer.go) loads with the
    defaults: not refused (chunk_size, max_concurrency, fetching_timeout_sec), and not 0
    retries, a 0 s prefetch or no attribute caching."""
    path = tmp_path / "config.toml"
    path.write_text(GO_ZEROS)
    assert load_config(path) == StoreConfig()


def test_prefetch_size_loads_and_says_it_does_nothing(caplog) -> None:
    """``prefetch_size`` (Go: bytes to prefetch of a layer without landmarks) has no
    counterpart here: it loads, changes nothing, and the log says so — it was taken as an
    honoured key and silently never used."""
    with caplog.at_level("INFO", logger="store.config"):
        assert parse_config({"prefetch_size": 1 << 20}) == StoreConfig()
    assert "config key 'prefetch_size' (Go stargz-store) has no effect here" in caplog.text


@pytest.mark.parametrize("table", ["kubeconfig_keychain", "cri_keychain"])
def test_a_keychain_turned_on_loads_with_a_warning(caplog, table: str) -> None:
    """A Go config that turns on a keychain this store does not read loads (drop-in) but
    warns: quietly ignored, every pull of a private image went whole without a word."""
    with caplog.at_level("INFO", logger="store.config"):
        assert parse_config({table: {"enable_keychain": True}}) == StoreConfig()
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and f"'{table}': enable_keychain is on" in warned[0].getMessage()
    assert "private images pull whole" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level("INFO", logger="store.config"):
        parse_config({table: {"enable_keychain": False}})
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_chunk_cap_is_read() -> None:
    assert parse_config({"chunk_max_bytes": 1 << 30}).chunk_max_bytes == 1 << 30
    assert StoreConfig().chunk_max_bytes == 64 << 20
    with pytest.raises(ConfigError, match="'chunk_max_bytes' must be positive"):
        parse_config({"chunk_max_bytes": 0})


def test_shipped_example_config_loads() -> None:
    path = Path(__file__).resolve().parents[2] / "store" / "packaging" / "config.toml"
    assert load_config(path).metrics_address == "127.0.0.1:9110"
    assert load_config(path).serve_all_users is False


def test_every_key_is_named_in_the_readme_and_the_config_docstring() -> None:
    """README's store section lists the keys a config may hold (an unknown one is an error),
    and store.config's docstring documents each: a key added without them is unfindable."""
    import store.config

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## The store: `stargz-store`", 1)[1].split("\n**", 1)[0]
    for key in store.config._KNOWN:
        section_name, _, name = key.rpartition(".")
        if section_name:
            assert f"[{section_name}]" in section, key
        else:
            assert f"`{name}`" in section, key
        assert name in (store.config.__doc__ or ""), key


def test_request_timeout_is_a_share_of_the_fetch_bound():
    assert request_timeout(StoreConfig()) == 30  # 300 s over 6 attempts, capped at 30
    assert request_timeout(StoreConfig(fetching_timeout_sec=15, max_retries=8)) == 15 / 9
    assert request_timeout(StoreConfig(fetching_timeout_sec=2, max_retries=5)) == 1  # floor
    assert request_timeout(StoreConfig(fetching_timeout_sec=10, max_retries=-1)) == 10


@pytest.mark.e2e
def test_sigterm_unmounts_and_exits_0(store_factory) -> None:
    from tests.store.conftest import _mounted

    sp = store_factory()
    sp.proc.terminate()
    assert sp.proc.wait(15) == 0
    assert not _mounted(sp.mnt)


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT], ids=["sighup", "sigint"])
def test_sighup_and_sigint_unmount_and_exit_0_as_sigterm_does(tmp_path: Path, signum) -> None:
    """SIGHUP (the terminal or ssh session the store ran in went away) ended the store by its
    default action: exit status 129, no log line, and a dead mount left on MOUNTPOINT that
    failed every podman command on the storage until the store was started again."""
    from tests.store.conftest import StoreProcess, _mounted

    with _sighup_as(signal.SIG_DFL):  # as from a terminal, whatever started the tests
        sp = StoreProcess(tmp_path / "s").start()
    try:
        assert sp.proc is not None
        sp.proc.send_signal(signum)
        assert sp.proc.wait(15) == 0
        assert not _mounted(sp.mnt)
        assert f"signal {int(signum)}: unmounting" in sp.log.read_text()
    finally:
        sp.stop()


@contextlib.contextmanager
def _sighup_as(disposition: Any) -> Iterator[None]:
    """SIGHUP's disposition in this process, which a child inherits if it is SIG_IGN."""
    old = signal.signal(signal.SIGHUP, disposition)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, old)


@pytest.mark.e2e
def test_a_store_started_under_nohup_outlives_its_session(tmp_path: Path) -> None:
    """``nohup stargz-store …`` ignores SIGHUP so that the store outlives the session; the
    store caught it anyway and unmounted under every container using it when the terminal
    closed. Started ignoring SIGHUP, it keeps ignoring it; SIGTERM still stops it."""
    from tests.store.conftest import StoreProcess, _mounted

    with _sighup_as(signal.SIG_IGN):
        sp = StoreProcess(tmp_path / "s").start()
    try:
        assert sp.proc is not None
        sp.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert sp.proc.poll() is None and _mounted(sp.mnt)
        sp.proc.send_signal(signal.SIGTERM)
        assert sp.proc.wait(15) == 0
        assert not _mounted(sp.mnt)
    finally:
        sp.stop()


@pytest.mark.e2e
def test_a_stop_signal_as_soon_as_the_mount_shows_still_unmounts(tmp_path: Path) -> None:
    """A SIGTERM in the milliseconds after the mount appeared (a unit stopped or restarted
    right after its start, a supervisor's quick stop) took its default action: the store died
    by the signal and left a dead mount that failed every podman command on the storage (17
    of 20 such stops did). The stop signals are caught from before the mount now."""
    from tests.store.conftest import _mounted

    mnt = tmp_path / "mnt"
    for attempt in range(5):
        log = tmp_path / f"store-{attempt}.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "store", "--config", "", "--root", str(tmp_path / "r"), mnt],
                stderr=err,
            )
        try:
            deadline = time.monotonic() + 30
            while not _mounted(mnt):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.0005)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, (attempt, log.read_text()[-2000:])
            assert not _mounted(mnt), attempt
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            if _mounted(mnt):
                subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


@pytest.mark.e2e
@pytest.mark.store_ours_only(reason="auth_file is our key; the warning is our log line")
def test_a_missing_auth_file_is_said_at_startup(store_factory, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "auth.json"
    sp = store_factory(f'auth_file = "{missing}"\n')
    msgs = [json.loads(line).get("msg", "") for line in sp.log.read_text().splitlines()]
    assert any(m.startswith(f"auth_file {missing} does not exist") for m in msgs), msgs


# Conformance with the Go store's interface (cmd/stargz-store/main.go, fs/config/config.go,
# service/resolver/registry.go upstream).


@pytest.mark.parametrize(
    "argv",
    [
        ["-config", "c.toml", "-root", "r", "-addr", "a.sock", "-log-level", "debug", "m"],
        ["-config=c.toml", "-root=r", "-addr=a.sock", "-log-level=debug", "m"],
        ["--config=c.toml", "--root=r", "--addr=a.sock", "--log-level=DEBUG", "m"],
    ],
)
def test_go_flag_spellings_are_accepted(argv: list[str]) -> None:
    """Go's flag package takes ``-name``, ``--name``, ``-name=v`` and ``--name=v`` alike."""
    from store.cli import build_parser

    args = build_parser().parse_args(argv)
    assert (args.config, args.root, args.addr) == ("c.toml", Path("r"), Path("a.sock"))
    assert (args.log_level, args.mountpoint) == ("debug", Path("m"))


@pytest.mark.parametrize(
    ("given", "level"),
    [("trace", "debug"), ("fatal", "critical"), ("panic", "critical"), ("WARN", "warning")],
)
def test_logrus_levels_are_accepted(given: str, level: str) -> None:
    """The Go store's ``--log-level`` is logrus's: trace … panic, any case."""
    from store.cli import build_parser, python_log_level

    args = build_parser().parse_args(["--log-level", given, "m"])
    assert python_log_level(args.log_level) == level


def test_log_lines_carry_the_go_stores_time_and_level_values() -> None:
    """The Go store logs through logrus's JSON formatter: ``time`` an RFC 3339 string with
    nine fraction digits, ``level`` a logrus name. Ours wrote ``time`` as a Unix number, which
    a log pipeline set up for the Go store (``time`` parsed as its timestamp) could not read."""
    import datetime
    import logging

    from store.cli import JsonFormatter

    def line(level: int) -> dict:
        record = logging.LogRecord("store", level, __file__, 1, "mounted on %s", ("/m",), None)
        record.created = 1_700_000_000.123456
        return json.loads(JsonFormatter().format(record))

    entry = line(logging.WARNING)
    assert entry["time"] == "2023-11-14T22:13:20.123456000Z"
    assert datetime.datetime.fromisoformat(entry["time"]).timestamp() == 1_700_000_000.123456
    assert (entry["level"], entry["msg"]) == ("warning", "mounted on /m")
    # logrus's names: panic, fatal, error, warning, info, debug, trace
    assert [line(lv)["level"] for lv in (40, 30, 20, 10)] == ["error", "warning", "info", "debug"]
    assert line(logging.CRITICAL)["level"] == "fatal"


@pytest.mark.e2e
def test_log_time_is_a_string_like_the_go_stores(store_factory) -> None:
    """Each store's log lines (JSON) carry ``time`` as an RFC 3339 string in UTC or with an
    offset, ``level`` and ``msg``: a parser set up for one reads the other."""
    import datetime

    sp = store_factory()
    sp.stop()
    entries = [json.loads(line) for line in sp.log.read_text().splitlines() if line.startswith("{")]
    assert entries
    for entry in entries:
        assert isinstance(entry["time"], str), entry
        assert datetime.datetime.fromisoformat(entry["time"]).tzinfo is not None, entry
        assert entry["level"] in ("trace", "debug", "info", "warning", "error", "fatal"), entry
        assert isinstance(entry["msg"], str), entry


@pytest.mark.parametrize("flag", ["-h", "--help", "-help"])
def test_help_spellings(flag: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([flag])
    assert exc.value.code == 0 and "MOUNTPOINT" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--version", "-version"])
def test_version_spellings(flag: str, capsys) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main([flag])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"stargz-store (lazybench) {version('lazybench')}"


def test_unknown_flag_is_refused(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--no-such-flag", "m"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_config_path_rules_follow_go(tmp_path: Path, monkeypatch) -> None:
    """An empty ``--config`` reads no file; the default path named explicitly may be absent."""
    import store.config

    monkeypatch.setattr(store.config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert load_config("") == StoreConfig()
    assert load_config(tmp_path / "absent.toml") == StoreConfig()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "other.toml")


def test_missing_mountpoint_is_created(tmp_path: Path) -> None:
    """As the Go store does (``os.MkdirAll(mountPoint, 0755)``)."""
    from store.cli import prepare_mountpoint

    prepare_mountpoint(tmp_path / "a" / "mnt")
    assert (tmp_path / "a" / "mnt").is_dir()


@pytest.mark.parametrize("what", ["mountpoint", "root"])
@pytest.mark.parametrize("where", ["file", "file/x", "file/a/x"])
def test_a_mountpoint_or_root_that_is_or_lies_under_a_file_is_refused_before_anything_is_made(
    tmp_path: Path, what: str, where: str, capsys
) -> None:
    """Named as what it is: a ``--root`` naming a file was refused as 'credential socket
    FILE/store.sock: Not a directory', which says nothing of the option at fault."""
    (tmp_path / "file").write_text("x")
    paths = {"mountpoint": tmp_path / "mnt", "root": tmp_path / "root", what: tmp_path / where}
    assert main(["--config", "", "--root", str(paths["root"]), str(paths["mountpoint"])]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "credential socket" not in err
    if where == "file":
        assert f"{what} {tmp_path / 'file'} is not a directory" in err
    else:
        assert f"cannot create {what} {tmp_path / where}: {tmp_path / 'file'} is not a" in err
    assert not (tmp_path / "mnt").exists() and not (tmp_path / "root").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_live_mount_is_refused_not_unmounted(tmp_path: Path) -> None:
    """Only a dead FUSE mount is cleaned up; a live one (a running store) is left alone.
    The refusal names the mount's type and the command that unmounts it, and comes before
    the store's root is made."""
    from store.cli import StoreError, is_mounted, main, prepare_mountpoint

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        with pytest.raises(StoreError, match=rf"already mounted \(tmpfs;.*`umount {mnt}`"):
            prepare_mountpoint(mnt)
        assert is_mounted(mnt)
        root = tmp_path / "root"
        assert main(["--config", "", "--root", str(root), str(mnt)]) == 1
        link = tmp_path / "link"
        link.symlink_to(mnt)  # the same mount, named through a symbolic link
        assert main(["--config", "", "--root", str(root), str(link)]) == 1
        assert not root.exists()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_unwritable_root_is_one_line(tmp_path: Path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(ro)], check=True)
    try:
        (ro / "root").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        empty = tmp_path / "empty.toml"
        empty.write_text("")
        argv = ["--config", str(empty), "--root", str(ro / "root"), str(tmp_path / "mnt")]
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Read-only file system" in err[0] and str(ro / "root") in err[0]
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


@pytest.mark.parametrize("value", ["memory", "db"])
def test_metadata_store_is_accepted(value: str) -> None:
    """``metadata_store`` (upstream cmd/stargz-store/main.go): no effect here."""
    assert parse_config({"metadata_store": value}) == StoreConfig()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"metadata_store": "sqlite"}, "'metadata_store' must be one of 'memory', 'db'"),
        ({"disable_verification": True}, "content verification cannot be disabled"),
        ({"blob": 1}, r"c.toml: \[blob\] must be a table"),
        (
            {"resolver": {"host": {"x": {"mirrors": [{"insecure": True}]}}}},
            r"c.toml: resolver.host.\"x\".mirrors\[0\] needs a non-empty string 'host'",
        ),
        ({"resolver": {"request_timeout_sec": "5"}}, "c.toml: resolver.request_timeout_sec"),
    ],
)
def test_go_rejects_these_too(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data, source="c.toml")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"host": {"x": {"mirror": [{"host": "m"}]}}},
            r"c.toml: resolver.host.\"x\": unknown key 'mirror' \(did you mean 'mirrors'\?\)",
        ),
        (
            {"host": {"x": {"mirrors": [{"host": "m", "insecur": True}]}}},
            r"resolver.host.\"x\".mirrors\[0\]: unknown key 'insecur' \(did you mean 'insecure'",
        ),
        ({"request_timeout": 5}, r"c.toml: resolver: unknown key 'request_timeout' \(did you"),
    ],
)
def test_a_resolver_key_the_go_schema_lacks_is_named(table: dict, message: str) -> None:
    """A typo in ``[resolver]`` was taken silently: ``[[resolver.host."x".mirror]]`` loaded
    and the store never used the mirror."""
    with pytest.raises(ConfigError, match=message):
        parse_config({"resolver": table}, source="c.toml")


def test_every_resolver_key_of_the_go_store_loads() -> None:
    """Upstream service/resolver/registry.go: Config, HostConfig, MirrorConfig."""
    mirror = {"host": "m", "insecure": True, "request_timeout_sec": 3, "header": {"a": "b"}}
    table = {"request_timeout_sec": 4, "host": {"x": {"mirrors": [mirror]}}}
    assert parse_config({"resolver": table}).resolver == table


def test_disable_verification_false_is_fine() -> None:
    assert parse_config({"disable_verification": False}) == StoreConfig()


def test_bad_resolver_is_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[resolver.host."x".mirrors]]\nhost = 1\n')
    assert main(["--config", str(bad), "--root", str(tmp_path / "r"), str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"stargz-store: {bad}: resolver.host.\"x\".mirrors[0] needs a non-empty string 'host'"
    ]


def test_resolver_request_timeout_is_applied() -> None:
    """``[resolver] request_timeout_sec``: every host's default request timeout (upstream
    service/resolver/registry.go); here the cap on each attempt's share of the read bound."""
    assert request_timeout(parse_config({"resolver": {"request_timeout_sec": 5}})) == 5
    assert request_timeout(parse_config({"resolver": {"request_timeout_sec": 0}})) == 30


def test_negative_mirror_timeout_is_accepted() -> None:
    """Go: ``request_timeout_sec < 0`` is no timeout. Reads here stay bounded by
    ``[blob] fetching_timeout_sec``; the mirror gets the default per-request bound."""
    from store.registry.hosts import parse_resolver_config

    table = {"host": {"x": {"mirrors": [{"host": "m", "request_timeout_sec": -1}]}}}
    cfg = parse_config({"resolver": table})
    [mirror, _origin] = parse_resolver_config(cfg.resolver).endpoints("x")
    assert mirror.host == "m" and mirror.request_timeout == 30


def test_a_root_holding_the_mountpoint_is_made_private_too(tmp_path: Path) -> None:
    """The default layout (/var/lib/stargz-store with its mountpoint store/ inside): the
    root is made before the mountpoint, so it is 0700, not the mountpoint's parents' 0755."""
    from store.cli import prepare

    root = tmp_path / "var" / "stargz-store"
    mountpoint = prepare(root, root / "store")
    assert mountpoint == root / "store" and mountpoint.is_dir()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "cache").stat().st_mode) == 0o700


def test_root_and_chunk_cache_are_private_to_the_store(tmp_path: Path) -> None:
    """The chunk cache holds layer bytes of private registries' images: other local users
    must not read it. A new root is 0700 (as the Go store's); a cache directory an older
    store left 0755 is made 0700 at the next start."""
    from store.cli import CACHE_DIR, prepare_root

    fresh = tmp_path / "fresh" / "root"
    prepare_root(fresh)
    assert fresh.stat().st_mode & 0o777 == 0o700
    assert (fresh / CACHE_DIR).stat().st_mode & 0o777 == 0o700

    old = tmp_path / "old"
    (old / CACHE_DIR).mkdir(parents=True, mode=0o755)
    os.chmod(old / CACHE_DIR, 0o755)
    prepare_root(old)
    assert (old / CACHE_DIR).stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    "value", ["127.0.0.1:9999", ":9999", "[::1]:9999", "localhost:1", "127.0.0.1:0"]
)
def test_metrics_addresses_go_takes_are_taken(value: str) -> None:
    assert parse_config({"metrics_address": value}).metrics_address == value


def test_a_busy_metrics_port_is_one_line_before_anything_is_mounted(tmp_path: Path, capsys) -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        config = tmp_path / "c.toml"
        config.write_text(f'metrics_address = "127.0.0.1:{busy.getsockname()[1]}"\n')
        mnt = tmp_path / "mnt"
        assert main(["--config", str(config), "--root", str(tmp_path / "r"), str(mnt)]) == 1
    finally:
        busy.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot listen there: Address already in use" in err[0], err
    assert not is_mounted(mnt)


def test_addr_never_replaces_a_file_nor_a_live_store_s_socket(tmp_path: Path, capsys) -> None:
    import socket

    precious = tmp_path / "precious.txt"
    precious.write_text("important\n")
    root, mnt = tmp_path / "r", tmp_path / "m"
    argv = ["--config", "", "--root", str(root), "--addr"]
    assert main([*argv, str(precious), str(mnt)]) == 1
    assert "not a socket" in capsys.readouterr().err
    assert precious.read_text() == "important\n" and not root.exists() and not mnt.exists()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(tmp_path / "live.sock"))
    live.listen(1)
    try:
        assert main([*argv, str(tmp_path / "live.sock"), str(mnt)]) == 1
        assert "a running store listens there" in capsys.readouterr().err
    finally:
        live.close()
    # Nobody listens on it now: a stale socket, which the store may take over.
    assert prepare(root, mnt, tmp_path / "live.sock") == mnt


@pytest.mark.e2e
def test_systemd_type_notify_gets_ready_once_mounted_and_stopping(tmp_path: Path) -> None:
    """Upstream's stargz-store.service is ``Type=notify``: the Go store sends READY=1 over
    ``$NOTIFY_SOCKET`` once mounted. Without it, that unit waits for its start timeout and
    kills the store. An abstract ``@`` socket, as systemd may hand out."""
    import socket

    from tests.store.conftest import StoreProcess, _mounted

    name = f"lazybench-notify-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(30)
        sp = StoreProcess(tmp_path / "store", env={"NOTIFY_SOCKET": "@" + name})
        try:
            sp.start()
            assert listener.recv(4096) == b"READY=1"
            assert _mounted(sp.mnt)
            sp.proc.terminate()
            assert listener.recv(4096) == b"STOPPING=1"
            assert sp.proc.wait(15) == 0
        finally:
            sp.stop()


@pytest.mark.e2e
@pytest.mark.store_ours_only(reason="the hint is our log line")
def test_a_credential_socket_where_the_helper_does_not_look_is_said_at_startup(
    store_factory,
) -> None:
    """podman runs the helper without arguments, so it looks only at the default socket; a
    store on another --root without --addr never gets podman's credentials (the Go store's
    socket is at the default whatever its --root): said once the socket is up."""
    import time

    sp = store_factory()
    deadline = time.monotonic() + 10  # the mount is up a moment before the socket
    while True:
        msgs = [json.loads(line).get("msg", "") for line in sp.log.read_text().splitlines()]
        hint = [m for m in msgs if "podman runs stargz-store-helper without arguments" in m]
        if hint or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(hint) == 1 and "--addr /var/lib/stargz-store/store.sock" in hint[0], msgs
