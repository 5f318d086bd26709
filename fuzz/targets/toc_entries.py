"""TOC entries built from the input bytes, through the library's parse and validated index.

Byte-level mutation rarely turns JSON into a differently *shaped* TOC; here the bytes choose
each entry's fields from the shapes hostile layers use — names that escape or repeat, every
entry type, chunk lists that overlap, leave gaps or run past the file, offsets around the TOC,
hardlinks to missing or later entries, wrong JSON types, bad base64 xattrs — and the result is
encoded as JSON, wrapped as a gzip layer's TOC and indexed (see ``_common.check_index``).
"""

from __future__ import annotations

import json

from fuzz.targets._common import (
    TOC_OFFSET,
    gzip_footer,
    gzip_toc_member,
    index_from_compressed_toc,
)
from store.estargz import EstargzError

ALLOWED: tuple[type[BaseException], ...] = (EstargzError,)

NAMES = ["a", "b", "a/b", "a/b/c", "./a", "a/", "/a", "..", "../a", "a/../..", ".", "", "b/./a"]
TYPES = ["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk", "sock", 7]
INTS = [0, 1, 2, 5, 10, 100, 4096, TOC_OFFSET - 1, TOC_OFFSET, TOC_OFFSET + 1, -1, 1 << 63]
WEIRD = [None, True, "5", 1.5, [], {}, "x"]
STRINGS = ["", "a", "../b", "sha256:" + "0" * 64, "2024-01-01T00:00:00Z", "\udcff"]
INT_KEYS = ["size", "offset", "innerOffset", "chunkOffset", "chunkSize", "mode", "uid", "gid"]
STR_KEYS = ["linkName", "digest", "chunkDigest", "modtime", "userName", "groupName"]


class _Bytes:
    """Draws small choices from the input; zeros once it runs out (so every input ends)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def pick(self, options: list) -> object:
        return options[self.byte() % len(options)]

    def more(self) -> bool:
        return self.pos < len(self.data)


def _value(b: _Bytes, typical: list) -> object:
    return b.pick(WEIRD) if b.byte() % 8 == 0 else b.pick(typical)


def entries(data: bytes) -> list[dict]:
    b = _Bytes(data)
    out: list[dict] = []
    while b.more() and len(out) < 64:
        e: dict = {"name": _value(b, NAMES), "type": b.pick(TYPES)}
        present = b.byte() | (b.byte() << 8)
        for i, key in enumerate(INT_KEYS):
            if present & (1 << i):
                e[key] = _value(b, INTS)
        for i, key in enumerate(STR_KEYS):
            if present & (1 << (8 + i)):
                e[key] = _value(b, STRINGS)
        if present & (1 << 14):
            e["xattrs"] = b.pick([{"user.a": "eA=="}, {"user.a": "!!"}, {"user.a": 1}, [], "x"])
        if present & (1 << 15):
            e["devMajor"] = _value(b, INTS)
        out.append(e)
    return out


def one_input(data: bytes) -> None:
    toc = json.dumps({"version": 1, "entries": entries(data)}).encode()
    compressed = gzip_toc_member(toc)
    index_from_compressed_toc(compressed, gzip_footer(compressed))
