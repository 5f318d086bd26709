"""One xattr of a node is one lookup: ``getxattr`` no longer builds the dict of them all.

overlayfs and the LSMs ask several xattr names per lookup, open and exec; building the
bytes-keyed dict of every xattr of the entry for each cost O(#xattrs) a call (18 ms at
160,000). The answer must stay what that dict gave, also for names whose bytes two different
strings spell (a JSON ``\\udcXX`` escape of UTF-8: the dict kept the later).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping

import pytest

from store.estargz import LayerIndex
from store.tree import OPAQUE_XATTRS, LayerTree


def _tree(xattrs: dict[str, bytes]) -> LayerTree:
    encoded = {k: base64.b64encode(v).decode() for k, v in xattrs.items()}
    entries = [{"name": "f", "type": "reg", "xattrs": encoded}]
    return LayerTree(LayerIndex.from_entries(entries, toc_offset=100, compression="gzip"))


class _Uniterable(Mapping[str, bytes]):
    """An entry's xattrs that refuse to be listed: only looked up."""

    def __init__(self, inner: Mapping[str, bytes]) -> None:
        self.inner = inner

    def __getitem__(self, key: str) -> bytes:
        return self.inner[key]

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("every xattr was listed for one")

    def __len__(self) -> int:
        return len(self.inner)


def test_getxattr_looks_up_one_name_without_listing_them_all():
    t = _tree({f"user.a{i}": b"v%d" % i for i in range(1000)} | {"user.é": b"accent"})
    node = t.lookup_path("f")
    assert node is not None
    assert node.getxattr(b"user.a0") == b"v0"  # the first has the tree look at all names once
    node.entry.xattrs = _Uniterable(node.entry.xattrs)
    assert node.getxattr(b"user.a7") == b"v7"
    assert node.getxattr("user.é".encode()) == b"accent"
    assert node.getxattr(b"security.capability") is None
    assert node.getxattr(b"user.\xff") is None


@pytest.mark.parametrize(
    "xattrs",
    [
        {"user.é": b"char", "user.\udcc3\udca9": b"escaped"},  # the later wins
        {"user.\udcc3\udca9": b"escaped", "user.é": b"char"},
        {"user.\udcc3\udca9": b"escaped"},  # found by its bytes alone
        {"user.\udcff": b"lone byte", "user.x": b"x"},  # decodes back to itself
    ],
)
def test_getxattr_answers_what_the_bytes_keyed_dict_answers(xattrs):
    node = _tree(xattrs).lookup_path("f")
    assert node is not None
    whole = node.xattrs
    assert whole is not None
    for name in [*whole, b"user.\xc3", b"user.absent"]:
        assert node.getxattr(name) == whole.get(name)
    assert node.listxattr() == list(whole)


def test_the_layer_root_shows_no_xattrs_of_its_toc_entry():
    """Extraction skips a layer's ``./`` entry (containers/storage keeps the root 0555
    root:root): its xattrs are not the root's; an opaque marker still is."""
    x = {"user.a": base64.b64encode(b"1").decode()}
    for opaque in (False, True):
        entries = [{"name": "./", "type": "dir", "mode": 0o711, "xattrs": x}]
        entries += [{"name": "f", "type": "reg", "xattrs": x}]
        if opaque:
            entries.append({"name": ".wh..wh..opq", "type": "reg"})
        t = LayerTree(LayerIndex.from_entries(entries, toc_offset=100, compression="gzip"))
        root, f = t.root, t.lookup_path("f")
        assert f is not None and f.getxattr(b"user.a") == b"1"
        assert root.xattrs is None and root.getxattr(b"user.a") is None
        assert root.listxattr() == (list(OPAQUE_XATTRS) if opaque else [])
        assert root.mode & 0o7777 == 0o555
