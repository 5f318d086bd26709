"""Build the Go reference tools under ``tests/**/go*/main.go`` against Debian's
golang-github-containerd-stargz-snapshotter-dev (GOPATH mode, no module download), once per
session. ``ci/install-system-deps`` installs Go and the library."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

GOPATH = Path("/usr/share/gocode")
LIBRARY = GOPATH / "src/github.com/containerd/stargz-snapshotter/estargz"
TESTS = Path(__file__).resolve().parent


def available() -> bool:
    return shutil.which("go") is not None and LIBRARY.is_dir()


def build(src_dir: str, out_dir: Path) -> Path:
    """Compile ``tests/<src_dir>/main.go`` into ``out_dir``; returns the binary's path."""
    src = TESTS / src_dir / "main.go"
    out = out_dir / src.parent.name
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": str(GOPATH),
        "GOFLAGS": "",
        "GOCACHE": str(out_dir / "gocache"),
    }
    subprocess.run(["go", "build", "-o", str(out), str(src)], check=True, env=env, timeout=300)
    return out
