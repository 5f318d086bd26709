"""Range planning and multipart/byteranges parsing (pure logic)."""

from __future__ import annotations

import pytest

from store.registry.errors import RangeError, RangeNotHonoured
from store.registry.ranges import (
    MULTIPART_PART_OVERHEAD,
    RangeBody,
    Span,
    body_limit,
    coalesce,
    multipart_boundary,
    parse_content_range,
    parse_multipart_byteranges,
    range_body,
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


@pytest.mark.parametrize(
    "value",
    [
        "bytes \u0665-\u0669/100",  # Arabic-Indic digits: int() reads them, HTTP has none
        "bytes 0-9/" + "9" * 5000,  # past int()'s limit on digits (ValueError before)
        "bytes 0-9/" + "9" * 20,  # past int64
    ],
)
def test_a_content_range_of_no_http_byte_positions_is_a_range_error(value: str) -> None:
    with pytest.raises(RangeError, match="bad Content-Range header"):
        parse_content_range(value)


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


def test_body_limit_is_the_spans_plus_multipart_overhead() -> None:
    assert body_limit([Span(10, 20)]) == 10
    assert body_limit([Span(0, 10), Span(20, 25)]) == 15 + 3 * MULTIPART_PART_OVERHEAD


def _h(**headers: str) -> dict[str, str]:
    return {k.replace("_", "-").lower(): v for k, v in headers.items()}


def test_range_body_single_part_must_be_within_the_request_and_say_its_length() -> None:
    one = [Span(100, 200)]
    assert range_body(one, 206, _h(content_range="bytes 100-199/1000")) == RangeBody(100, 100)
    ok = _h(content_range="bytes 100-199/1000", content_length="100")
    assert range_body(one, 206, ok) == RangeBody(100, 100)
    # A server may answer several spans with one part covering them (RFC 9110 §14.4).
    two = [Span(0, 10), Span(20, 30)]
    assert range_body(two, 206, _h(content_range="bytes 0-29/1000")) == RangeBody(0, 30)
    far = [Span(0, 10), Span(10_000, 10_010)]
    with pytest.raises(RangeError, match=r"more than the 3092 bytes asked"):
        range_body(far, 206, _h(content_range="bytes 0-10009/20000"))
    with pytest.raises(RangeError, match=r"bytes 100-1099 does not lie within .*bytes=100-199"):
        range_body(one, 206, _h(content_range="bytes 100-1099/2000"))
    with pytest.raises(RangeError, match=r"\(100 bytes\) has Content-Length 2147483648"):
        range_body(one, 206, _h(content_range="bytes 100-199/1000", content_length=str(2 << 30)))
    for bad in ("-1", "1e3", "", "1_0", "١٠٠"):
        with pytest.raises(RangeError, match="bad Content-Length"):
            range_body(one, 206, _h(content_range="bytes 100-199/1000", content_length=bad))


def test_range_body_multipart_is_bounded_by_the_spans() -> None:
    two = [Span(0, 10), Span(20, 30)]
    ctype = "multipart/byteranges; boundary=XyZ"
    limit = body_limit(two)
    assert range_body(two, 206, _h(content_type=ctype)) == RangeBody(0, limit, "XyZ")
    ok = _h(content_type=ctype, content_length=str(limit))
    assert range_body(two, 206, ok) == RangeBody(0, limit, "XyZ")
    with pytest.raises(RangeError, match=f"Content-Length {limit + 1}, more than the {limit}"):
        range_body(two, 206, _h(content_type=ctype, content_length=str(limit + 1)))


def test_range_body_200_only_when_the_whole_blob_was_asked() -> None:
    assert range_body([Span(0, 500)], 200, _h(content_length="500")) == RangeBody(0, 500)
    assert range_body([Span(0, 500)], 200, {}) == RangeBody(0, 500)  # read at most 501
    for spans, headers in [
        ([Span(400, 500)], _h(content_length="500")),  # the footer: not from byte 0
        ([Span(0, 100)], _h(content_length="500")),  # from byte 0, not to the end
        ([Span(0, 10), Span(20, 30)], {}),  # several spans: the caller asks one at a time
    ]:
        with pytest.raises(RangeNotHonoured, match=r"ignores Range requests \(answered 200"):
            range_body(spans, 200, headers)
    with pytest.raises(RangeError, match="whole blob: 400 bytes"):
        range_body([Span(0, 500)], 200, _h(content_length="400"))
