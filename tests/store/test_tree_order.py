"""Which of a name and its whiteout came first: answered by the index, not by a scan.

A directory ``X`` beside ``.wh.X`` in the same layer is shown by tar order (store/tree.py's
docstring): the overlay view asked it by scanning the directory's names in order, for each
lookup, listed name and opaque xattr, and a directory of N such pairs cost N² for N lookups
(20,000 of them took seconds). The index now notes the directories that came after their
whiteout (``LayerIndex.after_whiteout``) while it is built; these tests hold it to the scan's
answer and the view to a bounded number of names visited.
"""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from store.estargz import InvalidToc, LayerIndex
from store.tree import LayerTree

_PARTS = ("a", "b", ".wh.a", ".wh.b", ".wh..wh..opq")


def _scanned_after_whiteout(index: LayerIndex) -> set[int]:
    """The inodes of directories whose name comes after ``.wh.<name>`` in their parent's
    ``children`` (the order of the names' first entries): what the view used to scan for."""
    out = set()
    for parent in index.entries:
        order = {name: i for i, name in enumerate(parent.children)}
        for name, child in parent.children.items():
            wh = order.get(".wh." + name)
            if child.type == "dir" and wh is not None and wh < order[name]:
                out.add(child.ino)
    return out


_name = st.tuples(st.sampled_from(("", "p/", "p/a/")), st.sampled_from(_PARTS)).map("".join)
_entry = st.tuples(_name, st.sampled_from(("dir", "reg", "reg", "hardlink")), st.integers(0, 9))


@settings(max_examples=400, deadline=None)
@given(st.lists(_entry, max_size=10))
def test_the_index_notes_exactly_the_directories_the_scan_found_after_their_whiteout(raw):
    entries: list[dict] = []
    files: list[str] = []
    for name, etype, k in raw:
        if etype == "hardlink" and files:  # to a file named before (maybe replaced since)
            entries.append({"name": name, "type": etype, "linkName": files[k % len(files)]})
        elif etype == "dir":
            entries.append({"name": name + "/", "type": etype})
        else:
            entries.append({"name": name, "type": "reg"})
            files.append(name)
    try:
        index = LayerIndex.from_entries(entries, toc_offset=100, compression="gzip")
    except InvalidToc:
        return  # e.g. an entry under a file, a hardlink to nothing
    assert index.after_whiteout == _scanned_after_whiteout(index)


class _CountingDict(dict):
    """A directory's ``children`` that counts the names its iterations hand out."""

    visited = 0

    def __iter__(self) -> Iterator[str]:
        for key in super().__iter__():
            self.visited += 1
            yield key

    def items(self) -> Iterator[tuple[str, object]]:  # type: ignore[override]
        for key in self:
            yield key, self[key]

    def values(self) -> Iterator[object]:  # type: ignore[override]
        for key in self:
            yield self[key]

    def keys(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self)


def _counted(entries: list[dict]) -> tuple[LayerTree, _CountingDict]:
    t = LayerTree(LayerIndex.from_entries(entries, toc_offset=100, compression="gzip"))
    p = t.lookup_path("p").entry
    p.children = counting = _CountingDict(p.children)
    return t, counting


N = 2000


def test_lookups_of_markers_under_whiteouts_visit_no_names_and_a_listing_each_once():
    # Each p/dI holds only its opaque marker, and p/.wh.dI comes after it: dI is shown.
    entries = [{"name": f"p/d{i}/.wh..wh..opq", "type": "reg"} for i in range(N)]
    entries += [{"name": f"p/.wh.d{i}", "type": "reg"} for i in range(N)]
    t, counting = _counted(entries)
    children = t.lookup_path("p").children
    assert children is not None
    for i in range(N):
        node = children.get(f"d{i}".encode())
        assert node is not None and node.is_dir and node.opaque
    assert counting.visited == 0  # the scan visited ~N²/2 names (2,000,000)
    assert sum(1 for _ in children.items()) == N
    assert counting.visited == 2 * N  # every name once


def test_the_opaque_xattr_of_directories_before_their_whiteouts_visits_no_names():
    # Explicit p/dI, then p/.wh.dI: opaque (the whiteout hides only the lower layers).
    entries = [{"name": f"p/d{i}/", "type": "dir"} for i in range(N)]
    entries += [{"name": f"p/.wh.d{i}", "type": "reg"} for i in range(N)]
    entries += [{"name": "p/.wh.e", "type": "reg"}, {"name": "p/e/", "type": "dir"}]
    t, counting = _counted(entries)
    children = t.lookup_path("p").children
    assert children is not None
    for i in range(N):
        node = children.get(f"d{i}".encode())
        assert node is not None and node.getxattr(b"trusted.overlay.opaque") == b"y"
    after = children.get(b"e")
    assert after is not None and after.getxattr(b"trusted.overlay.opaque") is None
    assert counting.visited == 0


def test_a_name_keeps_its_first_place_when_its_entry_is_replaced():
    # p/d is first a file, then whited out, then a directory: the name came before its
    # whiteout (its first entry did), so the directory is opaque, as the scan answered.
    entries = [
        {"name": "p/d", "type": "reg"},
        {"name": "p/.wh.d", "type": "reg"},
        {"name": "p/d/", "type": "dir"},
    ]
    t = LayerTree(LayerIndex.from_entries(entries, toc_offset=100, compression="gzip"))
    d = t.lookup_path("p/d")
    assert d is not None and d.is_dir and d.opaque
    assert t.index.after_whiteout == set()
