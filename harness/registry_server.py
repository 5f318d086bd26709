"""A real `docker-registry` (CNCF distribution 2.8) process for tests, benchmarks and scenarios.

Why a plain subprocess: the harness must measure bytes and requests exactly as a registry serves
them, on loopback or inside a network namespace it created, with no container engine in the
way. The registry's access log (Apache combined format, written on the process's stdout) is the
ground truth for "how many bytes did a pull fetch" and "did anything GET a whole blob".

Use::

    with RegistryServer() as reg:
        reg.url            # "http://127.0.0.1:PORT"
        reg.host           # "127.0.0.1:PORT"
        reg.access_log()   # [AccessRecord(...), ...]
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.processes import Service, die_with_parent, free_port, stop_group
from harness.stale import claim, disown, release

REGISTRY_BINARY = "/usr/bin/docker-registry"
# Set to 1: a stopped registry's directory (its storage, config and logs) is kept, disowned,
# for a look afterwards; its path is printed on stderr. Remove it by hand.
KEEP_ENV = "LAZYBENCH_KEEP_REGISTRY"
_NO_VERIFY = ssl.create_default_context()
_NO_VERIFY.check_hostname = False
_NO_VERIFY.verify_mode = ssl.CERT_NONE

# 127.0.0.1 - - [27/Nov/2026:22:04:56 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
_COMBINED = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<path>\S+) (?P<proto>[^"]+)" (?P<status>\d{3}) (?P<bytes>\d+|-)'
    r'(?: "(?P<referer>[^"]*)" "(?P<agent>[^"]*)")?'
)
_V2_PATH = re.compile(
    r"^/v2/(?P<repo>.+?)/(?P<kind>blobs/uploads|blobs|manifests|tags)(?:/(?P<ref>[^?]*))?(?:\?.*)?$"
)
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


class RegistryServerError(RuntimeError):
    """The registry process could not be started or did not become ready in time."""


@dataclass(frozen=True)
class AccessRecord:
    """One line of the registry's access log, with what it touched decoded from the path."""

    remote: str
    user: str | None
    time: str
    method: str
    path: str
    status: int
    bytes: int
    user_agent: str
    repo: str | None = None
    kind: str | None = None  # "blobs", "manifests", "blobs/uploads", "tags", "base", "catalog"
    reference: str | None = None  # tag, digest or upload id
    digest: str | None = None  # the reference when it is a digest

    @property
    def is_blob_get(self) -> bool:
        return self.method == "GET" and self.kind == "blobs"

    @property
    def is_full_blob_get(self) -> bool:
        """A GET that returned a whole blob (200, not 206): what lazy pulling must avoid."""
        return self.is_blob_get and self.status == 200


def parse_access_line(line: str) -> AccessRecord | None:
    """Parse one combined-format line; None for lines that are not access records."""
    m = _COMBINED.match(line.strip())
    if not m:
        return None
    path = m["path"]
    repo = kind = ref = digest = None
    bare = path.split("?", 1)[0]
    if bare in ("/v2/", "/v2"):
        kind = "base"
    elif bare == "/v2/_catalog":
        kind = "catalog"
    else:
        pm = _V2_PATH.match(path)
        if pm:
            repo, kind, ref = pm["repo"], pm["kind"], pm["ref"] or None
            if ref and _DIGEST.match(ref):
                digest = ref
    user = m["user"]
    return AccessRecord(
        remote=m["remote"],
        user=None if user == "-" else user,
        time=m["time"],
        method=m["method"],
        path=path,
        status=int(m["status"]),
        bytes=0 if m["bytes"] == "-" else int(m["bytes"]),
        user_agent=m["agent"] or "",
        repo=repo,
        kind=kind,
        reference=ref,
        digest=digest,
    )


def parse_access_log(text: str) -> list[AccessRecord]:
    return [r for r in map(parse_access_line, text.splitlines()) if r is not None]


@dataclass(frozen=True)
class TokenAuthConfig:
    """distribution's `auth: token` section: JWTs signed by a key whose cert is in the bundle."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: str | os.PathLike[str]


def write_htpasswd(path: Path, users: Mapping[str, str]) -> None:
    """Write a bcrypt htpasswd file (the only scheme distribution accepts)."""
    try:
        import bcrypt

        def _hash(pw: str) -> str:
            return bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=5)).decode()
    except ImportError:  # pragma: no cover - Python <3.13 fallback
        import crypt  # type: ignore[import-not-found]

        def _hash(pw: str) -> str:
            return crypt.crypt(pw, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=32))

    lines = [f"{user}:{_hash(pw)}\n" for user, pw in users.items()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


@dataclass
class RegistryServer(Service):
    """Start `docker-registry serve` with a config of our own; stop it on exit, always.

    `wrapper` prefixes the command (e.g. ``["ip", "netns", "exec", "ns0"]``) so the harness can
    run the registry inside a namespace; then give `host` (an address of that namespace) and,
    if that address is not reachable from here, `ready_url` to probe instead.
    """

    storage_dir: Path | None = None
    host_addr: str = "127.0.0.1"
    port: int | None = None
    wrapper: Sequence[str] = ()
    htpasswd_users: Mapping[str, str] | None = None
    htpasswd_file: Path | None = None
    token_auth: TokenAuthConfig | None = None
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    # Serve HTTPS with this PEM certificate and key (the readiness probe does not verify it).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    startup_timeout: float = 15.0
    ready_url: str | None = None
    binary: str = REGISTRY_BINARY

    _workdir: Path | None = field(default=None, init=False, repr=False)
    _owns_storage: bool = field(default=False, init=False, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    # ---- addresses -----------------------------------------------------------------------
    @property
    def host(self) -> str:
        """`HOST:PORT` as it appears in image references."""
        if self.port is None:
            raise RegistryServerError("registry not started")
        h = f"[{self.host_addr}]" if ":" in self.host_addr else self.host_addr
        return f"{h}:{self.port}"

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://{self.host}"

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RegistryServerError("registry not started")
        return self._workdir

    @property
    def access_log_path(self) -> Path:
        return self.workdir / "access.log"

    @property
    def error_log_path(self) -> Path:
        return self.workdir / "registry.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yml"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # ---- lifecycle -----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        assert self.storage_dir is not None and self.port is not None
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"{self.host}", "secret": "lazybench-registry-secret"},
        }
        if self.tls_cert is not None:
            if self.tls_key is None:
                raise RegistryServerError("tls_cert given without tls_key")
            cfg["http"]["tls"] = {"certificate": str(self.tls_cert), "key": str(self.tls_key)}
        if self.htpasswd_users is not None or self.htpasswd_file is not None:
            path = self.htpasswd_file
            if path is None:
                path = self.workdir / "htpasswd"
                write_htpasswd(path, self.htpasswd_users or {})
            cfg["auth"] = {"htpasswd": {"realm": "lazybench", "path": str(path)}}
        elif self.token_auth is not None:
            t = self.token_auth
            cfg["auth"] = {
                "token": {
                    "realm": t.realm,
                    "service": t.service,
                    "issuer": t.issuer,
                    "rootcertbundle": str(t.rootcertbundle),
                }
            }
        return _deep_merge(cfg, self.extra_config)

    def start(self) -> None:
        if self._proc is not None:
            raise RegistryServerError("registry already started")
        self._workdir = Path(tempfile.mkdtemp(prefix="lazybench-registry-"))
        claim(self._workdir)  # removed by harness.stale.sweep if we die without cleaning up
        if self.storage_dir is None:
            self.storage_dir = self._workdir / "storage"
            self._owns_storage = True
        self.storage_dir = Path(self.storage_dir)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        fixed_port = self.port is not None
        attempts = 1 if fixed_port else 5
        last = ""
        try:
            for _ in range(attempts):
                if not fixed_port:
                    self.port = free_port(self.host_addr if not self.wrapper else "127.0.0.1")
                last = self._spawn_and_wait()
                if not last:
                    return
            raise RegistryServerError(last)
        except BaseException:
            self.stop()
            raise

    def _spawn_and_wait(self) -> str:
        """Start once; '' when ready, else why it failed (after killing the process)."""
        # JSON is YAML: no YAML library needed.
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.config(), indent=2))
        os.replace(tmp, self.config_path)
        out = open(self.access_log_path, "wb")  # noqa: SIM115 - handed to the child
        err = open(self.error_log_path, "wb")  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                [*self.wrapper, self.binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            out.close()
            err.close()
        probe = self.ready_url or f"{self.url}/v2/"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                rc, self._proc = self._proc.returncode, None
                return f"docker-registry exited with status {rc}: {self._tail_error_log()}"
            try:
                with urllib.request.urlopen(probe, timeout=1.0, context=_NO_VERIFY) as r:
                    if r.status in (200, 401):
                        return ""
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    return ""
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.05)
        self._kill()
        return f"docker-registry did not answer {probe} within {self.startup_timeout:.0f}s"

    def _tail_error_log(self) -> str:
        try:
            lines = self.error_log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        bad = [ln for ln in lines if "level=fatal" in ln or "level=error" in ln or "panic" in ln]
        return (bad or lines or [""])[-1][-500:]

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_group(proc, timeout=5, kill_timeout=5)

    def stop(self) -> None:
        """Kill the process; remove the temp dir (and storage if we created it), unless
        :data:`KEEP_ENV` is ``1``: then the dir is kept, and disowned so that no later run's
        sweep (:func:`harness.stale.sweep`) removes it."""
        self._kill()
        if self._workdir is None:
            return
        if os.environ.get(KEEP_ENV) == "1":
            disown(self._workdir)
            print(f"{KEEP_ENV}=1: registry directory kept: {self._workdir}", file=sys.stderr)
        else:
            release(self._workdir)
            if self._owns_storage:
                self.storage_dir = None
                self._owns_storage = False
        self._workdir = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---- inspection ----------------------------------------------------------------------
    def access_log(self, upto: int | None = None) -> list[AccessRecord]:
        """Every request served so far (the registry writes each line when it completes); with
        ``upto`` (a :meth:`log_offset`), those whose line was whole at that offset."""
        try:
            data = self.access_log_path.read_bytes()
        except FileNotFoundError:
            return []
        if upto is not None:
            data = data[: data.rfind(b"\n", 0, upto) + 1]
        return parse_access_log(data.decode(errors="replace"))

    def log_offset(self) -> int:
        """Bytes in the access log now, unsettled: one ``stat``, cheap enough to take inside a
        timed section (:meth:`log_mark` sleeps at least 0.15 s). Pass to
        :meth:`access_log` ``upto`` later, untimed."""
        try:
            return self.access_log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def settle_log(self, quiet: float = 0.15, timeout: float = 3.0) -> None:
        """Wait until the access log has not grown for `quiet` seconds (at most `timeout`).

        The registry writes a request's line after the response is sent, so a client can hold
        the bytes before the line exists; counting right after a request can miss it.
        """
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            try:
                size = self.access_log_path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size == last:
                return
            last = size
            time.sleep(quiet)

    def log_mark(self) -> int:
        """How many records exist once the log settled; pass to `access_log_since`."""
        self.settle_log()
        return len(self.access_log())

    def access_log_since(self, mark: int, settle: bool = True) -> list[AccessRecord]:
        if settle:
            self.settle_log()
        return self.access_log()[mark:]

    def blob_path(self, digest: str) -> Path:
        """The file that holds a blob's bytes in filesystem storage (tests corrupt it)."""
        if self.storage_dir is None:
            raise RegistryServerError("registry has no storage directory")
        algo, _, hexpart = digest.partition(":")
        if not hexpart or len(hexpart) < 2:
            raise ValueError(f"not a digest: {digest!r}")
        return (
            Path(self.storage_dir)
            / "docker/registry/v2/blobs"
            / algo
            / hexpart[:2]
            / hexpart
            / "data"
        )

    def warm(self, repository: str, digests: Sequence[str], timeout: float = 30.0) -> int:
        """Read the files the registry serves ``repository``'s image from (its repository
        directory: tags, revisions, layer links; and the blobs ``digests``) once, so that they
        are in the page cache when a measurement starts; bytes read. Stops quietly after
        ``timeout`` seconds (what is left is read from disk when served, as before).

        Why: the registry's disk is not the link under test, yet a cold read of this VM's
        virtual disk stalled a pull's first footer requests for up to 0.7 s, with the machine's
        I/O stall at 100% and the link idle (the 3 slowest of 25 pull timelines of one default
        and one vs-go run: pulls of 1.45, 2.98 and 1.9 s against 0.87-1.39 s for the others).
        The page cache does not keep them here between measurements: of the 4.7 GB of image
        blobs read during a benchmark, 0.7 GB was still cached after it. Raises
        :class:`RegistryServerError` without a storage directory."""
        if self.storage_dir is None:
            raise RegistryServerError("registry has no storage directory")
        root = Path(self.storage_dir) / "docker/registry/v2"
        files = sorted(p for p in (root / "repositories" / repository).rglob("*") if p.is_file())
        files += [self.blob_path(d) for d in digests]
        deadline = time.monotonic() + timeout
        total = 0
        for path in files:
            try:
                with path.open("rb", buffering=0) as f:
                    while chunk := f.read(1 << 20):
                        total += len(chunk)
                        if time.monotonic() > deadline:
                            return total
            except FileNotFoundError:
                continue  # a blob the image does not hold here: served (or not) as it is
        return total
