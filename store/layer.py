"""One mounted eStargz layer: its tree, and file reads through to verified bytes.

Why here and not in the format module: the format says where a chunk lives and how to check
it; the layer decides *when* to fetch what, in three parts with small interfaces:

- :class:`~store.chunks.ChunkSource` (``layer.source``): chunk bytes fetched through the blob
  reader, each verified against its ``chunkDigest`` before it enters the cache or reaches a
  reader (a mismatch raises :class:`ChunkVerifyError`, which the FUSE layer turns into EIO),
  concurrent fetches of one chunk shared, a read's whole :data:`READ_BLOCK` riding along
  (not the region's chunks the TOC's prefetch ranges leave out: the recorded run skipped them);
- :class:`~store.prefetch.Prefetcher` (``layer.prefetcher``): the region before
  ``.prefetch.landmark`` (or its prefetch ranges) in pieces as soon as the image is known,
  then the rest of the layer in the background, after 5 s without foreground work store-wide
  and cancelled by any (:mod:`store.priority`);
- :class:`Layer` itself: file reads with a per-file read-ahead window that grows while the
  reader reads on sequentially (fetched beside the read, in one exact range), raw blob reads
  (the whole blob checked against the layer digest first: :mod:`store.blobfile`),
  status, and one nursery for all of the layer's background work, cancelled whole on release.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from store.blobfile import BlobVerifyError, VerifiedBlob
from store.cache import ChunkCache
from store.chunks import (
    BLOCK_CHUNKS_MOST,
    DECOMPRESS_GROUPS,
    READ_BLOCK,
    BlobReader,
    ChunkRef,
    ChunkSource,
    ChunkVerifyError,
    LayerFetchError,
    LayerIndexView,
    LayerStats,
    ReadPlan,
)
from store.prefetch import AheadBlob, Prefetcher
from store.priority import Foreground
from store.tree import LayerTree, Node

__all__ = [
    "DECOMPRESS_GROUPS",
    "READAHEAD_MAX",
    "READAHEAD_MIN",
    "READ_BLOCK",
    "AheadBlob",
    "BlobReader",
    "BlobVerifyError",
    "ChunkRef",
    "ChunkVerifyError",
    "Layer",
    "LayerFetchError",
    "LayerIndexView",
    "LayerStats",
]

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
# Handing the kernel's page cache a file's bytes (Layer.page_in): a file is looked over at most
# once per PAGE_IN_EVERY seconds, in pushes of contiguous chunks of PAGE_IN_PUSH bytes at most.
PAGE_IN_EVERY = 0.1
PAGE_IN_PUSH = 4 << 20


@dataclass(slots=True)
class _ReadStream:
    """Where a file's last read ended, and its read-ahead window in uncompressed bytes."""

    next_offset: int
    window: int = READAHEAD_MIN


@dataclass
class Layer:
    """A resolved layer: tree, index, blob reader, shared cache; counts its references.

    Its background work (prefetch, background fetch, read-ahead) runs in its own nursery:
    ``await nursery.start(layer.run)``, then :meth:`start_prefetch`, :meth:`start_background`;
    :meth:`release` cancels all of it at once. ``chunk_size`` aligns on-demand requests, in
    compressed bytes. Callbacks: ``on_fetch(layer, nbytes, seconds)`` after every request the
    blob answered, ``on_file_access(layer, node)`` at a file's first read, ``on_read(layer)``
    at every read.
    """

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
    # The store's foreground work, which the layer's reads and look-ahead fetches that need
    # a chunk not cached, its blob reads and its prefetch mark, and its background fetch
    # waits out (store.priority); a layer of its own by default, whose background fetch
    # waits for none of its reads to be under way.
    foreground: Foreground = field(default_factory=lambda: Foreground(silence=0.0))
    stats: LayerStats = field(default_factory=LayerStats)
    released: bool = False
    cancel_scope: trio.CancelScope | None = None  # run()'s, once it started
    source: ChunkSource = field(init=False)
    prefetcher: Prefetcher = field(init=False)
    _nursery: trio.Nursery | None = None  # run()'s, while it runs
    _whole: VerifiedBlob = field(init=False)
    _whole_watched: bool = False  # drop_when_idle runs for _whole
    _total_chunk_bytes: int | None = None
    _accessed: set[int] = field(default_factory=set)
    _streams: dict[int, _ReadStream] = field(default_factory=dict)
    # page_in, per page cache (inode): the file's chunks handed to the kernel, when it was
    # last looked over, whether a page-in task runs for it
    _paged: dict[int, set[int]] = field(default_factory=dict)
    _paged_at: dict[int, float] = field(default_factory=dict)
    _paging: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        # Its parts hold no reference back to the layer (their callbacks reach it through a
        # weak one): a released layer, tree and index with it, is freed by reference counting
        # as soon as its last holder lets go. A reference cycle left it to the collector's
        # next full pass, which an idle store may not make for hours: two released
        # 60,000-entry layers kept 85 MB.
        self.source = ChunkSource(
            key=self.key,
            index=self.index,
            blob=self.blob,
            cache=self.cache,
            stats=self.stats,
            chunk_size=self.chunk_size,
            on_fetch=partial(_fetched, weakref.ref(self)),
        )
        self.prefetcher = Prefetcher(self.source, self.foreground)
        self._whole = VerifiedBlob(
            self.blob, self.digest, self.cache.root, partial(_count_blob_fetch, self.stats)
        )

    # -- status ------------------------------------------------------------------------------

    @property
    def total_chunk_bytes(self) -> int:
        """Uncompressed bytes of all the layer's chunks."""
        if self._total_chunk_bytes is None:
            self._total_chunk_bytes = sum(c.size for c in self.index.all_chunks())
        return self._total_chunk_bytes

    def status(self) -> dict[str, Any]:
        """The layer's line of the store's status JSON (bytes; ``percent`` cached, 0-100)."""
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
        """``size`` bytes of a regular file from ``offset`` — verified, from cache or registry.

        Raises :class:`ChunkVerifyError` (a chunk does not match its digest) or
        :class:`LayerFetchError` (the registry did not deliver)."""
        if offset >= node.size or size <= 0:
            return b""
        size = min(size, node.size - offset)
        if node.index not in self._accessed:
            self._accessed.add(node.index)
            if self.on_file_access is not None:
                self.on_file_access(self, node)
        chunks = self.index.chunks_of(node.entry)
        end = offset + size
        plan = self.source.plan_read(chunks, offset, end, node.size)
        self.stats.on_demand_reads += 1
        if self.on_read is not None:
            self.on_read(self)
        if plan.wanted:
            self._read_ahead(node, chunks, plan.after, offset, size)
        with self._fetching(plan):
            return await self.source.read(plan, offset, end, nursery=self._nursery)

    def _fetching(self, plan: ReadPlan) -> AbstractContextManager[None]:
        """Foreground work (:meth:`Foreground.busy <store.priority.Foreground.busy>`) when
        the read needs a chunk that is not cached — on the wire already, or to fetch; a read
        the cache answers whole interrupts no background fetch, as in the Go store, where only
        reads of the blob are prioritized tasks."""
        cache = self.cache
        if all(c.digest in cache for c in plan.wanted):
            return nullcontext()
        return self.foreground.busy()

    async def fetch_file(self, node: Node, offset: int, size: int) -> bytes:
        """The bytes :meth:`read_file` would return, fetched the same way (the read's whole
        block), but not counted as a read: no access trace, no read statistics, no
        read-ahead. For the store's own look-ahead (:mod:`store.libprefetch`). Raises as
        :meth:`read_file` does, and :class:`LayerFetchError` once the layer is released."""
        if self.released:
            raise LayerFetchError(f"{self.key}: released")
        if offset >= node.size or size <= 0:
            return b""
        end = min(offset + size, node.size)
        chunks = self.index.chunks_of(node.entry)
        plan = self.source.plan_read(chunks, offset, end, node.size)
        with self._fetching(plan):
            return await self.source.read(plan, offset, end, nursery=self._nursery)

    def fetch_file_soon(self, node: Node, offset: int, size: int) -> None:
        """:meth:`fetch_file` in the layer's own nursery (cancelled by :meth:`release`),
        nobody waiting; a failure is logged (a read of those bytes reports it)."""
        self._spawn(self._fetch_quietly, node, offset, size)

    async def _fetch_quietly(self, node: Node, offset: int, size: int) -> None:
        try:
            await self.fetch_file(node, offset, size)
        except Exception as exc:
            log.debug("look-ahead of %s at %d failed: %s", node.entry.name, offset, exc)

    def page_in(self, key: int, node: Node, push: Callable[[int, bytes], None]) -> None:
        """Hand the kernel's page cache the bytes of ``node`` the store already holds,
        verified, in memory (:meth:`ChunkCache.peek <store.cache.ChunkCache.peek>`), in the
        layer's nursery (nothing once released, or when a look-over of this file ran less
        than :data:`PAGE_IN_EVERY` seconds ago or still runs). ``push(file_offset, data)``
        is called in a worker thread with runs of contiguous chunks, each chunk once the
        kernel took it; it is ``pyfuse3.notify_store`` for the file's inode in the store,
        and may raise :class:`OSError` (logged at debug level; the kernel then asks with
        reads as usual).
        ``key`` names that page cache (the inode: one layer can be mounted under two refs).

        Why: a prefetched file's bytes are in the store before the workload reads them, but
        each read the page cache misses is still a round trip through FUSE into Python. A
        JVM's start issues thousands (tomcat: 1,875 FUSE reads behind 11,800 read and
        pread calls of its main thread), on two cores shared with the store."""
        if self.released or self._nursery is None or key in self._paging:
            return
        now = trio.current_time()
        last = self._paged_at.get(key)
        if last is not None and now - last < PAGE_IN_EVERY:
            return
        self._paged_at[key] = now
        self._paging.add(key)
        self._spawn(self._page_in, key, node, push)

    async def _page_in(self, key: int, node: Node, push: Callable[[int, bytes], None]) -> None:
        try:
            done = self._paged.setdefault(key, set())
            runs: list[tuple[int, list[bytes], list[int]]] = []  # (offset, datas, indices)
            end = -1
            run_bytes = 0
            for i, c in enumerate(self.index.chunks_of(node.entry)):
                if i in done:
                    continue
                data = self.cache.peek(c.digest)
                if data is None or len(data) != c.size:
                    continue
                if runs and c.file_offset == end and run_bytes < PAGE_IN_PUSH:
                    runs[-1][1].append(data)
                    runs[-1][2].append(i)
                    run_bytes += c.size
                else:
                    runs.append((c.file_offset, [data], [i]))
                    run_bytes = c.size
                end = c.file_offset + c.size

            def push_all() -> None:
                # a run counts as done once the kernel took it: a refused one is tried again
                for offset, datas, indices in runs:
                    push(offset, datas[0] if len(datas) == 1 else b"".join(datas))
                    done.update(indices)

            if runs:
                await trio.to_thread.run_sync(push_all)
        except OSError as exc:
            log.debug("page cache fill of %s failed: %s", node.entry.name, exc)
        finally:
            self._paging.discard(key)

    def in_prefetch_region(self, node: Node) -> bool:
        """Whether the file starts in the prioritized region before the landmark, which the
        prefetch brings in (when it runs) in the order a recorded run first read it — with
        prefetch ranges, whether its first chunk is in one (the run read its head)."""
        end = self.index.prefetch_end
        chunks = self.index.chunks_of(node.entry)
        if not end or not chunks or chunks[0].compressed_offset >= end:
            return False
        return not self.source.off_trace(chunks[0])

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
        for c in itertools.islice(chunks, after, after + BLOCK_CHUNKS_MOST):
            if c.file_offset >= horizon:
                break
            if not self.source.is_missing(c) or self.source.off_trace(c):
                if ahead:  # one contiguous run: one exact range
                    break
                continue
            ahead.append(c)
            missing += c.size
        reaches_end = after < len(chunks) and horizon >= node.size
        if ahead and (2 * missing >= stream.window or reaches_end):
            self._spawn(self.source.fetch_run, ahead)

    # -- blob --------------------------------------------------------------------------------

    async def read_blob(self, offset: int, size: int) -> bytes:
        """Raw compressed blob bytes ``[offset, offset + size)`` (for ``podman save``), once the
        whole blob hashed to the layer's digest (:class:`~store.blobfile.VerifiedBlob`: the
        first read downloads all of it). Raises :class:`LayerFetchError`,
        :class:`BlobVerifyError`. The downloaded blob is dropped after a minute without a
        read (:meth:`VerifiedBlob.drop_when_idle <store.blobfile.VerifiedBlob.drop_when_idle>`)."""
        try:
            with self.foreground.busy():
                return await self._whole.read(offset, size)
        finally:
            if not self._whole_watched and self._nursery is not None:
                self._whole_watched = True
                self._spawn(self._watch_whole)

    async def _watch_whole(self) -> None:
        try:
            await self._whole.drop_when_idle()
        finally:
            self._whole_watched = False

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

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start ``fn(*args)`` in the layer's nursery (nothing when it does not run)."""
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    def start_prefetch(self, limiter: trio.CapacityLimiter, timeout: float) -> None:
        """Start :meth:`prefetch` in the layer's nursery (nothing once released)."""
        self._spawn(self.prefetch, limiter, timeout)

    def start_background(
        self,
        *,
        prefetch: bool,
        background: bool,
        limiter: trio.CapacityLimiter,
        prefetch_timeout: float,
    ) -> None:
        """Start, in the layer's nursery (nothing once released), the landmark region's
        prefetch (if ``prefetch``; it gives up after ``prefetch_timeout`` seconds), then the
        background fetch of the rest (if ``background``), which yields to on-demand reads."""
        timeout = prefetch_timeout if prefetch else None
        self._spawn(self.prefetcher.run, limiter, timeout, background)

    async def prefetch(self, limiter: trio.CapacityLimiter, timeout: float) -> None:
        """Fetch the region before the landmark once; a second caller waits for the first
        (:meth:`Prefetcher.prefetch <store.prefetch.Prefetcher.prefetch>`).

        Why callable on its own: the resolver starts it as soon as the image's manifest is
        known, before the runtime has looked the layer up, so the prioritized files are on
        their way while the runtime is still walking the other layers.
        """
        await self.prefetcher.prefetch(limiter, timeout)

    # The prefetcher's state and background fetch, as the layer's own tests reach them.
    @property
    def _prefetch_started(self) -> bool:
        return self.prefetcher.started

    async def _background(self, limiter: trio.CapacityLimiter) -> None:
        await self.prefetcher.background(limiter)

    def release(self) -> None:
        """Stop background work and drop what memory can be dropped; the disk cache stays."""
        self.released = True
        self._whole.close()
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()
        self.prefetcher.stop()


def _fetched(layer: weakref.ref[Layer], nbytes: int, seconds: float) -> None:
    """A request of ``layer``'s chunk source was answered: its ``on_fetch``."""
    me = layer()
    if me is not None and me.on_fetch is not None:
        me.on_fetch(me, nbytes, seconds)


def _count_blob_fetch(stats: LayerStats, nbytes: int) -> None:
    """A request of a layer's whole-blob download was answered: counted in its ``stats``."""
    stats.fetched_bytes += nbytes
    stats.fetch_requests += 1
