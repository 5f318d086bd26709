"""Hypothesis strategies for small multi-layer images (see :mod:`tests.shapes.model`).

Names come from a small pool (with spaces and non-ASCII) so that layers keep meeting each
other's paths: the same name twice in a layer, a whiteout before or after the entry it names,
in the same layer or above it, an opaque marker before or after its directory's children.
"""

from __future__ import annotations

from hypothesis import strategies as st

from tests.shapes.model import Entry, Image, Layer

TOP = ["a", "b", "c d", "é", "日本"]
SUB = ["x", "y z", "ü"]
PATHS = TOP + [f"{t}/{s}" for t in TOP[:3] for s in SUB] + ["a/x/deep"]
DEEP = [p for p in PATHS if "/" in p]
DIR_PATHS = [*TOP[:3], "a/x", "b/y z"]
FILE_MODES = [0o644, 0o755, 0o600, 0o4755, 0o2755, 0o6711, 0o1644, 0o444, 0o000]
DIR_MODES = [0o755, 0o700, 0o1777, 0o2775, 0o555, 0o3750]
IDS = [0, 1, 1000, 65534, 2**32 - 1]  # 2**32-1: lchown's "leave it"
CONTENTS = ["", "old\n", "new\n", "x" * 100, "é日本\n" * 20, "".join(map(chr, range(32, 127)))]
XATTRS = st.dictionaries(
    st.sampled_from(["user.a", "user.b", "user.long name"]),
    st.sampled_from(["1", "yes", "v" * 40, "é"]),
    max_size=2,
)
LINK_TARGETS = ["a", "../b", "/etc/passwd", "c d/ü", "nowhere", "日本", "a/x/deep"]

KINDS = st.sampled_from(
    ["file"] * 6
    + ["dir"] * 4
    + ["symlink"] * 2
    + ["hardlink"] * 2
    + ["whiteout"] * 3
    + ["opaque"] * 2
    + ["fifo", "char", "block", "root"]
)


@st.composite
def layers(draw: st.DrawFn, size: int = 7) -> Layer:
    out: Layer = []
    files: list[str] = []
    for _ in range(draw(st.integers(1, size))):
        kind = draw(KINDS)
        uid, gid = draw(st.sampled_from(IDS)), draw(st.sampled_from(IDS))
        if kind == "hardlink" and not files and draw(st.integers(0, 9)):
            kind = "file"
        if kind == "root":
            out.append(Entry("dir", "", mode=draw(st.sampled_from(DIR_MODES)), uid=uid, gid=gid))
            continue
        if kind == "opaque":
            out.append(Entry("opaque", draw(st.sampled_from(DIR_PATHS))))
            continue
        # Mostly below the top level, so that a file seldom takes a name a directory needs.
        name = draw(
            st.sampled_from(PATHS if kind == "dir" or draw(st.integers(0, 3)) == 0 else DEEP)
        )
        if kind == "whiteout":
            out.append(Entry("whiteout", name))
        elif kind == "file":
            mode = draw(st.sampled_from(FILE_MODES))
            data = draw(st.sampled_from(CONTENTS))
            out.append(Entry("file", name, data, mode, uid, gid, xattrs=draw(XATTRS)))
            files.append(name)
        elif kind == "dir":
            mode = draw(st.sampled_from(DIR_MODES))
            out.append(Entry("dir", name, mode=mode, uid=uid, gid=gid, xattrs=draw(XATTRS)))
        elif kind == "symlink":
            out.append(
                Entry("symlink", name, uid=uid, gid=gid, link=draw(st.sampled_from(LINK_TARGETS)))
            )
        elif kind == "hardlink":
            # To a file written earlier in this layer; now and then to anything. The header
            # carries its target's mode and owner, as tar writes it; now and then others.
            pool = files if files and draw(st.integers(0, 9)) else PATHS[:2]
            target = draw(st.sampled_from(pool))
            like = [e for e in out if e.name == target and e.kind == "file"]
            link = Entry("hardlink", name, mode=0o644, link=target)
            if like and draw(st.integers(0, 9)):
                link.mode, link.uid, link.gid = like[-1].mode, like[-1].uid, like[-1].gid
            out.append(link)
        else:
            mode = draw(st.sampled_from([0o644, 0o600, 0o666]))
            dev = (draw(st.integers(1, 9)), draw(st.integers(0, 5))) if kind != "fifo" else (0, 0)
            out.append(Entry(kind, name, mode=mode, uid=uid, gid=gid, dev=dev))
    return out


def images(max_layers: int = 3) -> st.SearchStrategy[Image]:
    return st.lists(layers(), min_size=1, max_size=max_layers)
