"""A layer's file tree as overlayfs wants it: a thin view over the validated index.

Why a view: the TOC lists tar entries; overlayfs wants a directory whose whiteouts are 0:0
character devices and whose opaque directories answer the opaque xattr. The format library
(:class:`store.estargz.LayerIndex`) owns the tree and every check on it; this module only
presents its entries with these conventions, computed when asked, so a 100,000-entry layer
costs nothing here beyond the index (nodes are small wrappers made per request).

Conventions (DESIGN.md §3; OCI image spec, "Representing Changes"):

* ``.wh.<name>`` is hidden and shown as a char device 0:0 named ``<name>`` — unless the same
  layer has an entry ``<name>`` in that directory, before or after the whiteout: a whiteout
  hides only *lower* layers' content, so the layer's own entry is shown, and a directory of
  that name becomes opaque (the lower one is deleted, the layer's own content stays);
* ``.wh..wh..opq`` is hidden and marks its directory opaque (answers ``trusted.overlay.opaque``
  and ``user.overlay.opaque`` with ``y``), wherever it stands among the directory's entries;
* the landmark files ``.prefetch.landmark`` / ``.no.prefetch.landmark`` at the root are hidden;
* hardlinks share one node (``nlink`` counts the names); a directory's ``nlink`` is 2 + its
  subdirectories; an implicit root (a tar that does not name ``./``) is 0555, as
  containers/storage makes it.

Inode numbering: node ``i`` is ``LayerIndex.entries[i]`` (root 0); a whiteout is its
``.wh.`` entry's number.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime

from store.estargz import LayerIndex
from store.estargz.index import Entry

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
    """The index holds something overlayfs cannot be shown (e.g. a directory named ``.wh.x``)."""


def _key(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


class Node:
    """One inode of a layer tree: an index entry, seen through the overlay conventions.

    Made per request (two references): equal when they show the same entry the same way.
    """

    __slots__ = ("entry", "tree", "whiteout")

    def __init__(self, tree: LayerTree, entry: Entry, whiteout: bool = False) -> None:
        self.tree = tree
        self.entry = entry
        self.whiteout = whiteout

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Node)
            and other.entry is self.entry
            and other.whiteout == self.whiteout
            and other.tree is self.tree
        )

    def __hash__(self) -> int:
        return hash((id(self.entry), self.whiteout))

    @property
    def index(self) -> int:
        return self.entry.ino

    @property
    def is_dir(self) -> bool:
        return not self.whiteout and self.entry.type == "dir"

    @property
    def mode(self) -> int:
        e = self.entry
        if self.whiteout:
            return stat.S_IFCHR
        if e is self.tree.index.root and e.implicit:
            return stat.S_IFDIR | 0o555
        return _TYPE_BITS[e.type] | (e.mode & 0o7777)

    @property
    def size(self) -> int:
        if self.whiteout:
            return 0
        e = self.entry
        if e.type == "dir":
            return 4096  # what ext4/xfs show; tools comparing trees expect it
        if e.type == "symlink":
            return len(_key(e.link_name))
        return e.size

    @property
    def uid(self) -> int:
        return self.entry.uid

    @property
    def gid(self) -> int:
        return self.entry.gid

    @property
    def mtime(self) -> int:
        return self.tree.mtime(self.entry.modtime)

    @property
    def nlink(self) -> int:
        return 1 if self.whiteout else max(self.entry.nlink, 1)

    @property
    def rdev(self) -> int:
        e = self.entry
        if self.whiteout or e.type not in ("char", "block"):
            return 0
        return os.makedev(e.dev_major, e.dev_minor)

    @property
    def target(self) -> bytes:
        """A symlink's target, as data: the store never follows it."""
        return b"" if self.whiteout else _key(self.entry.link_name)

    @property
    def children(self) -> Children | None:
        return Children(self.tree, self.entry) if self.is_dir else None

    @property
    def opaque(self) -> bool:
        if not self.is_dir:
            return False
        e = self.entry
        if OPAQUE_MARKER in e.children:
            return True
        parent = e.parent
        return parent is not None and WHITEOUT_PREFIX + _base(e.name) in parent.children

    @property
    def xattrs(self) -> dict[bytes, bytes] | None:
        x = self.entry.xattrs
        return {_key(k): v for k, v in x.items()} if x and not self.whiteout else None

    def getxattr(self, name: bytes) -> bytes | None:
        if name in OPAQUE_XATTRS and self.opaque:
            return b"y"
        xattrs = self.xattrs
        return xattrs.get(name) if xattrs else None

    def listxattr(self) -> list[bytes]:
        names = list(self.xattrs or ())
        if self.opaque:
            names += [n for n in OPAQUE_XATTRS if n not in names]
        return names


class Children:
    """A directory's visible names (bytes) → nodes, by the conventions above."""

    __slots__ = ("entry", "tree")

    def __init__(self, tree: LayerTree, entry: Entry) -> None:
        self.tree = tree
        self.entry = entry

    def get(self, key: bytes) -> Node | None:
        name = key.decode("utf-8", "surrogateescape")
        if self._hidden(name):
            return None
        children = self.entry.children
        child = children.get(name)
        if child is not None:
            return Node(self.tree, child)
        wh = children.get(WHITEOUT_PREFIX + name)
        return Node(self.tree, wh, whiteout=True) if wh is not None else None

    def __contains__(self, key: bytes) -> bool:
        return self.get(key) is not None

    def items(self) -> Iterator[tuple[bytes, Node]]:
        children = self.entry.children
        for name, child in children.items():
            if name.startswith(WHITEOUT_PREFIX):
                shown = name[len(WHITEOUT_PREFIX) :]
                if shown and shown not in children and not self._hidden(shown):
                    yield _key(shown), Node(self.tree, child, whiteout=True)
            elif not self._hidden(name):
                yield _key(name), Node(self.tree, child)

    def values(self) -> Iterator[Node]:
        return (node for _, node in self.items())

    def __len__(self) -> int:
        return sum(1 for _ in self.items())

    def _hidden(self, name: str) -> bool:
        return name.startswith(WHITEOUT_PREFIX) or (
            name in LANDMARKS and self.entry is self.tree.index.root
        )


class _Nodes(Sequence[Node]):
    """``nodes[i]``: the node of inode offset ``i`` (made on request)."""

    def __init__(self, tree: LayerTree) -> None:
        self._tree = tree

    def __len__(self) -> int:
        return len(self._tree.index.entries)

    def __getitem__(self, i: int) -> Node:  # type: ignore[override]
        e = self._tree.index.entries[i]
        name = _base(e.name)
        whiteout = name.startswith(WHITEOUT_PREFIX) and name != OPAQUE_MARKER
        return Node(self._tree, e, whiteout=whiteout)


class LayerTree:
    """The overlay view of one validated layer index; ``nodes[i]`` has inode ``base + i``."""

    def __init__(self, index: LayerIndex) -> None:
        self.index = index
        self.nodes = _Nodes(self)
        self.root = Node(self, index.root)
        self._mtimes: dict[str, int] = {}
        self._paths: dict[int, str] | None = None
        for e in index.entries:
            if e.type == "dir" and e.name and _hidden_name(e):
                raise TreeError(f"{e.name!r}: a directory under a whiteout or landmark name")

    def mtime(self, modtime: str) -> int:
        """Seconds since the epoch of a TOC ``modtime`` (RFC 3339; 0 when absent or bad)."""
        found = self._mtimes.get(modtime)
        if found is None:
            try:
                found = int(datetime.fromisoformat(modtime.replace("Z", "+00:00")).timestamp())
            except ValueError:
                found = 0
            self._mtimes[modtime] = found
        return found

    def lookup_path(self, path: str) -> Node | None:
        node: Node | None = self.root
        for part in (p for p in path.split("/") if p not in ("", ".")):
            children = node.children if node is not None else None
            if children is None:
                return None
            node = children.get(_key(part))
        return node

    def path_of(self, node: Node) -> str:
        """A path of ``node`` (built on first use: only the access trace needs it)."""
        if self._paths is None:
            self._paths = {}
            for path, n in self.walk():
                self._paths.setdefault(n.index, path)
        return self._paths.get(node.index, "")

    def walk(self) -> Iterable[tuple[str, Node]]:
        """``(path, node)`` for every visible name in the tree, parents before children."""
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            children = node.children
            if children is not None:
                for name, child in sorted(children.items(), key=lambda kv: kv[0], reverse=True):
                    shown = name.decode("utf-8", "surrogateescape")
                    stack.append((f"{path}/{shown}" if path else shown, child))


def _base(name: str) -> str:
    return name.rpartition("/")[2]


def _hidden_name(e: Entry) -> bool:
    base = _base(e.name)
    return base.startswith(WHITEOUT_PREFIX) or (base == e.name and base in LANDMARKS)
