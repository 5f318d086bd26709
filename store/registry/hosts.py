"""Which endpoints serve a registry: mirrors in order, then the origin.

The configuration keys are the Go `stargz-store`'s, so one TOML file serves both::

    [[resolver.host."docker.io".mirrors]]
    host = "mirror.example.com:5000"
    insecure = true
    request_timeout_sec = 10
    header = { X-Custom = ["v"] }

`parse_resolver_config` is a pure function over the decoded TOML table (the store's config
module owns file reading).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

DEFAULT_REQUEST_TIMEOUT = 30.0
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"


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

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"


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

    def endpoints(self, registry: str) -> list[Endpoint]:
        """Mirrors in configured order, then the origin (skipped if already listed)."""
        out: list[Endpoint] = []
        seen: set[str] = set()
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
            seen.add(host)
        if registry not in seen:
            host = DOCKER_HUB_ENDPOINT if registry == "docker.io" else registry
            scheme = "http" if (origin_insecure or is_local_host(host)) else "https"
            out.append(Endpoint(host, scheme, self.default_timeout))
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
    hosts_raw = table.get("host", {}) or {}
    if not isinstance(hosts_raw, Mapping):
        raise ConfigError("resolver.host must be a table of registry names")
    hosts: dict[str, HostConfig] = {}
    for name, hc in hosts_raw.items():
        where = f'resolver.host."{name}"'
        if not isinstance(hc, Mapping):
            raise ConfigError(f"{where} must be a table")
        mirrors_raw = hc.get("mirrors", []) or []
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
            header_raw = m.get("header", {}) or {}
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
