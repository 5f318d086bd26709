"""Half-open byte spans ``[start, end)``: the one place they are merged.

The store merges spans in several layers — the writer's read ranges of an access trace, the
trace itself (:mod:`store.metrics`), the blob ranges a fetch asks for (:mod:`store.chunks`)
and the ranges of one HTTP request (:mod:`store.registry.ranges`) — always by this rule.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["merge_spans"]


def merge_spans(spans: Iterable[tuple[int, int]], gap: int = 0) -> list[tuple[int, int]]:
    """``spans`` sorted, empty ones (``end <= start``) dropped, and those that overlap, touch
    or lie at most ``gap`` bytes apart joined into one. ``[(0, 5), (3, 9), (9, 10), (20,
    20)]`` → ``[(0, 10)]``; with ``gap=10``, ``[(0, 5), (15, 20)]`` → ``[(0, 20)]``."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if end <= start:
            continue
        if out and start <= out[-1][1] + gap:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out
