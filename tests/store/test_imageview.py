"""Paths through an image's stacked layers (store.imageview.MergedView), as overlayfs shows them."""

from __future__ import annotations

from store.estargz import LayerIndex
from store.imageview import MAX_SYMLINKS, MergedView
from store.tree import LayerTree


def layer(*specs: str) -> LayerTree:
    """``name/`` a directory, ``name -> target`` a symbolic link, else a regular file."""
    entries = []
    for s in specs:
        if " -> " in s:
            name, target = s.split(" -> ")
            entries.append({"name": name, "type": "symlink", "linkName": target})
        elif s.endswith("/"):
            entries.append({"name": s, "type": "dir"})
        else:
            entries.append({"name": s, "type": "reg"})
    return LayerTree(LayerIndex.from_entries(entries, toc_offset=100, compression="gzip"))


def where(view: MergedView, path: str) -> tuple[int, str] | None:
    found = view.resolve(path)
    return None if found is None else (found.layer, found.path)


BASE = layer(
    "usr/",
    "usr/lib/",
    "usr/lib/x86_64-linux-gnu/",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/x86_64-linux-gnu/libz.so.1.2.13",
    "usr/lib/x86_64-linux-gnu/libz.so.1 -> libz.so.1.2.13",
    "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "lib -> usr/lib",
    "lib64/",
    "lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "opt/",
    "opt/old/",
    "opt/old/libold.so",
    "etc/",
    "etc/ld.so.cache",
)


def test_the_topmost_layer_wins_and_links_are_followed_across_layers():
    top = layer(
        "usr/", "usr/lib/", "usr/lib/x86_64-linux-gnu/", "usr/lib/x86_64-linux-gnu/libc.so.6"
    )
    view = MergedView([top, BASE])
    assert where(view, "/lib/x86_64-linux-gnu/libc.so.6") == (
        0,
        "usr/lib/x86_64-linux-gnu/libc.so.6",
    )
    assert where(view, "/lib/x86_64-linux-gnu/libz.so.1") == (
        1,
        "usr/lib/x86_64-linux-gnu/libz.so.1.2.13",
    )
    assert where(view, "/lib64/ld-linux-x86-64.so.2") == (
        1,
        "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    )
    assert where(view, "etc/ld.so.cache") == (1, "etc/ld.so.cache")
    assert where(view, "/usr/lib/x86_64-linux-gnu/libnope.so") is None


def test_whiteouts_and_opaque_directories_hide_the_layers_below():
    top = layer(
        "usr/", "usr/lib/", "usr/lib/x86_64-linux-gnu/", "usr/lib/x86_64-linux-gnu/.wh.libc.so.6"
    )
    assert where(MergedView([top, BASE]), "/usr/lib/x86_64-linux-gnu/libc.so.6") is None
    opaque = layer("opt/", "opt/old/", "opt/old/.wh..wh..opq", "opt/old/libnew.so")
    view = MergedView([opaque, BASE])
    assert where(view, "/opt/old/libold.so") is None
    assert where(view, "/opt/old/libnew.so") == (0, "opt/old/libnew.so")
    gone = layer(".wh.opt")
    assert where(MergedView([gone, BASE]), "/opt/old/libold.so") is None
    replaced = layer("opt")  # a regular file where the directory was
    assert where(MergedView([replaced, BASE]), "/opt/old/libold.so") is None


def test_dot_dot_loops_and_links_out_of_the_root():
    view = MergedView([layer("a/", "a/b/", "a/f", "loop -> loop", "up -> ../../../a/f"), BASE])
    assert where(view, "/a/b/../f") == (0, "a/f")
    assert where(view, "/../../a/f") == (0, "a/f")
    assert where(view, "up") == (0, "a/f")  # .. stops at the root, as the kernel's does
    assert where(view, "loop") is None
    chain = [f"l{i} -> l{i + 1}" for i in range(MAX_SYMLINKS + 1)] + [f"l{MAX_SYMLINKS + 1}"]
    assert where(MergedView([layer(*chain)]), "l0") is None  # ELOOP
    assert where(MergedView([layer(*chain[1:])]), "l1") is not None
    assert where(view, "/a/f/x") is None  # through a file
