"""store.spans.merge_spans: the one merge rule of byte spans, against a byte-set model."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from store.spans import merge_spans

spans_st = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), max_size=30)


def covered(spans: list[tuple[int, int]]) -> set[int]:
    return {b for lo, hi in spans for b in range(lo, hi)}


def test_examples() -> None:
    assert merge_spans([(0, 5), (3, 9), (9, 10), (20, 20)]) == [(0, 10)]
    assert merge_spans([(15, 20), (0, 5)]) == [(0, 5), (15, 20)]
    assert merge_spans([(0, 5), (15, 20)], gap=10) == [(0, 20)]
    assert merge_spans([(0, 5), (16, 20)], gap=10) == [(0, 5), (16, 20)]
    assert merge_spans([(5, 1), (7, 7)]) == []
    assert merge_spans(iter([(2, 4), (0, 1)])) == [(0, 1), (2, 4)]


@given(spans_st)
def test_same_bytes_sorted_disjoint_apart(spans: list[tuple[int, int]]) -> None:
    out = merge_spans(spans)
    assert covered(out) == covered(spans)
    assert all(lo < hi for lo, hi in out)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(out))  # never touching


@given(spans_st, st.integers(0, 50))
def test_gap_joins_only_near_spans(spans: list[tuple[int, int]], gap: int) -> None:
    out = merge_spans(spans, gap)
    assert covered(merge_spans(spans)) <= covered(out)
    assert all(b[0] - a[1] > gap for a, b in itertools.pairwise(out))
    # every output span starts and ends where an input span does
    starts = {lo for lo, hi in spans if lo < hi}
    ends = {hi for lo, hi in spans if lo < hi}
    assert all(lo in starts and hi in ends for lo, hi in out)
