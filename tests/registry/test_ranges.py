"""Range planning and multipart/byteranges parsing (pure logic)."""

from __future__ import annotations

import pytest

from store.registry.errors import RangeError
from store.registry.ranges import (
    Span,
    coalesce,
    multipart_boundary,
    parse_content_range,
    parse_multipart_byteranges,
    range_header,
)


def test_coalesce_merges_overlapping_and_adjacent() -> None:
    assert coalesce([(10, 5), (0, 10), (30, 5), (12, 10), (40, 0)]) == [Span(0, 22), Span(30, 35)]
    assert coalesce([(0, 10), (15, 5)], gap=5) == [Span(0, 20)]
    assert coalesce([(0, 10), (16, 5)], gap=5) == [Span(0, 10), Span(16, 21)]


def test_range_header() -> None:
    assert range_header([Span(0, 10), Span(20, 21)]) == "bytes=0-9,20-20"


def test_content_range() -> None:
    assert parse_content_range("bytes 5-9/100") == (5, 10, 100)
    assert parse_content_range("bytes 5-9/*") == (5, 10, None)
    with pytest.raises(RangeError):
        parse_content_range("items 1-2/3")


def _multipart(boundary: str, parts: list[tuple[int, bytes]], total: int) -> bytes:
    out = b""
    for start, data in parts:
        out += (
            f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {start}-{start + len(data) - 1}/{total}\r\n\r\n"
        ).encode() + data
    return out + f"\r\n--{boundary}--\r\n".encode()


def test_multipart_parsing_ignores_boundary_inside_data() -> None:
    boundary = "abc123"
    tricky = b"xx\r\n--abc123\r\nyy"
    body = _multipart(boundary, [(0, tricky), (100, b"hello")], 1000)
    parts = parse_multipart_byteranges(body, boundary)
    assert parts == {(0, len(tricky)): tricky, (100, 105): b"hello"}
    assert multipart_boundary('multipart/byteranges; boundary="abc123"') == "abc123"
    assert multipart_boundary("application/octet-stream") is None


def test_multipart_truncated() -> None:
    body = _multipart("b", [(0, b"0123456789")], 10)[:-20]
    with pytest.raises(RangeError):
        parse_multipart_byteranges(body, "b")
