"""Who may read the mounted store: root and the store's own user, not any other local user.

The mount is ``allow_other`` without ``default_permissions``, so every local user could read
every file of every layer through it, and its compressed ``blob``, whatever their modes (a
0600 ``etc/shadow`` of an image included), where a normal pull keeps layers under
``/var/lib/containers/storage`` (0700). ``serve_all_users = true`` serves everyone again,
for a store shared on purpose. Run as root: the other user is ``nobody`` (``runuser``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.store import images
from tests.store.mounted import MountedStore, mounted_store

pytestmark = pytest.mark.e2e

SECRET = b"root:$6$secrethash:19000:0:99999:7:::\n"


def _shadow_layer(tar: tarfile.TarFile) -> None:
    images.add_node(tar, "etc", tarfile.DIRTYPE, mode=0o700)
    images.add_file(tar, "etc/shadow", SECRET, mode=0o600)
    images.add_file(tar, "etc/motd", b"hello\n", mode=0o644)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory ``nobody`` may pass through (pytest's own are 0700), removed afterwards."""
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("reads as user nobody with runuser: needs root")
    work = Path(tempfile.mkdtemp(prefix="lazybench-users-"))
    work.chmod(0o711)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", *argv], capture_output=True, timeout=30, cwd="/"
    )


def _serve(store: MountedStore) -> Path:
    """The layer directory of a pushed layer with a 0700 ``etc`` and a 0600 ``etc/shadow``."""
    diff, _ = store.serve(images.to_estargz(images.make_tar(_shadow_layer)).data)
    return diff.parent


@pytest.mark.parametrize("config", ["", "serve_all_users = true\n"])
def test_another_user_reads_nothing_through_the_mount_unless_served_on_purpose(
    workdir: Path, config: str
) -> None:
    with mounted_store(workdir, "noprefetch = true\n" + config) as store:
        layer = _serve(store)
        diff, blob = layer / "diff", layer / "blob"
        # root first: the kernel then holds the names, and nobody's opens must still be asked
        assert (diff / "etc/shadow").read_bytes() == SECRET
        assert sorted(os.listdir(diff / "etc")) == ["motd", "shadow"]
        assert blob.read_bytes()[:2] == b"\x1f\x8b"
        reads = {
            "0600 file": _as_nobody("cat", str(diff / "etc/shadow")),
            "0644 file": _as_nobody("cat", str(diff / "etc/motd")),
            "layer directory": _as_nobody("ls", str(diff)),
            "0700 directory": _as_nobody("ls", str(diff / "etc")),
            "blob": _as_nobody("head", "-c", "2", str(blob)),
            "info": _as_nobody("cat", str(layer / "info")),
            "status": _as_nobody("cat", str(store.store.mnt / "status")),
            "use": _as_nobody("touch", str(layer / "use")),  # a reference counted
        }
        if config:  # served: as the Go store serves every user
            ok = {what: r.returncode == 0 for what, r in reads.items() if what != "use"}
            assert all(ok.values()), {w: reads[w].stderr for w, v in ok.items() if not v}
            assert reads["0600 file"].stdout == SECRET
            assert reads["blob"].stdout == b"\x1f\x8b"
            assert not store.log_lines("refused (EACCES)")
        else:
            for what, r in reads.items():
                assert r.returncode != 0 and not r.stdout, (what, r)
                assert b"Permission denied" in r.stderr, (what, r.stderr)
            assert store.log_lines("uid 65534 refused (EACCES)")
        # root still reads everything
        assert (diff / "etc/shadow").read_bytes() == SECRET
        assert blob.read_bytes()[:2] == b"\x1f\x8b"
