"""Registry credentials from containers' auth.json and docker's config.json, or given.

Lookup order (as containers/image): `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/
auth.json`, `~/.config/containers/auth.json`, `~/.docker/config.json`. Keys may be a registry
(`quay.io`), a namespace (`quay.io/org/repo`, most specific wins), or docker's legacy
`https://index.docker.io/v1/`.

Credential helpers, as docker and containers/image run them: a file's ``credHelpers``
(registry -> NAME) decides for that registry, ``credsStore`` (NAME) for an entry without
credentials (docker's ``{}``) or a registry the file has no entry for.
``docker-credential-NAME get`` is run with the server on stdin (the entry's own key, else the
registry; Docker Hub's is ``https://index.docker.io/v1/``) and answers JSON ``{"ServerURL",
"Username", "Secret"}`` (``Username`` ``<token>``: the secret is an identity token); "credentials
not found in native keychain" means none, the search goes on to the next file. Any other
failure (a helper that exits non-zero, answers no JSON, or takes more than
:data:`HELPER_TIMEOUT` seconds) is a ConfigError naming the helper and the file, as is a
``credHelpers`` helper not on ``PATH``; a ``credsStore`` helper not on ``PATH`` (a config.json
copied from Docker Desktop) is logged and gives none, the outcome podman (which does not read
``credsStore``) has. Answers, a failure too, are kept :data:`HELPER_CACHE_TTL` seconds (a
burst of requests behind a helper that hangs waits for it once, not once each);
:meth:`CredentialStore.alookup` runs helpers in a worker thread, off the event loop.

Credentials handed over per image reference by podman's layer-store auth helper
(:meth:`CredentialStore.add_for_references`, fed by ``stargz-store-helper`` through the store's
socket, :mod:`store.credsocket`) come first, and only for the origin: they are used for that
reference's registry host and repository, never sent to a mirror (as the Go store's
``storeKeychain``, cmd/stargz-store/main.go).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread

from .errors import ConfigError
from .stamps import FileStamp, file_stamp

log = logging.getLogger(__name__)

HELPER_TIMEOUT = 10.0  # seconds one `docker-credential-NAME get` may take
HELPER_CACHE_TTL = 60.0  # seconds a helper's answer (credentials, none, failure) is reused
# What a helper prints when it has nothing for the server (docker-credential-helpers'
# credentials.errCredentialsNotFound).
HELPER_NOT_FOUND = "credentials not found in native keychain"
HELPER_TOKEN_USER = "<token>"  # Username of an identity token (docker's tokenUsername)
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"


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


@dataclass(frozen=True)
class HelperCall:
    """One ``docker-credential-NAME get``: NAME, the server on its stdin, and the file and key
    that named it (for messages); ``required``: a missing helper is an error (credHelpers),
    not a logged none (credsStore)."""

    helper: str
    server: str
    where: str
    required: bool = True


def run_credential_helper(call: HelperCall, timeout: float = HELPER_TIMEOUT) -> Credentials | None:
    """Run ``docker-credential-NAME get``; its credentials, None for "not found".
    Raises ConfigError naming the helper for any other outcome; never waits past
    ``timeout`` (the helper's whole process group is killed then)."""
    if not call.helper or "/" in call.helper or "\0" in call.helper or call.helper.startswith("-"):
        raise ConfigError(f"{call.where}: {call.helper!r} is not a credential helper name")
    program = f"docker-credential-{call.helper}"
    what = f"credential helper {program} ({call.where})"
    try:
        proc = subprocess.Popen(
            [program, "get"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError:
        if not call.required:
            log.warning("%s is not on PATH: no credentials from it for %s", what, call.server)
            return None
        raise ConfigError(f"{what} is not on PATH") from None
    except OSError as exc:
        raise ConfigError(f"{what} cannot be run: {exc.strerror}") from None
    with proc:
        try:
            out, err = proc.communicate(call.server.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise ConfigError(
                f"{what} gave no answer for {call.server} within {timeout:g}s"
            ) from None
    said = (out.decode(errors="replace").strip() or err.decode(errors="replace").strip())[:300]
    if proc.returncode != 0:
        if said == HELPER_NOT_FOUND:
            return None
        raise ConfigError(
            f"{what} failed for {call.server} (exit status {proc.returncode}): {said}"
        )
    try:
        answer = json.loads(out)
        user, secret = answer.get("Username", ""), answer.get("Secret", "")
        if not isinstance(user, str) or not isinstance(secret, str):
            raise TypeError("Username and Secret must be strings")
    except (ValueError, AttributeError, TypeError):
        # Not quoted: it may hold the secret.
        raise ConfigError(
            f"{what} answered for {call.server} without a JSON object of Username and Secret"
        ) from None
    if user == HELPER_TOKEN_USER:
        creds = Credentials(identity_token=secret)
    else:
        creds = Credentials(user, secret)
    return creds if _holds_any(creds) else None


class _NotCached(Exception):
    """A lookup needs a helper's answer that is not cached."""


@dataclass(frozen=True)
class _AuthFile:
    path: Path
    # normalized key -> (key as written, entry)
    auths: Mapping[str, tuple[str, Mapping[str, object]]]
    # normalized registry -> (key as written, helper NAME)
    helpers: Mapping[str, tuple[str, object]]
    store: object  # credsStore: a NAME, or "" for none


def _keys_of(registry: str, repository: str) -> list[str]:
    """The keys that may name ``registry/repository``, most specific first
    (``quay.io/org/repo``, ``quay.io/org``, ``quay.io``)."""
    path = f"{registry}/{repository}" if repository else registry
    keys = [path]
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        keys.append(path)
    return keys


def find_credentials(
    files: list[_AuthFile],
    registry: str,
    repository: str,
    run: Callable[[HelperCall], Credentials | None],
) -> Credentials | None:
    """The credentials the auth ``files`` give ``registry/repository``, running helpers
    through ``run``.

    Per file, in order: a ``credHelpers`` entry for the registry decides for that file (as
    containers/image: registries only, not namespaces); else the most specific ``auths``
    key, whose credentials, or for an entry without any the ``credsStore``, decide; with no
    key at all the ``credsStore`` is asked for the registry (as docker). None from a file
    sends the search on to the next."""
    keys = _keys_of(registry, repository)
    for f in files:
        if registry in f.helpers:
            raw, name = f.helpers[registry]
            where = f"{f.path} credHelpers[{raw!r}]"
            if not isinstance(name, str):
                raise ConfigError(f"{where}: a credential helper name must be a string")
            if creds := run(HelperCall(name, registry, where)):
                return creds
            continue
        server = DOCKER_HUB_SERVER if registry == "docker.io" else registry
        for k in keys:
            if k in f.auths:
                raw, entry = f.auths[k]
                if (creds := _decode_entry(entry, f"{f.path} [{raw}]")) is not None:
                    return creds
                server = raw
                break
        else:
            if not f.store:
                continue
        if f.store:
            if not isinstance(f.store, str):
                raise ConfigError(f"{f.path}: 'credsStore' must be a string")
            call = HelperCall(f.store, server, f"{f.path} credsStore", required=False)
            if creds := run(call):
                return creds
    return None


class CredentialStore:
    """Explicit credentials first, then auth files; a file that is missing is skipped."""

    def __init__(
        self,
        explicit: Mapping[str, Credentials] | None = None,
        auth_files: list[Path] | None = None,
    ) -> None:
        self._explicit = {_normalize_key(k): v for k, v in (explicit or {}).items()}
        self._files = auth_files if auth_files is not None else default_auth_files()
        self._loaded: list[_AuthFile] | None = None
        self._loaded_as: list[FileStamp | None] = []  # the files' stamps then
        self._refused_as: list[FileStamp | None] = []  # a change that did not read
        self._given: dict[tuple[str, str], Credentials] = {}
        # (helper, server) -> (until, answer: credentials, None, or the failure's message)
        self._helper_answers: dict[tuple[str, str], tuple[float, Credentials | str | None]] = {}
        self._helper_lock: anyio.Lock | None = None

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

    def _stamps(self) -> list[FileStamp | None]:
        """Each auth file's stamp (:func:`~.stamps.file_stamp`), None for one missing."""
        return [file_stamp(path) for path in self._files]

    def _load(self) -> list[_AuthFile]:
        """The auth files as they are now: read again when one appeared, went or changed
        since the last read (a ``podman login`` or ``logout`` while the store runs takes
        effect at the next lookup, as the Go store reads docker's config file at each one).
        A change that does not read (a file rewritten in place, caught half written) keeps
        the last reading, with a warning, until the files change again. Raises ConfigError
        naming a file that cannot be read or is malformed when no reading came before."""
        stamps = self._stamps()
        if self._loaded is not None and stamps in (self._loaded_as, self._refused_as):
            return self._loaded
        if self._loaded is not None:
            log.info("credential files changed: reading them again")
        try:
            loaded = self._read_files()
        except ConfigError as exc:
            if self._loaded is None:
                raise
            log.warning("%s; the credentials read before stay in use until it reads", exc)
            self._refused_as = stamps
            return self._loaded
        self._loaded, self._loaded_as = loaded, stamps
        return self._loaded

    def _read_files(self) -> list[_AuthFile]:
        """Every auth file there is, read; raises ConfigError naming one that cannot be read
        or is malformed."""
        loaded = []
        for path in self._files:
            try:
                data = json.loads(path.read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read credentials file {path}: {e}") from e
            data = data if isinstance(data, dict) else {}
            auths = data.get("auths", {})
            if not isinstance(auths, dict):
                raise ConfigError(f"{path}: 'auths' must be an object")
            helpers = data.get("credHelpers") or {}
            if not isinstance(helpers, dict):
                raise ConfigError(f"{path}: 'credHelpers' must be an object")
            # Decoded when matched: a broken entry only fails the registry it is for.
            table = {_normalize_key(k): (k, v) for k, v in auths.items() if isinstance(v, dict)}
            by_registry = {_normalize_key(k): (k, v) for k, v in helpers.items()}
            loaded.append(_AuthFile(path, table, by_registry, data.get("credsStore") or ""))
        return loaded

    def _run_cached(self, call: HelperCall) -> Credentials | None:
        with contextlib.suppress(_NotCached):
            return self._cached_only(call)
        key = (call.helper, call.server)
        try:
            creds = run_credential_helper(call)
        except ConfigError as exc:
            self._helper_answers[key] = (time.monotonic() + HELPER_CACHE_TTL, str(exc))
            raise
        self._helper_answers[key] = (time.monotonic() + HELPER_CACHE_TTL, creds)
        return creds

    def _cached_only(self, call: HelperCall) -> Credentials | None:
        """The helper's answer kept for ``call``; raises _NotCached, or the ConfigError it
        failed with."""
        held = self._helper_answers.get((call.helper, call.server))
        if held is None or time.monotonic() >= held[0]:
            raise _NotCached
        if isinstance(held[1], str):
            raise ConfigError(held[1])
        return held[1]

    def _find(
        self,
        registry: str,
        repository: str,
        origin: bool,
        run: Callable[[HelperCall], Credentials | None],
    ) -> Credentials | None:
        given = self._given.get((registry, repository)) if origin else None
        if given is not None and _holds_any(given):
            return given
        for key in _keys_of(registry, repository):
            if key in self._explicit:
                return self._explicit[key]
        return find_credentials(self._load(), registry, repository, run)

    def lookup(
        self, registry: str, repository: str = "", *, origin: bool = True, helpers: bool = True
    ) -> Credentials | None:
        """Most specific match of `registry/repository` prefixes, explicit before files.

        Credentials given for an image reference match only its own registry and repository,
        and only when ``origin`` (the request goes to that registry, not to a mirror).
        Credential helpers run here, blocking (:meth:`alookup` does not block); with
        ``helpers=False`` only their cached answers count (one not cached gives None)."""
        if helpers:
            return self._find(registry, repository, origin, self._run_cached)
        try:
            return self._find(registry, repository, origin, self._cached_only)
        except _NotCached:
            return None

    async def alookup(
        self, registry: str, repository: str = "", *, origin: bool = True
    ) -> Credentials | None:
        """:meth:`lookup` for async callers: a helper not answered yet runs in a worker
        thread, one such lookup at a time (a burst of requests runs it once)."""
        with contextlib.suppress(_NotCached):
            return self._find(registry, repository, origin, self._cached_only)
        if self._helper_lock is None:
            self._helper_lock = anyio.Lock()
        async with self._helper_lock:
            with contextlib.suppress(_NotCached):
                return self._find(registry, repository, origin, self._cached_only)
            return await anyio.to_thread.run_sync(
                functools.partial(self.lookup, registry, repository, origin=origin),
                abandon_on_cancel=True,
            )
