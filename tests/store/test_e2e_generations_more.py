"""More end-to-end checks of the layer directory's ``blob`` across what podman does with a
lazily pulled image (save, push): the store mounted for real over a real docker-registry."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.store.images import add_file, busybox, make_tar, push, to_estargz

pytestmark = [pytest.mark.e2e]


@pytest.fixture
def small_root(tmp_path):
    """The store's ``--root`` on a 12 MiB tmpfs (its chunk cache and the blob's temporary
    file live there), unmounted afterwards."""
    root = tmp_path / "store" / "root"
    root.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(root)], check=True)
    yield root
    subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.mark.store_ours_only(reason="the blob's temporary file is ours")
def test_blob_read_after_a_full_disk_is_the_exact_blob(registry, store_factory, small_root):
    """A blob download that ran out of disk space half way fails that read (EIO); once space
    is back the next read resumes, and what it serves is the blob, byte for byte — not the
    resumed part shifted by what the failed write left in the temporary file."""
    payload = os.urandom(8 << 20)  # incompressible: a blob of about 8 MiB, two 4 MiB windows
    tar = make_tar(lambda t: (busybox(t), add_file(t, "payload", payload)))
    blob = to_estargz(tar)
    push(registry.host, "full/img", "1", [blob])
    ref = f"{registry.host}/full/img:1"
    store = store_factory("noprefetch = true\nno_background_fetch = true\n")
    layer = store.layer_dir(ref, blob.digest)
    assert os.stat(layer / "diff") is not None
    # Leave about 5 MiB: the first window fits, the second is cut by ENOSPC part way.
    filler = small_root / "filler"
    free = os.statvfs(small_root).f_bavail * os.statvfs(small_root).f_frsize
    filler.write_bytes(b"\0" * (free - (5 << 20)))
    with pytest.raises(OSError), open(layer / "blob", "rb") as f:
        f.read()
    assert "writing the blob's temporary file" in store.log.read_text()  # not a traceback
    filler.unlink()
    with open(layer / "blob", "rb") as f:
        assert f.read() == blob.data
