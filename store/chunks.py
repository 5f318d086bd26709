"""A layer's chunk source: verified chunk bytes, from the cache or fetched from the blob.

What it does for the layer above it (:class:`store.layer.Layer`) and its prefetcher
(:class:`store.prefetch.Prefetcher`): turn a set of chunks into compressed byte ranges of the
blob (aligned to the configured ``chunk_size`` and coalesced, or one exact range for a run in
blob order), fetch them through the :class:`BlobReader`, inflate and verify every chunk in
:data:`DECOMPRESS_GROUPS` worker threads, and put the good ones in the shared
:class:`~store.cache.ChunkCache`. Concurrent fetches of one chunk are deduplicated through the
cache's in-flight table (:meth:`ChunkCache.begin` claims a chunk, :meth:`ChunkCache.finish`
completes the claim, everyone else waits on it), whichever layer, read or prefetch asked.

Every chunk is verified against its ``chunkDigest`` (in :meth:`LayerIndexView.decompress`)
before it enters the cache or reaches a caller; a mismatch raises :class:`ChunkVerifyError`,
which the FUSE layer turns into EIO. Compressed bytes (:class:`Download`) are never served.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from store.cache import ChunkCache
from store.estargz import Chunk, touches

log = logging.getLogger(__name__)

# A read fetches at least the chunks of the READ_BLOCK-aligned file block(s) it touches: the
# granularity of eStargz's default 4 MiB chunks, whatever the layer's own chunks. With those it
# is the read's own chunk already; with small ones (zstd:chunked) it saves a round trip per
# chunk on scattered reads (mmap'ed code, page faults all over a library). 1 MiB blocks still
# cost gcc 74 requests where eStargz takes 43 (5.9 s against 4.4 s of run).
READ_BLOCK = 4 << 20  # uncompressed file bytes
DECOMPRESS_GROUPS = 4  # worker threads inflating one download's chunks (2 cores here)
# Edge blocks kept per layer (EdgeBlocks), in bytes: 83 of the default 50,000-byte chunk_size.
EDGE_BYTES_MAX = 4 << 20
# A request waits for an edge block that a request in flight brings only when that request
# asks for at most this many bytes more than its own: a bigger one (a prefetch or background
# batch, a 4 MiB read) would take longer than fetching the block itself.
EDGE_WAIT_SLACK = 256 << 10


class ChunkVerifyError(Exception):
    """A chunk's bytes do not match its ``chunkDigest`` (or it has none): never served."""


class LayerFetchError(Exception):
    """The registry did not deliver a chunk's bytes."""


# One chunk of one regular file: the format library's validated record (compressed_offset,
# compressed_end, inner_offset, file_offset, size, digest), shared, not copied.
ChunkRef = Chunk


class LayerIndexView(Protocol):
    """What the data path needs from a parsed layer (an adapter over ``store.estargz``)."""

    def chunks_of(self, entry: Any) -> Sequence[ChunkRef]: ...

    def all_chunks(self) -> Sequence[ChunkRef]: ...

    def decompress(self, chunk: ChunkRef, data: bytes) -> bytes: ...

    @property
    def prefetch_end(self) -> int | None: ...

    # ``[start, end)`` blob ranges before ``prefetch_end`` worth prefetching (None: all).
    prefetch_ranges: tuple[tuple[int, int], ...] | None


class BlobReader(Protocol):
    """Async range reads of one compressed blob (the registry, or a local file in tests)."""

    size: int

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]: ...


# What one ranged GET brings back within its first round trip on a new TCP connection: ten
# segments of 1448 bytes (Linux's initial congestion window, RFC 6928) less the response head.
ONE_WINDOW = 12 << 10
# A range of this many bytes or more is read in pieces on several connections at once
# (:func:`read_split`): a new connection's window doubles each round trip from ONE_WINDOW, so
# 467 KB on one takes about 5 round trips (250 ms at 40 ms RTT), in 8 pieces about 3.
SPLIT_PIECE = 48 << 10
SPLIT_MOST = 8  # pieces of one range


async def read_split(
    blob: BlobReader, lo: int, hi: int, piece: int = SPLIT_PIECE, most: int = SPLIT_MOST
) -> bytes:
    """Bytes ``[lo, hi)`` of ``blob``, read as up to ``most`` equal pieces of about ``piece``
    bytes, each its own request, all at once; joined in order.

    Why: a range read right after its connection was opened (a TOC, read once per layer
    while the runtime waits) is bounded by TCP slow start, not by the link's rate; pieces
    on several connections open their windows side by side. Raises what ``blob.read_ranges``
    raises (the first failure, not an exception group); the other pieces are cancelled.
    """
    spans = split_spans(lo, hi, piece, most)
    if len(spans) <= 1:
        return (await blob.read_ranges(spans))[0] if spans else b""
    parts: list[bytes] = [b""] * len(spans)

    async def one(i: int) -> None:
        (parts[i],) = await blob.read_ranges([spans[i]])

    try:
        async with trio.open_nursery() as nursery:
            for i in range(len(spans)):
                nursery.start_soon(one, i)
    except BaseExceptionGroup as group:
        raise _first(group) from None
    return b"".join(parts)


def split_spans(
    lo: int, hi: int, piece: int = SPLIT_PIECE, most: int = SPLIT_MOST
) -> list[tuple[int, int]]:
    """The ``(start, end)`` pieces :func:`read_split` reads ``[lo, hi)`` in: one below two
    pieces' worth, else up to ``most`` of equal size, in order; none for an empty range."""
    if hi <= lo:
        return []
    if hi - lo < 2 * piece or most <= 1:
        return [(lo, hi)]
    n = min(most, -(-(hi - lo) // piece))
    step = -(-(hi - lo) // n)
    return [(a, min(hi, a + step)) for a in range(lo, hi, step)]


def _first(group: BaseExceptionGroup) -> BaseException:
    """The first leaf of ``group`` that is not trio's ``Cancelled`` (else the first leaf)."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            stack[:0] = exc.exceptions
        else:
            leaves.append(exc)
    return next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])


@dataclass
class LayerStats:
    """Counters of one layer's data path, shared by its chunk source (fetches, verification
    failures), its prefetcher (the two ``*_done`` flags) and the layer (reads)."""

    fetched_bytes: int = 0  # compressed bytes received from the blob
    fetch_requests: int = 0  # range requests (one request may carry several ranges)
    on_demand_reads: int = 0  # FUSE reads of file contents
    cached_chunk_bytes: int = 0
    verify_failures: int = 0  # chunks whose bytes did not match their digest
    prefetch_done: bool = False
    background_done: bool = False


@dataclass(frozen=True, slots=True)
class Download:
    """Claimed chunks' compressed bytes, not yet inflated or verified (never served as is)."""

    chunks: list[ChunkRef]  # the claimed ones first, then free riders
    compressed: list[bytes]
    claimed: int


class EdgeBlocks:
    """The whole ``block``-aligned blob blocks at the two ends of each request, kept so that
    a neighbouring chunk's own request does not fetch them again.

    An aligned request is rounded out to ``block`` bytes (``[blob] chunk_size``, as the Go
    store's requests are): its first and last blocks then also hold the end or the start of
    a neighbouring chunk it did not need. The chunk cache keeps whole verified chunks only, so
    without these the neighbour's request would fetch the block again (400 kB of redis's and
    gcc's on-demand starts). The Go store keeps every fetched block by offset
    (``fs/remote/blob.go``) and fetches none twice. These are compressed bytes: whatever is
    built from them is verified by chunk digest, as any fetched bytes are, before it is cached
    or served.

    :meth:`fetch` takes the known blocks off a request's ends and marks its own end blocks
    as due until it is over. A request waits for a due block only when the request bringing
    it asks for at most :data:`EDGE_WAIT_SLACK` bytes more than it does (else it fetches the
    block itself), and only for requests started before it, so no two wait for each other;
    a block whose request failed or was cancelled is fetched by who waited for it. At most
    ``max_bytes`` of blocks are kept (two at least; oldest dropped first: a dropped block is
    fetched again); :meth:`drop` forgets those a chunk that failed verification was built
    from, so that a retry asks the registry again.
    """

    def __init__(self, block: int, blob_size: int, max_bytes: int = EDGE_BYTES_MAX) -> None:
        self.block = block
        self.blob_size = blob_size
        self.limit = max(2, max_bytes // block) if block > 0 else 0
        self._kept: dict[int, bytes] = {}  # block start -> its bytes, oldest first
        # blocks a request in flight brings: its "over" event and how many bytes it asks for
        self._due: dict[int, tuple[trio.Event, int]] = {}

    def _end(self, b: int) -> int:
        return min(b + self.block, self.blob_size)

    def _known(self, b: int, patience: int = -1) -> bool:
        """Kept, or due from a request asking for at most ``patience`` bytes."""
        if b in self._kept:
            return True
        due = self._due.get(b)
        return due is not None and due[1] <= patience

    async def fetch(
        self,
        ranges: Sequence[tuple[int, int]],
        request: Callable[[list[tuple[int, int]]], Awaitable[list[bytes]]],
    ) -> list[bytes]:
        """The bytes of ``ranges`` (``[start, end)`` blob offsets, sorted, disjoint), asking
        ``request`` (ranges -> their bytes; one call, none if every byte is known, and one more
        for the blocks that failed requests were to bring) for what no earlier request
        brought along. Raises what ``request`` raises."""
        plan = self._plan(ranges)
        try:
            got = await request(plan.request) if plan.request else []
            self._keep(plan, got)
        finally:
            self._forget(plan)
        return await self._assemble(plan, got, request)

    def _plan(self, ranges: Sequence[tuple[int, int]]) -> EdgePlan:
        """What to request for ``ranges`` (``[start, end)`` blob offsets, sorted, disjoint):
        each range less the known blocks at its ends; ranges wholly known are not requested."""
        if self.block <= 0:
            return EdgePlan(list(ranges), list(ranges), {}, [], [])
        bs = self.block
        request: list[tuple[int, int]] = []
        patience = sum(hi - lo for lo, hi in ranges) + EDGE_WAIT_SLACK
        reused: dict[int, bytes] = {}
        waits: list[tuple[int, trio.Event]] = []

        def take(b: int) -> None:
            data = self._kept.get(b)
            if data is not None:
                reused[b] = data  # held now: a later eviction cannot take it away
            else:
                waits.append((b, self._due[b][0]))

        for lo, hi in ranges:
            while lo < hi and self._known(b := lo // bs * bs, patience):
                take(b)
                lo = self._end(b)
            while lo < hi and (b := (hi - 1) // bs * bs) >= lo and self._known(b, patience):
                take(b)
                hi = b
            if lo < hi:
                request.append((lo, hi))
        mine = []
        size = sum(hi - lo for lo, hi in request)
        for lo, hi in request:
            for b in {lo // bs * bs, (hi - 1) // bs * bs}:
                if b >= lo and self._end(b) <= hi and b not in self._kept and b not in self._due:
                    self._due[b] = (trio.Event(), size)
                    mine.append(b)
        return EdgePlan(list(ranges), request, reused, waits, mine)

    def _keep(self, plan: EdgePlan, parts: Sequence[bytes]) -> None:
        """The request of ``plan`` answered ``parts``: keep its end blocks."""
        for b in plan.mine:
            for (lo, hi), data in zip(plan.request, parts, strict=True):
                if lo <= b < hi:
                    self._put(b, bytes(data[b - lo : self._end(b) - lo]))
                    break

    def _put(self, b: int, data: bytes) -> None:
        self._kept[b] = data
        while len(self._kept) > self.limit:
            del self._kept[next(iter(self._kept))]

    def drop(self, lo: int, hi: int) -> None:
        """Forget the kept blocks holding bytes of ``[lo, hi)`` (a chunk that failed its
        digest: the next try asks the registry, not these bytes again)."""
        if self.block <= 0 or lo >= hi:
            return
        for b in range(lo // self.block * self.block, hi, self.block):
            self._kept.pop(b, None)

    def clear(self) -> None:
        """Forget every kept block (the layer is released)."""
        self._kept.clear()

    def _forget(self, plan: EdgePlan) -> None:
        """The request of ``plan`` is over (answered or not): wake whoever waits on its blocks
        (a block it did not bring, they fetch themselves)."""
        for b in plan.mine:
            due = self._due.pop(b, None)
            if due is not None:
                due[0].set()

    async def _assemble(
        self,
        plan: EdgePlan,
        parts: Sequence[bytes],
        fetch: Callable[[list[tuple[int, int]]], Awaitable[list[bytes]]],
    ) -> list[bytes]:
        """The bytes of the ranges first asked for, from the request's ``parts`` and the
        reused blocks; a block whose request failed is fetched with ``fetch`` (ranges ->
        bytes). Raises what ``fetch`` raises."""
        reused = dict(plan.reused)
        for b, event in plan.waits:
            await event.wait()
            data = self._kept.get(b)
            if data is not None:
                reused[b] = data
        missing = [(b, self._end(b)) for b, _ in plan.waits if b not in reused]
        if missing:
            for (b, _), data in zip(missing, await fetch(missing), strict=True):
                reused[b] = data
                self._put(b, data)
        if not reused:
            return list(parts)
        starts = [lo for lo, _ in plan.request]
        segments = sorted([*zip(starts, parts, strict=True), *reused.items()])
        out = []
        for lo, hi in plan.ranges:
            buf = bytearray()
            for start, data in segments:
                a, z = max(lo + len(buf), start), min(hi, start + len(data))
                if a == lo + len(buf) and a < z:
                    buf += data[a - start : z - start]
            out.append(bytes(buf))
        return out


@dataclass(slots=True)
class EdgePlan:
    """One request's share of :class:`EdgeBlocks` (:meth:`EdgeBlocks.fetch`)."""

    ranges: list[tuple[int, int]]  # asked for
    request: list[tuple[int, int]]  # to request: ``ranges`` less the known end blocks
    reused: dict[int, bytes]  # kept blocks taken, by start
    waits: list[tuple[int, trio.Event]]  # blocks requests in flight bring, their "over" event
    mine: list[int]  # this request's own end blocks, due until it is over


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """The chunks a read of file bytes ``[offset, end)`` fetches (:meth:`ChunkSource.plan_read`)."""

    wanted: list[ChunkRef]  # those overlapping the read, in file order
    riders: list[ChunkRef]  # the rest of the read's block(s), neither cached nor on their way
    after: int  # index into the file's chunks of the first one past the block(s)


@dataclass
class ChunkSource:
    """Verified chunk bytes of one layer's blob (see the module docstring).

    ``chunk_size`` is the alignment of on-demand requests, in compressed bytes (the Go
    store's ``[blob] chunk_size``); ``on_fetch(nbytes, seconds)`` is called after every
    request the blob answered.
    """

    key: str  # "<ref>/<digest>", for messages
    index: LayerIndexView
    blob: BlobReader
    cache: ChunkCache
    stats: LayerStats
    chunk_size: int = 50000
    on_fetch: Callable[[int, float], None] | None = None
    _chunk_offsets: list[int] | None = None
    _edges: EdgeBlocks = field(init=False)

    def __post_init__(self) -> None:
        self._edges = EdgeBlocks(self.chunk_size, self.blob.size)

    # -- what to fetch -------------------------------------------------------------------------

    def is_missing(self, chunk: ChunkRef) -> bool:
        """Neither cached nor being fetched by anyone."""
        return chunk.digest not in self.cache and not self.cache.is_inflight(chunk.digest)

    def off_trace(self, chunk: ChunkRef) -> bool:
        """Whether ``chunk`` is in the prioritized region but in none of its prefetch ranges
        (:attr:`LayerIndexView.prefetch_ranges`): the recorded run did not read it, so no
        rider or read-ahead takes it along (a read of its own bytes still fetches it)."""
        ranges = self.index.prefetch_ranges
        end = self.index.prefetch_end
        if ranges is None or not end or chunk.compressed_end > end:
            return False
        return not touches(ranges, chunk.compressed_offset, chunk.compressed_end)

    def claim(self, chunks: Iterable[ChunkRef]) -> list[ChunkRef]:
        """Those of ``chunks`` that are neither cached nor claimed, now claimed by the caller,
        who must fetch them (:meth:`fetch`, or :meth:`download` then :meth:`deliver`) or
        release each claim with ``cache.finish(digest, None, error)``."""
        return [
            c
            for c in chunks
            if c.digest not in self.cache and self.cache.begin(c.digest) is not None
        ]

    def plan_read(
        self, chunks: Sequence[ChunkRef], offset: int, end: int, file_size: int
    ) -> ReadPlan:
        """Which of a file's ``chunks`` (in file order) a read of its bytes ``[offset, end)``
        fetches: those it overlaps, and the other chunks of the :data:`READ_BLOCK`-aligned
        block(s) it touches (riders, unless cached or already on their way)."""
        lo = (offset // READ_BLOCK) * READ_BLOCK
        hi = min(-(-end // READ_BLOCK) * READ_BLOCK, file_size)
        first = max(bisect.bisect_right(chunks, lo, key=_file_offset) - 1, 0)
        wanted: list[ChunkRef] = []
        riders: list[ChunkRef] = []
        after = first
        for c in chunks[first:]:
            if c.file_offset >= hi:
                break
            after += 1
            if c.file_offset + c.size <= lo:
                continue
            if c.file_offset < end and c.file_offset + c.size > offset:
                wanted.append(c)
            elif self.is_missing(c) and not self.off_trace(c):
                riders.append(c)
        return ReadPlan(wanted, riders, after)

    # -- reads ---------------------------------------------------------------------------------

    async def read(
        self, plan: ReadPlan, offset: int, end: int, *, nursery: trio.Nursery | None
    ) -> bytes:
        """File bytes ``[offset, end)`` from ``plan.wanted``, verified; the riders come along
        (see :meth:`get`). Raises :class:`ChunkVerifyError` or :class:`LayerFetchError`."""
        datas = await self.get(plan.wanted, riders=plan.riders, nursery=nursery)
        out = bytearray()
        for c, data in zip(plan.wanted, datas, strict=True):
            out += data[max(offset - c.file_offset, 0) : min(end - c.file_offset, c.size)]
        return bytes(out)

    async def get(
        self,
        chunks: Sequence[ChunkRef],
        *,
        riders: Sequence[ChunkRef] = (),
        nursery: trio.Nursery | None = None,
    ) -> list[bytes]:
        """The verified bytes of ``chunks``: cached ones directly, missing ones in one request.

        ``riders`` (the rest of a read's block) ride along in that request, or are fetched
        in ``nursery`` when ``chunks`` need none (not at all without one); they are never
        waited for, and one that fails verification fails no read but its own. Raises
        :class:`ChunkVerifyError` or :class:`LayerFetchError` for a chunk of ``chunks``."""
        result: dict[str, bytes] = {}
        claimed: list[ChunkRef] = []
        waiting: list[ChunkRef] = []
        for c in chunks:
            if c.digest in result:
                continue
            data = self.cache.get(c.digest)
            if data is not None:
                result[c.digest] = data
            elif self.cache.begin(c.digest) is not None:
                claimed.append(c)
            else:
                waiting.append(c)
        if claimed:
            result.update(await self.fetch(claimed, riders=self.claim(riders)))
        elif riders and nursery is not None:
            nursery.start_soon(self.fetch_run, list(riders))
        for c in waiting:
            try:
                data = await self.cache.wait_inflight(c.digest)
            except LayerFetchError:  # someone else's fetch failed (a prefetch piece): retry
                data = None
            if data is None:  # finished between our check and the wait
                data = self.cache.get(c.digest)
            if data is None:
                data = (await self.get([c]))[0]
            result[c.digest] = data
        return [result[c.digest] for c in chunks]

    async def fetch_run(self, chunks: list[ChunkRef]) -> None:
        """Fetch the missing ones of ``chunks`` (one run in blob order) in one exact range:
        no alignment, so the next run's request does not fetch this one's last bytes again.
        Nobody waits for it: a failure is logged, and a later read of a chunk reports it."""
        claimed = self.claim(chunks)
        if not claimed:
            return
        try:
            await self.fetch(claimed, align=False)
        except Exception as exc:
            log.debug("read-ahead failed in %s: %s", self.key, exc)

    # -- fetches -------------------------------------------------------------------------------

    async def fetch(
        self, claimed: list[ChunkRef], *, align: bool = True, riders: Sequence[ChunkRef] = ()
    ) -> dict[str, bytes]:
        """Fetch and verify claimed chunks (plus free riders in the aligned ranges): their
        bytes by digest. Raises as :meth:`download` and :meth:`deliver` do."""
        return await self.deliver(await self.download(claimed, align=align, riders=riders))

    async def download(
        self, claimed: list[ChunkRef], *, align: bool = True, riders: Sequence[ChunkRef] = ()
    ) -> Download:
        """The compressed bytes of claimed chunks (plus free riders in the aligned ranges,
        and ``riders``: chunks the caller claimed too, whose failure is not the caller's).

        ``align=False`` fetches one range from the first chunk to the end of the last (a
        prefetch piece or a read-ahead run, chunks in blob order): aligning would fetch the
        neighbouring piece's bytes twice, and the small gaps between chunks (directory and
        link entries) are not worth a multi-range request. Blocks an earlier request brought
        along at its ends are not fetched again (:class:`EdgeBlocks`). On failure every
        claim is completed with the error, and :class:`LayerFetchError` is raised.
        """
        if align:
            ranges = self._ranges_for([*claimed, *riders])
            have = {c.digest for c in claimed} | {c.digest for c in riders}
            extra = [*riders, *self._free_riders(ranges, have)]
        else:
            ranges = [(claimed[0].compressed_offset, claimed[-1].compressed_end)]
            extra = []
        chunks = claimed + extra
        try:
            try:
                parts = await self._edges.fetch(ranges, self._request)
            except Exception as exc:
                raise LayerFetchError(
                    f"{self.key}: fetching {len(ranges)} range(s): {exc}"
                ) from exc
        except BaseException as exc:
            for c in chunks:
                self.cache.finish(c.digest, None, _as_error(exc))
            raise
        range_starts = [r[0] for r in ranges]
        compressed = []
        for c in chunks:
            i = bisect.bisect_right(range_starts, c.compressed_offset) - 1
            lo = ranges[i][0]
            compressed.append(parts[i][c.compressed_offset - lo : c.compressed_end - lo])
        return Download(chunks, compressed, len(claimed))

    def release(self) -> None:
        """Drop the blocks kept for later requests (:class:`EdgeBlocks`): the layer is gone."""
        self._edges.clear()

    async def _request(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """One request for ``ranges``, counted (stats, ``on_fetch``)."""
        start = time.monotonic()
        parts = await self.blob.read_ranges(ranges)
        seconds = time.monotonic() - start
        nbytes = sum(len(p) for p in parts)
        self.stats.fetched_bytes += nbytes
        self.stats.fetch_requests += 1
        if self.on_fetch is not None:
            self.on_fetch(nbytes, seconds)
        log.debug("%s: fetched %d bytes in %.3fs", self.key, nbytes, seconds)
        return parts

    async def deliver(self, got: Download) -> dict[str, bytes]:
        """Inflate and verify downloaded chunks, complete their claims, cache the good ones:
        the verified bytes by digest.

        Raises the first verification error (:class:`ChunkVerifyError`) when a chunk the
        caller claimed (not a free rider) failed; failed chunks are never cached or served.
        """
        try:
            datas = await self._decompress_parallel(got.chunks, got.compressed)
        except BaseException as exc:
            for c in got.chunks:
                self.cache.finish(c.digest, None, _as_error(exc))
            raise
        out: dict[str, bytes] = {}
        for c, data in zip(got.chunks, datas, strict=True):
            if isinstance(data, Exception):
                self.stats.verify_failures += 1
                self._edges.drop(c.compressed_offset, c.compressed_end)
                log.error(
                    "chunk verification failed in %s at %d: %s", self.key, c.compressed_offset, data
                )
                self.cache.finish(c.digest, None, data)
            else:
                self.cache.finish(c.digest, data)
                out[c.digest] = data
        await self.cache.write_pending()  # waiters are served already; the disk comes after
        failed = [d for d in datas if isinstance(d, Exception)]
        if failed and any(c.digest not in out for c in got.chunks[: got.claimed]):
            raise failed[0]
        return out

    async def _decompress_parallel(
        self, chunks: list[ChunkRef], compressed: list[bytes]
    ) -> list[Any]:
        """Inflate+verify in worker threads, several chunks at once (zlib, zstd and hashlib
        release the GIL), so a multi-chunk fetch keeps the cores busy.

        Chunks go in :data:`DECOMPRESS_GROUPS` groups of about equal compressed bytes, one
        worker thread each: a 4 MiB read block of zstd:chunked holds a few hundred small
        chunks, and a thread dispatch per chunk cost more than inflating it."""
        if len(chunks) == 1:
            return await trio.to_thread.run_sync(self._decompress_all, chunks, compressed)
        total = sum(len(d) for d in compressed)
        share = -(-total // DECOMPRESS_GROUPS) or 1
        groups: list[list[int]] = [[]]
        size = 0
        for i, data in enumerate(compressed):
            if size >= share:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += len(data)
        out: list[Any] = [None] * len(chunks)

        async def run(group: list[int]) -> None:
            got = await trio.to_thread.run_sync(
                self._decompress_all, [chunks[i] for i in group], [compressed[i] for i in group]
            )
            for i, result in zip(group, got, strict=True):
                out[i] = result

        async with trio.open_nursery() as nursery:
            for group in groups:
                nursery.start_soon(run, group)
        return out

    def _decompress_all(self, chunks: list[ChunkRef], compressed: list[bytes]) -> list[Any]:
        out: list[Any] = []
        for c, data in zip(chunks, compressed, strict=True):
            try:
                out.append(self.index.decompress(c, data))
            except Exception as exc:
                out.append(ChunkVerifyError(f"chunk {c.digest}: {type(exc).__name__}: {exc}"))
        return out

    def _ranges_for(self, chunks: list[ChunkRef]) -> list[tuple[int, int]]:
        """Compressed ranges covering ``chunks``, aligned to ``chunk_size`` and coalesced."""
        cs = self.chunk_size
        spans = sorted(
            ((c.compressed_offset // cs) * cs, min(-(-c.compressed_end // cs) * cs, self.blob.size))
            for c in chunks
        )
        merged: list[tuple[int, int]] = []
        for lo, hi in spans:
            # The exact chunk bounds must be covered even when alignment is clipped.
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return merged

    def _free_riders(self, ranges: list[tuple[int, int]], have: set[str]) -> list[ChunkRef]:
        """Other uncached chunks lying wholly inside ``ranges``: decompress them for free."""
        all_chunks = self.index.all_chunks()
        if self._chunk_offsets is None:
            self._chunk_offsets = [c.compressed_offset for c in all_chunks]
        extra = []
        for lo, hi in ranges:
            i = bisect.bisect_left(self._chunk_offsets, lo)
            while i < len(all_chunks) and all_chunks[i].compressed_offset < hi:
                c = all_chunks[i]
                i += 1
                if c.compressed_end > hi or c.digest in have or c.digest in self.cache:
                    continue
                if self.cache.begin(c.digest) is not None:
                    have.add(c.digest)
                    extra.append(c)
        return extra


def _file_offset(chunk: ChunkRef) -> int:
    return chunk.file_offset


def _as_error(exc: BaseException) -> BaseException:
    if isinstance(exc, trio.Cancelled):
        return LayerFetchError("fetch cancelled")
    return exc
