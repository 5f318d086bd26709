"""A byte budget shared by tasks: at most ``limit`` bytes taken at once, first come first served.

Why: what a layer says about its chunks is not to be trusted with memory. A chunk of 64 MiB
of zeros compresses to 64 KiB, so a batch cut by compressed bytes alone can inflate to
gigabytes (48 such chunks in a 4 MiB batch held 3.25 GB at once). The store's tasks that
inflate chunks take their uncompressed size from one :class:`ByteBudget` (the chunk cache's,
:attr:`store.cache.ChunkCache.inflating`) before they start and give it back once the bytes
are in the cache, so the bytes being inflated store-wide stay under its limit, whatever the
layers say.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class ByteBudget:
    """At most ``limit`` bytes taken at once (one taker alone may take more: a request is
    never refused, only made to wait until nothing else is taken). Takers are served in the
    order they asked: a big request is not passed over forever by small ones — except
    ``urgent`` ones (a read someone waits for), which take what fits at once and otherwise
    wait at the head of the line: work ahead of reads never keeps a read waiting for more
    than the room one taker gives back."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"a byte budget's limit must be positive, got {limit}")
        self.limit = limit
        self.used = 0
        self._waiting: deque[list] = deque()  # [nbytes, trio.Event, granted]

    def _fits(self, nbytes: int) -> bool:
        return self.used == 0 or self.used + nbytes <= self.limit

    async def acquire(self, nbytes: int, *, urgent: bool = False) -> None:
        """Take ``nbytes`` (>= 0), waiting for room (a checkpoint either way)."""
        if (urgent or not self._waiting) and self._fits(nbytes):
            self.used += nbytes
            await trio.lowlevel.checkpoint()
            return
        ticket = [nbytes, trio.Event(), False]
        if urgent:
            self._waiting.appendleft(ticket)
        else:
            self._waiting.append(ticket)
        try:
            await ticket[1].wait()
        except BaseException:
            if ticket[2]:  # granted as we were cancelled: give it back
                self.release(nbytes)
            else:
                self._waiting.remove(ticket)
                self._grant()  # the next in line may fit now
            raise

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` taken with :meth:`acquire`; waiters that now fit go, in order."""
        self.used -= nbytes
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            ticket = self._waiting.popleft()
            self.used += ticket[0]
            ticket[2] = True
            ticket[1].set()

    @asynccontextmanager
    async def taking(self, nbytes: int, *, urgent: bool = False) -> AsyncIterator[None]:
        """``async with budget.taking(n):`` — :meth:`acquire`, then :meth:`release` on exit."""
        await self.acquire(nbytes, urgent=urgent)
        try:
            yield
        finally:
            self.release(nbytes)
