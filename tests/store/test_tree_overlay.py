"""The overlay view over a validated index: whiteouts and opaque markers in every position.

A whiteout hides only *lower* layers' content (OCI image spec, "Whiteouts"): an entry of the
same layer with the whiteout's name stays, before or after it. Within a layer entries apply in
tar order, as extraction does: a directory after its whiteout replaces it (not opaque, as
podman's extraction gives); a whiteout after the directory (podman refuses that layer) makes it
opaque (the lower directory is deleted, the layer's own content stays).
"""

from __future__ import annotations

import base64
import stat
import time

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
        ("case/", "case/a/", "case/.wh.a", "case/a/newfile"),  # between
        ("case/", "case/.wh.a", "case/a/newfile"),  # whiteout, then an implicit directory
    ],
)
def test_whiteout_of_a_same_layer_directory_makes_it_opaque_and_keeps_its_content(names):
    assert listing(tree(*names)) == {
        "": "dir",
        "case": "dir",
        "case/a": "dir+opaque",
        "case/a/newfile": "reg",
    }


def test_a_directory_after_its_whiteout_replaces_it_and_is_not_opaque():
    t = tree("case/", "case/.wh.a", "case/a/", "case/a/newfile")
    assert listing(t) == {"": "dir", "case": "dir", "case/a": "dir", "case/a/newfile": "reg"}
    assert t.lookup_path("case/a").getxattr(b"trusted.overlay.opaque") is None


def test_an_opaque_marker_after_its_directorys_whiteout_leaves_the_whiteout():
    t = tree(".wh.a", "a/.wh..wh..opq")
    assert listing(t) == {"": "dir", "a": "whiteout"}


def _raw_tree(entries: list[dict]) -> LayerTree:
    return LayerTree(LayerIndex.from_entries(entries, toc_offset=100, compression="gzip"))


def test_layer_root_is_0555_root_whatever_its_entry_says():
    t = _raw_tree([{"name": "./", "type": "dir", "mode": 0o700, "uid": 5, "gid": 6}])
    assert (t.root.mode, t.root.uid, t.root.gid) == (stat.S_IFDIR | 0o555, 0, 0)


def test_implicit_directory_under_a_setgid_directory_gets_the_bit():
    t = _raw_tree(
        [
            {"name": "b/", "type": "dir", "mode": 0o3750, "uid": 7, "gid": 8},
            {"name": "b/y/z/f", "type": "reg"},
            {"name": "c/d/f", "type": "reg"},
        ]
    )
    for path in ("b/y", "b/y/z"):
        n = t.lookup_path(path)
        assert (n.mode, n.uid, n.gid) == (stat.S_IFDIR | 0o2755, 0, 0), path
    assert t.lookup_path("c/d").mode == stat.S_IFDIR | 0o755


def test_the_bit_is_the_parents_at_mkdir_time_not_its_final_one():
    """Extraction makes ``a`` and ``a/x`` for ``a/x/f`` before the tar names ``a`` with the
    bit: the kernel gave ``a/x`` none (a shape fuzzer find; podman's normal pull agrees)."""
    t = _raw_tree(
        [
            {"name": "a/x/f", "type": "reg"},
            {"name": "a/", "type": "dir", "mode": 0o2755},
            {"name": "b/", "type": "dir", "mode": 0o2755},
            {"name": "b/y/f", "type": "reg"},
            {"name": "b/", "type": "dir", "mode": 0o755},
        ]
    )
    assert t.lookup_path("a").mode == stat.S_IFDIR | 0o2755
    assert t.lookup_path("a/x").mode == stat.S_IFDIR | 0o755
    assert t.lookup_path("b").mode == stat.S_IFDIR | 0o755
    assert t.lookup_path("b/y").mode == stat.S_IFDIR | 0o2755  # made while b had it


NO_ID = 2**32 - 1  # (uid_t)-1: lchown's "leave this id as it is"


def test_an_owner_id_of_2_32_minus_1_is_what_extraction_leaves():
    """``lchown(path, -1, -1)`` changes nothing: a file, directory or symlink whose header has
    uid or gid 4294967295 keeps the owner extraction made it with (root, the group of a
    set-group-ID parent), and a header naming an existing inode (a directory again, a
    hardlink) leaves that id as it was. Served as it is, the id showed as 65534 (the
    kernel's overflow id) where podman 4.3 and 5.4's normal pulls give 0 (a shape fuzzer
    find)."""
    t = _raw_tree(
        [
            {"name": "f", "type": "reg", "uid": NO_ID, "gid": NO_ID},
            {"name": "s", "type": "symlink", "linkName": "f", "uid": NO_ID, "gid": 5},
            {"name": "g/", "type": "dir", "mode": 0o2775, "uid": 3, "gid": 7},
            {"name": "g/f", "type": "reg", "uid": 4, "gid": NO_ID},
            {"name": "g/sub/", "type": "dir", "uid": NO_ID, "gid": NO_ID},
            {"name": "g/sub/x", "type": "reg", "gid": NO_ID},  # g/sub is 0755: no inheriting
            {"name": "g/", "type": "dir", "uid": NO_ID, "gid": 9},  # named again
            {"name": "h/x/f", "type": "reg", "uid": 2, "gid": 2},
            {"name": "h/x/f", "type": "reg", "uid": NO_ID, "gid": NO_ID},  # a new inode
            {"name": "a", "type": "reg", "uid": 6, "gid": 6},
            {"name": "l1", "type": "hardlink", "linkName": "a", "uid": NO_ID, "gid": 8},
            {"name": "l2", "type": "hardlink", "linkName": "a", "uid": 1, "gid": NO_ID},
            {"name": "b", "type": "reg", "uid": NO_ID},
            {"name": "l3", "type": "hardlink", "linkName": "b", "uid": 5, "gid": 5},
        ]
    )
    owners = {p: (n.uid, n.gid) for p, n in t.walk() if p}
    assert owners == {
        "f": (0, 0),
        "s": (0, 5),
        "g": (3, 9),
        "g/f": (4, 7),
        "g/sub": (0, 7),
        "g/sub/x": (0, 0),
        "h": (0, 0),
        "h/x": (0, 0),
        "h/x/f": (0, 0),
        "a": (1, 8),
        "l1": (1, 8),
        "l2": (1, 8),
        "b": (5, 5),
        "l3": (5, 5),
    }


def test_hardlink_header_metadata_applies_to_the_shared_inode():
    t = _raw_tree(
        [
            {"name": "b", "type": "reg", "mode": 0o755, "modtime": "2020-01-01T00:00:00Z"},
            {"name": "a", "type": "hardlink", "linkName": "b", "mode": 0o640, "uid": 3, "gid": 4,
             "modtime": "2021-01-01T00:00:00Z"},
        ]
    )  # fmt: skip
    a, b = t.lookup_path("a"), t.lookup_path("b")
    assert a == b
    assert (b.mode, b.uid, b.gid, b.nlink) == (stat.S_IFREG | 0o640, 3, 4, 2)
    assert b.mtime_ns == 1609459200 * 10**9


@pytest.mark.parametrize(
    ("modtime", "ns"),
    [
        # containers/storage writes RFC3339Nano: the fraction to the nanosecond (trailing
        # zeros dropped), as skopeo/podman 4.3–5.8 wrote it for a tar mtime of
        # 1700000000.1234567 s — extraction gives the file that st_mtime_ns.
        ("2023-11-14T22:13:20.1234567Z", 1_700_000_000_123_456_700),
        ("2023-11-14T23:13:20.123456789+01:00", 1_700_000_000_123_456_789),
        # Before the epoch the whole seconds count down: -315619200.5 s.
        ("1959-12-31T23:59:59.5Z", -315_619_200_500_000_000),
        ("2023-11-14T22:13:20Z", 1_700_000_000 * 10**9),  # eStargz: whole seconds
        ("", 0),
        ("yesterday", 0),
    ],
)
def test_mtime_keeps_the_fraction_of_a_second(modtime, ns):
    t = _raw_tree([{"name": "f", "type": "reg", "modtime": modtime}])
    assert t.mtime_ns(modtime) == ns
    # A file's time before the epoch is the epoch, as extraction's Chtimes sets it.
    assert t.lookup_path("f").mtime_ns == max(ns, 0)


@pytest.mark.parametrize("replacer", ["a", "a/x"])
def test_a_hardlink_replaced_later_in_its_layer_no_longer_counts(replacer):
    t = _raw_tree(
        [
            {"name": "b", "type": "reg"},
            {"name": "a/x", "type": "hardlink", "linkName": "b"},
            {"name": replacer, "type": "symlink", "linkName": "../b"},
        ]
    )
    assert t.lookup_path("b").nlink == 1


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


@pytest.mark.parametrize("name", ["d/.wh..", "d/.wh...", "d/.wh."])
def test_a_whiteout_of_dot_or_dotdot_is_refused(name):
    # Shown, it would list a device named "." or ".." in d; extraction fails on it.
    with pytest.raises(TreeError, match="a whiteout of"):
        tree("d/", name)


@pytest.mark.parametrize(
    "entries",
    [
        # a hardlink named like a whiteout: a device and a file with one inode number
        [{"name": "f", "type": "reg"}, {"name": ".wh.z", "type": "hardlink", "linkName": "f"}],
        # a hardlink to a whiteout (extraction makes no file to link to)
        [{"name": ".wh.x", "type": "reg"}, {"name": "y", "type": "hardlink", "linkName": ".wh.x"}],
        # ... whose whiteout entry is replaced afterwards: y still shows the old one
        [
            {"name": ".wh.x", "type": "reg"},
            {"name": "y", "type": "hardlink", "linkName": ".wh.x"},
            {"name": ".wh.x", "type": "reg"},
        ],
        # a hardlink to an opaque marker
        [
            {"name": "d/.wh..wh..opq", "type": "reg"},
            {"name": "y", "type": "hardlink", "linkName": "d/.wh..wh..opq"},
        ],
    ],
)
def test_a_hardlink_between_a_whiteout_and_a_file_is_refused(entries):
    index = LayerIndex.from_entries(entries, toc_offset=100, compression="gzip")
    with pytest.raises(TreeError, match="a whiteout on one side"):
        LayerTree(index)


def test_a_whiteout_hardlinked_to_an_opaque_marker_is_refused():
    # Served, the lookup of d/x gave a 0:0 character device (a whiteout) and a getattr of
    # the same inode number the marker entry's own type and device numbers (here 1:3).
    entries = [
        {"name": ".wh..wh..opq", "type": "char", "devMajor": 1, "devMinor": 3},
        {"name": "d/.wh.x", "type": "hardlink", "linkName": ".wh..wh..opq"},
    ]
    index = LayerIndex.from_entries(entries, toc_offset=100, compression="gzip")
    with pytest.raises(TreeError, match=r"\(an opaque marker\)"):
        LayerTree(index)


def test_an_opaque_marker_hardlinked_to_a_whiteout_shows_both():
    # The link is hidden (a marker, as extraction takes it by its name); no inode shows two ways.
    entries = [
        {"name": ".wh.x", "type": "fifo"},
        {"name": "d/.wh..wh..opq", "type": "hardlink", "linkName": ".wh.x"},
    ]
    t = LayerTree(LayerIndex.from_entries(entries, toc_offset=100, compression="gzip"))
    assert t.lookup_path("d").opaque and stat.S_ISCHR(t.lookup_path("x").mode)
    for _, node in t.walk():
        assert node.mode == t.nodes[node.index].mode and node.rdev == t.nodes[node.index].rdev


def test_every_name_of_an_inode_shows_one_type():
    entries = [
        {"name": "f", "type": "reg"},
        {"name": "g", "type": "hardlink", "linkName": "f"},
        {"name": ".wh.x", "type": "reg"},
        {"name": ".wh.y", "type": "hardlink", "linkName": ".wh.x"},
    ]
    t = LayerTree(LayerIndex.from_entries(entries, toc_offset=100, compression="gzip"))
    for _, node in t.walk():
        assert node.mode == t.nodes[node.index].mode


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


@pytest.mark.parametrize("name", ["d/.wh..", "d/.wh..."])
def test_a_hardlink_named_as_a_whiteout_of_dot_or_dotdot_is_refused(name):
    # Its name is the link's own, not an entry's: checked all the same.
    entries = [
        {"name": "d/", "type": "dir"},
        {"name": "d/.wh.x", "type": "reg"},
        {"name": name, "type": "hardlink", "linkName": "d/.wh.x"},
    ]
    with pytest.raises(TreeError, match="a whiteout of"):
        LayerTree(LayerIndex.from_entries(entries, toc_offset=1 << 20, compression="gzip"))


def _b64(v: bytes) -> str:
    return base64.b64encode(v).decode()


def test_every_link_headers_xattrs_are_set_on_the_shared_inode():
    # Extraction calls Lsetxattr on the shared inode for each header's xattrs, in tar order.
    t = _raw_tree(
        [
            {"name": "a", "type": "reg", "xattrs": {"user.q": _b64(b"1"), "user.r": _b64(b"0")}},
            {"name": "b", "type": "hardlink", "linkName": "a", "xattrs": {"user.r": _b64(b"2")}},
            {"name": "c", "type": "hardlink", "linkName": "a"},
            {"name": "d", "type": "hardlink", "linkName": "a", "xattrs": {"user.s": _b64(b"3")}},
        ]
    )
    for name in "abcd":
        node = t.lookup_path(name)
        assert node.xattrs == {b"user.q": b"1", b"user.r": b"2", b"user.s": b"3"}
        assert node.xattr(b"user.r") == b"2"
        assert node.getxattr(b"user.s") == b"3"
    plain = _raw_tree([{"name": "a", "type": "reg", "xattrs": {"user.q": _b64(b"1")}},
                       {"name": "b", "type": "hardlink", "linkName": "a"}])  # fmt: skip
    assert plain.lookup_path("b").xattrs == {b"user.q": b"1"}


# A file capability (VFS_CAP_REVISION_2, one permitted bit): what `setcap` writes.
_CAP = _b64(b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12))


@pytest.mark.parametrize(
    ("links", "kept"),
    [
        # same owner: SafeLchown makes no chown, the capability stays
        ([{}], True),
        # another owner: chowned, the kernel drops the capability
        ([{"uid": 5}], False),
        ([{"gid": 7}], False),
        # ids of 2**32-1 never match the inode's: lchown(-1, -1) still drops it
        ([{"uid": 2**32 - 1, "gid": 2**32 - 1}], False),
        # a header that chowns and sets the capability itself: set after the chown
        ([{"uid": 5, "cap": True}], True),
        ([{"uid": 5, "cap": True}, {"uid": 5}], True),  # the second makes no chown
        ([{"uid": 5, "cap": True}, {"uid": 6}], False),
        ([{"gid": 9}, {"gid": 9, "cap": True}], True),
    ],
)
def test_a_link_header_that_changes_the_owner_drops_the_file_capability(links, kept):
    """Extraction chowns a hardlink header's inode when the header's ids differ from the
    inode's (containers/storage ``idtools.SafeLchown``), and the kernel's chown removes
    ``security.capability`` from anything but a directory; the header's own xattrs are set
    after. Seen with podman 4.3 and 5.4 pulling such layers normally."""
    entries = [
        {"name": "f", "type": "reg", "mode": 0o755, "xattrs": {"security.capability": _CAP,
                                                               "user.keep": _b64(b"k")}},
    ]  # fmt: skip
    for i, link in enumerate(links):
        entry = {"name": f"l{i}", "type": "hardlink", "linkName": "f", "mode": 0o755}
        entry |= {k: v for k, v in link.items() if k != "cap"}
        if link.get("cap"):
            entry["xattrs"] = {"security.capability": _CAP}
        entries.append(entry)
    index = LayerIndex.from_entries(entries, toc_offset=100, compression="gzip")
    tree = LayerTree(index)
    want = {b"user.keep": b"k"} | ({b"security.capability": base64.b64decode(_CAP)} if kept else {})
    for name in ["f", *(f"l{i}" for i in range(len(links)))]:
        node = tree.lookup_path(name)
        assert node.xattrs == want, name
        assert (node.getxattr(b"security.capability") is not None) == kept
    assert "security.capability" in index.lookup("f").xattrs  # the target's own entry stays


def test_many_link_headers_with_xattrs_build_in_linear_time():
    # Each header's xattrs were merged into a fresh copy of all the earlier ones: 80,000
    # links to one file, each naming its own xattr (7 MB of TOC), held the GIL for 18 s.
    n = 60_000
    entries = [{"name": "f", "type": "reg", "xattrs": {"user.f": _b64(b"0")}}]
    entries += [
        {"name": f"h{k}", "type": "hardlink", "linkName": "f", "xattrs": {f"user.{k}": "eQ=="}}
        for k in range(n)
    ]
    start = time.monotonic()
    index = LayerIndex.from_entries(entries, toc_offset=100, compression="gzip")
    assert time.monotonic() - start < 3
    assert index.lookup("f").xattrs == {"user.f": b"0"}  # the target's own stay its own
    node = LayerTree(index).lookup_path("h7")
    assert len(node.xattrs) == n + 1 and node.xattr(b"user.7") == b"y"


def test_a_symlink_is_0777_and_a_link_header_naming_it_sets_no_mode_or_time():
    # No lchmod: extraction never sets a symlink's mode; through a hardlink header naming a
    # symlink it sets neither mode nor time (containers/storage createTarFile), only owner.
    t = _raw_tree(
        [
            {"name": "s", "type": "symlink", "linkName": "t", "mode": 0o644,
             "modtime": "2020-01-01T00:00:00Z"},
            {"name": "h", "type": "hardlink", "linkName": "s", "mode": 0o600, "uid": 7,
             "modtime": "2021-01-01T00:00:00Z"},
        ]
    )  # fmt: skip
    for name in ("s", "h"):
        node = t.lookup_path(name)
        assert node.mode == stat.S_IFLNK | 0o777
        assert node.mtime_ns == 1577836800 * 10**9
        assert node.uid == 7


@pytest.mark.parametrize(
    ("modtime", "file_ns"),
    [
        ("1969-12-31T23:59:55Z", 0),  # before the epoch
        ("2500-01-01T00:00:00Z", 0),  # past Go's os.Chtimes limit (2262)
        ("2262-04-11T23:47:16.854775807Z", (1 << 63) - 1),  # the last time it sets
        ("1970-01-01T00:00:00Z", 0),
    ],
)
def test_times_extraction_cannot_set_are_the_epoch_except_on_symlinks(modtime, file_ns):
    # containers/storage's Chtimes sets them to the epoch; a symlink's (LUtimesNano) stays.
    entries = [
        {"name": "d", "type": "dir", "modtime": modtime},
        {"name": "f", "type": "reg", "modtime": modtime},
        {"name": "s", "type": "symlink", "linkName": "f", "modtime": modtime},
    ]
    t = _raw_tree(entries)
    assert t.lookup_path("d").mtime_ns == t.lookup_path("f").mtime_ns == file_ns
    assert t.lookup_path("s").mtime_ns == t.mtime_ns(modtime)
