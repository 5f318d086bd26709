"""`stargz-store [--config PATH] [--root DIR] [--addr SOCKET] [--log-level L] MOUNTPOINT` — drop-in
for the Go one.

Mounts the Additional Layer Store at MOUNTPOINT with pyfuse3 and serves until SIGINT, SIGTERM,
SIGHUP or an external unmount, then unmounts. ``--root`` holds the chunk cache (``<root>/cache``)
and the credential socket ``<root>/store.sock`` that podman's layer-store auth helper
(``stargz-store-helper``) hands credentials to (:mod:`store.credsocket`).
MOUNTPOINT is created when missing, as the Go store does. A stale FUSE mount left on it by a
crashed store is unmounted first (``fusermount3 -u``, then ``umount -l``); if that fails, or
MOUNTPOINT carries a live mount, the store says so and exits non-zero. Under systemd
(``$NOTIFY_SOCKET``, a ``Type=notify`` unit) it reports ``READY=1`` once mounted and
``STOPPING=1`` when it stops, as the Go store does. Logs are JSON lines on stderr, with the
Go store's ``time`` (RFC 3339) and ``level`` values (:class:`JsonFormatter`). Errors
the user can fix are printed as one line, exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from store import version
from store.config import DEFAULT_ROOT, ConfigError, StoreConfig, load_config
from store.registry.hosts import DEFAULT_REQUEST_TIMEOUT
from store.registry.registriesconf import (
    RegistriesConfError,
    RegistriesConfFiles,
    config_locations,
    default_locations,
)

log = logging.getLogger("store")

M_ARENA_MAX = -8  # glibc mallopt parameter
# Signals that stop the store cleanly (unmount, then exit 0); SIGHUP only when the store was
# not started ignoring it (stop_signals).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The :data:`STOP_SIGNALS` this process answers: SIGHUP (the terminal or ssh session it
    ran in went away) only when it was not ignored at start. ``nohup stargz-store …`` is
    meant to outlive the session: caught there, the session's end unmounted the store under
    every container using it."""
    ignored = signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    return tuple(s for s in STOP_SIGNALS if not (s == signal.SIGHUP and ignored))


CACHE_DIR = "cache"  # the chunk cache, under --root
RESOLUTIONS_DIR = "resolutions"  # the tags' resolutions kept across restarts (store/resolutions.py)


class StoreError(Exception):
    """A startup problem the user can fix (mountpoint, permissions, config)."""


class JsonFormatter(logging.Formatter):
    """One JSON object a line, with the Go store's ``time`` and ``level`` values.

    Why: the Go store logs through logrus's JSON formatter (containerd's ``log.JSONFormat``,
    cmd/stargz-store/main.go upstream): ``time`` an RFC 3339 string with nanoseconds
    (``log.RFC3339NanoFixed``), ``level`` a logrus level name. A log pipeline set up for the
    Go store (a JSON parser with ``time`` as the timestamp) reads these lines the same way;
    a number there was an unparseable timestamp on every line.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": rfc3339_nano(record.created),
            "level": LOGRUS_LEVEL_NAMES.get(record.levelno, record.levelname.lower()),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


# Python's level -> the name logrus gives it (logrus ``Level.String``); the others match.
LOGRUS_LEVEL_NAMES = {logging.CRITICAL: "fatal"}


def rfc3339_nano(when: float) -> str:
    """``when`` (Unix time) as Go's ``time.RFC3339Nano`` with all nine fraction digits
    (containerd's ``log.RFC3339NanoFixed``) in UTC: ``2024-05-01T12:00:00.123456000Z``
    (``logging`` keeps microseconds)."""
    stamp = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("httpcore").setLevel(max(logging.WARNING, root.level))


# The Go store's --log-level takes logrus's level names, in any case (cmd/stargz-store/main.go
# upstream: log.SetLevel -> logrus.ParseLevel); Python's logging names the two below otherwise.
LOG_LEVELS = {
    "trace": "debug",
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "fatal": "critical",
    "panic": "critical",
}


def python_log_level(level: str) -> str:
    """The :mod:`logging` level name for a ``--log-level`` value (a key of ``LOG_LEVELS``)."""
    return LOG_LEVELS[level]


def build_parser() -> argparse.ArgumentParser:
    """The Go store's flags, in every spelling Go's ``flag`` package accepts.

    Go's ``flag`` takes ``-name`` as well as ``--name`` (and ``=value`` after either), so each
    long option has its single-dash form too: a unit file or script written for the Go store
    (``-config /etc/…``) starts this one unchanged. ``--config`` stays a string: an empty one
    means no file at all, as in Go (:func:`store.config.load_config`).
    """
    p = argparse.ArgumentParser(
        prog="stargz-store",
        description="Lazily pulled eStargz layers for podman, over FUSE.",
        add_help=False,
    )
    p.add_argument("-h", "--help", "-help", action="help", help="show this help and exit")
    p.add_argument(
        "--version",
        "-version",
        action="version",
        version=f"stargz-store (lazybench) {version()}",
        help="print the version and exit",
    )
    p.add_argument(
        "--config",
        "-config",
        default=None,
        help="TOML config (default /etc/stargz-store/config.toml, may be absent; '' = none)",
    )
    p.add_argument(
        "--root",
        "-root",
        type=Path,
        default=DEFAULT_ROOT,
        help="state directory: chunk cache (default /var/lib/stargz-store)",
    )
    p.add_argument(
        "--addr",
        "-addr",
        type=Path,
        default=None,
        help="credential socket for stargz-store-helper (default <root>/store.sock)",
    )
    p.add_argument(
        "--log-level",
        "-log-level",
        default="info",
        type=str.lower,
        choices=list(LOG_LEVELS),
        metavar="LEVEL",
        help=f"log level, as logrus names them: {', '.join(LOG_LEVELS)} (default info)",
    )
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    return p


def mount_type(path: Path) -> str | None:
    """The filesystem type mounted on ``path`` (``fuse``, ``fuse.stargz-store``, ``tmpfs``,
    …; the last mount when stacked), None when it is no mount point. Read from
    ``/proc/self/mountinfo`` (proc(5)) without touching ``path`` itself: a stat on the mount
    of a stuck FUSE server would hang."""
    target = os.path.join(os.path.realpath(path.parent), path.name)
    found: str | None = None
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == target:
                found = fields[fields.index("-") + 1]
    return found


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point (:func:`mount_type`)."""
    return mount_type(path) is not None


def prepare_mountpoint(path: Path) -> None:
    """Make sure ``path`` is a usable, unmounted directory; clean a stale mount from a crash.

    A missing mountpoint is created (mode 0755), as the Go store does
    (``os.MkdirAll(mountPoint, 0755)`` in cmd/stargz-store/main.go upstream). Only a dead
    mount (its server gone: ENOTCONN) is unmounted; a live one — a store still serving there,
    or any other filesystem — is refused, never taken down under its users.
    """
    stale = False
    try:
        path.stat()
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
            stale = True
        elif exc.errno == errno.ENOENT:
            try:
                path.mkdir(mode=0o755, parents=True, exist_ok=True)
            except OSError as mk:
                raise StoreError(f"cannot create mountpoint {path}: {mk.strerror}") from None
        else:
            raise StoreError(f"mountpoint {path}: {exc.strerror}") from None
    if not stale and is_mounted(path):
        refuse_live_mount(path)
        stale = True  # not refused: a dead mount
    if stale:
        log.warning("cleaning up a stale mount on %s", path)
        for cmd in (["fusermount3", "-u", str(path)], ["umount", "-l", str(path)]):
            try:
                subprocess.run(cmd, capture_output=True, timeout=30, check=False)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if not is_mounted(path):
                break
        if is_mounted(path):
            raise StoreError(
                f"{path} is still mounted (a stale mount that could not be removed): "
                f"unmount it with `fusermount3 -u {path}`"
            )
    if not path.is_dir():
        raise StoreError(f"mountpoint {path} is not a directory")


def refuse_live_mount(path: Path) -> None:
    """:class:`StoreError` naming the filesystem type and the command that unmounts it, when
    a live filesystem is mounted on ``path`` (a store still serving there, or any other); a
    dead FUSE mount (:func:`_dead_mount`) or no mount passes. Creates nothing."""
    fstype = mount_type(path)
    if fstype is None or _dead_mount(path):
        return
    unmount = "fusermount3 -u" if fstype.startswith("fuse") else "umount"
    raise StoreError(
        f"{path} is already mounted ({fstype}; a store running there?): stop it, or unmount "
        f"it with `{unmount} {path}`"
    )


def _dead_mount(path: Path) -> bool:
    """Whether the filesystem mounted on ``path`` has lost its server (ENOTCONN).

    ``stat`` alone cannot tell: the kernel answers it from the attributes it cached while the
    server lived. ``statfs`` always asks the server, so a dead FUSE connection answers it with
    ENOTCONN at once. Asked in a child process with a timeout: a live server that does not
    answer (hung) counts as live, and the store never waits on it.
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _STATFS_CHILD, str(path)],
            capture_output=True,
            timeout=5,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)


# Exits with statfs's errno (0: it answered).
_STATFS_CHILD = (
    "import os, sys\ntry:\n os.statvfs(sys.argv[1])\nexcept OSError as e:\n sys.exit(e.errno or 1)"
)


def prepare_root(root: Path) -> None:
    """Create ``root`` and its chunk cache directory and check a file can be written there,
    so that a root the store cannot use is one line at startup, not a traceback once mounted.

    The cache holds layer bytes of every image pulled through the store, private registries'
    included, so its directory is the store user's only (0700, also when an older store made
    it 0755), and a root the store creates is 0700 too, as the Go store's."""
    cache = root / CACHE_DIR
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        cache.mkdir(mode=0o700, exist_ok=True)
        os.chmod(cache, 0o700)
        with tempfile.TemporaryFile(dir=cache):
            pass
    except OSError as exc:
        if root.exists() and not root.is_dir():
            raise StoreError(f"root {root} is not a directory") from None
        raise StoreError(f"root {root} is not writable: {exc.strerror}") from None


def open_registries_conf(setting: str | None) -> RegistriesConfFiles | None:
    """The registries.conf files for ``registries_conf`` (None: where podman reads them),
    read once: a file named in the config that cannot be read or used is a
    :class:`StoreError`; one of the default places is logged and left out (the store reads
    it once it changes and reads)."""
    home = Path(os.path.expanduser("~"))
    locations = config_locations(setting, os.environ, home)
    if locations is None:
        return None
    # The default places are looked up again at each check, as podman does at each run.
    files = RegistriesConfFiles(
        locations,
        locate=None if setting is not None else lambda: default_locations(os.environ, home),
    )
    try:
        files.load()
    except RegistriesConfError as exc:
        if locations.required:
            raise StoreError(f"registries_conf: {exc}") from None
        log.warning("%s: left out, the store goes on without registries.conf", exc)
    return files


async def serve(
    cfg: StoreConfig,
    root: Path,
    mountpoint: Path,
    addr: Path | None = None,
    registries_conf: RegistriesConfFiles | None = None,
) -> None:
    """Mount the store on ``mountpoint`` and serve until a stop signal (:func:`stop_signals`) or
    an external unmount; unmount.

    The stop signals are caught from here on, before the mount: one that arrives while the
    store mounts is kept and answered once it serves (unmount, exit 0). Caught only once the
    store served, a SIGTERM in the few milliseconds after the mount appeared took the
    default action: the process died and left a dead mount, failing every podman command on
    the storage (17 of 20 stores stopped as soon as their mount showed)."""
    import trio

    with trio.open_signal_receiver(*stop_signals()) as signals:
        await _serve(cfg, root, mountpoint, addr, registries_conf, signals)


async def _serve(
    cfg: StoreConfig,
    root: Path,
    mountpoint: Path,
    addr: Path | None,
    registries_conf: RegistriesConfFiles | None,
    signals: AsyncIterator[int],
) -> None:
    import gc

    import pyfuse3
    import trio

    from store.cache import ChunkCache
    from store.credsocket import SOCKET_NAME, serve_credentials
    from store.fs import StoreFS
    from store.fuse_ops import StoreOperations
    from store.helper import DEFAULT_SOCKET as HELPER_SOCKET
    from store.metrics import AccessTrace, StoreMetrics
    from store.registry.client import RegistryClient
    from store.registry.credentials import CredentialStore
    from store.registry.hosts import parse_resolver_config
    from store.remote import RemoteRegistry
    from store.resolutions import Resolutions
    from store.resolver import LayerManager
    from store.timeline import open_timeline

    # What the process holds once set up (modules: ~50,000 objects) lives as long as it does:
    # collected once and frozen (the collector's permanent generation), it is never scanned
    # again. Before, each lazy pull here ran one full collection over it while the TOCs came
    # in (43-59 ms of CPU); with it frozen, the pulls measured ran none.
    gc.collect()
    gc.freeze()
    cache = ChunkCache(root / CACHE_DIR, cfg.cache_max_bytes)
    metrics = StoreMetrics()
    metrics.watch_cache(cache)
    if cfg.metrics_address:
        try:
            metrics.serve(cfg.metrics_address)
        except OSError as exc:  # before anything is mounted
            raise StoreError(
                f"metrics_address {cfg.metrics_address}: cannot listen there: {exc.strerror} "
                "(pick a free port, or leave metrics_address empty)"
            ) from None
    trace = AccessTrace(Path(cfg.access_trace_path)) if cfg.access_trace_path else None
    timeline = open_timeline(cfg.timeline_path)
    credentials = (
        CredentialStore(auth_files=[Path(cfg.auth_file)]) if cfg.auth_file else CredentialStore()
    )
    if cfg.auth_file and not Path(cfg.auth_file).exists():
        log.warning(
            "auth_file %s does not exist: registries that need credentials get none from it "
            "(check the path in the config)",
            cfg.auth_file,
        )
    client = RegistryClient(
        resolver=dataclasses.replace(
            parse_resolver_config(cfg.resolver), registries_conf=registries_conf
        ),
        credentials=credentials,
        timeout=request_timeout(cfg),
        retries=cfg.max_retries,
        retry_timeouts=True,
        redirect_ttl=0.0 if cfg.check_always else cfg.valid_interval,
    )

    def on_access(layer, node) -> None:  # type: ignore[no-untyped-def]
        metrics.on_file_access(layer)
        if trace is not None:
            trace.record(layer, node)

    async with client, trio.open_nursery() as nursery:
        await nursery.start(cache.run_writer)  # chunk files no read waits for, written behind
        manager = LayerManager(
            cfg,
            RemoteRegistry(
                client, cfg.fetching_timeout_sec, resolutions=Resolutions(root / RESOLUTIONS_DIR)
            ),
            cache,
            nursery,
            on_layer_fetch=metrics.on_fetch,
            on_file_access=on_access,
            on_read=metrics.on_read,
            timeline=timeline,
            early_ttl=cfg.resolve_result_entry_ttl_sec,
        )
        fs = StoreFS(manager, on_read_range=trace.record_read if trace is not None else None)
        ops = StoreOperations(fs, cfg.attr_timeout, cfg.entry_timeout)
        options = set(pyfuse3.default_options)
        # allow_other without default_permissions: the kernel asks the store about every
        # caller, and StoreFS.admit serves root and this process's user only (the Go store
        # mounts the same way and serves everyone: serve_all_users).
        options.discard("default_permissions")
        options |= {"fsname=stargzstore", "allow_other", "suid", "dev"}
        try:
            pyfuse3.init(ops, str(mountpoint), options)
        except RuntimeError as exc:  # libfuse printed its reason on stderr just before
            raise StoreError(mount_failure(mountpoint, exc)) from None
        fs.page_cache = pyfuse3.notify_store  # unused while an access trace is on (StoreFS)
        log.info("mounted on %s (cache %s)", mountpoint, root / CACHE_DIR)
        if registries_conf is None:
            log.info('registries.conf: none read (registries_conf = "")')
        else:
            log.info("registries.conf: %s", registries_conf.describe())
        if cfg.serve_all_users:
            log.info("every user may read the mount (serve_all_users)")
        else:
            log.info("root and uid %d may read the mount, no other user", fs.own_uid)
        if cfg.overlay_opaque_type == "auto":
            log.info(
                "opaque directories answer %s (overlay_opaque_type auto: %s)",
                " and ".join(x.decode() for x in cfg.opaque_xattrs),
                "in a user namespace, for overlayfs with userxattr"
                if cfg.opaque_type == "user"
                else "rootful overlayfs",
            )

        async def watch_signals() -> None:
            # SIGHUP too: its default action ends the process without unmounting, which left
            # a dead mount (every podman command on the storage failing) and no log line when
            # the terminal or ssh session a store ran in went away. ``signals`` is open since
            # before the mount (serve).
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                nursery.cancel_scope.cancel()
                return

        try:
            nursery.start_soon(watch_signals)
            listening = await nursery.start(
                serve_credentials, addr or root / SOCKET_NAME, credentials
            )
            if listening is not None and listening != Path(HELPER_SOCKET):
                log.info(
                    "credential socket %s: podman runs stargz-store-helper without arguments, "
                    "so it looks at %s only; for podman's credentials to reach this store, "
                    "start it with --addr %s",
                    listening,
                    HELPER_SOCKET,
                    HELPER_SOCKET,
                )
            notify_systemd("READY=1")
            await pyfuse3.main()
            log.info("filesystem unmounted externally")
        finally:
            notify_systemd("STOPPING=1")
            nursery.cancel_scope.cancel()
            pyfuse3.close(unmount=True)
            try:
                if trace is not None:
                    trace.close()
            finally:
                if timeline is not None:
                    timeline.close()
            log.info("unmounted %s", mountpoint)


def mount_failure(mountpoint: Path, exc: RuntimeError) -> str:
    """What the store says when libfuse cannot mount ``mountpoint`` (``exc``: pyfuse3's
    "fuse_session_mount failed"; libfuse's own reason is the stderr line before it), with what
    to change where this user's cause can be told: a ``/dev/fuse`` it may not open (udev makes
    it 0666; rootless stores need that), or a non-root store outside a user namespace, which
    libfuse mounts through ``fusermount3``: that refuses ``allow_other`` unless
    ``/etc/fuse.conf`` says ``user_allow_other``, as the Go store's mount is refused too."""
    from store.config import in_user_namespace

    message = f"cannot mount {mountpoint}: {exc} (libfuse's reason is on the line above)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return f"{message}; /dev/fuse is not readable and writable by this user (udev: 0666)"
    if os.geteuid() != 0 and not in_user_namespace():
        return (
            f"{message}; a store run by a user other than root mounts through fusermount3: "
            "start it in podman's user namespace (`podman unshare stargz-store …`), or allow "
            "user_allow_other in /etc/fuse.conf"
        )
    return message


def notify_systemd(state: str) -> None:
    """Tell systemd ``state`` (``READY=1``, ``STOPPING=1``) over ``$NOTIFY_SOCKET``, as the
    Go store does (sd_notify in cmd/stargz-store/main.go upstream); nothing without it.

    Why: upstream's unit files run the store with ``Type=notify``: a unit moved over to this
    store unchanged would wait for READY=1 until systemd's start timeout, kill the store,
    and restart it in a loop. A ``@`` name is an abstract socket (sd_notify(3)). A failed
    send is logged, never fatal: the store serves either way.
    """
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(5)
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd (%s) over NOTIFY_SOCKET %s: %s", state, target, exc)


def request_timeout(cfg: StoreConfig) -> float:
    """Seconds one registry request may wait for a connection or for its next bytes.

    ``[blob] fetching_timeout_sec`` bounds a whole read with its retries (see
    :class:`store.remote.RegistryBlob`); each of the ``max_retries + 1`` attempts gets an equal
    share of it, at most the resolver's request timeout (``[resolver] request_timeout_sec``,
    30 s when unset or not positive, as upstream's service/resolver/registry.go) and at least
    1 s, so that a stalled connection is given up and retried while the read can still
    succeed. A slow but moving body is not cut by it: only the whole-read deadline ends that.
    """
    configured = cfg.resolver.get("request_timeout_sec", 0)
    cap = float(configured) if configured > 0 else DEFAULT_REQUEST_TIMEOUT
    share = cfg.fetching_timeout_sec / (max(cfg.max_retries, 0) + 1)
    return max(1.0, min(cap, share))


def refuse_unmakeable_dir(path: Path, what: str) -> None:
    """:class:`StoreError` naming ``what`` (``mountpoint``, ``root``) when ``path`` is a file,
    or lies under one (its nearest existing ancestor is no directory), so that :func:`prepare`
    refuses it before it makes anything. Anything else (a missing path, a directory, a dead
    mount) passes; creates nothing."""
    for candidate in (path, *path.parents):
        try:
            st = candidate.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:  # a dead mount on the path itself: prepare_mountpoint cleans it
            return
        if stat.S_ISDIR(st.st_mode):
            return
        if candidate == path:
            raise StoreError(f"{what} {path} is not a directory")
        raise StoreError(f"cannot create {what} {path}: {candidate} is not a directory")


def prepare(root: Path, mountpoint: Path, addr: Path | None = None) -> Path:
    """Check and make what the store needs before it mounts: no live mount on ``mountpoint``,
    no file on it, on ``root`` or in their way (:func:`refuse_unmakeable_dir`) and a credential
    socket path (``addr``, default ``<root>/store.sock``) the store may take
    (:func:`store.credsocket.check_socket_path`), all checked first so a refusal makes
    nothing; ``root`` (before the mountpoint, which may lie in it, as by default: then the
    root is made 0700, not the mountpoint's 0755), then the mountpoint. Returns the
    mountpoint as the mount table names it (a symbolic link resolved). Raises
    :class:`StoreError` (and ``OSError`` from the root's checks)."""
    from store.credsocket import SOCKET_NAME, SocketPathError, check_socket_path

    mountpoint = Path(os.path.realpath(mountpoint))
    refuse_live_mount(mountpoint)
    refuse_unmakeable_dir(mountpoint, "mountpoint")
    refuse_unmakeable_dir(root, "root")
    try:
        check_socket_path(addr or root / SOCKET_NAME)
    except SocketPathError as exc:
        raise StoreError(str(exc)) from None
    prepare_root(root)
    prepare_mountpoint(mountpoint)
    return mountpoint


def lock_mountpoint(path: Path) -> int:
    """Take ``path``'s lock for this store's life: an open descriptor of the (still unmounted)
    directory, flocked. Returns the descriptor, to be kept open while the store serves.

    Why: :func:`prepare` checks that nothing is mounted on ``path``, but a second store
    started at the same moment passes the same check before either mounts; both then mounted
    (stacked), and a mount outlived them. The lock makes that second store refuse
    (:class:`StoreError`); one that opens the directory after this store mounted finds the
    mount once it holds the lock, and refuses too. The kernel drops the lock with the
    process, also on ``kill -9``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StoreError(f"mountpoint {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(
            f"{path}: another store is starting or serving there: stop it first"
        ) from None
    if is_mounted(path):
        os.close(fd)
        raise StoreError(f"{path} is already mounted (a store started there meanwhile?)")
    return fd


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(python_log_level(args.log_level))
    try:
        cfg = load_config(args.config)
        registries_conf = open_registries_conf(cfg.registries_conf)
        args.mountpoint = prepare(args.root, args.mountpoint, args.addr)
        lock = lock_mountpoint(args.mountpoint)
    except (ConfigError, StoreError) as exc:
        print(f"stargz-store: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"stargz-store: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    import trio

    _one_malloc_arena()
    started = time.monotonic()
    try:
        trio.run(serve, cfg, args.root, args.mountpoint, args.addr, registries_conf)
    except KeyboardInterrupt:
        pass
    except (StoreError, BaseExceptionGroup) as exc:
        error = _store_error(exc)
        if error is None:
            raise
        print(f"stargz-store: {error}", file=sys.stderr)
        return 1
    finally:
        os.close(lock)
    log.info("stopped after %.1fs", time.monotonic() - started)
    return 0


def _store_error(exc: BaseException) -> StoreError | None:
    """``exc`` when it is a :class:`StoreError`, or the one error of the trio nursery groups
    around it (a nursery wraps even its body's error: a failed mount arrives so); else
    None."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, StoreError) else None


def _one_malloc_arena() -> None:
    """Keep glibc's malloc to one arena.

    Why: TOCs are parsed and trees built in worker threads (so FUSE requests are answered
    meanwhile), and each thread's own arena keeps the freed ~100 MB transient of a big TOC
    fragmented: 7 MB more resident with a 100,000-entry layer. The store's threads spend
    their time in zlib, hashlib and recv with the GIL released, not in malloc, so the shared
    arena's lock costs nothing measurable.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 1)
