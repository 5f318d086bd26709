"""The overlay view over a validated index: whiteouts and opaque markers in every position.

A whiteout hides only *lower* layers' content (OCI image spec, "Whiteouts"): an entry of the
same layer with the whiteout's name stays, before or after it, and a directory it names turns
opaque (the lower directory is deleted, the layer's own content stays).
"""

from __future__ import annotations

import stat

import pytest

from store.estargz import LayerIndex
from store.tree import LayerTree, TreeError


def tree(*names: str) -> LayerTree:
    entries = [
        {"name": n, "type": "dir"} if n.endswith("/") else {"name": n, "type": "reg"} for n in names
    ]
    return LayerTree(LayerIndex.from_entries(entries, toc_offset=100, compression="gzip"))


def listing(t: LayerTree) -> dict[str, str]:
    kinds = {stat.S_IFDIR: "dir", stat.S_IFREG: "reg", stat.S_IFCHR: "whiteout"}
    out = {}
    for path, node in t.walk():
        kind = kinds[stat.S_IFMT(node.mode)]
        if node.opaque:
            kind += "+opaque"
        out[path] = kind
    return out


@pytest.mark.parametrize(
    "names",
    [
        ("case/", "case/a/", "case/a/newfile", "case/.wh.a"),  # whiteout after the directory
        ("case/", "case/.wh.a", "case/a/", "case/a/newfile"),  # whiteout first
        ("case/", "case/a/", "case/.wh.a", "case/a/newfile"),  # between
    ],
)
def test_whiteout_of_a_same_layer_directory_makes_it_opaque_and_keeps_its_content(names):
    assert listing(tree(*names)) == {
        "": "dir",
        "case": "dir",
        "case/a": "dir+opaque",
        "case/a/newfile": "reg",
    }


@pytest.mark.parametrize("names", [(".wh.f", "f"), ("f", ".wh.f")])
def test_whiteout_of_a_file_added_in_the_same_layer_shows_the_file(names):
    t = tree(*names)
    assert listing(t) == {"": "dir", "f": "reg"}
    assert t.root.children.get(b".wh.f") is None


@pytest.mark.parametrize(
    "names",
    [("d/", "d/x", "d/.wh..wh..opq"), ("d/", "d/.wh..wh..opq", "d/x"), ("d/x", "d/.wh..wh..opq")],
)
def test_opaque_marker_anywhere_keeps_the_same_layers_entries(names):
    t = tree(*names)
    assert listing(t) == {"": "dir", "d": "dir+opaque", "d/x": "reg"}
    d = t.lookup_path("d")
    assert d.getxattr(b"trusted.overlay.opaque") == b"y"
    assert b"user.overlay.opaque" in d.listxattr()
    assert d.children.get(b".wh..wh..opq") is None


def test_plain_whiteout_is_a_0_0_char_device_and_landmarks_are_hidden():
    t = tree(".prefetch.landmark", "d/", "d/.wh.gone", "d/.prefetch.landmark")
    assert listing(t) == {
        "": "dir",
        "d": "dir",
        "d/gone": "whiteout",
        "d/.prefetch.landmark": "reg",  # hidden at the root only
    }
    gone = t.lookup_path("d/gone")
    assert gone.rdev == 0 and gone.size == 0 and gone.children is None
    assert t.nodes[gone.index] == gone


def test_a_whiteout_named_directory_is_refused():
    with pytest.raises(TreeError, match="whiteout"):
        tree("d/.wh.x/", "d/.wh.x/y")


def test_nodes_are_numbered_once_and_dir_nlink_counts_subdirectories():
    entries = [
        {"name": "d/", "type": "dir"},
        {"name": "d/e/", "type": "dir"},
        {"name": "f", "type": "reg"},
        {"name": "h", "type": "hardlink", "linkName": "f"},
    ]
    t = LayerTree(LayerIndex.from_entries(entries, toc_offset=100, compression="gzip"))
    indexes = sorted({node.index for _, node in t.walk()})
    assert indexes == list(range(len(t.nodes)))
    assert t.lookup_path("f") == t.lookup_path("h") and t.lookup_path("h").nlink == 2
    assert t.root.nlink == 3 and t.lookup_path("d").nlink == 3
    assert stat.S_IMODE(t.root.mode) == 0o555  # implicit root, as containers/storage makes it
