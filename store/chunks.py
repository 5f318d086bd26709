"""A layer's chunk source: verified chunk bytes, from the cache or fetched from the blob.

What it does for the layer above it (:class:`store.layer.Layer`) and its prefetcher
(:class:`store.prefetch.Prefetcher`): turn a set of chunks into compressed byte ranges of the
blob (aligned to the configured ``chunk_size``, coalesced, then cut to the chunks they
deliver; or their exact spans, one range per run of chunks adjacent in the blob), fetch
them through the
:class:`BlobReader`, inflate and verify every chunk in :data:`DECOMPRESS_GROUPS` worker
threads, and put the good ones in the shared
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
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import trio

from store.cache import ChunkCache, Hurry
from store.estargz import Chunk, touches
from store.spans import merge_spans

log = logging.getLogger(__name__)

# A read fetches at least the chunks of the READ_BLOCK-aligned file block(s) it touches: the
# granularity of eStargz's default 4 MiB chunks, whatever the layer's own chunks. With those it
# is the read's own chunk already; with small ones (zstd:chunked) it saves a round trip per
# chunk on scattered reads (mmap'ed code, page faults all over a library). 1 MiB blocks still
# cost gcc 74 requests where eStargz takes 43 (5.9 s against 4.4 s of run).
READ_BLOCK = 4 << 20  # uncompressed file bytes
DECOMPRESS_GROUPS = 4  # worker threads inflating one download's chunks (2 cores here)
# Uncompressed bytes one worker thread inflates at once at most (inflate_groups).
INFLATE_GROUP = 8 << 20
# Uncompressed bytes of the free riders one request takes along at most (_free_riders).
FREE_RIDERS_INFLATED = READ_BLOCK
# A read's block(s) cut into more chunks than this take no riders: the read fetches its own
# chunks only, found by bisection (ChunkSource.plan_read), and a read-ahead looks at this many
# chunks at most (store.layer). Real layers hold tens to hundreds of chunks per 4 MiB block
# (eStargz: one; zstd:chunked: ~16-64 KiB each); a TOC may cut one into a million 4-byte
# chunks, and every 4 KiB read of it then claimed, fetched, inflated and wrote them all.
BLOCK_CHUNKS_MOST = 1024
# Seconds a read waits for chunks another layer's source claimed before it fetches them from
# its own blob (ChunkSource.get): that layer's registry may be slow, or never answer (its
# fetch then ends at its fetching_timeout_sec, 300 s by default), and its TOC may name the
# digests of any other image's files (libc's, say) on purpose.
FOREIGN_WAIT = 5.0


class ChunkVerifyError(Exception):
    """A chunk's bytes do not match its ``chunkDigest`` (or it has none): never served."""


class LayerFetchError(Exception):
    """The registry did not deliver a chunk's bytes. ``source``: the chunk source whose
    blob request failed (None: not a request's failure)."""

    def __init__(self, *args: object, source: object = None) -> None:
        super().__init__(*args)
        self.source = source


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


@runtime_checkable
class HurriedBlob(Protocol):
    """A blob reader that downloads ahead of reads (:class:`store.prefetch.AheadBlob`): a
    read waiting for chunks another task claimed can have their bytes put on the wire now."""

    async def hurry(self, ranges: Sequence[tuple[int, int]]) -> None: ...


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

    def claim(self, chunks: Iterable[ChunkRef], *, ahead: bool = False) -> list[ChunkRef]:
        """Those of ``chunks`` that are neither cached nor claimed, now claimed by the caller,
        who must fetch them (:meth:`fetch`, or :meth:`download` then :meth:`deliver`) or
        release each claim with ``cache.finish(digest, None, error)``. ``ahead``: the caller
        takes their bytes from this source's :class:`HurriedBlob` as it brings them in, so a
        read waiting on one of them, in this layer or another, hurries them onto the wire
        (:meth:`store.cache.ChunkCache.hurries`)."""
        cache = self.cache
        hurry = self.blob.hurry if ahead and isinstance(self.blob, HurriedBlob) else None
        if hurry is None:
            return [
                c
                for c in chunks
                if c.digest not in cache and cache.begin(c.digest, owner=self) is not None
            ]
        return [
            c
            for c in chunks
            if c.digest not in cache
            and cache.begin(c.digest, (hurry, (c.compressed_offset, c.compressed_end)), self)
            is not None
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
        if bisect.bisect_left(chunks, hi, key=_file_offset) - first > BLOCK_CHUNKS_MOST:
            # Too finely cut to ride along (BLOCK_CHUNKS_MOST): the read's own chunks only.
            start = max(bisect.bisect_right(chunks, offset, key=_file_offset) - 1, 0)
            stop = bisect.bisect_left(chunks, end, key=_file_offset)
            return ReadPlan(list(chunks[start:stop]), [], stop)
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
        served: list[str] = []  # served from the cache or someone else's fetch: maybe pending
        for c in chunks:
            if c.digest in result:
                continue
            data = self.cache.get(c.digest)
            if data is not None:
                result[c.digest] = data
                served.append(c.digest)
            elif self.cache.begin(c.digest, owner=self) is not None:
                claimed.append(c)
            else:
                waiting.append(c)
        if claimed:
            result.update(await self.fetch(claimed, riders=self.claim(riders)))
        elif riders and nursery is not None:
            nursery.start_soon(self.fetch_run, list(riders))
        # Another layer's claim is waited for FOREIGN_WAIT seconds at most: then the chunks
        # still missing are fetched from this layer's own blob.
        foreign = any(self.cache.claimant(c.digest) not in (None, self) for c in waiting)
        deadline = trio.current_time() + FOREIGN_WAIT if foreign else math.inf
        if waiting:
            # Chunks a prefetch (of this layer or another with the same chunks) claimed whose
            # bytes are not on the wire yet: its region comes in blob order, and a read may
            # need a later part first.
            with trio.move_on_at(deadline):
                await _hurry(self.cache.hurries(c.digest for c in waiting))
        again: list[ChunkRef] = []
        late: list[ChunkRef] = []
        for c in waiting:
            try:
                data = None
                with trio.move_on_at(deadline) as scope:
                    data = await self.cache.wait_inflight(c.digest)
                if scope.cancelled_caught:
                    late.append(c)
                    continue
            except (LayerFetchError, ChunkVerifyError) as exc:
                # Someone else's fetch failed: a prefetch piece given back, a background
                # batch a read interrupted (store.priority), another layer's blob (its
                # registry may be another), or another layer's chunk of this digest that
                # its bytes do not match (a hostile layer naming the digest of a chunk it
                # does not hold). Not ours to report: fetch our own. But a request of this
                # source's own blob that the registry did not answer is this read's answer
                # too: asked again, each reader waiting on the chunk asked in turn, one full
                # round of retries after another (8 readers of one chunk of a registry
                # refusing connections got EIO after 9 to 50 s, fetching_timeout_sec = 20).
                if isinstance(exc, LayerFetchError) and exc.source is self:
                    raise
                data = None
            if data is None:  # finished between our check and the wait
                data = self.cache.get(c.digest)
            if data is None:
                again.append(c)
                continue
            result[c.digest] = data
            served.append(c.digest)
        if late:  # fetched here, unclaimed: their claims complete with these bytes
            got = await self.fetch(late)
            result.update(got)
            served.extend(got)
        if again:  # in one request, not a round trip each
            result.update(zip((c.digest for c in again), await self.get(again), strict=True))
            served.extend(c.digest for c in again)
        # What reads fetched is on disk when a read returns (module doc of store.cache): a
        # chunk an earlier read's free ride left to the writer is written now; a prefetched
        # one stays the writer's.
        await self.cache.write_served(served)
        out = [result[c.digest] for c in chunks]
        for c, data in zip(chunks, out, strict=True):
            # Bytes are kept by digest alone: verified bytes of that digest are another
            # chunk's size only when this chunk's TOC entry lies (it could never verify).
            if len(data) != c.size:
                self.stats.verify_failures += 1
                raise ChunkVerifyError(
                    f"chunk {c.digest} of {c.name!r}: {len(data)} verified bytes, "
                    f"its entry says {c.size}"
                )
        return out

    async def fetch_run(self, chunks: list[ChunkRef]) -> None:
        """Fetch the missing ones of ``chunks`` (a run of a file's chunks) in exact ranges: no
        alignment, so the next run's request does not fetch this one's last bytes again.
        Nobody waits for it: a failure is logged, and a later read of a chunk reports it."""
        claimed = self.claim(chunks)
        if not claimed:
            return
        try:
            await self.fetch(claimed, align=False, keep=False)
        except Exception as exc:
            log.debug("read-ahead failed in %s: %s", self.key, exc)

    # -- fetches -------------------------------------------------------------------------------

    async def fetch(
        self,
        claimed: list[ChunkRef],
        *,
        align: bool = True,
        riders: Sequence[ChunkRef] = (),
        behind: bool = False,
        keep: bool = True,
    ) -> dict[str, bytes]:
        """Fetch and verify claimed chunks (plus free riders in the aligned ranges): the
        claimed ones' bytes by digest (none with ``keep=False``). Raises as
        :meth:`download` and :meth:`deliver` do."""
        got = await self.download(claimed, align=align, riders=riders)
        return await self.deliver(got, behind=behind, keep=keep)

    async def download(
        self, claimed: list[ChunkRef], *, align: bool = True, riders: Sequence[ChunkRef] = ()
    ) -> Download:
        """The compressed bytes of claimed chunks (plus free riders in the aligned ranges,
        and ``riders``: chunks the caller claimed too, whose failure is not the caller's).

        Aligned ranges are then cut to the first and last byte of the chunks they deliver: the
        block's part of a neighbouring chunk, which the chunk cache cannot keep, would
        otherwise be fetched again by that chunk's own request (the Go store keeps every
        fetched block by offset instead, ``fs/remote/blob.go``). So a request never carries
        a part of a chunk it does not deliver; it may still carry, between two chunks it
        delivers, one that is cached or on its way already.

        ``align=False`` fetches the chunks' own spans, one range per run of chunks that follow
        each other in the blob (a prefetch piece or a read-ahead run is one): aligning would
        fetch the neighbouring piece's bytes twice. Chunks apart in the blob get a range each,
        never the bytes between: a read-ahead run is consecutive in the file, and a TOC may
        place a file's chunks anywhere (one 4 GiB away made a 4 KiB read's read-ahead ask for
        a 4 GiB range). On failure every claim is completed with the error, and
        :class:`LayerFetchError` is raised.
        """
        if align:
            ranges = self._ranges_for([*claimed, *riders])
            have = {c.digest for c in claimed} | {c.digest for c in riders}
            extra = [*riders, *self._free_riders(ranges, have)]
            ranges = _trimmed(ranges, [*claimed, *extra])
        else:
            ranges = _runs(claimed)
            extra = []
        chunks = claimed + extra
        start = time.monotonic()
        try:
            try:
                parts = await self.blob.read_ranges(ranges)
            except Exception as exc:
                raise LayerFetchError(
                    f"{self.key}: fetching {len(ranges)} range(s): {exc}", source=self
                ) from exc
        except BaseException as exc:
            for c in chunks:
                self.cache.finish(c.digest, None, _as_error(exc))
            raise
        nbytes = sum(len(p) for p in parts)
        self.stats.fetched_bytes += nbytes
        self.stats.fetch_requests += 1
        if self.on_fetch is not None:
            self.on_fetch(nbytes, time.monotonic() - start)
        log.debug("%s: fetched %d bytes in %.3fs", self.key, nbytes, time.monotonic() - start)
        range_starts = [r[0] for r in ranges]
        compressed = []
        for c in chunks:
            i = bisect.bisect_right(range_starts, c.compressed_offset) - 1
            lo = ranges[i][0]
            compressed.append(parts[i][c.compressed_offset - lo : c.compressed_end - lo])
        return Download(chunks, compressed, len(claimed))

    async def deliver(
        self, got: Download, *, behind: bool = False, keep: bool = True
    ) -> dict[str, bytes]:
        """Inflate and verify downloaded chunks, complete their claims, cache the good ones:
        the verified bytes of the chunks the caller claimed (``got.chunks[:got.claimed]``),
        by digest; nothing with ``keep=False`` (work ahead of reads, which no caller reads).

        Chunks are inflated in groups (:func:`inflate_groups`), up to
        :data:`DECOMPRESS_GROUPS` worker threads at once, each group taking its uncompressed
        bytes from the cache's store-wide budget (:attr:`ChunkCache.inflating`) while it
        inflates — ahead of the prefetch's and background fetch's groups unless ``behind``
        (``urgent``: a read waits at most for the room one group gives back). Each group's
        chunks are handed to the cache (claims completed, waiters woken) as soon as it is
        done, so what this call holds is the groups in flight and the caller's own chunks,
        not the whole download inflated: a batch of 48 chunks of 64 MiB of zeros (3 MB
        compressed) held 3.25 GB at once when the results waited for the whole batch.

        The cache files of the chunks the caller claimed are written before it returns
        (except those the disk refused, which are then not cached); the free riders', and
        all of them with ``behind`` (work ahead of reads: prefetch, background fetch), are
        left to the cache's writer (:meth:`ChunkCache.write_behind`, module doc of
        :mod:`store.cache`), which writes at once past the memory cache's size.

        Raises the first verification error (:class:`ChunkVerifyError`) of a chunk the
        caller claimed (not a free rider); failed chunks are never cached or served. On
        cancellation the claims not completed yet are completed with the error.
        """
        chunks, compressed, claimed = got.chunks, got.compressed, got.claimed
        groups = inflate_groups(chunks, compressed)
        handled = [False] * len(groups)
        out: dict[str, bytes] = {}
        own: list[str] = []  # the caller's chunks cached, written before returning
        errors: list[Exception] = []  # the caller's chunks that failed

        async def inflate(n: int) -> None:
            group = groups[n]
            nbytes = sum(chunks[i].size for i in group)
            async with self.cache.inflating.taking(nbytes, urgent=not behind):
                results = await trio.to_thread.run_sync(
                    self._decompress_all, [chunks[i] for i in group], [compressed[i] for i in group]
                )
                handled[n] = True
                rest: list[str] = []
                for i, data in zip(group, results, strict=True):
                    c = chunks[i]
                    if isinstance(data, Exception):
                        self.stats.verify_failures += 1
                        log.error(
                            "chunk verification failed in %s at %d: %s",
                            self.key,
                            c.compressed_offset,
                            data,
                        )
                        self.cache.finish(c.digest, None, data)
                        if i < claimed:
                            errors.append(data)
                        continue
                    self.cache.finish(c.digest, data)
                    if i < claimed:
                        if keep:
                            out[c.digest] = data
                        if not behind:
                            own.append(c.digest)
                            continue
                    rest.append(c.digest)
                del results
                # Waiters are served already; the disk comes after. Past the memory cache's
                # size the writer's share is written here, inside the budget.
                if rest:
                    await self.cache.write_behind(rest, ahead=behind)

        try:
            if len(groups) == 1:
                await inflate(0)
            else:
                todo = iter(range(len(groups)))

                async def worker() -> None:
                    for n in todo:
                        await inflate(n)

                async with trio.open_nursery() as nursery:
                    for _ in range(min(DECOMPRESS_GROUPS, len(groups))):
                        nursery.start_soon(worker)
        except BaseException as exc:
            for n, group in enumerate(groups):
                if not handled[n]:
                    for i in group:
                        self.cache.finish(chunks[i].digest, None, _as_error(exc))
            raise
        # A read's own chunks are on disk when it returns.
        await self.cache.write_pending(own)
        if errors:
            raise errors[0]
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
        # The exact chunk bounds are covered even where the blob's end clips the alignment.
        return merge_spans(
            ((c.compressed_offset // cs) * cs, min(-(-c.compressed_end // cs) * cs, self.blob.size))
            for c in chunks
        )

    def _free_riders(self, ranges: list[tuple[int, int]], have: set[str]) -> list[ChunkRef]:
        """Other uncached chunks lying wholly inside ``ranges``, claimed: decompress them for
        free — in blob order, up to :data:`FREE_RIDERS_INFLATED` uncompressed bytes in all."""
        all_chunks = self.index.all_chunks()
        if self._chunk_offsets is None:
            self._chunk_offsets = [c.compressed_offset for c in all_chunks]
        extra = []
        inflated = 0
        for lo, hi in ranges:
            i = bisect.bisect_left(self._chunk_offsets, lo)
            while i < len(all_chunks) and all_chunks[i].compressed_offset < hi:
                c = all_chunks[i]
                i += 1
                if c.compressed_end > hi or c.digest in have or c.digest in self.cache:
                    continue
                if inflated + c.size > FREE_RIDERS_INFLATED:
                    return extra  # a few KiB of gzip can claim gigabytes of chunks
                if self.cache.begin(c.digest, owner=self) is not None:
                    have.add(c.digest)
                    extra.append(c)
                    inflated += c.size
        return extra


def inflate_groups(
    chunks: Sequence[ChunkRef], compressed: Sequence[bytes], most: int | None = None
) -> list[list[int]]:
    """The indices of ``chunks`` (with their ``compressed`` bytes) in the groups
    :meth:`ChunkSource.deliver` inflates, in order (up to :data:`DECOMPRESS_GROUPS` worker
    threads take them in turn): each of about 1/:data:`DECOMPRESS_GROUPS` of the compressed
    bytes (a 4 MiB read block of zstd:chunked holds a few hundred small chunks, and a thread
    dispatch per chunk cost more than inflating it), and of at most ``most`` uncompressed
    bytes (chunk sizes; default :data:`INFLATE_GROUP`; a chunk bigger than that alone), so
    that what a layer compresses well is not inflated all at once. ``[]`` for no chunks."""
    if most is None:
        most = INFLATE_GROUP
    total = sum(map(len, compressed))
    share = -(-total // DECOMPRESS_GROUPS) or 1
    groups: list[list[int]] = []
    group: list[int] = []
    packed = inflated = 0
    for i, c in enumerate(chunks):
        if group and (packed >= share or inflated + c.size > most):
            groups.append(group)
            group = []
            packed = inflated = 0
        group.append(i)
        packed += len(compressed[i])
        inflated += c.size
    if group:
        groups.append(group)
    return groups


async def _hurry(hurries: dict[Hurry, list[tuple[int, int]]]) -> None:
    """Call each claimant's hurry with its ranges, side by side; return once all are in."""
    if len(hurries) == 1:
        ((fn, ranges),) = hurries.items()
        await fn(ranges)
    elif hurries:
        async with trio.open_nursery() as nursery:
            for fn, ranges in hurries.items():
                nursery.start_soon(fn, ranges)


def _file_offset(chunk: ChunkRef) -> int:
    return chunk.file_offset


def _runs(chunks: Sequence[ChunkRef]) -> list[tuple[int, int]]:
    """The compressed spans of ``chunks``, sorted, those that touch or overlap merged."""
    return merge_spans((c.compressed_offset, c.compressed_end) for c in chunks)


def _trimmed(ranges: list[tuple[int, int]], chunks: Sequence[ChunkRef]) -> list[tuple[int, int]]:
    """Each of ``ranges`` (sorted, disjoint) cut to ``[first chunk's offset, last chunk's end)``
    of the ``chunks`` it holds whole; ranges holding none are dropped."""
    starts = [lo for lo, _ in ranges]
    cut: list[list[int] | None] = [None] * len(ranges)
    for c in chunks:
        i = bisect.bisect_right(starts, c.compressed_offset) - 1
        if i < 0 or c.compressed_end > ranges[i][1]:
            continue
        span = cut[i]
        if span is None:
            cut[i] = [c.compressed_offset, c.compressed_end]
        else:
            span[0] = min(span[0], c.compressed_offset)
            span[1] = max(span[1], c.compressed_end)
    return [(span[0], span[1]) for span in cut if span is not None]


def _as_error(exc: BaseException) -> BaseException:
    """What a claim's waiters get for a fetch that ended with ``exc``: a cancellation — trio's
    ``Cancelled``, or a group of them from a nursery in the fetch — belongs to the fetching
    task's scope, so other tasks get :class:`LayerFetchError` (re-raised in a FUSE handler, a
    foreign ``Cancelled`` would end the FUSE loop); a group holding a real error, its first."""
    if isinstance(exc, BaseExceptionGroup):
        exc = _first(exc)
    if isinstance(exc, trio.Cancelled):
        return LayerFetchError("fetch cancelled")
    return exc
