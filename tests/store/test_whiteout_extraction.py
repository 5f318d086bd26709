"""Whiteouts and opaque markers in one layer: the tree is containers/storage's extraction's.

A model of how podman extracts a layer (containers/storage pkg/archive ``Unpack`` with the
overlay whiteout converter, ``overlayWhiteoutConverter.ConvertRead``), on a dict of paths:

* before each entry, its parent directory is made (``MkdirAll``, 0755) only when its
  ``Lstat`` fails with ``ENOENT``; under a non-directory it fails with ``ENOTDIR``, and
  nothing is made;
* an existing path is removed first (``RemoveAll``) unless both it and the entry are
  directories; a failing ``Lstat`` (``ENOENT``, ``ENOTDIR``) removes nothing;
* ``.wh..wh..opq`` sets the opaque xattr on its directory: an error (no directory there:
  ``ENOTDIR``) fails the extraction; on a whiteout's character device it succeeds (root);
* ``.wh.<name>`` (any entry type) is a ``mknod`` of a 0:0 character device ``<name>``:
  ``ENOTDIR`` is ignored (the whiteout is dropped), any other error fails the extraction —
  ``EEXIST`` where ``<name>`` exists;
* any other entry is created where its parent is a directory, else the extraction fails
  (``ENOTDIR``, ``ENOENT``); a hardlink's target must exist and be no directory.

Checked with podman 4.3.1 (``podman import`` of hand-made tars): every case in
:data:`PODMAN` gave what the model gives. No case names a path twice: ``podman import``
refuses that before extracting (the tar-split packer recording the layer: "duplicates of
file paths not supported"), while podman 4.3.1 pulls such layers (tests/shapes' regressions
hold some). Where the model extracts a layer, the store's tree
(:class:`~store.tree.LayerTree`, whiteouts shown as 0:0 devices) must be the same tree
— or a refusal, which only costs a normal pull.
"""

from __future__ import annotations

import itertools
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.estargz import InvalidToc, LayerIndex
from store.tree import LayerTree, TreeError

WH = ".wh."
OPQ = ".wh..wh..opq"


class Refused(Exception):
    """containers/storage's extraction fails on the layer."""


class _Extraction:
    """One layer extracted into an empty directory, as :func:`extract` models it."""

    def __init__(self) -> None:
        # path -> ["dir" | "reg" | "chr", opaque, inode]; "" is the root
        self.fs: dict[str, list] = {"": ["dir", False, 0]}
        self.inodes = itertools.count(1)

    def resolve(self, path: str) -> str:
        """A lookup of ``path``: ``"ok"`` or the errno's name (no symlinks are made here)."""
        parts = path.split("/") if path else []
        for i in range(1, len(parts) + 1):
            node = self.fs.get("/".join(parts[:i]))
            if node is None:
                return "ENOENT"
            if i < len(parts) and node[0] != "dir":
                return "ENOTDIR"
        return "ok"

    def parent_ok(self, path: str) -> str:
        parent = path.rpartition("/")[0]
        got = self.resolve(parent)
        if got == "ok" and self.fs[parent][0] != "dir":
            return "ENOTDIR"
        return got

    def remove_all(self, path: str) -> None:
        for p in [p for p in self.fs if p == path or p.startswith(path + "/")]:
            del self.fs[p]

    def apply(self, name: str, etype: str, link: str = "") -> None:
        parent, _, base = name.rpartition("/")
        if self.resolve(parent) == "ENOENT":  # MkdirAll
            parts = parent.split("/")
            for i in range(1, len(parts) + 1):
                self.fs.setdefault("/".join(parts[:i]), ["dir", False, 0])
        if self.resolve(name) == "ok":
            node = self.fs[name]
            if not (node[0] == "dir" and etype == "dir"):
                self.remove_all(name)
        if base == OPQ:
            if self.resolve(parent) != "ok":
                raise Refused(f"setxattr {parent!r}")
            self.fs[parent][1] = True
            return
        if base.startswith(WH):
            target = f"{parent}/{base[len(WH) :]}".lstrip("/") if base != WH else parent
            got = self.parent_ok(target) if base != WH else "ok"
            if got == "ENOTDIR":
                return  # ignored
            if got != "ok":
                raise Refused(f"mknod {target!r}: {got}")
            if target in self.fs or base in (WH + ".", WH + ".."):
                raise Refused(f"mknod {target!r}: EEXIST")
            self.fs[target] = ["chr", False, 0]
            return
        got = self.parent_ok(name)
        if got != "ok":
            raise Refused(f"create {name!r}: {got}")
        if etype == "dir":
            if name not in self.fs:
                self.fs[name] = ["dir", False, 0]
        elif etype == "hardlink":
            node = self.fs.get(link) if self.resolve(link) == "ok" else None
            if node is None or node[0] == "dir":
                raise Refused(f"link {link!r}")
            self.fs[name] = node
        else:
            self.fs[name] = ["reg", False, next(self.inodes)]


def extract(entries: list[tuple[str, str, str]]) -> dict[str, str]:
    """The tree containers/storage's extraction makes of ``(name, type, link)`` entries (as
    :meth:`listing` shows it), or :class:`Refused`."""
    x = _Extraction()
    for name, etype, link in entries:
        x.apply(name, etype, link)
    counts: dict[int, int] = {}
    for node in x.fs.values():
        if node[0] == "reg":
            counts[id(node)] = counts.get(id(node), 0) + 1
    out = {}
    for path, node in x.fs.items():
        kind = node[0]
        if kind == "dir" and node[1]:
            kind = "dir+opaque"
        elif kind == "reg":
            kind = f"reg/{counts[id(node)]}"
        out[path] = kind
    return out


def _toc(entries: list[tuple[str, str, str]]) -> list[dict]:
    out = []
    for name, etype, link in entries:
        e = {"name": name + "/" if etype == "dir" else name, "type": etype}
        if etype == "hardlink":
            e["linkName"] = link
        out.append(e)
    return out


def served(entries: list[tuple[str, str, str]]) -> dict[str, str]:
    """The store's tree of the layer, as :func:`extract` lists one (InvalidToc, TreeError
    for a refusal)."""
    t = LayerTree(LayerIndex.from_entries(_toc(entries), toc_offset=100, compression="gzip"))
    out = {}
    for path, node in t.walk():
        fmt = stat.S_IFMT(node.mode)
        if fmt == stat.S_IFDIR:
            kind = "dir+opaque" if node.opaque else "dir"
        elif fmt == stat.S_IFCHR:
            kind = "chr"
        else:
            kind = f"reg/{node.nlink}"
        out[path] = kind
    return out


def _entries(names: tuple[str, ...]) -> list[tuple[str, str, str]]:
    return [(n.rstrip("/"), "dir" if n.endswith("/") else "reg", "") for n in names]


# case -> (entries, podman 4.3.1's answer: its tree, or None where it refused the layer)
PODMAN: dict[str, tuple[tuple[str, ...], dict[str, str] | None]] = {
    "entry under a whited-out name": ((".wh.foo", "foo/bar/baz"), None),
    "file right under a whited-out name": ((".wh.foo", "foo/bar"), None),
    "directory under a whited-out name": ((".wh.foo", "foo/bar/"), None),
    "whiteout of a directory made for an entry": (("foo/bar", ".wh.foo"), None),
    "whiteout after its directory": (("foo/", ".wh.foo"), None),
    "whiteout after its file": (("f", ".wh.f"), None),
    "whiteout twice": ((".wh.f", ".wh.f"), None),
    "whiteout under a whited-out name": (
        (".wh.foo", "foo/.wh.bar"),
        {"": "dir", "foo": "chr"},
    ),
    "whiteout deeper under a whited-out name": (
        (".wh.foo", "foo/bar/.wh.baz"),
        {"": "dir", "foo": "chr"},
    ),
    "opaque marker right under a whited-out name": (
        (".wh.foo", "foo/.wh..wh..opq"),
        {"": "dir", "foo": "chr"},
    ),
    "opaque marker deeper under a whited-out name": ((".wh.foo", "foo/bar/.wh..wh..opq"), None),
    "directory after its whiteout": (
        (".wh.foo", "foo/", "foo/bar"),
        {"": "dir", "foo": "dir", "foo/bar": "reg/1"},
    ),
    "whiteout of a directory holding only a marker": (("foo/.wh..wh..opq", ".wh.foo"), None),
    "file after its whiteout": ((".wh.foo", "foo"), {"": "dir", "foo": "reg/1"}),
    "whiteout beside a directory made for an entry": (
        ("a/b", ".wh.c"),
        {"": "dir", "a": "dir", "a/b": "reg/1", "c": "chr"},
    ),
    "whiteout under a file": (("foo", "foo/.wh.bar"), {"": "dir", "foo": "reg/1"}),
    "whiteout deeper under a file": (("foo", "foo/bar/.wh.baz"), {"": "dir", "foo": "reg/1"}),
    "opaque marker right under a file": (("foo", "foo/.wh..wh..opq"), {"": "dir", "foo": "reg/1"}),
    "opaque marker deeper under a file": (("foo", "foo/bar/.wh..wh..opq"), None),
    "whiteout under a whiteout's own name": (
        (".wh.foo", ".wh.foo/.wh.bar"),
        {"": "dir", "foo": "chr", ".wh.foo": "dir", ".wh.foo/bar": "chr"},
    ),
    "file after its whiteout, then another": (
        (".wh.f", "f", "g"),
        {"": "dir", "f": "reg/1", "g": "reg/1"},
    ),
    "whiteout of a file named after its whiteout": ((".wh.f", "f", ".wh.f"), None),
}


@pytest.mark.parametrize("case", PODMAN, ids=list(PODMAN))
def test_the_model_gives_what_podman_gave(case):
    names, podman = PODMAN[case]
    if podman is None:
        with pytest.raises(Refused):
            extract(_entries(names))
    else:
        assert extract(_entries(names)) == podman


@pytest.mark.parametrize("case", [c for c in PODMAN if PODMAN[c][1] is not None])
def test_a_layer_podman_extracts_is_served_as_it_extracts_it(case):
    names, podman = PODMAN[case]
    if case == "whiteout under a whiteout's own name":
        # overlayfs would take a directory named .wh.foo for a whiteout: refused, which
        # costs a normal pull
        with pytest.raises(InvalidToc):
            served(_entries(names))
        return
    assert served(_entries(names)) == podman


# Paths under "a", "b" or ".wh.a", ending in "a", "b", a whiteout of one or an opaque marker.
_dirs = st.lists(st.sampled_from(("a", "b", "a", "b", WH + "a")), max_size=2)
_last = st.sampled_from(("a", "b", "a", "b", WH + "a", WH + "b", OPQ))
_name = st.tuples(_dirs, _last).map(lambda t: "/".join([*t[0], t[1]]))
_raw = st.tuples(
    _name, st.sampled_from(("dir", "reg", "reg", "reg", "hardlink")), st.integers(0, 7)
)


def _layer(raw: list[tuple[str, str, int]]) -> list[tuple[str, str, str]]:
    """Entries; a hardlink's target is a file named before (maybe replaced since)."""
    out: list[tuple[str, str, str]] = []
    files: list[str] = []
    for name, etype, k in raw:
        if etype == "hardlink":
            if not files:
                etype = "reg"
            else:
                out.append((name, etype, files[k % len(files)]))
                continue
        out.append((name, etype, ""))
        if etype == "reg":
            files.append(name)
    return out


@settings(max_examples=2000, deadline=None)
@given(st.lists(_raw, max_size=7).map(_layer))
def test_what_extraction_makes_of_a_layer_is_what_the_store_serves(entries):
    try:
        expected = extract(entries)
    except Refused:
        return
    try:
        got = served(entries)
    except (InvalidToc, TreeError):
        return  # a refusal costs a normal pull, never a wrong tree
    assert got == expected
