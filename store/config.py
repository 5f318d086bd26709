"""The store's TOML configuration: the Go ``stargz-store`` keys, plus a few of our own.

Why this shape: operators move between the Go store and this one with the same
``/etc/stargz-store/config.toml``. Keys that mean the same thing here are honoured
(``noprefetch``, ``prefetch_timeout_sec``, ``no_background_fetch``,
``max_concurrency``, ``resolve_result_entry_ttl_sec``, ``[blob] chunk_size /
fetching_timeout_sec / max_retries / valid_interval / check_always``,
``[fuse] attr_timeout / entry_timeout``, ``[resolver]``). Keys the Go store knows but that have
no meaning here (its HTTP/directory cache tuning, kubeconfig keychains, ``prefetch_size`` …)
are accepted and
ignored with a log line, so a Go config loads unchanged; what the Go store refuses is refused
here too (``disable_verification = true``, a ``metadata_store`` other than memory or db, a
honoured key of the wrong type, a malformed ``[resolver]`` table). Anything else is a typo and is
rejected with the key's dotted path, the file name and the known key it is closest to (the Go
store's go-toml decoding drops an unknown key without a word, another program's ``[snapshotter]``
table too: such a Go config must lose it here); so is a
key the Go store's ``[resolver]`` schema lacks (a ``mirror`` table for ``mirrors`` would leave
the mirror unused without a word).

Our additions (top level):

``cache_max_bytes``      size limit of the on-disk chunk cache (LRU eviction), default 10 GiB
``metrics_address``      ``HOST:PORT`` for the Prometheus endpoint; empty = off. An empty
                         host (``:9110``) listens on 127.0.0.1 only, not on every address
                         as the Go store's ``:PORT`` does
``access_trace_path``    JSON-lines file receiving per-layer first-access file order, and the
                         byte ranges read of each file when the store stops; empty = off.
                         With it on, the page-cache fill is off (every read reaches the store)
``timeline_path``        JSON-lines file receiving the pull timeline: per layer, when the
                         runtime looked it up and what the store did (footer and TOC fetch,
                         verification, parse, tree) with monotonic and wall times
                         (:mod:`store.timeline`); empty = off, nothing recorded
``resolve_timeout_sec``  bound on any lookup that needs the registry (the runtime then falls
                         back to a normal pull), default 15
``auth_file``            a containers auth.json / docker config.json to take credentials from
                         (its ``credHelpers`` and ``credsStore`` helpers are run,
                         :mod:`store.registry.credentials`)
``overlay_opaque_type``  which extended attribute marks a layer directory opaque (it holds a
                         ``.wh..wh..opq`` entry): the one the overlay mount over the store
                         reads. ``"trusted"`` answers ``trusted.overlay.opaque``: kernel
                         overlayfs mounted by root, as rootful podman and CRI-O do.
                         ``"user"`` answers ``user.overlay.opaque``: overlayfs mounted with
                         ``userxattr`` (rootless podman, kernel >= 5.11). ``"auto"`` (default)
                         is ``"user"`` for a store running in a user namespace (rootless, as
                         upstream's ``podman unshare stargz-store`` starts it: overlayfs
                         there must use ``userxattr``, and no process in it can read a
                         ``trusted.`` attribute), else ``"trusted"`` — the Go snapshotter's
                         rule (``NeedsUserXAttr``). ``"all"`` answers
                         both, as the Go store does (its ``layer.OverlayOpaqueAll``; the Go
                         snapshotter names the same choice ``OverlayOpaqueType``, trusted/user/
                         all, but its store has no key for it). Answer only what the mount
                         reads: rootful overlayfs copies a ``user.`` attribute it does not
                         read up as ordinary data, so ``all`` leaks ``user.overlay.opaque=y``
                         into every image committed from a container whose change touches an
                         opaque directory, which a normally pulled base never gives.
``toc_max_bytes``        largest TOC accepted, uncompressed JSON bytes (default 256 MiB); a
                         larger one — or a compressed TOC that could inflate past it — is
                         refused before it is decoded, with an error naming the limit; a
                         zstd:chunked layer's tar-split (podman 5) may inflate to this plus
                         4 KiB per tar member of its TOC
``toc_max_entries``      most TOC entries accepted (default 1,000,000; the index costs about
                         0.7 KB per entry); decoding stops at the first entry past it
``chunk_max_bytes``      largest chunk accepted, uncompressed bytes (default 64 MiB): a chunk
                         is inflated whole in memory to check its digest, so a TOC naming a
                         bigger one is refused before anything is read. eStargz writers cut
                         files into 4 MiB chunks; containers/storage's zstd:chunked writer
                         cuts data into chunks of ~64 KiB but makes a run of zeros one chunk,
                         so a layer with a sparse file holding more zeros in a row than this
                         is refused (the runtime pulls it normally) unless it is raised
``serve_all_users``      serve every local user through the mount (default false: only
                         root and the user the store runs as; any other caller gets EACCES,
                         :meth:`store.fs.StoreFS.admit`). The mount is ``allow_other`` without
                         ``default_permissions``, so a served user reads every file of every
                         layer and its ``blob``, whatever their modes, as every user can
                         through the Go store. Turn it on for a store shared on purpose:
                         a root store named in rootless users' ``storage.conf``
``registries_conf``      the containers-registries.conf(5) file to take podman's registry
                         settings from (mirrors, ``location`` rewrites, ``insecure``,
                         ``blocked``: :mod:`store.registry.registriesconf`), instead of the
                         places podman reads (``$CONTAINERS_REGISTRIES_CONF``, else
                         ``~/.config/containers/registries.conf`` when it exists, else
                         ``/etc/containers/registries.conf``, each with the
                         ``registries.conf.d`` drop-ins); ``""`` reads none. Unset (default):
                         those places. Its mirrors come after the ``[resolver]`` mirrors. A
                         file named here must exist and read, or the store does not start; one
                         of the default places that does not read is logged and left out. A
                         change while the store runs counts within a second (a change that
                         does not read keeps the reading before, with a warning)
``zstd_measure_diff_size`` give podman < 5.1 a zstd:chunked layer's exact tar size in
                         ``info`` (default false). No annotation containers/storage writes
                         carries it (an ``io.containers.estargz.uncompressed-size`` one is
                         used when a layer has it); measuring reads
                         each header frame's size, one 18-byte range per file (~0.3 KB and
                         ~0.4 ms of CPU a file with multipart responses: 13 s for a 7,000-file
                         layer here), when podman looks the layer up. Without it ``info``
                         has no ``diff-size`` (as the Go store's): pull, run and ``podman save
                         --format oci-archive`` are unaffected, but podman 4.3 leaves the
                         layer out of the image's size (``podman images``, ``inspect``).
                         Its ``podman save`` as a docker-archive (the default) fails either
                         way: "write too long" without it, "zstd compression is not
                         supported for docker images" with it. podman ≥ 5.1 never needs it.
``prefetch_libraries``   when a program's first bytes are read, fetch the shared libraries
                         ``ld.so`` will load for it (its ``PT_INTERP`` and ``DT_NEEDED``,
                         transitively, found through the image's layers) side by side, instead
                         of one round trip after another as the loader opens them (default
                         true; :mod:`store.libprefetch`). It fetches what a first read of each
                         library would, no more; nothing counts as read.
``prefetch_entrypoint``  when a container of an image starts (the runtime's first read of its
                         ``/etc/passwd`` or ``/etc/group``), fetch side by side what the start
                         reads next: the other of the two, the config's ``Entrypoint``/``Cmd``
                         program through its ``PATH`` (a script's ``#!`` interpreters in
                         turn), each up to 16 MiB, and, with ``prefetch_libraries``, their
                         libraries (default true; :mod:`store.libprefetch`); only when the
                         store serves every layer of the image. Started by a read, as the
                         library look-ahead is: ``noprefetch`` leaves it on. Nothing counts
                         as read.

The three caps bound the memory one hostile layer can take; a refused layer's lookup answers EIO
and the store logs one line naming the cause (the runtime then pulls the layer normally).

``resolve_result_entry_ttl_sec`` (Go's key, default 120; 0 means the default, as in the Go
store's ``fs/layer/layer.go``): a layer loaded with its image but never looked up, or looked
up but never counted as used, is dropped after this many seconds (its tree and background
fetch; its cached chunks stay). A layer in use is kept however long.

``[fuse] attr_timeout / entry_timeout`` apply to the layer trees (default 60 s: their content
is immutable); the store's own directories and files always use short timeouts.

``[blob] valid_interval`` (seconds, default 60) and ``check_always``: a blob GET the registry
redirected (to a CDN or object store) goes straight to the location it gave for that long
(:class:`store.registry.RegistryClient`'s ``redirect_ttl``), as the Go store reads a blob from
its resolved URL until the interval passes; an answer other than the bytes asked for from there
sends the read to the registry at once. ``check_always = true`` asks the registry every time.

``[blob] fetching_timeout_sec`` bounds one read from the registry with all its
``max_retries`` retries (a reader gets EIO past it); each attempt may wait an equal share of
it, at least 1 s and at most ``[resolver] request_timeout_sec`` (default 30 s), for a
connection or for its next bytes before it is retried (:func:`store.cli.request_timeout`).

As in the Go store, 0 means the default for ``max_concurrency``, ``prefetch_timeout_sec``,
``resolve_result_entry_ttl_sec``, ``[blob] chunk_size / fetching_timeout_sec / max_retries /
valid_interval`` and ``[fuse] attr_timeout / entry_timeout`` (a config that lists every key
with Go's zero values loads with the defaults, not with no retries or no timeouts). A negative
number is refused at startup, naming the key, but where the Go store gives it a meaning:
``[blob] max_retries`` (no retries: go-retryablehttp stops once ``RetryMax - attempt <= 0``),
``[blob] valid_interval`` (a check at every read, as ``check_always``: Go checks unless less
than the interval passed) and ``[resolver]`` mirrors' ``request_timeout_sec`` (Go's "no
timeout", read as the default bound).
"""

from __future__ import annotations

import difflib
import logging
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store.registry.errors import ConfigError as ResolverConfigError
from store.registry.hosts import parse_resolver_config

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("/etc/stargz-store/config.toml")
DEFAULT_ROOT = Path("/var/lib/stargz-store")


class ConfigError(ValueError):
    """The configuration file is missing, unreadable, or carries a bad key/value."""


@dataclass(frozen=True)
class StoreConfig:
    """Everything the store needs to know, with the Go store's defaults where it has them."""

    noprefetch: bool = False
    prefetch_timeout_sec: float = 10.0
    no_background_fetch: bool = False
    max_concurrency: int = 2
    chunk_size: int = 50000
    fetching_timeout_sec: float = 300.0
    max_retries: int = 5
    valid_interval: float = 60.0
    check_always: bool = False
    # Layer contents never change, so the kernel may cache their entries and attributes long
    # (the Go store uses 1 s; page-cache re-reads through FUSE are much faster with more).
    attr_timeout: float = 60.0
    entry_timeout: float = 60.0
    resolve_result_entry_ttl_sec: float = 120.0
    resolver: dict[str, Any] = field(default_factory=dict)
    # ours
    cache_max_bytes: int = 10 << 30
    metrics_address: str = ""
    access_trace_path: str = ""
    timeline_path: str = ""
    resolve_timeout_sec: float = 15.0
    auth_file: str = ""
    overlay_opaque_type: str = "auto"
    toc_max_bytes: int = 256 << 20
    toc_max_entries: int = 1_000_000
    chunk_max_bytes: int = 64 << 20
    zstd_measure_diff_size: bool = False
    prefetch_libraries: bool = True
    prefetch_entrypoint: bool = True
    serve_all_users: bool = False
    registries_conf: str | None = None  # None: where podman looks; "": none

    @property
    def opaque_type(self) -> str:
        """``overlay_opaque_type`` with ``"auto"`` decided: ``"user"`` in a user namespace
        (:func:`in_user_namespace`), else ``"trusted"``."""
        if self.overlay_opaque_type != "auto":
            return self.overlay_opaque_type
        return "user" if in_user_namespace() else "trusted"

    @property
    def opaque_xattrs(self) -> tuple[bytes, ...]:
        """The xattr names an opaque directory answers (``y``), per :attr:`opaque_type`."""
        return OVERLAY_OPAQUE_TYPES[self.opaque_type]


# overlay_opaque_type -> the attributes an opaque layer directory answers ("auto": see
# StoreConfig.opaque_type).
OVERLAY_OPAQUE_TYPES: dict[str, tuple[bytes, ...]] = {
    "trusted": (b"trusted.overlay.opaque",),
    "user": (b"user.overlay.opaque",),
    "all": (b"trusted.overlay.opaque", b"user.overlay.opaque"),
}

# /proc/self/uid_map of the initial user namespace: every uid mapped to itself.
_INITIAL_UID_MAP = ("0", "0", "4294967295")


def in_user_namespace(uid_map: str | None = None) -> bool:
    """Whether the process runs in a user namespace other than the initial one, from
    ``uid_map`` (default: ``/proc/self/uid_map``; unreadable counts as the initial one).
    The rule of containerd's ``userns.RunningInUserNS``: only the initial namespace maps
    the whole range 0-4294967294 onto itself."""
    if uid_map is None:
        try:
            with open("/proc/self/uid_map") as f:
                uid_map = f.read()
        except OSError:
            return False
    lines = uid_map.split("\n")
    return not (tuple(lines[0].split()) == _INITIAL_UID_MAP and not "".join(lines[1:]).strip())


# Keys we honour: dotted TOML path -> (StoreConfig field, accepted python types).
_NUM = (int, float)
_KNOWN: dict[str, tuple[str, tuple[type, ...]]] = {
    "noprefetch": ("noprefetch", (bool,)),
    "prefetch_timeout_sec": ("prefetch_timeout_sec", _NUM),
    "no_background_fetch": ("no_background_fetch", (bool,)),
    "max_concurrency": ("max_concurrency", (int,)),
    "blob.chunk_size": ("chunk_size", (int,)),
    "blob.fetching_timeout_sec": ("fetching_timeout_sec", _NUM),
    "blob.max_retries": ("max_retries", (int,)),
    "blob.valid_interval": ("valid_interval", _NUM),
    "blob.check_always": ("check_always", (bool,)),
    "resolve_result_entry_ttl_sec": ("resolve_result_entry_ttl_sec", _NUM),
    "fuse.attr_timeout": ("attr_timeout", _NUM),
    "fuse.entry_timeout": ("entry_timeout", _NUM),
    "cache_max_bytes": ("cache_max_bytes", (int,)),
    "metrics_address": ("metrics_address", (str,)),
    "access_trace_path": ("access_trace_path", (str,)),
    "timeline_path": ("timeline_path", (str,)),
    "resolve_timeout_sec": ("resolve_timeout_sec", _NUM),
    "auth_file": ("auth_file", (str,)),
    "overlay_opaque_type": ("overlay_opaque_type", (str,)),
    "toc_max_bytes": ("toc_max_bytes", (int,)),
    "toc_max_entries": ("toc_max_entries", (int,)),
    "chunk_max_bytes": ("chunk_max_bytes", (int,)),
    "zstd_measure_diff_size": ("zstd_measure_diff_size", (bool,)),
    "prefetch_libraries": ("prefetch_libraries", (bool,)),
    "prefetch_entrypoint": ("prefetch_entrypoint", (bool,)),
    "serve_all_users": ("serve_all_users", (bool,)),
    "registries_conf": ("registries_conf", (str,)),
}

# Keys whose value must be one of a few words (``metadata_store``: upstream
# cmd/stargz-store/main.go refuses any other; "" is its default, memory).
_CHOICES = {
    "overlay_opaque_type": ("auto", *OVERLAY_OPAQUE_TYPES),
    "metadata_store": ("memory", "db", ""),
}

# Keys of the Go store that have no effect here; accepted so a Go config loads unchanged.
_IGNORED = {
    # The prefetch here is the image's landmark region (eStargz ``.prefetch.landmark``) only;
    # Go's default byte count for a layer without landmarks (legacy stargz, zstd:chunked) has
    # no counterpart: its layers are read on demand and fetched in the background.
    "prefetch_size",
    "http_cache_type",
    "http_cache_chunk_ttl_sec",
    "filesystem_cache_type",
    "resolve_result_entry",
    "prefetch_async_size",
    "debug",
    "allow_no_verification",
    "disable_verification",
    "no_prometheus",
    "log_file_access",
    "blob.force_single_range_mode",
    "blob.prefetch_chunk_size",
    "blob.min_wait_msec",
    "blob.max_wait_msec",
    "directory_cache",
    "fuse.passthrough",
    "fuse.merge_buffer_size",
    "fuse.merge_worker_count",
    "kubeconfig_keychain",
    "cri_keychain",
    "listen_path",
    "config_path",
    "metadata_store",
}
_SECTIONS = {"blob", "fuse"}
# The Go store's credential sources this one does not read (upstream service/keychain).
_KEYCHAINS = {
    "kubeconfig_keychain": "kubeconfig credentials",
    "cri_keychain": "credentials from the CRI image service",
}

# The Go store's [resolver] schema (upstream service/resolver/registry.go: Config, HostConfig,
# MirrorConfig): the keys of the table, of each ``host."NAME"`` and of each of its mirrors.
_RESOLVER_KEYS = ("host", "request_timeout_sec")
_RESOLVER_HOST_KEYS = ("mirrors",)
_RESOLVER_MIRROR_KEYS = ("header", "host", "insecure", "request_timeout_sec")

# Go keys where 0 means the Go store's default, not zero (upstream fs/remote/resolver.go,
# fs/fs.go, fs/layer/layer.go, store/manager.go: ``if cfg.X == 0 { X = default }``): a Go
# config that spells them out as 0 gets the defaults here too, never 0 retries, 0 s timeouts
# or a refusal. A negative value is refused, as every negative number of the config is.
_ZERO_IS_DEFAULT = {
    "max_concurrency",
    "chunk_size",
    "fetching_timeout_sec",
    "max_retries",
    "valid_interval",
    "prefetch_timeout_sec",
    "resolve_result_entry_ttl_sec",
    "attr_timeout",
    "entry_timeout",
}

# Go keys whose negative value means something to the Go store (module doc), and what it
# means here: [blob] max_retries < 0 is no retry, valid_interval < 0 a check every time.
_NEGATIVE_IS = {"max_retries": 0, "valid_interval": 0.0}

# Values that must be positive for the store to work at all (0 of a key of _ZERO_IS_DEFAULT
# means its default and passes).
_POSITIVE = {
    "chunk_size",
    "max_concurrency",
    "fetching_timeout_sec",
    "resolve_timeout_sec",
    "cache_max_bytes",
    "toc_max_bytes",
    "toc_max_entries",
    "chunk_max_bytes",
}


def load_config(path: Path | str | None) -> StoreConfig:
    """Load ``path``; ``None`` means the default path, which may be absent (defaults apply).

    As the Go store's ``--config`` (cmd/stargz-store/main.go upstream): an empty path reads
    no file, and the default path may be absent even when named explicitly (upstream's unit
    files pass ``--config=/etc/stargz-store/config.toml``); any other path must exist.
    """
    if path == "":
        return StoreConfig()
    path = DEFAULT_CONFIG_PATH if path is None else Path(path)
    explicit = path != DEFAULT_CONFIG_PATH
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
        return StoreConfig()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, source=str(path))


def parse_config(data: dict[str, Any], source: str = "<config>") -> StoreConfig:
    """Turn decoded TOML into a :class:`StoreConfig`, rejecting unknown keys and bad types."""
    values: dict[str, Any] = {}
    for key, value in _flatten(data, source):
        if key == "resolver" or key.startswith("resolver."):
            continue
        if key in _KNOWN:
            name, types = _KNOWN[key]
            if isinstance(value, bool) and bool not in types:
                raise ConfigError(f"{source}: key {key!r} must be a number, not a boolean")
            if not isinstance(value, types):
                want = " or ".join(t.__name__ for t in types)
                raise ConfigError(f"{source}: key {key!r} must be {want}, got {value!r}")
            if isinstance(value, float) and math.isnan(value):
                # TOML's nan passes every comparison below (nan <= 0 is false): it loaded,
                # the store mounted, and the first lookup or read met trio's "seconds must
                # not be NaN" (prefetch_timeout_sec, resolve_result_entry_ttl_sec: the store
                # died with a traceback; resolve_timeout_sec, fetching_timeout_sec: every
                # lookup or read answered EIO). inf stays: no bound, and it works as one.
                raise ConfigError(f"{source}: key {key!r} must be a number, got nan")
            if name in _ZERO_IS_DEFAULT and value == 0:
                continue  # Go: 0 = the default
            if name in _POSITIVE and value <= 0:
                raise ConfigError(f"{source}: key {key!r} must be positive, got {value!r}")
            if name in _NEGATIVE_IS and value < 0:
                values[name] = _NEGATIVE_IS[name]  # as the Go store reads it (module doc)
                continue
            if isinstance(value, int | float) and value < 0:
                # Every number here is a count, a size or seconds: a negative one loaded,
                # and [blob] max_retries = -1 made every registry request fail with an
                # empty error (podman pulled every layer itself), prefetch_timeout_sec = -1
                # ended the store with a traceback at its first prefetch (trio: "seconds
                # must be non-negative").
                raise ConfigError(
                    f"{source}: key {key!r} must not be negative, got {value!r}"
                    + (" (0 means the default)" if name in _ZERO_IS_DEFAULT else "")
                )
            if name in _CHOICES and value not in _CHOICES[name]:
                want = ", ".join(repr(c) for c in _CHOICES[name])
                raise ConfigError(f"{source}: key {key!r} must be one of {want}, got {value!r}")
            if name == "metrics_address" and value:
                _check_host_port(value, f"{source}: key {key!r}")
            values[name] = value
        elif key in _IGNORED or key.split(".")[0] in _IGNORED:
            if key in _CHOICES and value not in _CHOICES[key]:
                want = ", ".join(repr(c) for c in _CHOICES[key] if c)
                raise ConfigError(f"{source}: key {key!r} must be one of {want}, got {value!r}")
            if key == "disable_verification" and value is True:
                # The Go store refuses to start with it (cmd/stargz-store/main.go upstream);
                # ignoring it would let a user believe reads go unchecked.
                raise ConfigError(f"{source}: content verification cannot be disabled")
            if key in _KEYCHAINS and isinstance(value, dict) and value.get("enable_keychain"):
                # A keychain the operator turned on was meant to reach private images: ignored
                # quietly, every pull of one would silently go whole.
                log.warning(
                    "config key %r: enable_keychain is on, but the store reads no %s; private "
                    "images pull whole unless "
                    "their credentials are in auth_file or the runtime's auth file (README, "
                    "Credentials)",
                    key,
                    _KEYCHAINS[key],
                )
                continue
            log.info("config key %r (Go stargz-store) has no effect here; ignored", key)
        else:
            raise ConfigError(f"{source}: {_unknown(key, [*_KNOWN, *_IGNORED])}")
    resolver = data.get("resolver", {})
    if not isinstance(resolver, dict):
        raise ConfigError(f"{source}: [resolver] must be a table")
    _check_resolver(resolver, source)
    return StoreConfig(resolver=resolver, **values)


def _unknown(key: str, known: list[str]) -> str:
    """``unknown key 'KEY'``, with the known key closest to it when one is close (a typo)."""
    close = difflib.get_close_matches(key, known, n=1)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def split_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` as Go's ``net.SplitHostPort`` takes it (an IPv6 host in brackets; an
    empty host in ``:PORT``, which the metrics endpoint takes as 127.0.0.1) -> (host, port);
    the port a number 0..65535 (0: any free one; a service name such as ``:http``, which Go's
    ``net.Listen`` also takes, is not taken here). Raises ValueError."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536 or "[" in host:
        raise ValueError(f"expected HOST:PORT with a numeric port 0..65535, got {value!r}")
    return host, int(port)


def _check_host_port(value: str, where: str) -> None:
    """:func:`split_host_port`, or :class:`ConfigError` naming ``where``."""
    try:
        split_host_port(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_resolver(resolver: dict[str, Any], source: str) -> None:
    """Refuse a bad ``[resolver]`` table now, naming the file, rather than when the store
    starts serving; note the mirror timeouts that cannot mean here what they mean in Go."""
    try:
        parsed = parse_resolver_config(resolver)
    except ResolverConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    # The table's shape is checked above: hosts are tables, their mirrors arrays of tables.
    tables: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
        ("resolver", resolver, _RESOLVER_KEYS)
    ]
    for name, host_table in (resolver.get("host") or {}).items():
        where = f'resolver.host."{name}"'
        tables.append((where, host_table, _RESOLVER_HOST_KEYS))
        for i, mirror_table in enumerate(host_table.get("mirrors") or []):
            tables.append((f"{where}.mirrors[{i}]", mirror_table, _RESOLVER_MIRROR_KEYS))
    for where, table, keys in tables:
        for key in table:
            if key not in keys:
                raise ConfigError(f"{source}: {where}: {_unknown(key, list(keys))}")
    for name, host in parsed.hosts.items():
        for i, mirror in enumerate(host.mirrors):
            if mirror.request_timeout_sec < 0:
                log.info(
                    'config key resolver.host."%s".mirrors[%d].request_timeout_sec < 0 (Go: '
                    "no timeout): the default applies here, each read stays bounded by "
                    "[blob] fetching_timeout_sec",
                    name,
                    i,
                )


def _flatten(data: dict[str, Any], source: str) -> list[tuple[str, Any]]:
    """Dotted keys for the known sections; other tables stay whole (they are ignored/passed)."""
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table")
            out.extend((f"{key}.{sub}", v) for sub, v in value.items())
        else:
            out.append((key, value))
    return out
