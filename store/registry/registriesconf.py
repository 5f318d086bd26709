"""Where podman pulls an image from: containers-registries.conf(5), read as containers/image
reads it (``pkg/sysregistriesv2``), so the store reaches registries the way podman does
without the configuration being repeated in the store's own ``[resolver]`` table.

What is taken from the files:

- ``[[registry]]`` tables: ``prefix`` (default: ``location``; ``*.example.com`` matches every
  subdomain), ``location`` (the prefix is rewritten to it: ``prefix = "example.com/foo"``,
  ``location = "internal:5000/bar"`` pulls ``example.com/foo/app`` from
  ``internal:5000/bar/app``), ``insecure`` (plain HTTP, or TLS without verification, allowed),
  ``blocked``, ``mirror-by-digest-only`` and ``[[registry.mirror]]`` (``location``,
  ``insecure``, ``pull-from-mirror`` = ``all`` / ``digest-only`` / ``tag-only``).
- The v1 format's ``[registries.insecure]`` and ``[registries.block]`` lists (one registry
  table each; a file mixing v1 and v2 is refused, as there).

For a reference, the one ``[[registry]]`` with the longest ``prefix`` matching its name on a
boundary (the name equals it, or goes on with ``/``, ``:`` or ``@``) decides; its mirrors,
those the reference may use (a tag or a digest: ``pull-from-mirror``,
``mirror-by-digest-only``), are tried in order, then its (rewritten) location. An endpoint
whose rewritten name falls under a ``blocked`` registry is not used (containers/image refuses
it when it connects); when none is left the registry is blocked (:class:`RegistriesBlocked`).

Files (:func:`config_locations`): ``$CONTAINERS_REGISTRIES_CONF``, else
``$HOME/.config/containers/registries.conf`` when it exists, else
``/etc/containers/registries.conf``; then the ``*.conf`` files of the drop-in directories
``/etc/containers/registries.conf.d`` (not with the home file) and
``$HOME/.config/containers/registries.conf.d``, each in name order: a drop-in's
``[[registry]]`` replaces the one of the same prefix read before. Drop-ins must be v2.

Everything here but :class:`RegistriesConfFiles` is pure: decoded TOML in, tables out.
Unused keys (``unqualified-search-registries``, ``[aliases]``, ``short-name-mode``,
``credential-helpers``, ``proxy`` …) are ignored, as unknown keys are there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, ReferenceError, RegistryError
from .reference import DOCKER_HUB_ENDPOINT, Reference
from .stamps import FileStamp, file_stamp

log = logging.getLogger(__name__)

SYSTEM_FILE = Path("/etc/containers/registries.conf")
SYSTEM_DROP_IN_DIR = Path("/etc/containers/registries.conf.d")
USER_FILE = Path(".config/containers/registries.conf")  # under $HOME
USER_DROP_IN_DIR = Path(".config/containers/registries.conf.d")  # under $HOME
ENV_VAR = "CONTAINERS_REGISTRIES_CONF"
PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")
V1_LISTS = ("block", "insecure", "search")  # [registries.NAME] registries = [...]
# Seconds a reading is used before the files' stamps are looked at again.
RECHECK = 1.0


class RegistriesConfError(ConfigError):
    """A registries.conf file that cannot be read or used; the message names the file."""


class RegistriesBlocked(RegistryError):
    """registries.conf blocks pulls of the reference (``blocked = true``)."""


@dataclass(frozen=True)
class ConfEndpoint:
    """A mirror (or a registry's own location): ``host[:port][/path]``."""

    location: str
    insecure: bool = False
    pull_from_mirror: str = ""  # mirrors only: "", "all", "digest-only", "tag-only"


@dataclass(frozen=True)
class ConfRegistry:
    """One ``[[registry]]`` table, normalized (``prefix`` set, trailing slashes dropped)."""

    prefix: str
    location: str = ""  # "" only for a wildcard prefix: the reference's own registry
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple[ConfEndpoint, ...] = ()
    source: str = ""  # the file it comes from


@dataclass(frozen=True)
class PullSource:
    """One place to pull a reference from: the name it has there, split."""

    registry: str  # host[:port]
    repository: str
    insecure: bool
    mirror: bool  # a [[registry.mirror]], not the registry's location


@dataclass(frozen=True)
class RegistriesConf:
    """The registries of every file read, by prefix (sorted, as containers/image keeps them)."""

    registries: tuple[ConfRegistry, ...] = ()
    files: tuple[str, ...] = ()  # the files read, for messages

    def find(self, name: str) -> ConfRegistry | None:
        """The registry of the longest prefix matching ``name`` (``host[/repository]``)."""
        best, best_len = None, 0
        for reg in self.registries:
            if prefix_match(name, reg.prefix) >= 0 and len(reg.prefix) > best_len:
                best, best_len = reg, len(reg.prefix)
        return best

    def pull_sources(self, registry: str, repository: str, digested: bool) -> list[PullSource]:
        """Where to pull ``registry/repository`` from, in order (containers/image's
        ``PullSourcesFromReference``, without the sources whose name is blocked).

        Raises :class:`RegistriesBlocked` when every one is blocked, :class:`ConfigError`
        when a rewritten name is not a reference."""
        name = f"{registry}/{repository}"
        reg = self.find(name)
        if reg is None:
            return [PullSource(registry, repository, False, False)]
        if reg.mirror_by_digest_only:
            mirrors = reg.mirrors if digested else ()
        else:
            mirrors = tuple(
                m
                for m in reg.mirrors
                if not (m.pull_from_mirror == "digest-only" and not digested)
                and not (m.pull_from_mirror == "tag-only" and digested)
            )
        primary = ConfEndpoint(reg.location, reg.insecure)
        out = []
        for ep in (*mirrors, primary):
            source = rewrite(name, reg, ep, mirror=ep is not primary)
            found = self.find(f"{source.registry}/{source.repository}")
            if found is not None and found.blocked:
                continue
            out.append(source)
        if not out:
            where = reg.source or ", ".join(self.files)
            raise RegistriesBlocked(
                f"registry {reg.prefix} is blocked in {where} (blocked = true)", host=registry
            )
        return out

    def insecure(self, registry: str) -> bool:
        """Whether the registry's own table (no repository: a push) allows insecure access."""
        reg = self.find(registry)
        return reg is not None and reg.insecure


def prefix_match(name: str, prefix: str) -> int:
    """How much of ``name`` ``prefix`` matches (containers/image's ``refMatchingPrefix``), -1
    for none: the whole prefix followed by the end, ``/``, ``:`` or ``@``; a wildcard
    ``*.example.com`` matches a host ending in ``.example.com``. (As there, ``example.com``
    matches ``example.com:5000/x`` too.)"""
    if prefix.startswith("*."):
        index = name.find(prefix[1:])
        if index < 0 or "/" in name[:index]:
            return -1
        end = index + len(prefix) - 1
    elif name.startswith(prefix):
        end = len(prefix)
    else:
        return -1
    if end == len(name) or name[end] in ":/@":
        return end
    return -1


def rewrite(name: str, reg: ConfRegistry, ep: ConfEndpoint, *, mirror: bool) -> PullSource:
    """``name`` (which ``reg``'s prefix matches) with the prefix replaced by ``ep``'s
    location (containers/image's ``rewriteReference``). Raises ConfigError naming the file
    when the result is not a fully qualified image name."""
    # A wildcard prefix without a location: the name itself.
    new = ep.location + name[prefix_match(name, reg.prefix) :] if ep.location else name
    try:
        ref = Reference.parse(new)
    except ReferenceError as exc:
        raise ConfigError(
            f"{reg.source}: [[registry]] prefix {reg.prefix!r}: {name} rewritten to "
            f"{new}, which is not an image name: {exc}"
        ) from None
    # Not canonical (docker.io/x reads as docker.io/library/x, or no registry host at all)
    # is refused, as there; Docker Hub's endpoint host, which reads as docker.io here, is a
    # canonical name there (only index.docker.io is not): the same place.
    hub = new == f"{DOCKER_HUB_ENDPOINT}/{ref.repository}"
    if ref.name != new and not hub:
        raise ConfigError(
            f"{reg.source}: [[registry]] prefix {reg.prefix!r}: {name} rewritten to {new}, "
            f"which is not a fully qualified image name (it reads as {ref.name})"
        )
    return PullSource(ref.registry, ref.repository, ep.insecure, mirror)


def _location(value: object, where: str) -> str:
    """containers/image's ``parseLocation``: trailing slashes dropped, no URI scheme."""
    if not isinstance(value, str):
        raise RegistriesConfError(f"{where} must be a string")
    trimmed = value.rstrip("/")
    if trimmed.startswith(("http://", "https://")):
        raise RegistriesConfError(f"{where} {value!r}: URI schemes are not supported")
    return trimmed


def _bool(table: Mapping[str, Any], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise RegistriesConfError(f"{where}.{key} must be true or false, got {value!r}")
    return value


# The v2 format's top-level keys (containers/image's V2RegistriesConf).
_V2_KEYS = (
    "registry",
    "unqualified-search-registries",
    "credential-helpers",
    "short-name-mode",
    "additional-layer-store-auth-helper",
    "aliases",
)


def _has_v1(data: Mapping[str, Any]) -> bool:
    """Whether a v1 list is set (an empty one counts, as there)."""
    v1 = data.get("registries")
    if v1 is None:
        return False
    if not isinstance(v1, Mapping):
        return True  # refused by _v1_registries, naming it
    return any(isinstance(v1.get(k), Mapping) and "registries" in v1[k] for k in V1_LISTS)


def _v1_registries(data: Mapping[str, Any], source: str) -> list[ConfRegistry]:
    """The v1 ``[registries.block]`` / ``[registries.insecure]`` lists as v2 tables
    (containers/image's ``ConvertToV2``): one table per location, in order of appearance,
    blocked ones first."""
    v1 = data["registries"]
    if not isinstance(v1, Mapping):
        raise RegistriesConfError(f"{source}: [registries] must be a table")
    order: list[str] = []
    flags: dict[str, dict[str, bool]] = {}
    for kind, flag in zip(V1_LISTS, ("blocked", "insecure", ""), strict=True):
        table = v1.get(kind, {})
        if not isinstance(table, Mapping):
            raise RegistriesConfError(f"{source}: [registries.{kind}] must be a table")
        names = table.get("registries", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RegistriesConfError(
                f"{source}: registries.{kind}.registries must be an array of strings"
            )
        if not flag:
            continue  # unqualified search: not where a pull goes
        for raw in names:
            location = _location(raw, f"{source}: registries.{kind}.registries entry")
            if location not in flags:
                order.append(location)
                flags[location] = {}
            flags[location][flag] = True
    return [ConfRegistry(prefix=loc, location=loc, source=source, **flags[loc]) for loc in order]


def parse_registries_conf(
    data: Mapping[str, Any], source: str, *, drop_in: bool = False
) -> tuple[ConfRegistry, ...]:
    """The ``[[registry]]`` tables of one decoded file, checked as containers/image checks
    them (``loadConfigFile``, ``postProcessRegistries``). For one prefix listed twice the first
    table counts. Raises :class:`RegistriesConfError` naming ``source`` and what is wrong."""
    v2 = data.get("registry")
    if _has_v1(data):
        if drop_in:
            raise RegistriesConfError(
                f"{source}: a drop-in file must be in the v2 format, not the v1 [registries]"
            )
        if any(data.get(k) is not None for k in _V2_KEYS):
            raise RegistriesConfError(
                f"{source}: mixes the v1 [registries] format with v2 keys: use one of them"
            )
        tables = _v1_registries(data, source)
    else:
        if v2 is None:
            v2 = []
        if not isinstance(v2, list) or not all(isinstance(t, Mapping) for t in v2):
            raise RegistriesConfError(f"{source}: 'registry' must be an array of tables")
        tables = [
            _v2_registry(t, f"{source}: [[registry]] #{i + 1}", source) for i, t in enumerate(v2)
        ]
    _check_conflicts(tables, source)
    out: dict[str, ConfRegistry] = {}
    for reg in tables:
        out.setdefault(reg.prefix, reg)
    return tuple(out[p] for p in sorted(out))


def _v2_registry(table: Mapping[str, Any], where: str, source: str) -> ConfRegistry:
    location = _location(table.get("location", ""), f"{where}: location")
    prefix = table.get("prefix", "")
    if prefix:
        prefix = _location(prefix, f"{where}: prefix")
    if not prefix:
        if not location:
            raise RegistriesConfError(f"{where}: needs a 'location' or a 'prefix'")
        prefix = location
    elif not location and not prefix.startswith("*."):
        raise RegistriesConfError(
            f"{where}: 'location' is unset and prefix {prefix!r} is not of the form *.example.com"
        )
    if prefix.startswith("*.") and any(c in prefix for c in "/@:"):
        raise RegistriesConfError(
            f"{where}: wildcard prefix {prefix!r} must be of the form *.example.com "
            "(no port, namespace, tag or digest)"
        )
    where = f"{source}: [[registry]] prefix {prefix!r}"
    if table.get("pull-from-mirror"):
        raise RegistriesConfError(f"{where}: pull-from-mirror belongs in [[registry.mirror]]")
    by_digest = _bool(table, "mirror-by-digest-only", where)
    mirrors_raw = table.get("mirror", [])
    if not isinstance(mirrors_raw, list) or not all(isinstance(m, Mapping) for m in mirrors_raw):
        raise RegistriesConfError(f"{where}: 'mirror' must be an array of tables")
    mirrors = []
    for i, m in enumerate(mirrors_raw):
        mwhere = f"{where} mirror #{i + 1}"
        mloc = _location(m.get("location", ""), f"{mwhere}: location")
        if not mloc:
            raise RegistriesConfError(f"{mwhere}: 'location' is unset")
        pull = m.get("pull-from-mirror", "")
        if pull not in ("", *PULL_FROM_MIRROR):
            raise RegistriesConfError(
                f"{mwhere} ({mloc}): pull-from-mirror must be one of "
                f"{', '.join(PULL_FROM_MIRROR)}, got {pull!r}"
            )
        if by_digest and pull:
            raise RegistriesConfError(
                f"{where}: mirror-by-digest-only and the pull-from-mirror of mirror {mloc} "
                "cannot both be set"
            )
        mirrors.append(ConfEndpoint(mloc, _bool(m, "insecure", mwhere), pull))
    return ConfRegistry(
        prefix=prefix,
        location=location,
        insecure=_bool(table, "insecure", where),
        blocked=_bool(table, "blocked", where),
        mirror_by_digest_only=by_digest,
        mirrors=tuple(mirrors),
        source=source,
    )


def _check_conflicts(tables: Sequence[ConfRegistry], source: str) -> None:
    """One location listed in several tables must agree on ``insecure`` and ``blocked``."""
    seen: dict[str, ConfRegistry] = {}
    for reg in tables:
        key = reg.location or reg.prefix
        other = seen.setdefault(key, reg)
        for name in ("insecure", "blocked"):
            if getattr(other, name) != getattr(reg, name):
                raise RegistriesConfError(
                    f"{source}: registry {key!r} is defined several times with conflicting "
                    f"{name!r} settings"
                )


def merge(readings: Iterable[tuple[ConfRegistry, ...]], files: Sequence[str]) -> RegistriesConf:
    """The main file's registries, then each drop-in's in order: a later table replaces the
    one of the same prefix (containers/image's ``updateWithConfigurationFrom``)."""
    by_prefix: dict[str, ConfRegistry] = {}
    for tables in readings:
        by_prefix.update((reg.prefix, reg) for reg in tables)
    return RegistriesConf(tuple(by_prefix[p] for p in sorted(by_prefix)), tuple(files))


def parse_text(text: bytes, source: str, *, drop_in: bool = False) -> tuple[ConfRegistry, ...]:
    """One file's bytes → its registries; :class:`RegistriesConfError` names ``source``."""
    try:
        data = tomllib.loads(text.decode())
    except UnicodeDecodeError as exc:
        raise RegistriesConfError(f"{source}: not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RegistriesConfError(f"{source}: not valid TOML: {exc}") from None
    return parse_registries_conf(data, source, drop_in=drop_in)


@dataclass(frozen=True)
class Locations:
    """Which files make up the configuration: the main file, then the drop-in directories."""

    main: Path
    drop_in_dirs: tuple[Path, ...] = ()
    # The main file must exist (a path the user gave); else a missing one is an empty file.
    required: bool = False


def config_locations(
    setting: str | None,
    environ: Mapping[str, str],
    home: Path,
    exists: Callable[[Path], bool] = os.path.exists,
) -> Locations | None:
    """The files to read for the store's ``registries_conf`` ``setting``: None (unset) → as
    containers/image finds them (``CONTAINERS_REGISTRIES_CONF``, the home file, the system
    file, plus drop-ins), a path → that file alone (required), ``""`` → none at all."""
    if setting == "":
        return None
    if setting is not None:
        return Locations(Path(setting), required=True)
    return default_locations(environ, home, exists)


def default_locations(
    environ: Mapping[str, str], home: Path, exists: Callable[[Path], bool] = os.path.exists
) -> Locations:
    """Where containers/image finds the files (``newConfigWrapper``), as they are now."""
    user_dir = home / USER_DROP_IN_DIR
    if env := environ.get(ENV_VAR):
        return Locations(Path(env), (SYSTEM_DROP_IN_DIR, user_dir))
    if exists(home / USER_FILE):
        return Locations(home / USER_FILE, (user_dir,))
    return Locations(SYSTEM_FILE, (SYSTEM_DROP_IN_DIR, user_dir))


Stamp = tuple[tuple[str, FileStamp | None], ...]


def _stamp(path: Path) -> tuple[str, FileStamp | None]:
    return (str(path), file_stamp(path))


def _drop_ins(directory: Path) -> list[Path]:
    """The ``*.conf`` files of a drop-in directory, in name order (a missing one: none)."""
    try:
        names = sorted(e.name for e in os.scandir(directory) if not e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise RegistriesConfError(
            f"{directory}: cannot read drop-in directory: {exc.strerror}"
        ) from None
    return [directory / n for n in names if n.endswith(".conf")]


@dataclass
class RegistriesConfFiles:
    """The registries.conf files of :class:`Locations`, read again when they change.

    Calling it gives the current :class:`RegistriesConf`. At most every :data:`RECHECK`
    seconds the files' stamps (device, inode, size, mtime) and the drop-in directories'
    listings are compared with those of the last reading; on a change they are read again.
    A change that does not read (a file caught half written, a mistake) keeps the last good
    reading, with one warning naming the file and the problem, until the files change again.
    With ``locate``, the locations are looked up again each time too (the default places:
    a home file created or removed switches podman between it and the system file)."""

    locations: Locations
    clock: Callable[[], float] = time.monotonic
    locate: Callable[[], Locations] | None = None
    _current: RegistriesConf = field(default_factory=RegistriesConf)
    _stamp: Stamp | None = None
    _refused: Stamp | None = None
    _checked: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self) -> RegistriesConf:
        """Read now; :class:`RegistriesConfError` when a file cannot be read or used (the
        reading before stays)."""
        with self._lock:
            self._checked = self.clock()
            stamp, files = self._listing()
            try:
                self._current = self._read(files)
            except RegistriesConfError:
                self._refused = stamp
                raise
            self._stamp, self._refused = stamp, None
            return self._current

    def __call__(self) -> RegistriesConf:
        with self._lock:
            now = self.clock()
            if now - self._checked < RECHECK:
                return self._current
            self._checked = now
            try:
                stamp, files = self._listing()
            except RegistriesConfError as exc:
                log.warning("%s; the registries.conf reading before stays in use", exc)
                return self._current
            if stamp in (self._stamp, self._refused):
                return self._current
            try:
                self._current = self._read(files)
            except RegistriesConfError as exc:
                self._refused = stamp
                log.warning("%s; the registries.conf reading before stays in use", exc)
                return self._current
            self._stamp, self._refused = stamp, None
            log.info("registries.conf changed: %s", self.describe())
            return self._current

    def describe(self) -> str:
        """What the current reading holds, for the log."""
        conf = self._current
        files = ", ".join(conf.files) or "no file"
        return f"{len(conf.registries)} [[registry]] tables from {files}"

    def _listing(self) -> tuple[Stamp, list[tuple[Path, bool]]]:
        if self.locate is not None:
            self.locations = self.locate()
        files = [(self.locations.main, False)]
        for d in self.locations.drop_in_dirs:
            files += [(p, True) for p in _drop_ins(d)]
        return tuple(_stamp(p) for p, _ in files), files

    def _read(self, files: Sequence[tuple[Path, bool]]) -> RegistriesConf:
        readings, read = [], []
        for path, drop_in in files:
            try:
                text = path.read_bytes()
            except FileNotFoundError:
                if drop_in:
                    continue  # removed after the listing
                if self.locations.required:
                    raise RegistriesConfError(
                        f"{path}: registries.conf file does not exist"
                    ) from None
                continue
            except OSError as exc:
                raise RegistriesConfError(f"{path}: cannot read: {exc.strerror}") from None
            readings.append(parse_text(text, str(path), drop_in=drop_in))
            read.append(str(path))
        return merge(readings, read)
