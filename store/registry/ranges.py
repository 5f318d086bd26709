"""Byte-range planning and `multipart/byteranges` parsing (sans-IO, unit tested alone)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..spans import merge_spans
from .errors import RangeError

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.I)
_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.I)


@dataclass(frozen=True, order=True)
class Span:
    """A half-open byte interval [start, end)."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def coalesce(ranges: Sequence[tuple[int, int]], gap: int = 0) -> list[Span]:
    """Merge (offset, size) ranges that overlap or lie within `gap` bytes of each other.

    Overlapping ranges must be merged for correctness too: Go's ServeContent (which
    distribution uses) answers the whole blob when the requested ranges sum past its size.
    """
    return [Span(lo, hi) for lo, hi in merge_spans(((o, o + s) for o, s in ranges), gap)]


def range_header(spans: Sequence[Span]) -> str:
    return "bytes=" + ",".join(f"{s.start}-{s.end - 1}" for s in spans)


def parse_content_range(value: str | None) -> tuple[int, int, int | None]:
    """`bytes a-b/total` → (a, b+1, total or None)."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        raise RangeError(f"bad Content-Range header {value!r}")
    total = None if m[3] == "*" else int(m[3])
    return int(m[1]), int(m[2]) + 1, total


def multipart_boundary(content_type: str) -> str | None:
    if not content_type.lower().startswith("multipart/byteranges"):
        return None
    m = _BOUNDARY.search(content_type)
    if not m:
        raise RangeError(f"multipart response without boundary: {content_type!r}")
    return m[1] or m[2]


def parse_multipart_byteranges(body: bytes, boundary: str) -> dict[tuple[int, int], bytes]:
    """Parts keyed by (start, end). Part lengths come from Content-Range, never from searching
    the boundary, so binary data that happens to contain it cannot confuse the parser."""
    delim = b"--" + boundary.encode()
    pos = body.find(delim)
    if pos < 0:
        raise RangeError("multipart body does not contain its boundary")
    parts: dict[tuple[int, int], bytes] = {}
    while True:
        pos += len(delim)
        if body[pos : pos + 2] == b"--":
            return parts
        hdr_end = body.find(b"\r\n\r\n", pos)
        if hdr_end < 0:
            raise RangeError("multipart part headers not terminated")
        content_range = None
        for line in body[pos:hdr_end].split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if sep and name.strip().lower() == b"content-range":
                content_range = value.decode("latin-1")
        start, end, _ = parse_content_range(content_range)
        data_start = hdr_end + 4
        data = body[data_start : data_start + (end - start)]
        if len(data) != end - start:
            raise RangeError(f"multipart part {start}-{end - 1} is truncated")
        parts[(start, end)] = data
        pos = body.find(delim, data_start + len(data))
        if pos < 0:
            raise RangeError("multipart body ends without closing boundary")


def slice_from(parts: dict[tuple[int, int], bytes], offset: int, size: int) -> bytes:
    """The bytes [offset, offset+size) out of whichever part contains them."""
    for (start, end), data in parts.items():
        if start <= offset and offset + size <= end:
            return data[offset - start : offset - start + size]
    raise RangeError(f"response does not cover bytes {offset}-{offset + size - 1}")
