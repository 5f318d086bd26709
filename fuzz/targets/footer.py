"""The blob's footer: eStargz (51 bytes), legacy stargz (47), zstd:chunked (48 and 72).

Input: the last bytes of a blob. The first two bytes (when present) add to the blob size, so
the fuzzer also sees tails of blobs longer than the tail. Parsed footers must point inside
the blob, and slicing the TOC out of the tail must agree with :func:`toc_range`.
"""

from __future__ import annotations

from store.estargz import (
    EstargzError,
    parse_footer,
    tail_fetch_size,
    toc_bytes_from_tail,
    toc_range,
)

ALLOWED: tuple[type[BaseException], ...] = (EstargzError,)


def one_input(data: bytes) -> None:
    extra = int.from_bytes(data[:2], "little") if len(data) >= 2 else 0
    blob_size = len(data) + extra
    footer = parse_footer(data, blob_size)
    start, end = toc_range(footer, blob_size)
    assert 0 <= start <= end <= blob_size - footer.footer_size, (footer, blob_size)
    toc = toc_bytes_from_tail(data, blob_size, footer)
    if toc is not None:
        assert len(toc) == end - start, (footer, len(toc))
    assert 0 <= tail_fetch_size(blob_size) <= blob_size
