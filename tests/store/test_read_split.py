"""A range read in pieces on several connections (store.chunks.read_split): the pieces, the
bytes, and the error a failing piece raises."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from store.chunks import SPLIT_MOST, SPLIT_PIECE, read_split, split_spans


@given(
    lo=st.integers(0, 1 << 30),
    size=st.integers(0, 4 << 20),
    piece=st.integers(1, 1 << 20),
    most=st.integers(1, 16),
)
def test_split_spans_cover_the_range_in_order(lo: int, size: int, piece: int, most: int) -> None:
    spans = split_spans(lo, lo + size, piece, most)
    if size == 0:
        assert spans == []
        return
    assert spans[0][0] == lo and spans[-1][1] == lo + size
    assert all(a < b for a, b in spans)
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    assert len(spans) <= most
    if size < 2 * piece:
        assert len(spans) == 1  # below two pieces' worth: one request
    sizes = [b - a for a, b in spans]
    assert len(set(sizes[:-1])) <= 1 and sizes[-1] <= sizes[0]  # equal, the last no longer


def test_split_spans_of_a_large_toc() -> None:
    spans = split_spans(1000, 1000 + 467_000)
    assert len(spans) == SPLIT_MOST
    assert split_spans(0, 2 * SPLIT_PIECE - 1) == [(0, 2 * SPLIT_PIECE - 1)]


class Blob:
    """Bytes in memory; ``fail_at``: a read starting there raises."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        self.data, self.size, self.fail_at = data, len(data), fail_at
        self.requests: list[list[tuple[int, int]]] = []

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self.requests.append(list(ranges))
        await trio.sleep(0)
        if any(lo == self.fail_at for lo, _ in ranges):
            raise ValueError(f"no bytes at {self.fail_at}")
        return [self.data[lo:hi] for lo, hi in ranges]


@pytest.mark.anyio
@pytest.mark.parametrize("lo,hi", [(0, 0), (10, 20), (5, 5 + 3 * SPLIT_PIECE + 7), (0, 1 << 20)])
async def test_read_split_returns_the_bytes_one_range_a_request(lo: int, hi: int) -> None:
    blob = Blob(os.urandom(1 << 20))
    assert await read_split(blob, lo, hi) == blob.data[lo:hi]
    assert sorted(r for (r,) in blob.requests) == split_spans(lo, hi)


@pytest.mark.anyio
async def test_a_failing_piece_raises_its_own_error_not_a_group() -> None:
    spans = split_spans(0, 1 << 20)
    blob = Blob(os.urandom(1 << 20), fail_at=spans[3][0])
    with pytest.raises(ValueError, match=f"no bytes at {spans[3][0]}"):
        await read_split(blob, 0, 1 << 20)
