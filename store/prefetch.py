"""A layer's prefetcher: the region before ``.prefetch.landmark`` first, then the rest.

An optimized eStargz image lays the files its workload reads first out before the
``.prefetch.landmark`` entry (the TOC gives its offset, the index's ``prefetch_end``). Two
pieces bring that region in ahead of the reads:

- :class:`AheadBlob` starts downloading it raw as soon as the TOC's digest is verified, before
  the TOC is parsed into an index (the resolver wires it in); its bytes are only ever handed
  to the chunk source, which inflates and verifies every chunk before anything is served;
- :class:`Prefetcher` claims the region's chunks and fetches them through the layer's
  :class:`~store.chunks.ChunkSource` in pieces of :data:`PREFETCH_PIECE` compressed bytes,
  :data:`PREFETCH_STREAMS` requests at a time, then (if asked) fetches the rest of the layer
  in :data:`BACKGROUND_BATCH` batches, each only while no on-demand read is waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from store.chunks import BlobReader, ChunkRef, ChunkSource, Download, LayerFetchError

log = logging.getLogger(__name__)

PREFETCH_PIECE = 1 << 20  # compressed bytes per prefetch request
PREFETCH_STREAMS = 3  # prefetch requests in flight per layer
BACKGROUND_BATCH = 4 << 20  # compressed bytes per background request


@dataclass
class _Region:
    """One early download of ``[0, end)``: piece ``i``'s bytes once ``done[i]`` is set
    (``None`` if it failed, or after the region was dropped)."""

    end: int
    data: list[bytes | None]
    done: list[trio.Event]


@dataclass
class AheadBlob:
    """A blob reader that can download the blob's first bytes ahead of need, in pieces.

    Why: the landmark offset is in the TOC's JSON as soon as its digest is verified, but
    parsing the TOC into an index costs ~0.1 s of CPU per 10,000 entries, and an image's
    layers are parsed together. Starting the prefetch region's download at verification
    instead of after the parse puts it on the wire about half a second sooner in a pull.
    The bytes are handed to the layer raw: every chunk is still inflated and verified
    before anything is served. Reads outside the region (or of a failed or dropped piece)
    go to the registry as usual.
    """

    blob: BlobReader
    _region: _Region | None = None
    _started: bool = False
    _scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def size(self) -> int:
        return self.blob.size

    def start(self, end: int | None, nursery: trio.Nursery) -> None:
        """Begin downloading ``[0, end)`` (once; ``None`` or 0: nothing to do)."""
        if self._started or not end or end <= 0:
            return
        self._started = True
        end = min(end, self.blob.size)
        pieces = [(lo, min(lo + PREFETCH_PIECE, end)) for lo in range(0, end, PREFETCH_PIECE)]
        region = _Region(end, [None] * len(pieces), [trio.Event() for _ in pieces])
        self._region = region
        nursery.start_soon(self._run, region, pieces)

    async def _run(self, region: _Region, pieces: list[tuple[int, int]]) -> None:
        send, receive = trio.open_memory_channel[int](len(pieces))
        for i in range(len(pieces)):
            send.send_nowait(i)
        send.close()

        async def worker() -> None:
            async for i in receive:
                try:
                    (part,) = await self.blob.read_ranges([pieces[i]])
                    if self._region is region:  # not dropped meanwhile
                        region.data[i] = part
                except Exception as exc:  # the layer then reads these bytes itself
                    log.warning("early prefetch of bytes %d-%d failed: %s", *pieces[i], exc)
                finally:
                    region.done[i].set()

        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    for _ in range(min(PREFETCH_STREAMS, len(pieces))):
                        nursery.start_soon(worker)
        finally:
            for done in region.done:
                done.set()

    def drop(self) -> None:
        """Stop downloading and forget the region's bytes (the layer has what it needs).

        A reader still waiting on a piece wakes up and reads from the registry instead."""
        region, self._region = self._region, None
        self._scope.cancel()
        if region is not None:
            for i, done in enumerate(region.done):
                region.data[i] = None
                done.set()

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        out: list[bytes | None] = [None] * len(ranges)
        for n, (lo, hi) in enumerate(ranges):
            region = self._region
            if region is None or hi > region.end:
                continue
            first, last = lo // PREFETCH_PIECE, (hi - 1) // PREFETCH_PIECE
            for i in range(first, last + 1):
                await region.done[i].wait()
            parts = region.data[first : last + 1]
            if all(p is not None for p in parts):
                joined = b"".join(p for p in parts if p is not None)
                base = first * PREFETCH_PIECE
                out[n] = joined[lo - base : hi - base]
        missing = [n for n, part in enumerate(out) if part is None]
        if missing:
            fetched = await self.blob.read_ranges([ranges[n] for n in missing])
            for n, part in zip(missing, fetched, strict=True):
                out[n] = part
        return [p for p in out if p is not None]


@dataclass
class Prefetcher:
    """One layer's landmark-region prefetch and background fetch, through its chunk source.

    ``idle()`` returns once no on-demand read of the layer is in progress: the background
    fetch waits for it before each batch. Progress shows in ``source.stats``
    (``prefetch_done``, ``background_done``).
    """

    source: ChunkSource
    idle: Callable[[], Awaitable[None]]
    started: bool = False  # the prefetch has claimed its chunks (or is not needed)
    _finished: trio.Event = field(default_factory=trio.Event)
    _scope: trio.CancelScope | None = None

    async def run(
        self, limiter: trio.CapacityLimiter, prefetch_timeout: float | None, background: bool
    ) -> None:
        """:meth:`prefetch` (unless ``prefetch_timeout`` is None), then :meth:`background`
        (if ``background``)."""
        if prefetch_timeout is not None:
            await self.prefetch(limiter, prefetch_timeout)
        self.source.stats.prefetch_done = True
        if background:
            await self.background(limiter)
            self.source.stats.background_done = True

    async def prefetch(self, limiter: trio.CapacityLimiter, timeout: float) -> None:
        """Fetch the region before the landmark once, giving up after ``timeout`` seconds
        (its unfetched chunks are then read on demand); a second caller waits for the first.
        Holds one of ``limiter``'s tokens while it fetches. Raises nothing: a failed piece is
        logged, and a reader of its chunks fetches them itself."""
        if self.started:
            await self._finished.wait()
            return
        self.started = True
        try:
            with trio.CancelScope() as self._scope, trio.move_on_after(timeout):
                await self._prefetch(limiter)
        finally:
            self.source.stats.prefetch_done = True
            self._finished.set()
            self._drop_ahead()

    async def _prefetch(self, limiter: trio.CapacityLimiter) -> None:
        """Fetch the landmark region in pieces, in blob order, a few requests at a time.

        Why pieces and not one request: a piece's chunks are decompressed, verified and
        handed to waiting readers as soon as that piece arrives. An optimized image lays its
        files out in the order the workload first reads them, so the workload starts on the
        first files while the later ones are still on the wire, and inflating overlaps with
        the download instead of following it.
        """
        source = self.source
        end = source.index.prefetch_end
        if not end:
            return
        claimed = source.claim(c for c in source.index.all_chunks() if c.compressed_end <= end)
        pieces: list[list[ChunkRef]] = []
        piece_bytes = PREFETCH_PIECE
        for c in claimed:
            if piece_bytes >= PREFETCH_PIECE:
                pieces.append([])
                piece_bytes = 0
            pieces[-1].append(c)
            piece_bytes += c.compressed_end - c.compressed_offset
        log.debug(
            "prefetch of %s: %d chunks, %d bytes, %d pieces",
            source.key,
            len(claimed),
            sum(c.compressed_end - c.compressed_offset for c in claimed),
            len(pieces),
        )
        send, receive = trio.open_memory_channel[list[ChunkRef]](len(pieces))
        for piece in pieces:
            send.send_nowait(piece)
        send.close()

        async def deliver(got: Download) -> None:
            try:
                await source.deliver(got)
            except Exception as exc:  # never cached; a reader's own fetch reports it
                log.warning("prefetch of %s: %s", source.key, exc)

        async def worker(nursery: trio.Nursery) -> None:
            # Inflating a piece runs beside the next piece's download, not before it.
            async for piece in receive:
                try:
                    got = await source.download(piece, align=False)
                except Exception as exc:  # readers of these chunks fetch them on demand
                    log.warning("prefetch of %s failed: %s", source.key, exc)
                    continue
                nursery.start_soon(deliver, got)

        try:
            async with limiter, trio.open_nursery() as nursery:
                for _ in range(min(PREFETCH_STREAMS, len(pieces))):
                    nursery.start_soon(worker, nursery)
        finally:
            # Cancelled (timeout, release): give the unfetched claims back to on-demand reads.
            while True:
                try:
                    piece = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                for c in piece:
                    source.cache.finish(c.digest, None, LayerFetchError("prefetch stopped"))

    async def background(self, limiter: trio.CapacityLimiter) -> None:
        """Fetch every chunk of the layer not yet cached, in blob order, in batches of
        :data:`BACKGROUND_BATCH` compressed bytes, each after the layer's on-demand reads
        and under one of ``limiter``'s tokens. A failed batch is logged, and the next one
        waits a second."""
        batch: list[ChunkRef] = []
        batch_bytes = 0
        for c in self.source.index.all_chunks():
            if c.digest in self.source.cache:
                continue
            batch.append(c)
            batch_bytes += c.compressed_end - c.compressed_offset
            if batch_bytes >= BACKGROUND_BATCH:
                await self._background_batch(batch, limiter)
                batch, batch_bytes = [], 0
        if batch:
            await self._background_batch(batch, limiter)

    async def _background_batch(self, batch: list[ChunkRef], limiter: trio.CapacityLimiter) -> None:
        await self.idle()  # on-demand reads first
        async with limiter:
            try:
                await self._fetch_region(batch)
            except Exception as exc:
                log.warning("background fetch of %s failed: %s", self.source.key, exc)
                await trio.sleep(1.0)

    async def _fetch_region(self, chunks: list[ChunkRef]) -> None:
        claimed = self.source.claim(chunks)
        if claimed:
            await self.source.fetch(claimed)

    def stop(self) -> None:
        """Cancel the prefetch and drop an early download's bytes (the layer is released)."""
        if self._scope is not None:
            self._scope.cancel()
        self._drop_ahead()

    def _drop_ahead(self) -> None:
        if isinstance(self.source.blob, AheadBlob):
            self.source.blob.drop()
