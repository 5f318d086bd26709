"""A layer's file tree as overlayfs wants it: a thin view over the validated index.

Why a view: the TOC lists tar entries; overlayfs wants a directory whose whiteouts are 0:0
character devices and whose opaque directories answer the opaque xattr. The format library
(:class:`store.estargz.LayerIndex`) owns the tree and every check on it; this module only
presents its entries with these conventions, computed when asked, so a 100,000-entry layer
costs nothing here beyond the index (nodes are small wrappers made per request).

Conventions (DESIGN.md §3; OCI image spec, "Representing Changes"):

* ``.wh.<name>`` is hidden and shown as a char device 0:0 named ``<name>`` — unless the same
  layer has an entry ``<name>`` in that directory, which is then shown. In tar order, as
  extraction applies them: a whiteout *before* a directory it names is replaced by it (not
  opaque: lower content shows through, as podman's extraction gives); a whiteout *after* the
  directory (podman refuses such a layer) hides only lower layers' content (OCI image spec):
  the directory becomes opaque, the layer's own content stays; a whiteout followed only by
  ``<name>/.wh..wh..opq`` stays a whiteout (extraction marks it, creating no directory).
  Which of a name and its whiteout came first is noted by the index as it is built
  (``LayerIndex.after_whiteout``): a lookup asks it in constant time, a listing once a name;
* ``.wh..wh..opq`` is hidden and marks its directory opaque, wherever it stands among the
  directory's entries; the store answers ``y`` for the opaque xattr the overlay mount in use
  reads (``trusted.overlay.opaque`` rootful, ``user.overlay.opaque`` rootless, or both: the
  ``overlay_opaque_type`` config key, :mod:`store.fs`);
* the landmark files ``.prefetch.landmark`` / ``.no.prefetch.landmark`` at the root are hidden;
* hardlinks share one node (``nlink`` counts the names); its mode, owner, mtime and xattrs
  are the last link header's (``LayerIndex.link_headers``, whose xattrs hold every header's),
  as extraction applies each link header to the shared inode — but a symlink's mode is 0777
  and its mtime its own (no ``lchmod``, and extraction sets no time through a link header
  naming a symlink); other mtimes before 1970 or past 2262 are the epoch, as extraction's
  ``Chtimes`` clamps them; an owner id of 2**32-1 is ``lchown``'s "leave it", so the
  inode keeps what extraction made it with (``LayerIndex.owners``); a directory's
  ``nlink`` is 2 + its subdirectories; a layer root is 0555 root:root whatever a ``./``
  entry says, as containers/storage makes every layer's root; a directory the tar never
  names is 0755 root:root, plus set-group-ID when its parent had it at that point of the
  tar (extraction's mkdir; ``LayerIndex.setgid_implicit`` lists them).

Inode numbering: node ``i`` is ``LayerIndex.entries[i]`` (root 0); a whiteout is its
``.wh.`` entry's number.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime

from store.estargz import LayerIndex
from store.estargz.index import WHITEOUT_PREFIX, Entry

OPAQUE_MARKER = ".wh..wh..opq"
LANDMARKS = {".prefetch.landmark", ".no.prefetch.landmark"}
_DOT_WHITEOUTS = frozenset({".wh.", ".wh..", ".wh..."})  # whiteouts of "", "." and ".."
OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")
# The fraction of a second in an RFC 3339 modtime: up to 9 digits (Go's RFC3339Nano, as
# containers/storage writes zstd:chunked TOCs); eStargz writers round to whole seconds.
_FRACTION = re.compile(r"\.([0-9]+)")

# containers/storage's Chtimes sets a time before the epoch or past Go's os.Chtimes limit
# (time.Unix(0, 1<<63-1), in 2262) to the epoch instead (pkg/system/chtimes.go).
_MAX_CHTIMES_NS = (1 << 63) - 1

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
        if e is self.tree.index.root:
            return stat.S_IFDIR | 0o555
        if e.implicit and e.ino in self.tree.index.setgid_implicit:
            return stat.S_IFDIR | 0o755 | stat.S_ISGID
        if e.type == "symlink":  # Linux has no lchmod: extraction never sets a link's mode
            return stat.S_IFLNK | 0o777
        return _TYPE_BITS[e.type] | (self._meta.mode & 0o7777)

    @property
    def _meta(self) -> Entry:
        """Where mode, owner and mtime come from: a hardlinked file's last link header."""
        headers = self.tree.index.link_headers
        return headers.get(self.entry.ino, self.entry) if headers else self.entry

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
        return self._owner[0]

    @property
    def gid(self) -> int:
        return self._owner[1]

    @property
    def _owner(self) -> tuple[int, int]:
        e = self.entry
        if e is self.tree.index.root:
            return (0, 0)
        owners = self.tree.index.owners
        found = owners.get(e.ino) if owners else None
        if found is not None:  # a header's id was 2**32-1: what extraction left instead
            return found
        meta = self._meta
        return (meta.uid, meta.gid)

    @property
    def mtime_ns(self) -> int:
        """As extraction sets it: a symlink's own (``LUtimesNano``; a link header naming a
        symlink sets no time), anything else's from its last header, clamped to the epoch
        when before 1970 or past 2262 (containers/storage ``pkg/system.Chtimes``)."""
        if self.entry.type == "symlink":
            return self.tree.mtime_ns(self.entry.modtime)
        ns = self.tree.mtime_ns(self._meta.modtime)
        return ns if 0 <= ns <= _MAX_CHTIMES_NS else 0

    @property
    def nlink(self) -> int:
        return 1 if self.whiteout else max(self.entry.nlink, 1)

    @property
    def rdev(self) -> int:
        e = self.entry
        if self.whiteout or e.type not in ("char", "block"):
            return 0
        return _makedev(e.dev_major, e.dev_minor)

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
        parent = self.tree.index.parent(e)
        if parent is None:
            return False
        if WHITEOUT_PREFIX + _base(e.name) not in parent.children:
            return False
        # Tar order, as extraction applies it: a directory named after its whiteout replaces
        # it (not opaque); a whiteout after the directory hides the lower layers' content.
        return e.implicit if e.ino in self.tree.index.after_whiteout else True

    @property
    def _xattrs(self) -> Mapping[str, bytes] | None:
        """The entry's own xattrs: none on a whiteout, nor on the layer root, whose TOC entry
        extraction skips (containers/storage ``pkg/archive`` ``Unpack``: a directory named
        ``.``), as it does its mode and owner."""
        if self.whiteout or self.entry is self.tree.index.root:
            return None
        return self._meta.xattrs

    @property
    def xattrs(self) -> dict[bytes, bytes] | None:
        x = self._xattrs
        return {_key(k): v for k, v in x.items()} if x else None

    def xattr(self, name: bytes) -> bytes | None:
        """``xattrs.get(name)``, in one lookup of the entry's own (str-keyed) xattrs: the
        name's decoding is the only key that encodes to it, unless the entry has a name whose
        bytes decode to another string (``LayerTree`` notes those, for the whole dict)."""
        x = self._xattrs
        if not x:
            return None
        if self.entry.ino in self.tree.odd_xattrs:
            return self.xattrs.get(name)  # type: ignore[union-attr]
        return x.get(name.decode("utf-8", "surrogateescape"))

    def getxattr(self, name: bytes) -> bytes | None:
        if name in OPAQUE_XATTRS and self.opaque:
            return b"y"
        return self.xattr(name)

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
        if child is not None and not self._marker_under_whiteout(child):
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
                if shown and not self._hidden(shown):
                    other = children.get(shown)
                    if other is None or self._marker_under_whiteout(other):
                        yield _key(shown), Node(self.tree, child, whiteout=True)
            elif not self._hidden(name) and not self._marker_under_whiteout(child):
                yield _key(name), Node(self.tree, child)

    def values(self) -> Iterator[Node]:
        return (node for _, node in self.items())

    def __len__(self) -> int:
        return sum(1 for _ in self.items())

    def _hidden(self, name: str) -> bool:
        return name.startswith(WHITEOUT_PREFIX) or (
            name in LANDMARKS and self.entry is self.tree.index.root
        )

    def _marker_under_whiteout(self, child: Entry) -> bool:
        """``.wh.<name>`` then ``<name>/.wh..wh..opq`` alone: extraction marks the whiteout it
        made opaque and creates no directory, so the whiteout is what shows."""
        if not (child.implicit and child.type == "dir" and len(child.children) == 1):
            return False
        # .wh.<name> came first in tar order (LayerIndex.after_whiteout: so it is there still)
        return OPAQUE_MARKER in child.children and child.ino in self.tree.index.after_whiteout


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
        self._mtimes: dict[str, int] = {}
        self._paths: dict[int, str] | None = None
        self._odd_xattrs: set[int] | None = None
        for e in index.entries:
            if e.type == "dir" and e.name and _hidden_name(e):
                raise TreeError(f"{e.name!r}: a directory under a whiteout or landmark name")
            if WHITEOUT_PREFIX not in e.name:  # most entries: no name part to look at
                continue
            base = _base(e.name)
            if base in _DOT_WHITEOUTS:
                # It would be listed as a device named "." or ".." (or not at all): extraction
                # fails on it (the name it removes is the directory itself, or its parent).
                raise TreeError(f"{e.name!r}: a whiteout of {base[len(WHITEOUT_PREFIX) :]!r}")
        for name, e in index.hardlinks():
            if _base(name) in _DOT_WHITEOUTS:  # a link's own name, which entries do not list
                raise TreeError(f"{name!r}: a whiteout of {_base(name)[len(WHITEOUT_PREFIX) :]!r}")
            # A whiteout is shown by its name, a file by its entry's inode: a hardlink between
            # the two gives one inode number both a device and a file (and the file an nlink
            # counting the whiteout); extraction makes no such tree (a whiteout is no file to
            # link to, and a link named like a whiteout is a whiteout).
            if _base(name).startswith(WHITEOUT_PREFIX) != _base(e.name).startswith(WHITEOUT_PREFIX):
                raise TreeError(f"{name!r}: a hardlink to {e.name!r} (a whiteout on one side)")
            # Likewise a whiteout linked to an opaque marker: its name showed a 0:0 device, its
            # inode number (the marker's entry, not shown as a whiteout) the marker's own type.
            if _base(e.name) == OPAQUE_MARKER and _base(name) != OPAQUE_MARKER:
                raise TreeError(f"{name!r}: a hardlink to {e.name!r} (an opaque marker)")

    # Made per request, as every node: a tree holds nothing that refers back to it, so a
    # released layer's tree and index (a 60,000-entry one: ~40 MB) are freed by reference
    # counting when its last holder lets go. Held here, they made a reference cycle, freed
    # at the collector's next full pass only, which an idle store may not make for hours.
    @property
    def nodes(self) -> Sequence[Node]:
        """``nodes[i]``: the node of inode offset ``i``."""
        return _Nodes(self)

    @property
    def root(self) -> Node:
        return Node(self, self.index.root)

    def mtime_ns(self, modtime: str) -> int:
        """Nanoseconds since the epoch of a TOC ``modtime`` (RFC 3339; 0 when absent or bad).

        The fraction is kept to the nanosecond, as extracting the tar does: containers/storage
        writes a zstd:chunked TOC's ``modtime`` with Go's ``RFC3339Nano`` (``pkg/chunked/
        compressor``), and its own pulls set the file's time from it (or from the tar header)
        to the nanosecond. ``datetime`` keeps only microseconds, so the fraction is read apart
        from the whole seconds, and added to them: 1959-12-31T23:59:59.5Z is -315619200.5 s
        (truncating the float gave -315619200, half a second late).
        """
        found = self._mtimes.get(modtime)
        if found is None:
            fraction = _FRACTION.search(modtime)
            whole = modtime if fraction is None else _FRACTION.sub("", modtime, count=1)
            try:
                seconds = int(datetime.fromisoformat(whole.replace("Z", "+00:00")).timestamp())
            except ValueError:
                found = 0
            else:
                digits = fraction.group(1)[:9].ljust(9, "0") if fraction is not None else "0"
                found = seconds * 1_000_000_000 + int(digits)
            self._mtimes[modtime] = found
        return found

    @property
    def odd_xattrs(self) -> set[int]:
        """The inodes with an xattr name whose bytes decode to another string (a JSON
        ``\\udcXX`` escape that spells UTF-8): :meth:`Node.xattr` finds theirs by bytes. Made
        when first asked (a pass over the entries: most layers never ask)."""
        if self._odd_xattrs is None:
            self._odd_xattrs = {
                e.ino for e in self.index.entries if e.xattrs and not all(map(_canonical, e.xattrs))
            } | {
                ino
                for ino, h in self.index.link_headers.items()
                if h.xattrs and not all(map(_canonical, h.xattrs))
            }
        return self._odd_xattrs

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


def _makedev(major: int, minor: int) -> int:
    """glibc's ``makedev`` for 32-bit major and minor numbers (the index admits up to
    2**32-1); ``os.makedev`` takes C ints and raised OverflowError past 2**31-1."""
    return (
        ((major & 0xFFFFF000) << 32)
        | ((major & 0xFFF) << 8)
        | ((minor & 0xFFFFFF00) << 12)
        | (minor & 0xFF)
    )


def _canonical(name: str) -> bool:
    """Whether ``name`` is what its bytes (:func:`_key`) decode to."""
    return name.isascii() or _key(name).decode("utf-8", "surrogateescape") == name


def _base(name: str) -> str:
    return name.rpartition("/")[2]


def _hidden_name(e: Entry) -> bool:
    base = _base(e.name)
    return base.startswith(WHITEOUT_PREFIX) or (base == e.name and base in LANDMARKS)
