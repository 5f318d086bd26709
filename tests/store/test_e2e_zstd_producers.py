"""zstd:chunked images as real producers write them, pulled lazily through the mounted store
and compared with a normal pull of the same layer tars.

Producers: skopeo on the host (containers/storage 1.43, podman 4.3's compressor; podman 4.3's
own ``push --compression-format zstd:chunked`` reuses the gzip blobs the registry already has
and cannot be forced) and ``podman push --compression-format zstd:chunked --force-compression``
from the podman 5.4 (trixie) and 5.8 (sid) nodes. Every podman generation pulls each image it
can look up (podman ≥ 5.1 only by the ``io.github.`` TOC annotation the 5.x producers write).

The layers hold what real images hold: files larger than one chunk (containers/storage's
rolling-checksum split), runs of zeros (its ``zeros`` chunks), many identical files, hardlinks
(to a chunked and to an empty file; 300 across directories to files of several chunks),
symlinks (relative, absolute, dangling, pointing out of the root, long), empty files, xattrs,
setuid/setgid/sticky modes, owners, a fifo and devices, a deep directory, non-ASCII and long
names, mtimes with a fraction of a second, and a whiteout and an opaque directory in the
upper layer. (A run of zeros longer than ``chunk_max_bytes`` is one ``zeros`` chunk there: the
store refuses such a layer, as store/config.py documents, and podman pulls it normally.)

Mtimes before 1970 are in: extraction sets a file's or directory's to the epoch
(containers/storage ``pkg/system.Chtimes``) but keeps a symlink's, and the store shows them
the same way. Left out, as the normal pulls disagree among themselves, not with the store: an
xattr with an empty value (containers/storage 1.43 drops it, both from the TOC skopeo writes
and when podman 4.3 extracts a tar; podman 5 keeps it, and so does the store when the TOC has
it).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import tarfile
from pathlib import Path

import pytest

from harness.podman import PodmanEnv
from tests.shapes.model import list_tree
from tests.store.conftest import lost_lazy_layers
from tests.store.images import (
    add_file,
    add_node,
    busybox,
    full_blob_gets,
    make_tar,
    push,
    to_gzip,
    to_zstd_chunked_skopeo,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.store_ours_only(
        reason="the Go store v0.12 reads a zstd:chunked layer only with a stargz TOC-digest "
        "annotation"
    ),
]

# The container's view: type, mode, owner, size, links, device numbers, and the content's
# sha256 or the link's target (busybox has no getfattr: xattrs come from `podman image mount`).
LISTING = (
    "cd / && find / -xdev ! -path '/proc*' ! -path '/sys*' ! -path /dev ! -path '/dev/*' "
    "! -path '/run*' ! -path /etc/hosts ! -path /etc/hostname ! -path /etc/resolv.conf "
    "| sort | while read p; "
    "do s=$(stat -c '%F %a %u %g %s %h %t:%T' \"$p\"); "
    'if [ -L "$p" ]; then h=$(/bin/busybox readlink "$p"); '
    'elif [ -f "$p" ]; then h=$(sha256sum "$p" | cut -c1-64); else h=-; fi; '
    'echo "$p|$s|$h"; done'
)
FRACTION = 1_700_000_000.1234567  # a built file's mtime has a fraction (tarfile: 7 digits)
BEFORE_1970 = -86400  # 1969-12-31: extraction clamps a file's or directory's to the epoch


def _lower(tar: tarfile.TarFile) -> None:
    rng = random.Random(11)
    big = bytes(rng.getrandbits(8) for _ in range(1_500_000))
    busybox(tar)
    add_file(tar, "big", big, mtime=FRACTION)
    noise = bytes(rng.getrandbits(8) for _ in range(70_000))
    add_file(tar, "sparse", b"head" * 1000 + b"\0" * (3 << 20) + noise + b"\0" * (5 << 20) + b"t")
    add_file(tar, "allzeros", b"\0" * (2 << 20))
    add_file(tar, "empty")
    add_node(tar, "same", tarfile.DIRTYPE)
    for i in range(30):
        add_file(tar, f"same/f{i:02d}", b"identical content\n" * 50)
    add_node(tar, "hl", tarfile.DIRTYPE, mtime=FRACTION)
    add_file(tar, "hl/orig", b"hardlinked\n")
    add_node(tar, "hl/link1", tarfile.LNKTYPE, 0o644, linkname="hl/orig")
    add_node(tar, "hl/link2", tarfile.LNKTYPE, 0o644, linkname="hl/orig")
    add_node(tar, "hl/big", tarfile.LNKTYPE, 0o644, linkname="big")
    add_node(tar, "hl/empty", tarfile.LNKTYPE, 0o644, linkname="empty")
    for d in range(3):  # many links, across directories, to files of several chunks
        add_node(tar, f"farm{d}", tarfile.DIRTYPE)
        for i in range(100):
            target = "sparse" if i % 2 else "allzeros"
            add_node(tar, f"farm{d}/{i}", tarfile.LNKTYPE, 0o644, linkname=target)
    add_node(tar, "sl", tarfile.DIRTYPE)
    for name, target in [
        ("rel", "../big"),
        ("abs", "/etc/passwd"),
        ("dangling", "nowhere/at/all"),
        ("outside", "../../../../../../etc/shadow"),
        ("long", "x/" * 150 + "y"),
        ("dir", "/same"),
    ]:
        add_node(tar, f"sl/{name}", tarfile.SYMTYPE, 0o777, linkname=target, mtime=FRACTION)
    add_node(tar, "modes", tarfile.DIRTYPE, 0o1777)
    add_file(tar, "modes/suid", b"#!/bin/sh\n", 0o4755)
    add_file(tar, "modes/sgid", b"#!/bin/sh\n", 0o2755)
    add_file(tar, "modes/none", b"x", 0o000)
    add_file(tar, "modes/owned", b"o", 0o640, uid=1234, gid=5678, uname="", gname="")
    add_node(tar, "devs", tarfile.DIRTYPE)
    add_node(tar, "devs/fifo", tarfile.FIFOTYPE, 0o644)
    add_node(tar, "devs/null2", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3)
    add_node(tar, "devs/blk", tarfile.BLKTYPE, 0o660, devmajor=7, devminor=0)
    add_node(tar, "x", tarfile.DIRTYPE)
    capability = "\x01\x00\x00\x02\x00\x04" + "\x00" * 14
    xattrs = {"SCHILY.xattr.user.foo": "bar", "SCHILY.xattr.security.capability": capability}
    add_file(tar, "x/attr", b"with xattrs\n", pax_headers=xattrs)
    deep = [f"d{i}" for i in range(40)]
    for i in range(1, len(deep) + 1):
        add_node(tar, "/".join(deep[:i]), tarfile.DIRTYPE)
    add_file(tar, "/".join(deep) + "/leaf", b"deep\n")
    add_node(tar, "names", tarfile.DIRTYPE)
    for name in [
        "ünïcödé",
        "日本語ファイル",
        "with space",
        "emoji😀",
        "L" * 200,
        "a" * 255,
        "-dash",
    ]:
        add_file(tar, f"names/{name}", name.encode())
    add_node(tar, "wo", tarfile.DIRTYPE)
    add_file(tar, "wo/gone", b"gone\n")
    add_file(tar, "wo/stays", b"stays\n")
    add_node(tar, "opq", tarfile.DIRTYPE)
    add_file(tar, "opq/old", b"old\n")
    add_node(tar, "etc", tarfile.DIRTYPE)
    add_file(tar, "etc/passwd", b"root:x:0:0::/:/bin/sh\n")
    add_node(tar, "old", tarfile.DIRTYPE, mtime=BEFORE_1970)
    add_file(tar, "old/file", b"old\n", mtime=BEFORE_1970)
    add_node(tar, "old/link", tarfile.SYMTYPE, 0o777, linkname="file", mtime=BEFORE_1970)


def _upper(tar: tarfile.TarFile) -> None:
    add_node(tar, "wo", tarfile.DIRTYPE)
    add_file(tar, "wo/.wh.gone")
    add_node(tar, "opq", tarfile.DIRTYPE)
    add_file(tar, "opq/.wh..wh..opq")
    add_file(tar, "opq/new", b"new\n", mtime=FRACTION)
    add_file(tar, ".wh.empty")
    add_file(tar, "big", bytes(range(256)) * 5000)
    add_file(tar, "sparse2", b"\0" * (1 << 20) + b"x" + b"\0" * 100)


@pytest.fixture(scope="module")
def shape_tars() -> list[bytes]:
    return [make_tar(_lower), make_tar(_upper)]


def _mounted_tree(env: PodmanEnv, ref: str) -> dict:
    """``podman image mount`` listing (xattrs, nlink, rdev) plus every path's mtime in ns."""
    root = env.host_path(env.podman("image", "mount", ref, timeout=60).stdout.strip())
    try:
        assert (root / "bin").is_dir(), root
        tree = list_tree(root)
        return {p: (*row, os.lstat(root / p).st_mtime_ns) for p, row in tree.items() if p}
    finally:
        env.podman("image", "unmount", "--force", ref, timeout=60, check=False)


def _produce(producer: str, host: str, tars: list[bytes], tmp_path: Path) -> list:
    """Push the tars as ``HOST/p/z:1`` in zstd:chunked by ``producer``; the pushed blobs (for
    skopeo; the node's podman push leaves them in the registry only)."""
    ref = f"{host}/p/z:1"
    if producer == "skopeo-host":
        blobs = to_zstd_chunked_skopeo(tars, tmp_path / "skopeo")
        push(host, "p/z", "1", blobs)
        return blobs
    from harness.runtimes import NodeError, build_node

    try:
        node = build_node(producer.split("-")[1])
    except NodeError as exc:
        pytest.fail(f"building runtime node for {producer}: {exc}")
    with PodmanEnv(tmp_path / "producer", insecure_registries=[host], node=node) as env:
        env.pull(f"{host}/p/g:1", timeout=120)
        env.podman(
            "push",
            "--compression-format",
            "zstd:chunked",
            "--force-compression",
            f"{host}/p/g:1",
            f"docker://{ref}",
            timeout=300,
        )
    return []


@pytest.mark.parametrize("producer", ["skopeo-host", "podman-trixie", "podman-sid"])
def test_lazy_pull_of_a_real_producers_layers_matches_a_normal_pull(
    registry, store_factory, tmp_path, podman_env, runtime_node, producer, shape_tars
):
    if producer != "skopeo-host" and shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap not installed (ci/install-system-deps)")
    if producer == "skopeo-host" and runtime_node is not None:
        pytest.skip("podman >= 5.1 looks up only the io.github. TOC annotation (podman 5's)")
    host = registry.host
    push(host, "p/g", "1", [to_gzip(t) for t in shape_tars])
    blobs = _produce(producer, host, shape_tars, tmp_path)
    ref = f"{host}/p/z:1"
    store = store_factory("noprefetch = true\nno_background_fetch = true\n")
    lost = lost_lazy_layers(runtime_node)
    mark = registry.log_mark()
    with podman_env(
        tmp_path / "lazy", additional_layer_store=store.mnt, insecure_registries=[host]
    ) as env:
        env.pull(ref, timeout=120)
        assert len(store.status()["layers"]) == 2  # both layers came from the store
        lazy = env.run(ref, "/bin/sh", "-c", LISTING, timeout=300).stdout
        # podman >= 5.5 forgets the image after the pull (documented): no mount to list.
        lazy_tree = None if lost else _mounted_tree(env, ref)
    assert full_blob_gets(registry, mark, blobs) == []
    with podman_env(tmp_path / "full", insecure_registries=[host]) as env:
        env.pull(f"{host}/p/g:1", timeout=120)
        full = env.run(f"{host}/p/g:1", "/bin/sh", "-c", LISTING, timeout=300).stdout
        full_tree = None if lost else _mounted_tree(env, f"{host}/p/g:1")
    assert "/hl/big|regular file 644 0 0 1500000 2 " in full and "/opq/new|" in full
    assert "/farm2/99|regular file 644 0 0 8462609 151 " in full
    lazy_set, full_set = set(lazy.splitlines()), set(full.splitlines())
    assert lazy_set == full_set, (sorted(lazy_set - full_set), sorted(full_set - lazy_set))
    if lazy_tree is not None:
        assert full_tree is not None and full_tree["hl"][-1] == 1_700_000_000_123_456_700
        diff = {
            p for p in lazy_tree.keys() | full_tree.keys() if lazy_tree.get(p) != full_tree.get(p)
        }
        assert not diff, {p: (lazy_tree.get(p), full_tree.get(p)) for p in sorted(diff)}


def test_a_name_that_is_not_utf8_is_not_served_renamed(registry, store_factory, tmp_path):
    """A tar name that is not UTF-8 (``latin\\xe9.txt``, a Latin-1 name) cannot be written in
    the JSON TOC: containers/storage's writer (Go ``encoding/json``) writes ``\\ufffd`` in its
    place, so the TOC names a file that is not in the layer. The store refuses the layer (as
    containers/storage ≥ 1.55 refuses it for its own partial pull, "tar-split and TOC data is
    inconsistent") and podman 4.3 pulls it normally: the container sees the tar's name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        busybox(tar)
        add_file(tar, "latin\udce9.txt", b"abc")  # the byte 0xe9, surrogate-escaped
        add_node(tar, "link", tarfile.SYMTYPE, 0o777, linkname="target\udcff")
    blobs = to_zstd_chunked_skopeo([buf.getvalue()], tmp_path / "skopeo")
    host = registry.host
    push(host, "latin/img", "1", blobs)
    ref = f"{host}/latin/img:1"
    store = store_factory("noprefetch = true\nno_background_fetch = true\n")
    listing = (
        "/bin/find / -maxdepth 1 -name 'lat*' | /bin/busybox od -An -c; "
        "/bin/busybox readlink /link | /bin/busybox od -An -c"
    )
    with PodmanEnv(
        tmp_path / "lazy", additional_layer_store=store.mnt, insecure_registries=[host]
    ) as env:
        env.pull(ref, timeout=120)
        out = env.run(ref, "/bin/sh", "-c", listing, timeout=60).stdout
        assert store.status()["layers"] == {}  # pulled normally
    assert "refusing layer" in store.log.read_text()
    assert "/   l   a   t   i   n 351   .   t   x   t" in out, out  # \351 = 0xe9
    assert "t   a   r   g   e   t 377" in out, out
