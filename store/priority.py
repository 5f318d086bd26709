"""Foreground before background, store-wide: a background fetch waits for quiet.

Why: the background fetch brings each layer whole (``no_background_fetch = false``, the
default), 4 MiB per request, while the container that is starting reads on demand. Gated per
layer — a batch of a layer waited only for that layer's reads in progress — the batches of the
image's other layers filled the link between one read and the next, and each read shared it
with them: on a 100 Mbit/s, 40 ms link, with background fetching, gcc's start through
``estargz-noopt`` took 8.99 s instead of 4.78 s, python's 2.99 s instead of 2.10 s (medians
of 4; with this rule 4.82 s and 2.13 s, ``scenarios/background-fetch.toml``).

The rule is the Go store's (stargz-snapshotter ``task/task.go``, ``BackgroundTaskManager``;
``store/manager.go`` makes it with a 5 s silence period): foreground work — a file read or
a look-ahead fetch that needs a chunk not cached (a read the cache answers is none, as only
blob reads are in the Go store), a blob read, an image's manifest fetch, a layer's load, a
prefetch — marks itself (:meth:`Foreground.busy`); a background batch starts only once no
foreground work has run for :data:`SILENCE` seconds, and foreground work that starts
meanwhile cancels the batches under way (their claims are released, so a read waiting on
their chunks fetches them itself, in one request), which run again after the next quiet.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

# Seconds without foreground work before a background batch starts (the Go store's 5 s).
SILENCE = 5.0


@dataclass
class Foreground:
    """Whether work a reader waits on is under way, store-wide, and since when it is not.

    ``silence``: seconds of quiet a background batch waits for (:data:`SILENCE`; 0 lets it
    start as soon as no foreground work runs)."""

    silence: float = SILENCE
    _active: int = 0
    _quiet_since: float = -math.inf
    _idle: trio.Event = field(default_factory=trio.Event)  # set when _active drops to 0
    _background: set[trio.CancelScope] = field(default_factory=set)

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Foreground work runs inside: background batches under way are cancelled, and
        none starts until :attr:`silence` seconds after the last such block ends."""
        self._active += 1
        for scope in self._background:
            scope.cancel()
        try:
            yield
        finally:
            self._active -= 1
            if not self._active:  # the waiters' quiet starts now: wake them (once, not per read)
                self._quiet_since = trio.current_time()
                self._idle.set()
                self._idle = trio.Event()

    async def _quiet(self) -> None:
        """Return once no foreground work has run for :attr:`silence` seconds."""
        while True:
            if self._active:
                await self._idle.wait()
                continue
            until = self._quiet_since + self.silence
            if trio.current_time() >= until:
                return
            await trio.sleep_until(until)  # then look again: work may have come and gone

    async def in_background(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work()`` after a quiet period; while foreground work interrupts it (cancels
        it), again after the next one. ``work`` must tolerate being cancelled and started
        again."""
        while True:
            await self._quiet()
            with trio.CancelScope() as scope:
                self._background.add(scope)
                try:
                    await work()
                finally:
                    self._background.discard(scope)
            if not scope.cancelled_caught:
                return
