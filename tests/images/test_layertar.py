"""Layer tars from file specs and from overlayfs upperdirs: OCI whiteouts, links, xattrs."""

from __future__ import annotations

import hashlib
import os
import tarfile

import pytest

from harness.images.layertar import LayerTarError, specs_to_tar, tar_names, tree_to_tar
from harness.images.recipes import FileSpec


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar}


def test_specs_whiteout_opaque_symlink(tmp_path):
    out = tmp_path / "l.tar"
    diff_id = specs_to_tar(
        [
            FileSpec("a", "dir", mode=0o755),
            FileSpec("a/f", data=b"x", mode=0o600, uid=7, gid=8),
            FileSpec("a/gone", "whiteout"),
            FileSpec("top", "whiteout"),
            FileSpec("a/o", "opaque"),
            FileSpec("a/l", "symlink", target="f"),
        ],
        out,
    )
    assert diff_id == "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()
    m = _members(out)
    assert set(m) == {".", "a", "a/f", "a/.wh.gone", ".wh.top", "a/o", "a/o/.wh..wh..opq", "a/l"}
    assert (m["a/f"].mode, m["a/f"].uid, m["a/f"].gid, m["a/f"].size) == (0o600, 7, 8, 1)
    assert m["a/l"].issym() and m["a/l"].linkname == "f"
    # deterministic: the same specs make the same bytes
    again = tmp_path / "again.tar"
    one = [FileSpec("a", "dir")]
    assert specs_to_tar(one, again) == specs_to_tar(one, again)


def test_bad_spec_is_named(tmp_path):
    with pytest.raises(LayerTarError, match="bogus"):
        specs_to_tar([FileSpec("x", "bogus")], tmp_path / "x.tar")


def test_upperdir_whiteouts_opaque_hardlinks_xattrs(tmp_path):
    """An overlayfs upperdir as the kernel writes it becomes OCI whiteout entries."""
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "conf").write_text("c")
    os.link(upper / "etc" / "conf", upper / "etc" / "conf2")
    os.mknod(upper / "etc" / "deleted", 0o020000 | 0o600, os.makedev(0, 0))
    os.mknod(upper / "etc" / "realdev", 0o020000 | 0o600, os.makedev(1, 3))
    opq = upper / "var" / "opq"
    opq.mkdir(parents=True)
    os.setxattr(opq, "trusted.overlay.opaque", b"y")
    (opq / "new").write_text("n")
    (upper / "skip").mkdir()
    (upper / "skip" / "x").write_text("x")
    (upper / "bin").mkdir()
    (upper / "bin" / "cap").write_text("#!")
    os.setxattr(upper / "bin" / "cap", "user.lazybench", b"\x01\x00binary")
    out = tmp_path / "u.tar"
    tree_to_tar(upper, out, exclude=lambda n, d: n == "skip", overlay_upper=True)
    m = _members(out)
    assert "etc/.wh.deleted" in m and "etc/deleted" not in m
    assert m["etc/realdev"].ischr() and m["etc/realdev"].devminor == 3
    assert "var/opq/.wh..wh..opq" in m and "var/opq/new" in m
    assert not any(n.startswith("skip") for n in m)
    links = [m["etc/conf"], m["etc/conf2"]]
    assert sum(x.islnk() for x in links) == 1
    assert (
        m["bin/cap"].pax_headers["SCHILY.xattr.user.lazybench"].encode("utf-8", "surrogateescape")
        == b"\x01\x00binary"
    )
    # the overlay xattr itself is not copied into the layer
    assert not any("overlay" in k for x in m.values() for k in x.pax_headers)
    assert tar_names(out)[:2] == ["", "bin"]  # the root, then sorted, parents first


def test_every_layer_names_its_root(tmp_path):
    """The first entry is ``./`` with the tree root's mode and owner (a layer that does not
    name its root gets a 0700 ``/`` from podman 4.3's zstd:chunked partial pull)."""
    tree = tmp_path / "tree"
    (tree / "usr").mkdir(parents=True)
    tree.chmod(0o751)
    os.chown(tree, 12, 34)
    out = tmp_path / "t.tar"
    tree_to_tar(tree, out)
    with tarfile.open(out) as tar:
        first = tar.next()
    assert (first.name, first.isdir(), first.mode, first.uid, first.gid) == (
        ".",
        True,
        0o751,
        12,
        34,
    )
    assert out.read_bytes()[:2] == b"./"  # the name on disk, as `tar -C tree .` writes it
    specs_to_tar([FileSpec("usr", "dir", mode=0o755)], out)
    with tarfile.open(out) as tar:
        first = tar.next()
    assert (first.name, first.isdir(), first.mode, first.uid, first.gid) == (".", True, 0o755, 0, 0)
    assert tar_names(out) == ["", "usr"]
