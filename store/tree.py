"""A layer's file tree, built from its TOC with the overlayfs conventions, without FUSE.

Why a separate tree: the TOC lists tar entries; overlayfs wants a directory whose whiteouts are
0:0 character devices and whose opaque directories answer the opaque xattr. This module turns
one into the other once per layer, so the FUSE operations only look things up.

Conventions (DESIGN.md §3): ``.wh.<name>`` is hidden and shown as a char device 0:0 named
``<name>``; ``.wh..wh..opq`` is hidden and marks its directory opaque (answers
``trusted.overlay.opaque`` and ``user.overlay.opaque`` with ``y``); the landmark files
``.prefetch.landmark`` / ``.no.prefetch.landmark`` at the root are hidden. Hardlinks share one
node (``nlink`` counts the names); a directory's ``nlink`` is 2 + its subdirectories.

Memory matters (a layer can hold 100,000 entries): nodes use ``__slots__`` and regular files
keep a reference to the TOC entry for their chunks rather than a copy.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
LANDMARKS = {".prefetch.landmark", ".no.prefetch.landmark"}
OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")

_TYPE_BITS = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


class TreeError(ValueError):
    """The TOC describes something that cannot be a file tree (e.g. a dangling hardlink)."""


class Node:
    """One inode of a layer tree. ``index`` is its position, the inode is ``base + index``."""

    __slots__ = (
        "children",
        "entry",
        "gid",
        "index",
        "mode",
        "mtime",
        "nlink",
        "opaque",
        "rdev",
        "size",
        "target",
        "uid",
        "xattrs",
    )

    def __init__(self, index: int, mode: int) -> None:
        self.index = index
        self.mode = mode
        self.uid = 0
        self.gid = 0
        self.size = 0
        self.mtime = 0
        self.rdev = 0
        self.nlink = 1
        self.children: dict[bytes, Node] | None = {} if stat.S_ISDIR(mode) else None
        if self.children is not None:
            self.size = 4096  # what ext4/xfs show; tools comparing trees expect it
        self.entry: Any = None  # the TOC entry of a regular file (for its chunks)
        self.target: bytes = b""  # symlink target
        self.xattrs: dict[bytes, bytes] | None = None
        self.opaque = False

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    def getxattr(self, name: bytes) -> bytes | None:
        if self.opaque and name in OPAQUE_XATTRS:
            return b"y"
        if self.xattrs:
            return self.xattrs.get(name)
        return None

    def listxattr(self) -> list[bytes]:
        names = list(self.xattrs or ())
        if self.opaque:
            names += [n for n in OPAQUE_XATTRS if n not in names]
        return names


@dataclass(frozen=True)
class EntryView:
    """The fields of a TOC entry the tree needs, independent of the format module's names."""

    name: str
    type: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime: int
    link_name: str
    dev_major: int
    dev_minor: int
    xattrs: dict[str, bytes]


class LayerTree:
    """The nodes of one layer; ``nodes[i]`` has inode ``base + i``; ``nodes[0]`` is the root."""

    def __init__(self, entries: Iterable[tuple[EntryView, Any]]) -> None:
        self.nodes: list[Node] = []
        # A tar that does not name "./" gets a 0555 layer root from containers/storage.
        self.root = self._new(stat.S_IFDIR | 0o555)
        self._paths: dict[int, str] | None = None
        for view, raw in entries:
            self._add(view, raw)
        self._count_dir_links(self.root)

    def _new(self, mode: int) -> Node:
        node = Node(len(self.nodes), mode)
        self.nodes.append(node)
        return node

    def _dir_for(self, parts: list[str]) -> Node:
        node = self.root
        for part in parts:
            key = part.encode("utf-8", "surrogateescape")
            assert node.children is not None
            child = node.children.get(key)
            if child is None or not child.is_dir:
                child = self._new(stat.S_IFDIR | 0o755)
                node.children[key] = child
            node = child
        return node

    def lookup_path(self, path: str) -> Node | None:
        node = self.root
        for part in _split(path):
            if node.children is None:
                return None
            found = node.children.get(part.encode("utf-8", "surrogateescape"))
            if found is None:
                return None
            node = found
        return node

    def _add(self, e: EntryView, raw: Any) -> None:
        parts = _split(e.name)
        if not parts:
            if e.type == "dir":
                _apply(self.root, e)
            return
        parent = self._dir_for(parts[:-1])
        base = parts[-1]
        assert parent.children is not None
        if len(parts) == 1 and base in LANDMARKS:
            return
        if base == OPAQUE_MARKER:
            parent.opaque = True
            return
        if base.startswith(WHITEOUT_PREFIX):
            node = self._new(stat.S_IFCHR)
            node.uid, node.gid, node.mtime = e.uid, e.gid, e.mtime
            parent.children[base[len(WHITEOUT_PREFIX) :].encode("utf-8", "surrogateescape")] = node
            return
        key = base.encode("utf-8", "surrogateescape")
        if e.type == "hardlink":
            target = self.lookup_path(e.link_name)
            if target is None or target.is_dir:
                raise TreeError(f"hardlink {e.name!r} points to missing {e.link_name!r}")
            target.nlink += 1
            parent.children[key] = target
            return
        if e.type not in _TYPE_BITS:
            raise TreeError(f"entry {e.name!r} has unknown type {e.type!r}")
        existing = parent.children.get(key)
        if e.type == "dir" and existing is not None and existing.is_dir:
            _apply(existing, e)  # a directory named after its children were seen
            return
        node = self._new(_TYPE_BITS[e.type])
        _apply(node, e)
        if e.type == "reg":
            node.entry = raw
        elif e.type == "symlink":
            node.target = e.link_name.encode("utf-8", "surrogateescape")
            node.size = len(node.target)
        parent.children[key] = node

    def _count_dir_links(self, root: Node) -> None:
        stack = [root]
        while stack:
            node = stack.pop()
            assert node.children is not None
            subdirs = [c for c in node.children.values() if c.is_dir]
            node.nlink = 2 + len(subdirs)
            stack.extend(subdirs)

    def path_of(self, node: Node) -> str:
        """A path of ``node`` (built on first use: only the access trace needs it)."""
        if self._paths is None:
            self._paths = {}
            for path, n in self.walk():
                self._paths.setdefault(n.index, path)
        return self._paths.get(node.index, "")

    def walk(self) -> Iterable[tuple[str, Node]]:
        """``(path, node)`` for every name in the tree, parents before children."""
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                for name, child in sorted(node.children.items(), reverse=True):
                    stack.append(
                        (f"{path}/{name.decode('utf-8', 'surrogateescape')}".lstrip("/"), child)
                    )


def _split(name: str) -> list[str]:
    return [p for p in name.split("/") if p not in ("", ".")]


def _apply(node: Node, e: EntryView) -> None:
    node.mode = stat.S_IFMT(node.mode) | (e.mode & 0o7777)
    node.uid, node.gid, node.mtime = e.uid, e.gid, e.mtime
    if e.type == "reg":
        node.size = e.size
    if e.type in ("char", "block"):
        node.rdev = _makedev(e.dev_major, e.dev_minor)
    if e.xattrs:
        node.xattrs = {k.encode("utf-8", "surrogateescape"): v for k, v in e.xattrs.items()}


def _makedev(major: int, minor: int) -> int:
    import os

    return os.makedev(major, minor)
