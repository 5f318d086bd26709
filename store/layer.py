"""One mounted eStargz layer: its tree, and the data path from FUSE reads to verified bytes.

Why here and not in the format module: the format says where a chunk lives and how to check
it; this module decides *when* to fetch what — batching a read's missing chunks into one
multi-range request aligned to ``chunk_size``, deduplicating concurrent fetches through the
:class:`~store.cache.ChunkCache`, prefetching the region before ``.prefetch.landmark`` in
pieces as soon as the image is known, reading ahead in a file by a window that grows while
the reader reads on sequentially (beside the read, in one exact range), and fetching the rest of
the layer in the background while yielding to on-demand reads.

Every chunk is verified against its ``chunkDigest`` (in :meth:`LayerIndexView.decompress`)
before it enters the cache or reaches a reader; a mismatch raises :class:`ChunkVerifyError`,
which the FUSE layer turns into EIO.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from store.cache import ChunkCache
from store.estargz import Chunk
from store.estargz.head import HeadHint, head_hint
from store.tree import LayerTree, Node

log = logging.getLogger(__name__)

# Read-ahead per file, sized by how the reader reads (as the kernel's own read-ahead is): a
# read that starts near where the file's last read ended (within READAHEAD_MIN either way: the
# kernel's reads in flight arrive a little out of order) doubles the window up to the maximum
# (eStargz's default chunk size); any other read starts over at the minimum. Chunks in the
# window are fetched beside the read, not after it, once at least half the window is missing:
# a layer cut into small chunks (zstd:chunked's content-defined ones average 10–50 kB) is read
# in a few large requests, not one round trip per chunk, and random reads fetch little beyond
# their own.
READAHEAD_MIN = 256 << 10  # uncompressed bytes
READAHEAD_MAX = 4 << 20
# A read fetches at least the chunks of the READ_BLOCK-aligned file block(s) it touches: the
# granularity of eStargz's default 4 MiB chunks, whatever the layer's own chunks. With those it
# is the read's own chunk already; with small ones (zstd:chunked) it saves a round trip per
# chunk on scattered reads (mmap'ed code, page faults all over a library). 1 MiB blocks still
# cost gcc 74 requests where eStargz takes 43 (5.9 s against 4.4 s of run).
READ_BLOCK = 4 << 20
DECOMPRESS_GROUPS = 4  # worker threads inflating one download's chunks (2 cores here)
PREFETCH_PIECE = 1 << 20  # compressed bytes per prefetch request
PREFETCH_STREAMS = 3  # prefetch requests in flight per layer
# Before the TOC: the head probe (the first tar headers), then a region guessed from it,
# fetched one growing piece at a time: 256 KiB, 512 KiB, 1 MiB, 2 MiB (at most the last one
# is wasted when the TOC says the region ends sooner).
HEAD_PROBE = 12 << 10  # one TCP initial window (10 segments)
SPECULATE_FIRST = 256 << 10
SPECULATE_BYTES = 4 << 20
BLOB_WINDOW = 4 << 20
BACKGROUND_BATCH = 4 << 20


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


class BlobReader(Protocol):
    """Async range reads of one compressed blob (the registry, or a local file in tests)."""

    size: int

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]: ...


@dataclass
class _Region:
    """The early download of ``[0, end)`` in pieces: piece ``i`` is ``pieces[i]``, its bytes
    ``data[i]`` once ``done[i]`` is set (``None`` if it failed, was not needed after all, or
    the region was dropped). ``claimed[i]``: a worker or a reader is fetching it."""

    end: int
    pieces: list[tuple[int, int]] = field(default_factory=list)
    data: list[bytes | None] = field(default_factory=list)
    done: list[trio.Event] = field(default_factory=list)
    claimed: list[bool] = field(default_factory=list)
    final: bool = False  # the end is the TOC's, not a guess
    more: trio.Event = field(default_factory=trio.Event)  # set when pieces are added

    def add(self, lo: int, hi: int, step: int) -> None:
        """Pieces of ``step`` bytes covering ``[lo, hi)``."""
        for p in range(lo, hi, step):
            self.pieces.append((p, min(p + step, hi)))
            self.data.append(None)
            self.done.append(trio.Event())
            self.claimed.append(False)
        self.more.set()
        self.more = trio.Event()

    def claim_next(self) -> int | None:
        for i, taken in enumerate(self.claimed):
            if not taken:
                self.claimed[i] = True
                return i
        return None


@dataclass
class AheadBlob:
    """A blob reader that downloads the blob's first bytes ahead of need, in pieces.

    Why: the landmark offset is in the TOC's JSON as soon as its digest is verified, but
    parsing the TOC into an index costs ~0.1 s of CPU per 10,000 entries, and an image's
    layers are parsed together. Starting the prefetch region's download at verification
    instead of after the parse puts it on the wire about half a second sooner in a pull;
    :meth:`speculate` starts it sooner still, from what the blob's first bytes say
    (:func:`store.estargz.head.head_hint`), while the TOC is on its way.

    :data:`PREFETCH_STREAMS` workers fetch the pieces in blob order (the region's files are
    in first-access order); a read that needs a piece no worker has started fetches that
    piece itself at once rather than wait for the workers to reach it. The bytes are handed
    to the layer raw: every chunk is still inflated and verified before anything is served.
    Reads outside the region (or of a failed or dropped piece) go to the registry as usual.
    """

    blob: BlobReader
    _region: _Region | None = None
    _started: bool = False  # start() was called: the region's end is the TOC's
    _speculating: bool = False
    _scopes: list[trio.CancelScope] = field(default_factory=list)  # its tasks', for drop()
    _dropped: bool = False

    @property
    def size(self) -> int:
        return self.blob.size

    def speculate(self, nursery: trio.Nursery) -> None:
        """Before the TOC is known: read the blob's first :data:`HEAD_PROBE` bytes and, if
        they say prioritized files come first (:attr:`HeadHint.REGION`), start downloading
        up to :data:`SPECULATE_BYTES` of the region, growing piece by piece from
        :data:`SPECULATE_FIRST` bytes, one request at a time; :meth:`start` then sets the
        real end (at most the last piece is past it: the bytes a wrong guess costs)."""
        if self._started or self._speculating:
            return
        self._speculating = True
        nursery.start_soon(self._speculate)

    async def _speculate(self) -> None:
        with self._cancellable():
            try:
                (head,) = await self.blob.read_ranges([(0, min(HEAD_PROBE, self.blob.size))])
            except Exception as exc:  # a hint only: the TOC-time start stays
                log.debug("head probe failed: %s", exc)
                return
            if self._started or head_hint(head) is not HeadHint.REGION:
                return
            region = self._region = _Region(end=0)
            lo, step = 0, SPECULATE_FIRST
            while lo < min(SPECULATE_BYTES, self.blob.size) and not region.final:
                hi = min(lo + step, self.blob.size)
                region.add(lo, hi, hi - lo)
                region.end = hi
                i = len(region.pieces) - 1
                region.claimed[i] = True
                await self._fetch(region, i)
                lo, step = hi, step * 2

    def start(self, end: int | None, nursery: trio.Nursery) -> None:
        """Download ``[0, end)``, ``end`` the TOC's landmark offset (once; ``None`` or 0:
        nothing to do, and a speculative download stops)."""
        if self._started:
            return
        self._started = True
        region = self._region
        if not end or end <= 0:
            if region is not None:
                self.drop()
            return
        end = min(end, self.blob.size)
        if region is None:
            region = self._region = _Region(end=0)
        else:  # a speculative start: pieces past the end are not needed
            for i, (lo, _hi) in enumerate(region.pieces):
                if lo >= end and not region.claimed[i]:
                    region.claimed[i] = True
                    region.done[i].set()
        covered = region.pieces[-1][1] if region.pieces else 0
        region.final = True
        if covered < end:
            region.add(covered, end, PREFETCH_PIECE)
        region.end = end if covered <= end else covered
        nursery.start_soon(self._run, region)

    async def _run(self, region: _Region) -> None:
        async def worker() -> None:
            while (i := region.claim_next()) is not None:
                await self._fetch(region, i)

        with self._cancellable():
            async with trio.open_nursery() as nursery:
                for _ in range(PREFETCH_STREAMS):
                    nursery.start_soon(worker)

    def _cancellable(self) -> trio.CancelScope:
        """A cancel scope for one of this blob's tasks, cancelled by :meth:`drop`."""
        scope = trio.CancelScope()
        if self._dropped:
            scope.cancel()
        self._scopes.append(scope)
        return scope

    async def _fetch(self, region: _Region, i: int) -> None:
        """Fetch piece ``i`` (claimed by the caller) into ``region``; ``done[i]`` is set
        whatever happens (on failure its bytes stay ``None``: the reader asks the registry)."""
        try:
            (part,) = await self.blob.read_ranges([region.pieces[i]])
            if self._region is region:  # not dropped meanwhile
                region.data[i] = part
        except Exception as exc:  # the layer then reads these bytes itself
            log.warning("early prefetch of bytes %d-%d failed: %s", *region.pieces[i], exc)
        finally:
            region.done[i].set()

    def drop(self) -> None:
        """Stop downloading and forget the region's bytes (the layer has what it needs).

        A reader still waiting on a piece wakes up and reads from the registry instead."""
        region, self._region = self._region, None
        self._dropped = True
        for scope in self._scopes:
            scope.cancel()
        if region is not None:
            for i, done in enumerate(region.done):
                region.data[i] = None
                done.set()

    def _covering(self, region: _Region, lo: int, hi: int) -> list[int] | None:
        """The pieces that hold ``[lo, hi)`` whole, or None if the region does not."""
        if hi > region.end or not region.final:
            return None
        starts = [p[0] for p in region.pieces]
        first = bisect.bisect_right(starts, lo) - 1
        last = bisect.bisect_left(starts, hi) - 1
        if first < 0 or region.pieces[last][1] < hi:
            return None
        return list(range(first, last + 1))

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        out: list[bytes | None] = [None] * len(ranges)
        for n, (lo, hi) in enumerate(ranges):
            region = self._region
            covering = None if region is None else self._covering(region, lo, hi)
            if region is None or covering is None:
                continue
            # Pieces no worker has started yet are fetched here, now, in parallel.
            mine = [i for i in covering if not region.claimed[i]]
            for i in mine:
                region.claimed[i] = True
            if mine:
                async with trio.open_nursery() as nursery:
                    for i in mine:
                        nursery.start_soon(self._fetch, region, i)
            for i in covering:
                await region.done[i].wait()
            parts = [region.data[i] for i in covering]
            if all(p is not None for p in parts):
                joined = b"".join(p for p in parts if p is not None)
                base = region.pieces[covering[0]][0]
                out[n] = joined[lo - base : hi - base]
        missing = [n for n, part in enumerate(out) if part is None]
        if missing:
            fetched = await self.blob.read_ranges([ranges[n] for n in missing])
            for n, part in zip(missing, fetched, strict=True):
                out[n] = part
        return [p for p in out if p is not None]


@dataclass(frozen=True, slots=True)
class _Download:
    """Claimed chunks' compressed bytes, not yet inflated or verified (never served as is)."""

    chunks: list[ChunkRef]  # the claimed ones first, then free riders
    compressed: list[bytes]
    claimed: int


@dataclass(slots=True)
class _ReadStream:
    """Where a file's last read ended, and its read-ahead window in uncompressed bytes."""

    next_offset: int
    window: int = READAHEAD_MIN


@dataclass
class LayerStats:
    fetched_bytes: int = 0
    fetch_requests: int = 0
    on_demand_reads: int = 0
    cached_chunk_bytes: int = 0
    verify_failures: int = 0
    prefetch_done: bool = False
    background_done: bool = False


@dataclass
class Layer:
    """A resolved layer: tree, index, blob reader, shared cache; counts its references."""

    key: str  # "<ref>/<digest>"
    digest: str
    toc_digest: str
    tree: LayerTree
    index: LayerIndexView
    blob: BlobReader
    cache: ChunkCache
    chunk_size: int = 50000
    on_fetch: Callable[[Layer, int, float], None] | None = None
    on_file_access: Callable[[Layer, Node], None] | None = None
    on_read: Callable[[Layer], None] | None = None
    stats: LayerStats = field(default_factory=LayerStats)
    released: bool = False
    _active_reads: int = 0
    _idle: trio.Event = field(default_factory=trio.Event)
    _blob_windows: dict[int, bytes] = field(default_factory=dict)
    _chunk_offsets: list[int] | None = None
    _total_chunk_bytes: int | None = None
    _accessed: set[int] = field(default_factory=set)
    _streams: dict[int, _ReadStream] = field(default_factory=dict)
    cancel_scope: trio.CancelScope | None = None
    _prefetch_started: bool = False
    _prefetched: trio.Event = field(default_factory=trio.Event)
    _prefetch_scope: trio.CancelScope | None = None

    def __post_init__(self) -> None:
        self._idle.set()

    # -- status ------------------------------------------------------------------------------

    @property
    def total_chunk_bytes(self) -> int:
        if self._total_chunk_bytes is None:
            self._total_chunk_bytes = sum(c.size for c in self.index.all_chunks())
        return self._total_chunk_bytes

    def status(self) -> dict[str, Any]:
        chunks = self.index.all_chunks()
        cached = sum(c.size for c in chunks if c.digest in self.cache)
        total = self.total_chunk_bytes
        return {
            "digest": self.digest,
            "toc_digest": self.toc_digest,
            "blob_size": self.blob.size,
            "fetched_bytes": self.stats.fetched_bytes,
            "fetch_requests": self.stats.fetch_requests,
            "on_demand_reads": self.stats.on_demand_reads,
            "cached_bytes": cached,
            "total_bytes": total,
            "percent": round(100.0 * cached / total, 1) if total else 100.0,
            "prefetch_done": self.stats.prefetch_done,
            "background_done": self.stats.background_done,
            "released": self.released,
        }

    # -- reads -------------------------------------------------------------------------------

    async def read_file(self, node: Node, offset: int, size: int) -> bytes:
        """``size`` bytes of a regular file from ``offset`` — verified, from cache or registry."""
        if offset >= node.size or size <= 0:
            return b""
        size = min(size, node.size - offset)
        if node.index not in self._accessed:
            self._accessed.add(node.index)
            if self.on_file_access is not None:
                self.on_file_access(self, node)
        chunks = self.index.chunks_of(node.entry)
        end = offset + size
        # The chunks of the read's block(s) of READ_BLOCK file bytes; those overlapping the
        # read are wanted, the others ride along unless cached or already on their way.
        lo = (offset // READ_BLOCK) * READ_BLOCK
        hi = min(-(-end // READ_BLOCK) * READ_BLOCK, node.size)
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
            elif c.digest not in self.cache and not self.cache.is_inflight(c.digest):
                riders.append(c)
        self.stats.on_demand_reads += 1
        if self.on_read is not None:
            self.on_read(self)
        if wanted:
            self._read_ahead(node, chunks, after, offset, size)
        self._active_reads += 1
        self._idle = trio.Event() if self._active_reads == 1 else self._idle
        try:
            datas = await self.get_chunks(wanted, riders=riders)
        finally:
            self._active_reads -= 1
            if self._active_reads == 0:
                self._idle.set()
        out = bytearray()
        for c, data in zip(wanted, datas, strict=True):
            out += data[max(offset - c.file_offset, 0) : min(end - c.file_offset, c.size)]
        return bytes(out)

    def _read_ahead(
        self, node: Node, chunks: Sequence[ChunkRef], after: int, offset: int, size: int
    ) -> None:
        """Start fetching the chunks from ``chunks[after]`` within the file's read-ahead
        window past ``offset + size``, in one request beside the read's own."""
        end = offset + size
        stream = self._streams.get(node.index)
        if stream is None:
            stream = self._streams[node.index] = _ReadStream(end)
        else:
            # Reads the kernel has in flight together may arrive a little out of order.
            if abs(offset - stream.next_offset) <= READAHEAD_MIN:
                stream.window = min(stream.window * 2, READAHEAD_MAX)
                stream.next_offset = max(stream.next_offset, end)
            else:
                stream.window = READAHEAD_MIN
                stream.next_offset = end
        horizon = end + stream.window
        ahead: list[ChunkRef] = []
        missing = 0
        for c in chunks[after:]:
            if c.file_offset >= horizon:
                break
            if c.digest in self.cache or self.cache.is_inflight(c.digest):
                if ahead:  # one contiguous run: one exact range
                    break
                continue
            ahead.append(c)
            missing += c.size
        reaches_end = after < len(chunks) and horizon >= node.size
        if ahead and self._nursery is not None and (2 * missing >= stream.window or reaches_end):
            self._nursery.start_soon(self._readahead, ahead)

    _nursery: trio.Nursery | None = None

    async def _readahead(self, chunks: list[ChunkRef]) -> None:
        """Fetch ``chunks`` (one run in blob order) in one exact range: no alignment, so the
        next run's request does not fetch this one's last bytes again."""
        claimed = [
            c
            for c in chunks
            if c.digest not in self.cache and self.cache.begin(c.digest) is not None
        ]
        if not claimed:
            return
        try:
            await self._fetch(claimed, align=False)
        except Exception as exc:  # a later on-demand read will report it
            log.debug("read-ahead failed in %s: %s", self.key, exc)

    async def get_chunks(
        self, chunks: Sequence[ChunkRef], *, riders: Sequence[ChunkRef] = ()
    ) -> list[bytes]:
        """The verified bytes of ``chunks``: cached ones directly, missing ones in one request.

        ``riders`` (the rest of a read's block) ride along in that request, or are fetched in
        the background when ``chunks`` need none; they are never waited for, and one that
        fails verification fails no read but its own."""
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
            along = [
                c
                for c in riders
                if c.digest not in self.cache and self.cache.begin(c.digest) is not None
            ]
            result.update(await self._fetch(claimed, riders=along))
        elif riders and self._nursery is not None:
            self._nursery.start_soon(self._readahead, list(riders))
        for c in waiting:
            try:
                data = await self.cache.wait_inflight(c.digest)
            except LayerFetchError:  # someone else's fetch failed (a prefetch piece): retry
                data = None
            if data is None:  # finished between our check and the wait
                data = self.cache.get(c.digest)
            if data is None:
                data = (await self.get_chunks([c]))[0]
            result[c.digest] = data
        return [result[c.digest] for c in chunks]

    async def _fetch(
        self, claimed: list[ChunkRef], *, align: bool = True, riders: Sequence[ChunkRef] = ()
    ) -> dict[str, bytes]:
        """Fetch and verify claimed chunks (plus free riders in the aligned ranges)."""
        return await self._deliver(await self._download(claimed, align=align, riders=riders))

    async def _download(
        self, claimed: list[ChunkRef], *, align: bool = True, riders: Sequence[ChunkRef] = ()
    ) -> _Download:
        """The compressed bytes of claimed chunks (plus free riders in the aligned ranges,
        and ``riders``: chunks the caller claimed too, whose failure is not the caller's).

        ``align=False`` fetches one range from the first chunk to the end of the last (a
        prefetch piece or a read-ahead run, chunks in blob order): aligning would fetch the
        neighbouring piece's bytes twice, and the small gaps between chunks (directory and
        link entries) are not worth a multi-range request. On failure every claim is
        completed with the error.
        """
        if align:
            ranges = self._ranges_for([*claimed, *riders])
            have = {c.digest for c in claimed} | {c.digest for c in riders}
            extra = [*riders, *self._free_riders(ranges, have)]
        else:
            ranges = [(claimed[0].compressed_offset, claimed[-1].compressed_end)]
            extra = []
        chunks = claimed + extra
        start = time.monotonic()
        try:
            try:
                parts = await self.blob.read_ranges(ranges)
            except Exception as exc:
                raise LayerFetchError(
                    f"{self.key}: fetching {len(ranges)} range(s): {exc}"
                ) from exc
        except BaseException as exc:
            for c in chunks:
                self.cache.finish(c.digest, None, _as_error(exc))
            raise
        nbytes = sum(len(p) for p in parts)
        self.stats.fetched_bytes += nbytes
        self.stats.fetch_requests += 1
        if self.on_fetch is not None:
            self.on_fetch(self, nbytes, time.monotonic() - start)
        log.debug("%s: fetched %d bytes in %.3fs", self.key, nbytes, time.monotonic() - start)
        range_starts = [r[0] for r in ranges]
        compressed = []
        for c in chunks:
            i = bisect.bisect_right(range_starts, c.compressed_offset) - 1
            lo = ranges[i][0]
            compressed.append(parts[i][c.compressed_offset - lo : c.compressed_end - lo])
        return _Download(chunks, compressed, len(claimed))

    async def _deliver(self, got: _Download) -> dict[str, bytes]:
        """Inflate and verify downloaded chunks, complete their claims, cache the good ones.

        Raises the first verification error when a chunk the caller claimed (not a free
        rider) failed; failed chunks are never cached or served.
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
                log.error(
                    "chunk verification failed in %s at %d: %s", self.key, c.compressed_offset, data
                )
                self.cache.finish(c.digest, None, data)
            else:
                self.cache.finish(c.digest, data)
                out[c.digest] = data
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

    # -- blob --------------------------------------------------------------------------------

    async def read_blob(self, offset: int, size: int) -> bytes:
        """Raw compressed blob bytes (for ``podman save``), through a small window cache."""
        if offset >= self.blob.size:
            return b""
        size = min(size, self.blob.size - offset)
        out = bytearray()
        pos = offset
        while pos < offset + size:
            w = pos // BLOB_WINDOW
            window = self._blob_windows.get(w)
            if window is None:
                lo = w * BLOB_WINDOW
                hi = min(lo + BLOB_WINDOW, self.blob.size)
                try:
                    (window,) = await self.blob.read_ranges([(lo, hi)])
                except Exception as exc:
                    raise LayerFetchError(f"{self.key}: blob range {lo}-{hi}: {exc}") from exc
                self.stats.fetched_bytes += len(window)
                self.stats.fetch_requests += 1
                if len(self._blob_windows) >= 4:
                    self._blob_windows.pop(next(iter(self._blob_windows)))
                self._blob_windows[w] = window
            take = window[pos - w * BLOB_WINDOW : offset + size - w * BLOB_WINDOW]
            if not take:
                break
            out += take
            pos += len(take)
        return bytes(out)

    # -- background work ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The layer's own nursery, for its prefetch, background fetch and read-ahead; start
        it with ``await nursery.start(layer.run)``. It lives until :meth:`release` cancels it
        with everything in it."""
        with trio.CancelScope() as scope:
            self.cancel_scope = scope
            if self.released:
                scope.cancel()
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    await trio.sleep_forever()
            finally:
                self._nursery = None

    def start_prefetch(self, limiter: trio.CapacityLimiter, timeout: float) -> None:
        """Start :meth:`prefetch` in the layer's nursery (nothing once released)."""
        if self._nursery is not None:
            self._nursery.start_soon(self.prefetch, limiter, timeout)

    def start_background(
        self,
        *,
        prefetch: bool,
        background: bool,
        limiter: trio.CapacityLimiter,
        prefetch_timeout: float,
    ) -> None:
        """Start :meth:`run_background`'s work in the layer's nursery (nothing once released)."""
        if self._nursery is not None:
            self._nursery.start_soon(
                self._background_work, prefetch, background, limiter, prefetch_timeout
            )

    async def run_background(
        self,
        *,
        prefetch: bool,
        background: bool,
        limiter: trio.CapacityLimiter,
        prefetch_timeout: float,
    ) -> None:
        """Prefetch the landmark region, then fetch the rest; yields to on-demand reads.
        Runs the layer's nursery (:meth:`run`) until :meth:`release`."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run)
            self.start_background(
                prefetch=prefetch,
                background=background,
                limiter=limiter,
                prefetch_timeout=prefetch_timeout,
            )

    async def _background_work(
        self,
        prefetch: bool,
        background: bool,
        limiter: trio.CapacityLimiter,
        prefetch_timeout: float,
    ) -> None:
        if prefetch:
            await self.prefetch(limiter, prefetch_timeout)
        self.stats.prefetch_done = True
        if background:
            await self._background(limiter)
            self.stats.background_done = True

    async def prefetch(self, limiter: trio.CapacityLimiter, timeout: float) -> None:
        """Fetch the region before the landmark once; a second caller waits for the first.

        Why callable on its own: the resolver starts it as soon as the image's manifest is
        known, before the runtime has looked the layer up, so the prioritized files are on
        their way while the runtime is still walking the other layers.
        """
        if self._prefetch_started:
            await self._prefetched.wait()
            return
        self._prefetch_started = True
        try:
            with trio.CancelScope() as self._prefetch_scope, trio.move_on_after(timeout):
                await self._prefetch(limiter)
        finally:
            self.stats.prefetch_done = True
            self._prefetched.set()
            if isinstance(self.blob, AheadBlob):
                self.blob.drop()

    async def _prefetch(self, limiter: trio.CapacityLimiter) -> None:
        """Fetch the landmark region in pieces, in blob order, a few requests at a time.

        Why pieces and not one request: a piece's chunks are decompressed, verified and
        handed to waiting readers as soon as that piece arrives. An optimized image lays its
        files out in the order the workload first reads them, so the workload starts on the
        first files while the later ones are still on the wire, and inflating overlaps with
        the download instead of following it.
        """
        end = self.index.prefetch_end
        if not end:
            return
        claimed = [
            c
            for c in self.index.all_chunks()
            if c.compressed_end <= end
            and c.digest not in self.cache
            and self.cache.begin(c.digest) is not None
        ]
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
            self.key,
            len(claimed),
            sum(c.compressed_end - c.compressed_offset for c in claimed),
            len(pieces),
        )
        send, receive = trio.open_memory_channel[list[ChunkRef]](len(pieces))
        for piece in pieces:
            send.send_nowait(piece)
        send.close()

        async def deliver(got: _Download) -> None:
            try:
                await self._deliver(got)
            except Exception as exc:  # never cached; a reader's own fetch reports it
                log.warning("prefetch of %s: %s", self.key, exc)

        async def worker(nursery: trio.Nursery) -> None:
            # Inflating a piece runs beside the next piece's download, not before it.
            async for piece in receive:
                try:
                    got = await self._download(piece, align=False)
                except Exception as exc:  # readers of these chunks fetch them on demand
                    log.warning("prefetch of %s failed: %s", self.key, exc)
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
                    self.cache.finish(c.digest, None, LayerFetchError("prefetch stopped"))

    async def _fetch_region(self, chunks: list[ChunkRef], ranges: list[tuple[int, int]]) -> None:
        claimed = [
            c
            for c in chunks
            if c.digest not in self.cache and self.cache.begin(c.digest) is not None
        ]
        if not claimed:
            return
        await self._fetch(claimed)

    async def _background(self, limiter: trio.CapacityLimiter) -> None:
        batch: list[ChunkRef] = []
        batch_bytes = 0
        for c in self.index.all_chunks():
            if c.digest in self.cache:
                continue
            batch.append(c)
            batch_bytes += c.compressed_end - c.compressed_offset
            if batch_bytes >= BACKGROUND_BATCH:
                await self._background_batch(batch, limiter)
                batch, batch_bytes = [], 0
        if batch:
            await self._background_batch(batch, limiter)

    async def _background_batch(self, batch: list[ChunkRef], limiter: trio.CapacityLimiter) -> None:
        await self._idle.wait()  # on-demand reads first
        async with limiter:
            try:
                await self._fetch_region(batch, [])
            except Exception as exc:
                log.warning("background fetch of %s failed: %s", self.key, exc)
                await trio.sleep(1.0)

    def release(self) -> None:
        """Stop background work and drop what memory can be dropped; the disk cache stays."""
        self.released = True
        self._blob_windows.clear()
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()
        if self._prefetch_scope is not None:
            self._prefetch_scope.cancel()
        if isinstance(self.blob, AheadBlob):
            self.blob.drop()


def _file_offset(chunk: ChunkRef) -> int:
    return chunk.file_offset


def _as_error(exc: BaseException) -> BaseException:
    if isinstance(exc, trio.Cancelled):
        return LayerFetchError("fetch cancelled")
    return exc


FetchHook = Callable[["Layer", int, float], Awaitable[None]]
