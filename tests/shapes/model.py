"""Small multi-layer images as data, their layer tars, and the tree the OCI image spec defines.

An :class:`Image` is a list of layers; a layer is a list of :class:`Entry` in tar order. Entries
serialise to JSON (the regression files in ``regressions/``) and to a PAX tar.

:func:`spec_tree` is the reference for layers a normal pull refuses: it applies each layer's tar
entries in order with extraction's rules (the later entry of a name wins; a non-directory over
a directory removes what was under it; a directory re-declared keeps its children, takes the
later mode and owner and accumulates xattrs; an owner id of 2**32-1 leaves that id as it was,
root's or a set-group-ID parent's group for a new inode), then the OCI image spec's layer rules
(image-spec ``layer.md``: a whiteout ``.wh.NAME`` hides ``NAME`` in lower layers only; an opaque
marker ``.wh..wh..opq`` hides its directory's lower children; entries of the same layer stay),
then merges the layers the way overlayfs shows them. It answers ``None`` where no tree exists:
a hardlink to nothing (or to a directory, or to a path under the name it replaces) in its
layer, an entry under a non-directory (but a whiteout, or an opaque marker right under a
file, device or fifo: extraction ignores them).

A listing row (:data:`Row`) is what the comparison sees of one path: type, permission bits
with suid/sgid/sticky, owner, size, content sha256 or link target or device numbers, xattrs,
and the link count of regular files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

WH = ".wh."
OPQ = ".wh..wh..opq"
XATTR = "SCHILY.xattr."
MTIME = 1_700_000_000
NO_ID = 2**32 - 1  # an owner id lchown takes as "leave it as it is"

# (type, mode, uid, gid, size, body, xattrs, nlink)
Row = tuple[str, int | None, int, int, int | None, Any, tuple[tuple[str, str], ...], int | None]
Listing = dict[str, Row]


@dataclass
class Entry:
    """One tar entry. ``kind``: file dir symlink hardlink char block fifo whiteout opaque."""

    kind: str
    name: str  # path without leading "./"; "" is the layer root (a dir entry "./")
    data: str = ""  # file content (UTF-8 text, kept readable in regression files)
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""  # symlink target / hardlink target path
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, str] = field(default_factory=dict)

    @property
    def tar_name(self) -> str:
        if self.kind == "whiteout":
            parent, _, base = self.name.rpartition("/")
            return f"{parent}/{WH}{base}".lstrip("/")
        if self.kind == "opaque":
            return f"{self.name}/{OPQ}".lstrip("/")
        return self.name or "."


Layer = list[Entry]
Image = list[Layer]


def dumps(image: Image, **meta: Any) -> str:
    return json.dumps(
        {**meta, "layers": [[asdict(e) for e in layer] for layer in image]},
        ensure_ascii=False,
        indent=1,
    )


def loads(text: str) -> tuple[Image, dict[str, Any]]:
    doc = json.loads(text)
    layers = [
        [Entry(**{**e, "dev": tuple(e.get("dev", (0, 0)))}) for e in layer]
        for layer in doc.pop("layers")
    ]
    return layers, doc


def to_tar(layer: Layer) -> bytes:
    """The layer as an uncompressed PAX tar, entries in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in layer:
            ti = tarfile.TarInfo(e.tar_name)
            ti.mtime, ti.mode, ti.uid, ti.gid = MTIME, e.mode, e.uid, e.gid
            payload = b""
            if e.kind == "file":
                payload = e.data.encode()
            elif e.kind in ("whiteout", "opaque"):
                ti.mode = 0o644
            elif e.kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif e.kind == "symlink":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, e.link, 0o777
            elif e.kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, e.link
            elif e.kind in ("char", "block"):
                ti.type = tarfile.CHRTYPE if e.kind == "char" else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = e.dev
            elif e.kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            else:
                raise ValueError(f"unknown entry kind {e.kind!r}")
            if e.xattrs:
                ti.pax_headers = {XATTR + k: v for k, v in e.xattrs.items()}
            ti.size = len(payload)
            tar.addfile(ti, io.BytesIO(payload) if payload else None)
    return buf.getvalue()


# -- the reference tree ------------------------------------------------------------------------


class _Node:
    __slots__ = ("data", "dev", "gid", "kind", "link", "mode", "opaque", "uid", "xattrs")

    def __init__(self, kind: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        self.kind, self.mode, self.uid, self.gid = kind, mode, uid, gid
        self.data, self.link, self.dev = b"", "", (0, 0)
        self.xattrs: dict[str, str] = {}
        self.opaque = False


_KINDS = {
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
}
_HIDDEN = {".no.prefetch.landmark", ".prefetch.landmark", "stargz.index.json"}


def _clean(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


class _Refused(Exception):
    pass


def _layer_tree(
    tar_bytes: bytes, notes: set[str] | None = None
) -> tuple[dict[str, _Node], set[str]]:
    """One layer: path → node (hardlinks share a node), and the paths whited out below.
    ``notes`` collects the names of rare rules that applied (see :func:`layer_notes`)."""
    notes = set() if notes is None else notes
    tree: dict[str, _Node] = {"": _Node("dir", 0o555)}
    whiteouts: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        for ti in tar:
            name = _clean(ti.name)
            if name in _HIDDEN:
                continue
            kind = _KINDS[ti.type]
            xattrs = {k[len(XATTR) :]: v for k, v in ti.pax_headers.items() if k.startswith(XATTR)}
            if not name:
                # containers/storage skips a directory entry named "." (pkg/archive Unpack):
                # every layer root stays 0555 root:root, without xattrs
                continue
            parent, _, base = name.rpartition("/")
            if base == OPQ or base.startswith(WH):
                # Under a file, device or fifo of the layer extraction ignores a whiteout at
                # any depth (its mknod: ENOTDIR) and an opaque marker right under it (its
                # setxattr marks that inode); a deeper opaque marker fails it, as below.
                blocker = _non_dir_above(tree, parent)
                if blocker is not None and (base != OPQ or blocker == parent):
                    continue
            _ensure_dir(tree, parent, notes)
            if base == OPQ:
                tree[parent].opaque = True
                continue
            if base.startswith(WH):
                whiteouts.add(f"{parent}/{base[len(WH) :]}".lstrip("/"))
                continue
            if kind == "hardlink":
                link = _clean(ti.linkname)
                target = tree.get(link)
                if target is None or target.kind == "dir":
                    raise _Refused(f"hardlink {name!r} to missing {ti.linkname!r}")
                if link.startswith(name + "/"):  # removed with the directory the link replaces
                    raise _Refused(f"hardlink {name!r} to {ti.linkname!r}, under itself")
                _remove(tree, name)
                tree[name] = target
                # extraction chowns and chmods the shared inode from the link's header; the
                # chown (made only when the ids differ: SafeLchown) drops a file capability
                if (ti.uid, ti.gid) != (target.uid, target.gid):
                    target.xattrs.pop("security.capability", None)
                target.mode = ti.mode
                target.uid, target.gid = _ids(ti, target.uid, target.gid)
                continue
            old = tree.get(name)
            if kind == "dir" and old is not None and old.kind == "dir":
                old.mode = ti.mode
                old.uid, old.gid = _ids(ti, old.uid, old.gid)
                old.xattrs.update(xattrs)
                continue
            _remove(tree, name)
            # a new inode is root's, in a set-group-ID directory of the directory's group
            up = tree[parent]
            node = _Node(kind, ti.mode, *_ids(ti, 0, up.gid if up.mode & stat.S_ISGID else 0))
            node.xattrs = xattrs
            if kind == "reg":
                f = tar.extractfile(ti)
                node.data = f.read() if f else b""
            elif kind == "symlink":
                node.link = ti.linkname
            elif kind in ("char", "block"):
                node.dev = (ti.devmajor, ti.devminor)
            tree[name] = node
    return tree, whiteouts


def _ids(ti: tarfile.TarInfo, uid: int, gid: int) -> tuple[int, int]:
    """The owner ``lchown`` leaves from ``ti``'s ids over ``uid``/``gid``: an id of
    :data:`NO_ID` changes nothing."""
    return (uid if ti.uid == NO_ID else ti.uid, gid if ti.gid == NO_ID else ti.gid)


def _non_dir_above(tree: dict[str, _Node], path: str) -> str | None:
    """The first of ``path`` and its parents, from the root down, that the layer holds as a
    file, device or fifo (not a symlink: extraction follows it), else None."""
    parts = path.split("/") if path else []
    for i in range(1, len(parts) + 1):
        node = tree.get("/".join(parts[:i]))
        if node is None:
            return None
        if node.kind not in ("dir", "symlink"):
            return "/".join(parts[:i])
    return None


def _ensure_dir(tree: dict[str, _Node], path: str, notes: set[str]) -> None:
    """Parents an entry needs, made as extraction makes them (``mkdir -p``, mode 0755): under
    a set-group-ID directory the kernel gives a new directory the set-group-ID bit too."""
    parts = path.split("/") if path else []
    for i in range(1, len(parts) + 1):
        p = "/".join(parts[:i])
        node = tree.get(p)
        if node is None:
            setgid = tree["/".join(parts[: i - 1])].mode & stat.S_ISGID
            tree[p] = _Node("dir", 0o755 | setgid)
            if setgid:
                notes.add("implicit-setgid")
        elif node.kind != "dir":
            raise _Refused(f"{p!r} is not a directory")


def _remove(tree: dict[str, _Node], name: str) -> None:
    if tree.pop(name, None) is not None:
        for p in [p for p in tree if p.startswith(name + "/")]:
            del tree[p]


def spec_tree(layer_tars: list[bytes]) -> Listing | None:
    """The merged tree the spec defines for these layers (bottom first), or ``None``."""
    try:
        layers = [_layer_tree(t) for t in layer_tars]
    except _Refused:
        return None
    nlinks = []
    for tree, _ in layers:
        counts: dict[int, int] = {}
        for node in tree.values():
            counts[id(node)] = counts.get(id(node), 0) + 1
        nlinks.append(counts)
    out: Listing = {}

    def resolve(path: str, top: int, bottom: int) -> None:
        """Show ``path`` from layer ``top`` down to ``bottom``, overlay-style."""
        dirs: list[int] = []
        for i in range(top, bottom - 1, -1):
            tree, whiteouts = layers[i]
            node = tree.get(path)
            if node is None:
                if path in whiteouts or _under_whiteout(path, whiteouts):
                    break
                continue
            if node.kind != "dir":
                if not dirs:
                    out[path] = _row(node, nlinks[i][id(node)])
                break
            dirs.append(i)
            if node.opaque or path in whiteouts:
                break
        if not dirs:
            return
        out[path] = _row(layers[dirs[0]][0][path], None)
        prefix = path + "/" if path else ""
        children = {
            p
            for i in dirs
            for p in layers[i][0]
            if p.startswith(prefix) and p != path and "/" not in p[len(prefix) :]
        }
        for child in sorted(children):
            resolve(child, dirs[0], dirs[-1])

    resolve("", len(layers) - 1, 0)
    return out


def _under_whiteout(path: str, whiteouts: set[str]) -> bool:
    return any(path.startswith(w + "/") for w in whiteouts)


def _row(node: _Node, nlink: int | None) -> Row:
    xattrs = tuple(sorted(node.xattrs.items()))
    if node.kind == "reg":
        body: Any = hashlib.sha256(node.data).hexdigest()
        return ("reg", node.mode & 0o7777, node.uid, node.gid, len(node.data), body, xattrs, nlink)
    if node.kind == "symlink":
        return ("symlink", None, node.uid, node.gid, None, node.link, (), None)
    body = list(node.dev) if node.kind in ("char", "block") else None
    return (node.kind, node.mode & 0o7777, node.uid, node.gid, None, body, xattrs, None)


# -- listing a mounted tree ----------------------------------------------------------------------

_STAT_KINDS = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "reg",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
}


def list_tree(root: Path) -> Listing:
    """Rows for every path under ``root`` (an image's mounted root filesystem)."""
    out: Listing = {}

    def row(path: Path) -> Row:
        st = path.lstat()
        kind = _STAT_KINDS[stat.S_IFMT(st.st_mode)]
        mode = stat.S_IMODE(st.st_mode)
        if kind == "symlink":
            return ("symlink", None, st.st_uid, st.st_gid, None, os.readlink(path), (), None)
        xattrs = tuple(
            sorted(
                (k, os.getxattr(path, k, follow_symlinks=False).decode("utf-8", "replace"))
                for k in os.listxattr(path, follow_symlinks=False)
            )
        )
        if kind == "reg":
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            return ("reg", mode, st.st_uid, st.st_gid, st.st_size, digest, xattrs, st.st_nlink)
        body: Any = (
            [os.major(st.st_rdev), os.minor(st.st_rdev)] if kind in ("char", "block") else None
        )
        return (kind, mode, st.st_uid, st.st_gid, None, body, xattrs, None)

    out[""] = row(root)
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            try:
                out[str(p.relative_to(root))] = row(p)
            except FileNotFoundError:
                # overlayfs lists a whiteout kept inside an opaque lower directory (it reads
                # such a directory as it is) but answers ENOENT for it: not a file, skipped.
                continue
    return out


def layer_notes(tar_bytes: bytes) -> set[str]:
    """Rare rules extracting this layer meets: ``refused: WHY`` where no tree exists for it,
    ``implicit-setgid`` where a directory the tar does not name is made under a set-group-ID
    directory (and so is set-group-ID itself)."""
    notes: set[str] = set()
    try:
        _layer_tree(tar_bytes, notes)
    except _Refused as exc:
        notes.add(f"refused: {exc}")
    return notes
