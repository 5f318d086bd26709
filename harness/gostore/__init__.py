"""The reference Go ``stargz-store``, built here from Debian's Go packages, offline.

Upstream's ``cmd/stargz-store`` is not packaged; ``main.go`` beside this file is our own small
``main`` over the packaged store library (``golang-github-containerd-stargz-snapshotter-dev``,
v0.12 in bookworm): ``go-stargz-store [--config F] [--root D] [--log-level L] MOUNTPOINT``,
unmounting on SIGINT/SIGTERM. It is compiled in GOPATH mode against ``/usr/share/gocode``
(``GO111MODULE=off``, ``GOPROXY=off``: nothing is downloaded).

:func:`build` puts the binary at ``CACHE/stores/go-stargz-store-KEY/go-stargz-store``, KEY
hashing ``main.go``, the Go version and the library's package version, so a change to any of
them builds anew and an unchanged one is reused. The directory is renamed into place whole:
a concurrent or interrupted build never leaves a half-written binary behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.cli import default_cache_dir
from harness.processes import kill_group

GOPATH = Path("/usr/share/gocode")
LIBRARY_PACKAGE = "golang-github-containerd-stargz-snapshotter-dev"
LIBRARY_DIR = GOPATH / "src/github.com/containerd/stargz-snapshotter/store"
SOURCE = Path(__file__).with_name("main.go")
BINARY_NAME = "go-stargz-store"
BUILD_TIMEOUT = 900.0  # seconds; a cold build on 2 busy cores takes about 2 minutes
_INSTALL_HINT = "run ci/install-system-deps (as root) to install golang-go and " + LIBRARY_PACKAGE


class GoStoreBuildError(RuntimeError):
    """Go or the store library is missing, or the build failed (the message says which)."""


@dataclass(frozen=True)
class GoStoreBuild:
    """What a build is made of; ``key`` names its cache directory."""

    source_sha256: str
    go_version: str
    library_version: str

    @property
    def key(self) -> str:
        text = f"{self.source_sha256}\n{self.go_version}\n{self.library_version}\n"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stores_dir(cache_dir: Path | None) -> Path:
    return (cache_dir or default_cache_dir()) / "stores"


def _go_env(gocache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": str(GOPATH),
        "GOFLAGS": "",
        "GOPROXY": "off",
        "GOCACHE": str(gocache),
    }


def current_build() -> GoStoreBuild:
    """The inputs a build would use now. Raises :class:`GoStoreBuildError` naming what is
    missing (Go, the library package)."""
    go = shutil.which("go")
    if go is None:
        raise GoStoreBuildError(f"go not found on PATH; {_INSTALL_HINT}")
    if not LIBRARY_DIR.is_dir():
        raise GoStoreBuildError(f"the Go store library is missing ({LIBRARY_DIR}); {_INSTALL_HINT}")
    go_version = subprocess.run(
        [go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60, check=False
    ).stdout.strip()
    lib = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", LIBRARY_PACKAGE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout.strip()
    if not lib:  # not installed through dpkg: fall back to the library's own sources
        digest = hashlib.sha256()
        for path in sorted(LIBRARY_DIR.glob("*.go")):
            digest.update(path.read_bytes())
        lib = "src-" + digest.hexdigest()[:16]
    return GoStoreBuild(
        source_sha256=hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        go_version=go_version or "unknown",
        library_version=lib,
    )


def binary_path(cache_dir: Path | None = None, build_info: GoStoreBuild | None = None) -> Path:
    """Where the build for the current inputs lives (whether or not it exists yet)."""
    info = build_info or current_build()
    return _stores_dir(cache_dir) / f"{BINARY_NAME}-{info.key}" / BINARY_NAME


def build(
    cache_dir: Path | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    timeout: float = BUILD_TIMEOUT,
) -> Path:
    """Build the Go store into the cache unless this exact build is there; return its path.

    Raises :class:`GoStoreBuildError` when Go or the library is missing, the compiler fails
    (its last lines are in the message) or takes longer than ``timeout`` seconds.
    """
    info = current_build()
    target = binary_path(cache_dir, info)
    if target.is_file():
        return target
    stores = _stores_dir(cache_dir)
    stores.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(f"building the Go stargz-store ({info.library_version}, {info.go_version})")
    staging = Path(tempfile.mkdtemp(prefix=f".{BINARY_NAME}-", dir=stores))
    try:
        proc = subprocess.Popen(
            ["go", "build", "-trimpath", "-o", str(staging / BINARY_NAME), str(SOURCE)],
            env=_go_env(stores / "gocache"),
            cwd=staging,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a timeout kills the compiler and linker too
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException as exc:
            kill_group(proc)
            proc.communicate(timeout=10)
            if isinstance(exc, subprocess.TimeoutExpired):
                raise GoStoreBuildError(
                    f"go build of the Go store took over {timeout:g}s"
                ) from None
            raise
        if proc.returncode != 0:
            tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
            raise GoStoreBuildError(f"go build of {SOURCE} failed:\n{tail}")
        (staging / "build.json").write_text(
            json.dumps(
                {
                    "library": f"{LIBRARY_PACKAGE} {info.library_version}",
                    "go": info.go_version,
                    "source_sha256": info.source_sha256,
                },
                indent=1,
            )
            + "\n"
        )
        try:
            staging.rename(target.parent)
        except OSError:
            if not target.is_file():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def cached_builds(cache_dir: Path | None = None) -> list[Path]:
    """Every Go store binary in the cache, current or not, newest first."""
    found = _stores_dir(cache_dir).glob(f"{BINARY_NAME}-*/{BINARY_NAME}")
    return sorted((p for p in found if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True)
