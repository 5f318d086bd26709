"""Byte-range planning and `multipart/byteranges` parsing (sans-IO, unit tested alone)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..spans import merge_spans
from .errors import RangeError, RangeNotHonoured

# ASCII digits only (RFC 9110 §14.4's DIGIT; ``\d`` alone takes any Unicode decimal digit), at
# most 19 of them: a byte position fits in int64 (a 5,000-digit one reached ``int``'s limit on
# digits as a ValueError, not a RangeError).
_CONTENT_RANGE = re.compile(
    r"^\s*bytes\s+([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)\s*$", re.I | re.ASCII
)
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


# Bytes a multipart/byteranges answer may spend per part besides the part's data: the delimiter
# line and the part's headers (Content-Type, Content-Range: about 100 bytes from Go's
# http.ServeContent, which distribution uses), with room to spare; one more share for the
# preamble and the closing delimiter.
MULTIPART_PART_OVERHEAD = 1024


@dataclass(frozen=True)
class RangeBody:
    """What the body of an answer to a Range request must be, known from its status and
    headers before any of it is read.

    ``limit`` bytes at most are read. With ``boundary`` None the body is one part: exactly
    ``limit`` bytes of the blob from ``start``; otherwise a multipart/byteranges body of at
    most ``limit`` bytes, whose parts are then parsed."""

    start: int
    limit: int
    boundary: str | None = None


def body_limit(spans: Sequence[Span]) -> int:
    """The most body bytes an answer to a request for ``spans`` may carry: their sizes, and
    for several spans (a multipart answer) :data:`MULTIPART_PART_OVERHEAD` per part plus one.

    Exact, not generous: ``spans`` come from :func:`coalesce`, so a server that merges them
    (RFC 9110 §14.2 lets it) would add the bytes between them; Go's ServeContent and nginx do
    not merge."""
    total = sum(s.size for s in spans)
    if len(spans) > 1:
        total += MULTIPART_PART_OVERHEAD * (len(spans) + 1)
    return total


def range_body(spans: Sequence[Span], status: int, headers: Mapping[str, str]) -> RangeBody:
    """How to read a 200 or 206 answer to ``Range: range_header(spans)`` (``spans`` sorted, as
    :func:`coalesce` returns them); ``headers`` looked up by lower-case name.

    A 200 is the whole blob: the server ignored the Range header (RFC 9110 §14.2 lets it). It
    is read only when that is what was asked — one span from byte 0 and, by the
    ``Content-Length`` when there is one, the whole blob; any other 200 raises
    :class:`RangeNotHonoured` unread, since taking the wanted bytes out of it means reading
    the blob from its start to them, for every read (the TOC at the blob's end, in up to
    eight parallel pieces, downloaded the blob eight times over). The Go stargz-snapshotter
    instead takes the 200 body as the whole blob and caches every chunk of it
    (fs/remote/resolver.go ``httpFetcher.fetch``, fs/remote/blob.go ``fetchRegions``): a full
    download per read that a lazy store should not hide. A 200 to several spans is the
    caller's to handle (ask one range at a time).

    Raises :class:`RangeError` when the headers already show the body is not what was asked,
    so it is refused unread: a single part whose ``Content-Range`` reaches outside the
    requested bytes (RFC 9110 §14.4: a server answers with the ranges asked, clipped to the
    blob; one that sends more is not trusted with a bigger buffer) or that is longer than
    :func:`body_limit` (one part merging far-apart spans), a ``Content-Length`` that
    differs from the part's length, or a multipart ``Content-Length`` above
    :func:`body_limit`."""
    asked = range_header(spans)
    length = _content_length(headers.get("content-length"))
    if status == 200:
        end = spans[-1].end
        if len(spans) > 1 or spans[0].start != 0 or (length is not None and length > end):
            whole = "" if length is None else f" of {length} bytes"
            raise RangeNotHonoured(
                f"ignores Range requests (answered 200{whole} to {asked}): the blob cannot be "
                "pulled lazily from it"
            )
        if length is not None and length < end:
            raise RangeError(f"answered 200 to {asked} with the whole blob: {length} bytes")
        return RangeBody(0, end)
    boundary = multipart_boundary(headers.get("content-type", ""))
    if boundary:
        limit = body_limit(spans)
        if length is not None and length > limit:
            raise RangeError(
                f"multipart answer to {asked} has Content-Length {length}, more than the "
                f"{limit} bytes its parts can take"
            )
        return RangeBody(spans[0].start, limit, boundary)
    start, end, _ = parse_content_range(headers.get("content-range"))
    if start < spans[0].start or end > spans[-1].end:
        raise RangeError(
            f"answer for bytes {start}-{end - 1} does not lie within the request for {asked}"
        )
    if end - start > body_limit(spans):  # one part for several spans, with what lies between
        raise RangeError(
            f"answer for bytes {start}-{end - 1} to {asked}: more than the {body_limit(spans)} "
            "bytes asked"
        )
    if length is not None and length != end - start:
        raise RangeError(
            f"answer for bytes {start}-{end - 1} ({end - start} bytes) has Content-Length {length}"
        )
    return RangeBody(start, end - start)


def _content_length(value: str | None) -> int | None:
    if value is None:
        return None
    digits = value.strip()
    if not (digits.isascii() and digits.isdigit()):
        raise RangeError(f"bad Content-Length header {value!r}")
    return int(digits)


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


def covers(parts: Mapping[tuple[int, int], bytes], offset: int, size: int) -> bool:
    """Whether one of ``parts`` (keyed by (start, end)) holds all of [offset, offset+size)."""
    return any(start <= offset and offset + size <= end for start, end in parts)


def slice_from(parts: dict[tuple[int, int], bytes], offset: int, size: int) -> bytes:
    """The bytes [offset, offset+size) out of whichever part contains them."""
    for (start, end), data in parts.items():
        if start <= offset and offset + size <= end:
            return data[offset - start : offset - start + size]
    raise RangeError(f"response does not cover bytes {offset}-{offset + size - 1}")
