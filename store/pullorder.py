"""The order in which an image's TOCs are parsed while the runtime pulls it.

podman looks an image's layers up one after another and waits for each, but not in the
manifest's order: it changes from pull to pull (seen with podman 4.3, which copies an
image's layers concurrently: python's six layers came in five different orders in nine
pulls, never bottom layer first). The store loads them all at once as soon as the manifest
is known (:meth:`store.resolver.LayerManager._start_indexes`). Decoding a TOC and building
its index is Python under the GIL (about 10 µs an entry: 0.08 s for gcc's 8,800-entry
layers): two big TOCs built side by side both finish as late as the two built one after the
other would — gcc's pull timeline showed each taking 0.19 s instead of 0.09 s.
:class:`Turns` builds them one at a time, lowest priority key first. The resolver's key is
(not yet looked up, when the image's layers started loading, the layer's place in the
manifest), read when the turn is handed on: a layer podman asked for goes before one it has
not (a base layer it already has may never be asked for), so the layer podman waits on is
ready first; among the layers not asked for yet, the manifest's order only breaks the tie.
The inflate and hash that verify a TOC (they release the GIL) are not ordered; a TOC too big
to be kept whole after them is inflated again inside its turn. Two more orderings of the CPU
work changed nothing, each an A/B in one invocation (``estargz``, 10 samples, pull medians,
Mann-Whitney p ≥ 0.35): the verify inside the turn as well, so one TOC's CPU work runs at a
time and a looked-up layer's verify is not starved (python 1.015 → 1.030 s, gcc 1.014 →
0.996 s, redis 0.849 → 0.857 s); and the prefetch's inflating and verifying held back until no
parse holds or waits for a turn, its download left as it is (python 1.015 → 1.026 s, gcc
1.007 → 0.994 s, redis 0.864 → 0.843 s).

The link is not ordered. Tried with this order, each an A/B in one invocation:
- holding an image's prefetch downloads back until all its TOCs were in (5 samples):
  gcc's pull p95 went from 1.07 to 0.95 s, but its run from 1.27 to 1.59 s, as the
  prefetched bytes arrived later;
- sending the TOC requests in this order, 12 or 24 in flight (4 samples): no gain in any
  workload's pull median (python 1.47 → 1.59 / 1.51 s);
- one queue of 12 for the TOC requests and then the prefetch downloads (5 samples): pull
  medians unchanged or longer, postgres's run 1.03 → 1.27 s.
Once the TOCs are in, the pull waits on the parses of the biggest ones, not on the link.

Nor does reading the first looked-up layer's footer and TOC before the manifest is in (a
suffix range, ``bytes=-N``, needs only the blob's digest, which podman < 5.1 looks it up by)
shorten the pull. A/B of 5 samples, ``estargz``, pull medians: python 0.952 → 0.977 s,
gcc 0.900 → 0.957 s, postgres 0.845 → 0.833 s (none significant), redis 0.836 → 0.797 s
(Mann-Whitney p = 0.008); ``zstd-chunked-lazy`` unchanged. The tail came in with the
manifest, both one round trip after a new connection's handshake, so the layer was ready
only 0.09 s sooner (python: 0.62 s), and podman's next lookup then waited on another layer's
TOC, still sharing the link with all the others (0.54 to 0.81 s).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

# Compared as tuples, lowest first; read each time the turn is handed on (it may change).
TurnKey = tuple[bool | float | int, ...]


@dataclass
class Turns:
    """One holder at a time; when it leaves, the waiter whose ``priority()`` is lowest at that
    moment goes next (ties: first come). A waiter cancelled before its turn leaves the queue;
    one cancelled after its turn was granted hands it on. Never blocks beyond the holders:
    the turn is handed on however a holder leaves."""

    _busy: bool = False
    _waiting: list[tuple[Callable[[], TurnKey], int, trio.Event]] = field(default_factory=list)
    _arrivals: itertools.count[int] = field(default_factory=itertools.count)

    @asynccontextmanager
    async def turn(self, priority: Callable[[], TurnKey]) -> AsyncIterator[None]:
        if self._busy:
            entry = (priority, next(self._arrivals), trio.Event())
            self._waiting.append(entry)
            try:
                await entry[2].wait()
            except BaseException:
                if entry[2].is_set():  # granted meanwhile: the turn is ours to hand on
                    self._hand_on()
                else:
                    self._waiting.remove(entry)
                raise
        else:
            self._busy = True
        try:
            yield
        finally:
            self._hand_on()

    def _hand_on(self) -> None:
        if self._waiting:  # still busy: the turn passes directly
            best = min(self._waiting, key=lambda e: (e[0](), e[1]))
            self._waiting.remove(best)
            best[2].set()
        else:
            self._busy = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)
