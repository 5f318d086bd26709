"""Which endpoints serve a registry: mirrors in order, then the origin.

The configuration keys are the Go `stargz-store`'s, so one TOML file serves both::

    [[resolver.host."docker.io".mirrors]]
    host = "mirror.example.com:5000"
    insecure = true
    request_timeout_sec = 10
    header = { X-Custom = ["v"] }

`parse_resolver_config` is a pure function over the decoded TOML table (the store's config
module owns file reading).

Podman's own configuration, containers-registries.conf(5) (:mod:`.registriesconf`), adds to
that for a pull: after the store's mirrors, the mirrors registries.conf lists for the
image, then its (possibly rewritten) location; ``insecure`` from either source.

How each HTTPS host is verified, and which client certificate it is shown, is podman's
per-host TLS directory (containers-certs.d(5), containers/image's ``dockerCertDir`` and
``tlsclientconfig.SetupCertificates``): the first of ``~/.config/containers/certs.d/HOST[:PORT]``,
``/etc/containers/certs.d/HOST[:PORT]``, ``/etc/docker/certs.d/HOST[:PORT]`` that exists is
the host's; in it ``*.crt`` files are CAs trusted beside the system's, and ``NAME.cert`` with
``NAME.key`` a client certificate (one without the other is an error). The Go store has no
setting for this (it trusts the system's CAs only), so none is added here.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .reference import DOCKER_HUB_ENDPOINT
from .registriesconf import PullSource, RegistriesConf

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT = 30.0


def is_local_host(host: str) -> bool:
    """localhost, 127.0.0.0/8 and ::1 (with or without a port) speak plain HTTP by default."""
    h = host
    if h.startswith("["):
        h = h[1 : h.index("]")] if "]" in h else h
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Endpoint:
    """One place to send requests for a registry: base URL, timeout, extra headers."""

    host: str  # "mirror:5000"
    scheme: str = "https"
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    headers: tuple[tuple[str, str], ...] = ()
    is_mirror: bool = False
    # The registry as the user names it, when not ``host`` (Docker Hub's origin: docker.io).
    registry: str = ""
    # The image's repository here, when registries.conf rewrote it ("": the reference's).
    repository: str = ""
    # False: TLS without checking the certificate (registries.conf ``insecure``).
    verify: bool = True

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def certs_host(self) -> str:
        """The HOST[:PORT] of its certs.d directory: containers/image names Docker Hub's as
        users write the registry, ``docker.io``, not by the host it connects to."""
        return self.registry or self.host


@dataclass(frozen=True)
class MirrorConfig:
    host: str
    insecure: bool = False
    request_timeout_sec: float = 0.0
    header: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class HostConfig:
    """Per-registry settings: its mirrors (tried first, in order)."""

    mirrors: tuple[MirrorConfig, ...] = ()


@dataclass(frozen=True)
class ResolverConfig:
    hosts: Mapping[str, HostConfig] = field(default_factory=dict)
    # Registries reached over plain HTTP although not loopback (e.g. a namespace address).
    insecure_hosts: frozenset[str] = frozenset()
    default_timeout: float = DEFAULT_REQUEST_TIMEOUT
    # registries.conf as it is now (registriesconf.RegistriesConfFiles); None: not read.
    registries_conf: Callable[[], RegistriesConf] | None = None

    def endpoints(
        self, registry: str, repository: str = "", *, digested: bool = False
    ) -> list[Endpoint]:
        """The store's mirrors in configured order, then, for a pull of ``repository`` (by
        digest: ``digested``), the places registries.conf lists for it (its mirrors, then
        the registry's location, rewritten); without a repository (a push) the origin.
        An endpoint already listed is skipped.

        An ``insecure`` registries.conf endpoint is reached over plain HTTP, then over TLS
        without verification (containers/image allows both; plain HTTP first: what such a
        registry mostly speaks). Raises :class:`~.registriesconf.RegistriesBlocked` for a
        pull registries.conf blocks, ConfigError for a rewrite that names no image."""
        out: list[Endpoint] = []
        seen: set[tuple[str, str]] = set()
        origin_insecure = registry in self.insecure_hosts
        for m in self.hosts.get(registry, HostConfig()).mirrors:
            host, scheme = _split_scheme(m.host)
            if scheme is None:
                scheme = "http" if (m.insecure or is_local_host(host)) else "https"
            if host == registry and m.insecure:
                origin_insecure = True
            # 0: the default; < 0 (Go: no timeout of its own) too, see parse_resolver_config.
            timeout = m.request_timeout_sec if m.request_timeout_sec > 0 else self.default_timeout
            headers = tuple((k, v) for k, vs in m.header.items() for v in vs)
            out.append(Endpoint(host, scheme, timeout, headers, is_mirror=host != registry))
            seen.add((host, ""))
        conf = self.registries_conf() if self.registries_conf is not None else None
        if conf is not None and repository:
            sources = conf.pull_sources(registry, repository, digested)
        else:
            insecure = conf is not None and conf.insecure(registry)
            sources = [PullSource(registry, repository, insecure, False)]
        for src in sources:
            repo = "" if src.repository == repository else src.repository
            if (src.registry, repo) in seen:
                continue
            seen.add((src.registry, repo))
            host = DOCKER_HUB_ENDPOINT if src.registry == "docker.io" else src.registry
            plain = origin_insecure and src.registry == registry
            ep = Endpoint(
                host,
                "http" if (plain or src.insecure or is_local_host(host)) else "https",
                self.default_timeout,
                is_mirror=src.mirror or src.registry != registry,
                registry=src.registry if host != src.registry else "",
                repository=repo,
            )
            out.append(ep)
            if src.insecure and not plain:
                out.append(replace(ep, scheme="https", verify=False))
        return out


def _split_scheme(host: str) -> tuple[str, str | None]:
    for scheme in ("http", "https"):
        if host.startswith(f"{scheme}://"):
            return host[len(scheme) + 3 :].rstrip("/"), scheme
    return host.rstrip("/"), None


def parse_resolver_config(
    table: Mapping[str, Any] | None,
    *,
    insecure_hosts: frozenset[str] | set[str] = frozenset(),
    default_timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> ResolverConfig:
    """Read the `resolver` table (or the whole config with a `resolver` key).

    As upstream's service/resolver/registry.go: the table's ``request_timeout_sec`` (> 0)
    replaces ``default_timeout`` for every host without its own; a mirror's
    ``request_timeout_sec`` of 0 means that default, and < 0 — Go's "no timeout" — means it
    too here, kept as given so the caller can say so: the store never waits without a bound
    (``[blob] fetching_timeout_sec`` bounds every read).

    Raises ConfigError naming the offending key for wrong types.
    """
    table = dict(table or {})
    if "resolver" in table:
        table = dict(table["resolver"] or {})
    global_timeout = table.get("request_timeout_sec", 0)
    if isinstance(global_timeout, bool) or not isinstance(global_timeout, int | float):
        raise ConfigError("resolver.request_timeout_sec must be a number")
    if global_timeout > 0:
        default_timeout = float(global_timeout)
    hosts_raw = table.get("host", {})
    if not isinstance(hosts_raw, Mapping):
        raise ConfigError("resolver.host must be a table of registry names")
    hosts: dict[str, HostConfig] = {}
    for name, hc in hosts_raw.items():
        where = f'resolver.host."{name}"'
        if not isinstance(hc, Mapping):
            raise ConfigError(f"{where} must be a table")
        mirrors_raw = hc.get("mirrors", [])
        if not isinstance(mirrors_raw, list):
            raise ConfigError(f"{where}.mirrors must be an array of tables")
        mirrors = []
        for i, m in enumerate(mirrors_raw):
            mwhere = f"{where}.mirrors[{i}]"
            if not isinstance(m, Mapping) or not isinstance(m.get("host"), str) or not m["host"]:
                raise ConfigError(f"{mwhere} needs a non-empty string 'host'")
            insecure = m.get("insecure", False)
            if not isinstance(insecure, bool):
                raise ConfigError(f"{mwhere}.insecure must be true or false")
            timeout = m.get("request_timeout_sec", 0)
            if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                raise ConfigError(f"{mwhere}.request_timeout_sec must be a number")
            header_raw = m.get("header", {})
            if not isinstance(header_raw, Mapping):
                raise ConfigError(f"{mwhere}.header must be a table")
            header: dict[str, tuple[str, ...]] = {}
            for k, v in header_raw.items():
                # As upstream: a string or an array of strings, anything else is an error.
                if isinstance(v, str):
                    header[str(k)] = (v,)
                elif isinstance(v, list) and all(isinstance(x, str) for x in v):
                    header[str(k)] = tuple(v)
                else:
                    raise ConfigError(
                        f"{mwhere}.header.{k} must be a string or an array of strings"
                    )
            mirrors.append(MirrorConfig(m["host"], insecure, float(timeout), header))
        hosts[str(name)] = HostConfig(tuple(mirrors))
    return ResolverConfig(hosts, frozenset(insecure_hosts), default_timeout)


def default_certs_roots() -> tuple[Path, ...]:
    """The directories holding a ``HOST[:PORT]`` directory each, in containers/image's order
    of search (``$HOME`` first)."""
    home = Path(os.path.expanduser("~"))
    return (
        home / ".config" / "containers" / "certs.d",
        Path("/etc/containers/certs.d"),
        Path("/etc/docker/certs.d"),
    )


@dataclass(frozen=True)
class HostTls:
    """What a host's certs.d directory holds: CA files and at most one client key pair.

    ``searched``: the directories looked at, in order; ``directory``: the first of them that
    exists (None: none does, the system's CAs alone are trusted)."""

    host: str
    searched: tuple[Path, ...]
    directory: Path | None = None
    ca_files: tuple[Path, ...] = ()
    client_cert: tuple[Path, Path] | None = None  # (NAME.cert, NAME.key)
    # Files' (name, size, mtime) when read: the context is rebuilt when they change.
    stamp: tuple[tuple[str, int, int], ...] = ()

    def describe(self) -> str:
        """Where the host's CAs and client certificate come from, for error messages."""
        if self.directory is None:
            dirs = ", ".join(str(d) for d in self.searched)
            return f"no certs.d directory for {self.host} (none of {dirs} exists)"
        cas = ", ".join(p.name for p in self.ca_files) or "no *.crt file"
        cert = self.client_cert[0].name if self.client_cert else "no client certificate"
        return f"certs.d directory for {self.host}: {self.directory} ({cas}; {cert})"

    def context(self, cafile: str | None = None, verify: bool = True) -> ssl.SSLContext:
        """An SSL context trusting the system's CAs (or ``cafile`` alone) plus the *.crt
        files, showing the client certificate (``verify=False``: checking nothing, showing
        the client certificate). Raises ConfigError naming the file that cannot be used."""
        ctx = ssl.create_default_context(cafile=cafile)
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        for path in self.ca_files if verify else ():
            try:
                ctx.load_verify_locations(cadata=path.read_text(errors="replace"))
            except FileNotFoundError:
                log.warning("%s: dangling or removed, not trusted", path)
            except OSError as exc:
                raise ConfigError(
                    f"{path}: cannot read CA file: {exc.strerror}", host=self.host
                ) from None
            except (ssl.SSLError, ValueError) as exc:
                # containers/image skips a file without a PEM certificate (Go's
                # AppendCertsFromPEM); a verification that needed it names the directory.
                log.warning("%s: no PEM certificate in it, not trusted (%s)", path, exc)
        if self.client_cert is not None:
            cert, key = self.client_cert
            try:
                ctx.load_cert_chain(cert, key, password=_no_password)
            except (OSError, ssl.SSLError, ValueError) as exc:
                why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                raise ConfigError(
                    f"{cert} with {key.name}: not a usable client certificate and key "
                    f"(PEM, unencrypted, matching): {why}",
                    host=self.host,
                ) from None
        return ctx


def _no_password() -> bytes:
    # An encrypted client key cannot be used unattended (containers/image refuses it too);
    # without this OpenSSL would prompt on the terminal.
    raise ValueError("the key is encrypted")


def read_certs_dir(host: str, roots: Sequence[Path] | None = None) -> HostTls:
    """The host's certs.d directory and what it holds, read as containers/image reads it.

    Directories that do not exist or cannot be read are skipped, as there; in the one used,
    a ``NAME.cert`` without ``NAME.key`` (or the reverse) is a ConfigError naming both."""
    searched = tuple(Path(r) / host for r in (default_certs_roots() if roots is None else roots))
    for d in searched:
        try:
            names = sorted(os.listdir(d))
        except (FileNotFoundError, PermissionError):
            continue
        except NotADirectoryError:
            raise ConfigError(f"{d}: certs.d entry for {host} is not a directory") from None
        except OSError as exc:
            raise ConfigError(f"{d}: cannot read certs.d directory: {exc.strerror}") from None
        cas, pairs = [], []
        for name in names:
            if name.endswith(".crt"):
                cas.append(d / name)
            elif name.endswith(".cert"):
                key = name[: -len(".cert")] + ".key"
                if key not in names:
                    raise ConfigError(
                        f"{d}: missing key {key} for client certificate {name} (CA "
                        "certificates take the extension .crt)",
                        host=host,
                    )
                pairs.append((d / name, d / key))
            elif name.endswith(".key") and name[: -len(".key")] + ".cert" not in names:
                raise ConfigError(
                    f"{d}: missing client certificate {name[: -len('.key')]}.cert for key {name}",
                    host=host,
                )
        if len(pairs) > 1:
            log.info("%s: %d client certificates; %s is shown", d, len(pairs), pairs[0][0].name)
        stamp = []
        for path in [*cas, *(p for pair in pairs[:1] for p in pair)]:
            try:
                st = path.stat()
                stamp.append((path.name, st.st_size, st.st_mtime_ns))
            except OSError:
                stamp.append((path.name, -1, -1))
        return HostTls(host, searched, d, tuple(cas), pairs[0] if pairs else None, tuple(stamp))
    return HostTls(host, searched)
