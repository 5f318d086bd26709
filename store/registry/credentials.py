"""Registry credentials from containers' auth.json and docker's config.json, or given.

Lookup order (as containers/image): `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/
auth.json`, `~/.config/containers/auth.json`, `~/.docker/config.json`. Keys may be a registry
(`quay.io`), a namespace (`quay.io/org/repo`, most specific wins), or docker's legacy
`https://index.docker.io/v1/`. Credential helpers are not run.

Credentials handed over per image reference by podman's layer-store auth helper
(:meth:`CredentialStore.add_for_references`, fed by ``stargz-store-helper`` through the store's
socket, :mod:`store.credsocket`) come first, and only for the origin: they are used for that
reference's registry host and repository, never sent to a mirror (as the Go store's
``storeKeychain``, cmd/stargz-store/main.go).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""  # OAuth2 refresh token (docker `identitytoken`)

    def __repr__(self) -> str:  # never print secrets
        return f"Credentials(username={self.username!r}, password=***)"


def default_auth_files() -> list[Path]:
    files: list[Path] = []
    if env := os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env))
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(xdg) / "containers" / "auth.json")
    home = Path(os.path.expanduser("~"))
    files.append(home / ".config" / "containers" / "auth.json")
    docker_dir = os.environ.get("DOCKER_CONFIG")
    files.append(Path(docker_dir) / "config.json" if docker_dir else home / ".docker/config.json")
    return files


def _normalize_key(key: str) -> str:
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            # A URL names a registry, never a namespace (containers/image's
            # normalizeAuthFileKey): `https://host/v1/`, `https://host/anything` -> `host`.
            key = key[len(prefix) :].split("/", 1)[0]
    key = key.rstrip("/")
    if key.endswith("/v1") or key.endswith("/v2"):
        key = key[:-3]
    if key in ("index.docker.io", "registry-1.docker.io"):
        key = "docker.io"
    return key


def _decode_entry(entry: Mapping[str, object], where: str) -> Credentials | None:
    """The entry's credentials; None for one that holds none (docker writes `{}` for a
    registry whose credentials a `credsStore` keeps; `auth` without a colon is skipped too,
    as containers/image does). `auth` that is not base64 is an error."""
    user = str(entry.get("username") or "")
    password = str(entry.get("password") or "")
    if auth := entry.get("auth"):
        try:
            decoded = base64.b64decode(str(auth), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}: 'auth' is not base64 of user:password") from e
        user, sep, password = decoded.partition(":")
        if not sep:
            user = password = ""
        password = password.strip("\n")  # as containers/image
    creds = Credentials(user, password, str(entry.get("identitytoken") or ""))
    return creds if _holds_any(creds) else None


def _holds_any(creds: Credentials) -> bool:
    return bool(creds.username or creds.password or creds.identity_token)


class CredentialStore:
    """Explicit credentials first, then auth files; a file that is missing is skipped."""

    def __init__(
        self,
        explicit: Mapping[str, Credentials] | None = None,
        auth_files: list[Path] | None = None,
    ) -> None:
        self._explicit = {_normalize_key(k): v for k, v in (explicit or {}).items()}
        self._files = auth_files if auth_files is not None else default_auth_files()
        self._loaded: list[tuple[Path, dict[str, tuple[str, Mapping[str, object]]]]] | None = None
        self._given: dict[tuple[str, str], Credentials] = {}

    def add_for_references(self, data: object) -> list[str]:
        """Take ``{"<image ref>": {"username", "password", "identityToken"}}`` (what podman
        gives its layer-store auth helper); return the references taken. Raise ConfigError
        naming what is malformed (nothing is taken then)."""
        from .errors import ReferenceError
        from .reference import Reference

        if not isinstance(data, dict):
            raise ConfigError("credentials: expected an object keyed by image reference")
        taken: dict[tuple[str, str], Credentials] = {}
        for ref, entry in data.items():
            if not isinstance(entry, dict) or not all(
                isinstance(entry.get(k, ""), str) for k in ("username", "password", "identityToken")
            ):
                raise ConfigError(f"credentials for {ref!r}: expected string fields")
            try:
                parsed = Reference.parse(ref)
            except ReferenceError as exc:
                raise ConfigError(f"credentials: {exc}") from None
            taken[(parsed.registry, parsed.repository)] = Credentials(
                entry.get("username", ""),
                entry.get("password", ""),
                entry.get("identityToken", ""),
            )
        self._given.update(taken)
        return list(data)

    def _load(self) -> list[tuple[Path, dict[str, tuple[str, Mapping[str, object]]]]]:
        if self._loaded is None:
            self._loaded = []
            for path in self._files:
                try:
                    data = json.loads(path.read_text())
                except FileNotFoundError:
                    continue
                except (OSError, ValueError) as e:
                    raise ConfigError(f"cannot read credentials file {path}: {e}") from e
                auths = data.get("auths", {}) if isinstance(data, dict) else {}
                if not isinstance(auths, dict):
                    raise ConfigError(f"{path}: 'auths' must be an object")
                # Decoded when matched: a broken entry only fails the registry it is for.
                table = {_normalize_key(k): (k, v) for k, v in auths.items() if isinstance(v, dict)}
                self._loaded.append((path, table))
        return self._loaded

    def lookup(
        self, registry: str, repository: str = "", *, origin: bool = True
    ) -> Credentials | None:
        """Most specific match of `registry/repository` prefixes, explicit before files.

        Credentials given for an image reference match only its own registry and repository,
        and only when ``origin`` (the request goes to that registry, not to a mirror)."""
        given = self._given.get((registry, repository)) if origin else None
        if given is not None and _holds_any(given):
            return given
        keys = []
        path = f"{registry}/{repository}" if repository else registry
        while True:
            keys.append(path)
            if "/" not in path:
                break
            path = path.rsplit("/", 1)[0]
        for k in keys:
            if k in self._explicit:
                return self._explicit[k]
        # As containers/image: the most specific key of the first file that has one decides
        # for that file; an entry without credentials sends the search on to the next file.
        for path, table in self._load():
            for k in keys:
                if k in table:
                    raw_key, entry = table[k]
                    if (creds := _decode_entry(entry, f"{path} [{raw_key}]")) is not None:
                        return creds
                    break
        return None
