"""Layer shapes whose right tree is the OCI image spec's, checked with podman 4.3 pulling
lazily through the mounted store (a real registry, a real FUSE mount, real overlayfs)."""

from __future__ import annotations

import shutil
import tarfile

import pytest

from harness.podman import PodmanEnv
from tests.store.images import (
    add_file,
    add_node,
    busybox,
    full_blob_gets,
    make_tar,
    push,
    to_estargz,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed"),
]


@pytest.mark.store_ours_only(
    reason="the Go store v0.12 does not apply a whiteout of a directory its own layer also "
    "holds: the lower layer's case/a/file stays visible"
)
def test_same_layer_whiteout_hides_only_the_lower_layer(registry, store_factory, tmp_path):
    """Lower ``case/a/file``; upper ``case/``, ``case/a/``, ``case/a/newfile``, ``case/.wh.a``
    (whiteout after the directory it names). The whiteout deletes the lower ``case/a``; the
    upper layer's own ``case/a/newfile`` stays (OCI image spec, "Whiteouts")."""

    def lower(tar: tarfile.TarFile) -> None:
        busybox(tar)
        add_node(tar, "case", tarfile.DIRTYPE)
        add_node(tar, "case/a", tarfile.DIRTYPE)
        add_file(tar, "case/a/file", b"lower\n")
        add_node(tar, "case/b", tarfile.DIRTYPE)
        add_file(tar, "case/b/old", b"lower\n")

    def upper(tar: tarfile.TarFile) -> None:
        add_node(tar, "case", tarfile.DIRTYPE)
        add_node(tar, "case/a", tarfile.DIRTYPE)
        add_file(tar, "case/a/newfile", b"upper\n")
        add_file(tar, "case/.wh.a", b"")
        add_file(tar, "case/.wh.b", b"")  # whiteout first, then the same layer re-adds b
        add_node(tar, "case/b", tarfile.DIRTYPE)
        add_file(tar, "case/b/new", b"upper\n")

    host = registry.host
    blobs = [to_estargz(make_tar(lower)), to_estargz(make_tar(upper))]
    push(host, "shapes/wh", "1", blobs)
    ref = f"{host}/shapes/wh:1"
    store = store_factory()
    mark = registry.log_mark()
    with PodmanEnv(
        tmp_path / "lazy", additional_layer_store=store.mnt, insecure_registries=[host]
    ) as env:
        env.pull(ref, timeout=120)
        assert full_blob_gets(registry, mark, blobs) == []  # both layers served lazily
        out = env.run(ref, "/bin/sh", "-c", "find /case | sort; cat /case/a/newfile", timeout=120)
    assert out.stdout.split("\n") == [
        "/case",
        "/case/a",
        "/case/a/newfile",
        "/case/b",
        "/case/b/new",
        "upper",
        "",
    ]
