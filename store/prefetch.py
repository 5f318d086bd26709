"""A layer's prefetcher: the region before ``.prefetch.landmark`` first, then the rest.

An optimized eStargz image lays the files its workload reads first out before the
``.prefetch.landmark`` entry (the TOC gives its offset, the index's ``prefetch_end``). Two
pieces bring that region in ahead of the reads:

- :class:`AheadBlob` starts downloading it raw before the TOC is parsed into an index (the
  resolver wires it in): speculatively when the blob's first bytes show prioritized files,
  for sure once the TOC's digest is verified; its bytes are only ever handed to the chunk
  source, which inflates and verifies every chunk before anything is served;
- :class:`Prefetcher` claims the region's chunks and fetches them through the layer's
  :class:`~store.chunks.ChunkSource` in pieces of :data:`PREFETCH_PIECE` compressed bytes at
  most, :data:`PREFETCH_STREAMS` requests at a time — over an :class:`AheadBlob` that carries
  the region, each piece as soon as the early download has its bytes, without a turn under
  the store's limiter — then (if asked) fetches the rest of the layer in
  :data:`BACKGROUND_BATCH` batches, each in the background of the store's foreground work
  (:mod:`store.priority`: after 5 s without reads, loads or prefetches, cancelled by one).

Memory: neither holds the region whole. The early download keeps a piece only until the
prefetch has cached its chunks, and waits while :data:`AHEAD_HELD` bytes are kept; prefetch
pieces and background batches are cut by uncompressed bytes too, and their chunks are
inflated within the cache's store-wide budget (:attr:`store.cache.ChunkCache.inflating`).

When the landmark's TOC entry lists the region's ranges worth prefetching
(:data:`store.estargz.PREFETCH_RANGES_KEY`: the chunks an access trace saw read, of files
read in part), both take only those: the chunks that touch a range. The rest of the region
is read on demand, as the rest of the layer is.

What the prefetch costs a pull, and two ways tried to win that back (``wan``, ``estargz``, 6
samples per store in one invocation, medians): with ``noprefetch = true`` the pull took
0.09–0.19 s less (gcc 1.09 → 0.99 s, python 1.17 → 1.01 s, postgres 0.96 → 0.86 s, redis
0.91 → 0.82 s, tomcat 1.12 → 0.93 s) and the total 1.38–1.82 times as long. Not done:
holding a downloaded piece's inflating while any layer load ran (the loads' TOC decoding
needs the interpreter lock): over two invocations, 12 pairs per workload, the pull moved by
-0.07 to 0.00 s and the total by -0.07 to +0.03 s (Wilcoxon p 0.08–0.97). Not done either:
holding the early download while TOCs were on the wire: the pull took 0.04–0.16 s less
except gcc's (+0.04 s), but the run took 0.17–0.23 s more for gcc, postgres and redis as the
region came later (totals 1.09, 1.06 and 1.14 of before). What the prefetch takes from a pull
is its share of the link, and the run needs it.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import trio

from store.chunks import ONE_WINDOW, BlobReader, ChunkRef, ChunkSource, Download, LayerFetchError
from store.estargz.head import HeadHint, head_hint
from store.estargz.toc import UNLISTED_RANK
from store.priority import Foreground
from store.registry.reference import digest_hasher
from store.spans import merge_spans

log = logging.getLogger(__name__)

PREFETCH_PIECE = 1 << 20  # compressed bytes per prefetch request
# The early download's unit: a request carries up to PREFETCH_PIECE of them, a read waiting
# for one that is not on the wire yet fetches just it (AheadBlob.hurry), and the prefetch
# hands a piece's chunks on as soon as it is in.
AHEAD_PIECE = 256 << 10
PREFETCH_STREAMS = 3  # prefetch requests in flight per layer
# A blob this small that one read brought whole is kept whole (AheadBlob): reads of its
# files then need no request (a small top layer's files cost a round trip each).
WHOLE_KEPT_MAX = 64 << 10
# Before the TOC: the head probe (the first tar headers), then a region guessed from it,
# fetched one growing piece at a time: 256 KiB, 512 KiB, 1 MiB, 2 MiB (at most the last one
# is wasted when the TOC says the region ends sooner).
HEAD_PROBE = ONE_WINDOW  # one round trip on a new connection
SPECULATE_FIRST = 256 << 10
SPECULATE_BYTES = 4 << 20
FIRST_BATCH = 64 << 10  # bytes of the first early-download request; then doubling
# Pieces per early-download request at most: a registry without multi-range requests gets
# each piece as a request of its own, all at once (store.registry.client.read_ranges).
BATCH_PIECES = 16
# Bytes of the early download's pieces a layer keeps that the prefetch has not processed yet
# (arrived, not yet inflated, verified and cached): past it the download waits (AheadBlob).
AHEAD_HELD = 16 << 20
# Prefetch pieces downloaded and not yet delivered (inflated, verified, cached), per layer.
PREFETCH_DELIVERS = 2 * PREFETCH_STREAMS
# The rank of a piece no ranked range holds: after all of them (as the TOC scan ranks the
# bytes an order does not list, store.estargz.TocScan.fetch_ranges).
UNRANKED = UNLISTED_RANK
BACKGROUND_BATCH = 4 << 20  # compressed bytes per background request
# Uncompressed bytes (chunk sizes) per background request and per prefetch piece at most (a
# chunk bigger than that goes alone): what a layer compresses well is fetched in small
# batches too (48 chunks of 64 MiB of zeros are 3 MB compressed).
BACKGROUND_BATCH_INFLATED = 16 << 20
PREFETCH_PIECE_INFLATED = 8 << 20
# A background batch the registry did not deliver is tried again (with the rest of the layer)
# after this many seconds, doubled per attempt that fetched nothing, up to the most.
BACKGROUND_RETRY = 1.0
BACKGROUND_RETRY_MOST = 60.0


def _span(piece: Sequence[ChunkRef]) -> tuple[int, int]:
    """The compressed ``[start, end)`` blob range of a prefetch piece (chunks in blob order)."""
    return piece[0].compressed_offset, piece[-1].compressed_end


def batches(
    chunks: Iterable[ChunkRef], packed_most: int, inflated_most: int
) -> Iterator[list[ChunkRef]]:
    """``chunks`` in order, in consecutive batches of at least one chunk, each cut once it
    holds ``packed_most`` compressed bytes (``compressed_end - compressed_offset``) or
    ``inflated_most`` uncompressed ones (chunk sizes), whichever comes first. Lazy: a
    chunk is looked at only once the batches before it were taken (the background fetch
    skips those cached meanwhile)."""
    batch: list[ChunkRef] = []
    packed = inflated = 0
    for c in chunks:
        batch.append(c)
        packed += c.compressed_end - c.compressed_offset
        inflated += c.size
        if packed >= packed_most or inflated >= inflated_most:
            yield batch
            batch = []
            packed = inflated = 0
    if batch:
        yield batch


@dataclass
class _Region:
    """The early download of ``[0, end)`` in pieces: piece ``i`` is ``pieces[i]``, its bytes
    ``data[i]`` once ``done[i]`` is set (``None`` if it failed, was not needed after all, was
    released, or the region was dropped). ``claimed[i]``: a worker or a reader is fetching
    it. ``users[i]``: prefetch pieces (:meth:`AheadBlob.expect`) and reads that will take
    bytes of it; once ``expected`` is set, a piece is released when that drops to 0."""

    end: int
    pieces: list[tuple[int, int]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # the pieces' first bytes, for bisect
    data: list[bytes | None] = field(default_factory=list)
    done: list[trio.Event] = field(default_factory=list)
    claimed: list[bool] = field(default_factory=list)
    users: list[int] = field(default_factory=list)
    final: bool = False  # the end is the TOC's, not a guess
    # The order workers claim pieces in (indices into ``pieces``); None: blob order.
    order: list[int] | None = None
    # Each piece's fetch rank from the TOC (PREFETCH_ORDER_KEY), comparable across layers
    # (WireOrder); None: the region has none.
    ranks: list[int] | None = None
    _cursor: int = 0  # order[:_cursor] (blob order: pieces[:_cursor]) are claimed
    expected: bool = False  # the prefetch said which pieces it takes (AheadBlob.expect)
    more: trio.Event = field(default_factory=trio.Event)  # set when pieces are added

    def add(self, lo: int, hi: int, step: int, first: int | None = None) -> None:
        """Pieces covering ``[lo, hi)``: of ``step`` bytes, or growing from ``first`` bytes,
        doubling, up to ``step``."""
        size = step if first is None else min(first, step)
        p = lo
        while p < hi:
            self.pieces.append((p, min(p + size, hi)))
            self.starts.append(p)
            self.data.append(None)
            self.done.append(trio.Event())
            self.claimed.append(False)
            self.users.append(0)
            p += size
            size = min(2 * size, step)
        self.more.set()
        self.more = trio.Event()

    def claim_batch(self, limit: int) -> list[int]:
        """Claim the first unclaimed piece and the unclaimed ones after it, in :attr:`order`
        (blob order when None), up to ``limit`` bytes and :data:`BATCH_PIECES` pieces in all
        (at least one piece; [] when none is left); returned ascending (one request).
        Amortized O(batch + pieces claimed since the last call): the claimed ones at the
        front are stepped over once (from the front each time, claiming a large region was
        quadratic in its pieces)."""
        order = self.order if self.order is not None else range(len(self.pieces))
        while self._cursor < len(order) and self.claimed[order[self._cursor]]:
            self._cursor += 1
        batch: list[int] = []
        total = 0
        for n in range(self._cursor, len(order)):
            i = order[n]
            if self.claimed[i]:
                continue
            lo, hi = self.pieces[i]
            if batch and (total + (hi - lo) > limit or len(batch) >= BATCH_PIECES):
                break
            self.claimed[i] = True
            batch.append(i)
            total += hi - lo
        return sorted(batch)

    def rank(self, listed: Sequence[tuple[int, ...]]) -> None:
        """Claim pieces by ``listed``: ``(start, end)`` blob ranges in the order to fetch
        them, or ``(start, end, rank)`` triples (lower ranks first; kept in :attr:`ranks`
        for :class:`WireOrder`). A piece goes where the first range holding any of its bytes
        does (the lowest rank), pieces of one place in blob order, pieces no range holds
        last."""
        ranked = bool(listed) and all(len(t) == 3 for t in listed)
        rank = [UNRANKED] * len(self.pieces)
        for n, item in enumerate(listed):
            r = item[2] if ranked else n
            for i in self.overlapping(item[0], item[1]):
                rank[i] = min(rank[i], r)
        self.order = sorted(range(len(self.pieces)), key=lambda i: (rank[i], i))
        self.ranks = rank if ranked else None
        self._cursor = 0

    def next_rank(self) -> int | None:
        """The rank of the next piece a worker would claim (None: no ranks, or every piece
        is claimed)."""
        if self.ranks is None or self.order is None:
            return None
        while self._cursor < len(self.order) and self.claimed[self.order[self._cursor]]:
            self._cursor += 1
        if self._cursor == len(self.order):
            return None
        return self.ranks[self.order[self._cursor]]

    def overlapping(self, lo: int, hi: int) -> range:
        """The indices of the pieces holding any byte of ``[lo, hi)``."""
        first = max(bisect.bisect_right(self.starts, lo) - 1, 0)
        last = bisect.bisect_left(self.starts, hi)
        while first < last and self.pieces[first][1] <= lo:
            first += 1
        return range(first, last)


@dataclass(eq=False)
class WireOrder:
    """Turns on the wire, store-wide, for the early downloads whose TOC ranks their pieces
    (:data:`store.estargz.PREFETCH_ORDER_KEY`: the number of the traced read that first took
    each piece, one count across an image's layers).

    A worker of such a download puts its next batch on the wire only while its region's
    next piece ranks lowest among them (ties go together), or while their batches on the
    wire hold less than :func:`wire_room` bytes (the link stays full while the lowest one
    ramps up from small first batches or waits for room: a region whose workers wait for the
    prefetch to catch up, or that was dropped, holds nobody up for longer than a batch
    takes; counting three batches instead, small first batches counted as a full wire, and
    python's ``estargz`` total was 10% longer in an A/B, p = 0.02). Why: each layer's
    download has its own workers, so layers loaded together shared the link evenly —
    tomcat's JVM waited for ``libjvm.so`` and ``classes.jsa`` pages while the link carried
    the tomcat jars of another layer, read seconds later. Downloads without ranks take no
    turns (blob order, as before).

    Waiting (:meth:`may_go`, then :meth:`wait`) happens only while the wire is that full,
    so one of its batches leaving it comes next. Each change that can let a waiting region
    go — a batch leaving the wire, one going on it (the ranks moved on), a region leaving, a
    woken worker not taking its turn (:meth:`passed`) — wakes the waiting regions whose next
    piece ranks lowest, and of the others the lowest-ranked while there is room (it wakes
    the next when it goes on the wire); nobody else. Cost: O(regions) per change, O(1)
    wake-ups per batch (waking every waiting worker at every change cost O(regions²) per
    batch: 100 layers loaded at once, 92 s of CPU for 10,000 batches).
    """

    on_wire_bytes: int = 0  # bytes of ranked regions' batches on the wire
    _regions: list[_Region] = field(default_factory=list)
    # id(region) -> (region, event): regions whose workers wait for a turn, on that event.
    _waiting: dict[int, tuple[_Region, trio.Event]] = field(default_factory=dict)

    def join(self, region: _Region) -> None:
        """``region``'s workers take turns from now on (until :meth:`leave`)."""
        self._regions.append(region)

    def leave(self, region: _Region) -> None:
        """``region``'s workers are done: it holds nobody up any more."""
        self._regions = [g for g in self._regions if g is not region]
        found = self._waiting.pop(id(region), None)
        if found is not None:
            found[1].set()
        self._dispatch()

    def _lowest(self) -> int | None:
        """The lowest next rank of the regions taking turns (None: none has a piece left)."""
        return min(
            (r for r in (g.next_rank() for g in self._regions) if r is not None), default=None
        )

    def may_go(self, region: _Region) -> bool:
        """Whether ``region`` may claim its next batch now: it has no ranks or nothing left
        to claim, the ranked batches on the wire hold less than :func:`wire_room` bytes, or
        its next piece ranks lowest. O(regions)."""
        mine = region.next_rank()
        if mine is None or self.on_wire_bytes < wire_room():
            return True
        lowest = self._lowest()
        return lowest is None or mine <= lowest

    async def wait(self, region: _Region) -> None:
        """Wait until ``region`` may go, maybe (:meth:`may_go` again: another worker may have
        taken the free place first). Call only when :meth:`may_go` said no, with no
        checkpoint between. Cancellable."""
        found = self._waiting.get(id(region))
        if found is None:
            found = self._waiting[id(region)] = (region, trio.Event())
        await found[1].wait()

    def passed(self) -> None:
        """A worker woken for a turn did not take it (nothing left to claim, or waiting for
        room first): the turn goes to the next waiting region."""
        self._dispatch()

    def _dispatch(self) -> None:
        if not self._waiting:
            return
        lowest = self._lowest()
        rest: list[tuple[int, int]] = []  # (next rank, id) of the regions still waiting
        for key, (g, event) in list(self._waiting.items()):
            mine = g.next_rank()
            if mine is None or lowest is None or mine <= lowest:
                del self._waiting[key]
                event.set()
            else:
                rest.append((mine, key))
        if rest and self.on_wire_bytes < wire_room():
            _mine, key = min(rest)
            self._waiting.pop(key)[1].set()

    @contextmanager
    def sending(self, size: int) -> Iterator[None]:
        """A batch of ``size`` bytes of a ranked region is on the wire (just claimed: the
        next ranks moved)."""
        self.on_wire_bytes += size
        self._dispatch()
        try:
            yield
        finally:
            self.on_wire_bytes -= size
            self._dispatch()


def wire_room() -> int:
    """Bytes of ranked batches on the wire below which any ranked region may send: one full
    batch (:data:`PREFETCH_PIECE`, about twice the ``wan`` link's bandwidth-delay product).
    A region sending full batches keeps the others waiting; regions still sending their
    small first batches go side by side."""
    return PREFETCH_PIECE


@dataclass
class AheadBlob:
    """A blob reader that downloads the blob's first bytes ahead of need, in pieces.

    Why: the landmark offset is in the TOC's JSON as soon as its digest is verified, but
    parsing the TOC into an index costs ~0.1 s of CPU per 10,000 entries, and an image's
    layers are parsed together. Starting the prefetch region's download at verification
    instead of after the parse puts it on the wire about half a second sooner in a pull;
    :meth:`speculate` starts it sooner still, from what the blob's first bytes say
    (:func:`store.estargz.head.head_hint`), while the TOC is on its way.

    The region is cut into pieces of :data:`AHEAD_PIECE` bytes (growing to it from
    :data:`FIRST_BATCH` when nothing was speculated).
    :data:`PREFETCH_STREAMS` workers fetch the pieces in blob order (the region's files are
    in first-access order), each request a batch of the next pieces (one multi-range request
    when the prefetch ranges leave gaps: tomcat's largest layer lists 84 ranges of 220 KB on
    average, and three streams of requests that small kept the link at half its rate). The
    byte limit of a batch grows from :data:`FIRST_BATCH` to :data:`PREFETCH_PIECE`, doubling
    with every batch claimed (a piece bigger than the limit goes alone): the first files are
    needed first, and a batch's bytes are handed on only once all of it arrived. Ranked
    batches of one piece each, so that every piece was handed on as it arrived, made the
    ``estargz`` totals longer instead (A/B of 5 samples in one invocation, ``wan``: tomcat
    5.86 → 6.19 s, p = 0.03; gcc 2.12 → 2.22 s, p = 0.10): four times the requests, each
    starting with a round trip of its own. Nor did more workers for a ranked region help
    (4 or 6 instead of 3, same A/B: tomcat, gcc and python totals 1-7% longer, p ≥ 0.10):
    in gcc's run the link carried 80-85% of its rate while the region's three 1 MiB
    requests were on the wire, and the cause is not the gaps between one worker's requests.
    A read that needs a piece no worker has started fetches that piece itself at once rather
    than wait for the workers to reach it; a read whose bytes are in a piece already on the
    wire waits for that piece. A read waiting for chunks the prefetch claimed puts their
    pieces on the wire at once too (:meth:`hurry`) when no worker has started them: a JVM
    reads ``libjava.so`` early, but it lies after the ``modules`` ranges read later, and
    waited 0.7-1.1 s for the workers to get there (tomcat, ``wan``). Asking the registry again
    instead (reads of up to 256 KiB, and reads of chunks a prefetch piece had claimed)
    fetched 10-22% more bytes and made ``estargz`` totals up to 10% longer here (five
    workloads, ``wan``): during a prefetch the link is full, and a read's own request only
    takes a share of it.
    A blob of at most :data:`WHOLE_KEPT_MAX` bytes that one read took whole (a small layer's
    footer read takes all of it) is kept once it hashed to ``digest`` (the layer's): every
    later read is answered from it, and :meth:`start` downloads nothing. Before, each first
    read of one of its files asked the registry for bytes the footer read had already
    brought. Bytes that do not hash to it are not kept: kept, a wrong answer would be every
    later read's (a chunk failing to verify for the layer's life, the ``blob`` file's second
    download hashing the same bytes again).
    The bytes are handed to the layer raw: every chunk is still inflated and verified before
    anything is served. Reads outside the region (or of a failed, released or dropped piece)
    go to the registry as usual.

    Memory: a piece's bytes are kept only until the prefetch has processed them. The
    prefetch says which pieces it takes (:meth:`expect`) and lets each go once its chunks
    are inflated, verified and in the cache (:meth:`done_with`); a piece it does not take is
    let go as soon as it is in, and a read holds the pieces it reads while it reads them.
    The workers take no new batch while :data:`AHEAD_HELD` bytes of pieces are kept: the
    download waits for the inflating (back-pressure), and what a layer holds is bounded by
    that, not by its region (a 300 MB region held 481 MB of store RSS until the whole
    prefetch ended, a 1 GB one 1.28 GB).
    """

    blob: BlobReader
    digest: str = ""  # the blob's (``algorithm:hex``): a whole blob is kept only if it matches
    # The store's turns on the wire for ranked regions (None: this download takes none).
    wire: WireOrder | None = None
    _region: _Region | None = None
    _started: bool = False  # start() was called: the region's end is the TOC's
    _speculating: bool = False
    _scopes: list[trio.CancelScope] = field(default_factory=list)  # its tasks', for drop()
    _dropped: bool = False
    _held: int = 0  # bytes of the region's pieces kept (data not None)
    _stuck: int = 0  # of those, bytes of ranges waiting for an unclaimed piece (arrived())
    _room: trio.Event | None = None  # set when _held drops, for workers waiting for room
    # The whole blob, once one read took all of it (a small layer's footer read does) and it
    # hashed to ``digest``: every later read is served from it, no request (at most
    # WHOLE_KEPT_MAX bytes).
    _whole: bytes | None = None

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

    def start(
        self,
        end: int | None,
        nursery: trio.Nursery,
        ranges: Sequence[tuple[int, ...]] | None = None,
    ) -> None:
        """Download ``[0, end)``, ``end`` the TOC's landmark offset — only the parts in
        ``ranges`` (``[start, end)`` blob ranges, not overlapping) when given, in the order
        they are listed (ascending: blob order), or by rank when each is a ``(start, end,
        rank)`` triple (:data:`store.estargz.PREFETCH_ORDER_KEY`; the download then takes
        turns on the wire with other ranked ones, :class:`WireOrder`) — once; ``None`` or 0:
        nothing to do, and a speculative download stops."""
        if self._started:
            return
        self._started = True
        region = self._region
        if self._whole is not None:  # every byte is here already
            end = None
        if not end or end <= 0:
            if region is not None:
                self.drop()
            return
        end = min(end, self.blob.size)
        wanted = [(0, end)]
        listed: list[tuple[int, ...]] = []
        if ranges is not None:
            listed = [(t[0], min(t[1], end), *t[2:]) for t in ranges if t[0] < end]
            wanted = merge_spans((t[0], t[1]) for t in listed)
        if region is None:
            region = self._region = _Region(end=0)
        else:  # a speculative start: pieces past the end are not needed
            for i, (lo, _hi) in enumerate(region.pieces):
                if lo >= end and not region.claimed[i]:
                    region.claimed[i] = True
                    region.done[i].set()
        covered = region.pieces[-1][1] if region.pieces else 0
        region.final = True
        # The first bytes are needed first: without a speculative start, pieces grow from
        # FIRST_BATCH, so the first files are handed on after a small request.
        first = None if region.pieces else FIRST_BATCH
        for lo, hi in wanted:
            if max(lo, covered) < hi:
                region.add(max(lo, covered), hi, min(AHEAD_PIECE, PREFETCH_PIECE), first)
                first = None
        region.end = end if covered <= end else covered
        if listed != sorted(listed) or any(len(t) == 3 for t in listed):
            region.rank(listed)
        nursery.start_soon(self._run, region)

    async def _run(self, region: _Region) -> None:
        limit = min(FIRST_BATCH, PREFETCH_PIECE)
        wire = self.wire if region.ranks is not None else None

        async def worker() -> None:
            nonlocal limit
            while True:
                # Back-pressure: the prefetch catches up (arrived() explains _stuck).
                if self._held - self._stuck >= AHEAD_HELD:
                    if wire is not None:
                        wire.passed()
                    if self._room is None:
                        self._room = trio.Event()
                    await self._room.wait()
                    continue
                if wire is not None and not wire.may_go(region):
                    await wire.wait(region)
                    continue  # room may have run out meanwhile
                batch = region.claim_batch(limit)
                if not batch:
                    if wire is not None:
                        wire.passed()
                    return
                limit = min(2 * limit, PREFETCH_PIECE)
                size = sum(region.pieces[i][1] - region.pieces[i][0] for i in batch)
                with wire.sending(size) if wire is not None else nullcontext():
                    await self._fetch(region, *batch)

        with self._cancellable():
            if wire is not None:
                wire.join(region)
            try:
                async with trio.open_nursery() as nursery:
                    for _ in range(PREFETCH_STREAMS):
                        nursery.start_soon(worker)
            finally:
                if wire is not None:
                    wire.leave(region)

    def _cancellable(self) -> trio.CancelScope:
        """A cancel scope for one of this blob's tasks, cancelled by :meth:`drop`."""
        scope = trio.CancelScope()
        if self._dropped:
            scope.cancel()
        self._scopes.append(scope)
        return scope

    async def _fetch(self, region: _Region, *pieces: int) -> None:
        """Fetch ``pieces`` (claimed by the caller) into ``region``, in one request; their
        ``done`` is set whatever happens (on failure their bytes stay ``None``: the reader asks
        the registry)."""
        try:
            parts = await self.blob.read_ranges([region.pieces[i] for i in pieces])
            if self._region is region:  # not dropped meanwhile
                for i, part in zip(pieces, parts, strict=True):
                    region.data[i] = part
                    self._held += len(part)
                    if region.expected and not region.users[i]:
                        self._release(region, i)  # nobody will take its bytes
        except Exception as exc:  # the layer then reads these bytes itself
            first, last = region.pieces[pieces[0]], region.pieces[pieces[-1]]
            log.warning("early prefetch of bytes %d-%d failed: %s", first[0], last[1], exc)
        finally:
            for i in pieces:
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
        self._held = 0
        self._wake()

    def _release(self, region: _Region, i: int) -> None:
        """Forget piece ``i``'s bytes (a later read of them goes to the registry)."""
        data = region.data[i]
        if data is not None:
            region.data[i] = None
            self._held -= len(data)
            self._wake()

    def _wake(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None

    def expect(self, spans: Sequence[tuple[int, int]]) -> None:
        """The prefetch will take the bytes of ``spans`` (``[start, end)`` blob ranges, one
        per prefetch piece, each given back with :meth:`done_with`): the pieces holding them
        are kept until then, and from now on every other piece is let go as soon as it is in
        (those in already, now). Once per region; nothing before :meth:`start`."""
        region = self._region
        if region is None or not region.final or region.expected:
            return
        for lo, hi in spans:
            for i in region.overlapping(lo, hi):
                region.users[i] += 1
        region.expected = True
        for i, users in enumerate(region.users):
            if not users:
                self._release(region, i)

    def done_with(self, lo: int, hi: int) -> None:
        """The prefetch has processed the bytes ``[lo, hi)`` of a span it gave :meth:`expect`
        (or given up on them): the pieces nobody else takes are let go."""
        region = self._region
        if region is not None:
            self._unuse(region, region.overlapping(lo, hi))

    def _unuse(self, region: _Region, pieces: Iterable[int]) -> None:
        for i in pieces:
            region.users[i] -= 1
            if region.expected and not region.users[i] and region.done[i].is_set():
                self._release(region, i)

    def carries(self, lo: int, hi: int) -> bool:
        """Whether the early download holds (or is bringing in) all of ``[lo, hi)``."""
        region = self._region
        return region is not None and self._covering(region, lo, hi) is not None

    def piece_end(self, offset: int) -> int | None:
        """The end of the early download's piece holding ``offset`` (None: none holds it)."""
        region = self._region
        if region is None or not region.final:
            return None
        i = bisect.bisect_right(region.starts, offset) - 1
        if i < 0 or region.pieces[i][1] <= offset:
            return None
        return region.pieces[i][1]

    async def hurry(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Fetch now, in parallel, the pieces holding ``ranges`` (``[start, end)`` blob
        ranges) that no worker has started, and return once they are in: a read is waiting
        for their chunks, which the prefetch claimed and hands on as their pieces arrive.
        Pieces on the wire already are not asked for again; ranges the early download does
        not hold are left alone. Raises nothing (a failed piece is read from the registry)."""
        region = self._region
        if region is not None:
            held = [i for lo, hi in ranges for i in self._covering(region, lo, hi) or ()]
            await self._fetch_unstarted(region, held)

    async def _fetch_unstarted(self, region: _Region, pieces: Sequence[int]) -> None:
        """Claim those of ``pieces`` no worker has started and fetch them, in parallel;
        return once they are in."""
        mine = [i for i in dict.fromkeys(pieces) if not region.claimed[i]]
        for i in mine:
            region.claimed[i] = True
        if mine:
            async with trio.open_nursery() as nursery:
                for i in mine:
                    nursery.start_soon(self._fetch, region, i)

    async def arrived(self, lo: int, hi: int) -> None:
        """Wait until the pieces holding ``[lo, hi)`` are in (or failed, or the region was
        dropped), fetching none of them itself: the workers bring them in, in blob order.
        Returns at once when the early download does not hold the range.

        While the range's first pieces are in and the next one is not claimed yet, their
        bytes do not count against the workers' room (``_stuck``): a chunk spanning more than
        :data:`AHEAD_HELD` would otherwise keep the workers waiting for room that only its
        own first pieces hold, and the prefetch waiting for the workers."""
        region = self._region
        covering = None if region is None else self._covering(region, lo, hi)
        if region is None or covering is None:
            return
        for n, i in enumerate(covering):
            if not n or region.claimed[i]:
                await region.done[i].wait()
                continue
            stuck = 0
            for j in covering[:n]:
                data = region.data[j]
                stuck += 0 if data is None else len(data)
            self._stuck += stuck
            self._wake()
            try:
                await region.done[i].wait()
            finally:
                self._stuck -= stuck

    def _covering(self, region: _Region, lo: int, hi: int) -> list[int] | None:
        """The pieces that hold ``[lo, hi)`` whole, or None if the region does not."""
        if hi > region.end or not region.final:
            return None
        pieces = region.pieces
        starts = region.starts
        first = bisect.bisect_right(starts, lo) - 1
        last = bisect.bisect_left(starts, hi) - 1
        if first < 0 or pieces[last][1] < hi or pieces[first][1] <= lo:
            return None
        if any(pieces[i][1] != pieces[i + 1][0] for i in range(first, last)):
            return None  # a gap: the region holds only the ranges worth prefetching
        return list(range(first, last + 1))

    def _is_whole(self, data: bytes) -> bool:
        """Whether ``data`` is the blob, small enough to keep: its size, and its digest."""
        if len(data) != self.size or self.size > WHOLE_KEPT_MAX:
            return False
        hasher = digest_hasher(self.digest)
        if hasher is None:
            return False
        hasher.update(data)
        return hasher.hexdigest() == self.digest.partition(":")[2]

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        whole = self._whole
        if whole is not None:
            return [whole[lo:hi] for lo, hi in ranges]
        out: list[bytes | None] = [None] * len(ranges)
        for n, (lo, hi) in enumerate(ranges):
            region = self._region
            covering = None if region is None else self._covering(region, lo, hi)
            if region is None or covering is None:
                continue
            for i in covering:  # kept while this read takes its bytes
                region.users[i] += 1
            try:
                # Pieces no worker has started yet are fetched here, now, in parallel.
                await self._fetch_unstarted(region, covering)
                for i in covering:
                    await region.done[i].wait()
                parts = [region.data[i] for i in covering]
            finally:
                self._unuse(region, covering)
            if all(p is not None for p in parts):
                joined = b"".join(p for p in parts if p is not None)
                base = region.pieces[covering[0]][0]
                out[n] = joined[lo - base : hi - base]
        missing = [n for n, part in enumerate(out) if part is None]
        if missing:
            fetched = await self.blob.read_ranges([ranges[n] for n in missing])
            for n, part in zip(missing, fetched, strict=True):
                out[n] = part
                if ranges[n] == (0, self.size) and self._is_whole(part):
                    self._whole = part
        return [p for p in out if p is not None]


@dataclass
class Prefetcher:
    """One layer's landmark-region prefetch and background fetch, through its chunk source.

    The prefetch is foreground work of ``foreground`` (:class:`store.priority.Foreground`,
    the store's); each background batch runs in its background (after a quiet period,
    interrupted by foreground work). Progress shows in ``source.stats`` (``prefetch_done``,
    ``background_done``).
    """

    source: ChunkSource
    foreground: Foreground
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
        """Fetch the region before the landmark (only its chunks touching the prefetch ranges,
        when the TOC lists them) once, giving up after ``timeout`` seconds (its unfetched
        chunks are then read on demand); a second caller waits for the first.
        Holds one of ``limiter``'s tokens while it fetches, unless the early download
        carries the region (:meth:`_prefetch`). Raises nothing: a failed piece is
        logged, and a reader of its chunks fetches them itself."""
        if self.started:
            await self._finished.wait()
            return
        self.started = True
        try:
            with (
                self.foreground.busy(),
                trio.CancelScope() as self._scope,
                trio.move_on_after(timeout),
            ):
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

        The region's chunks are claimed up front: a read of one waits for its piece.
        Claiming each piece only when a worker takes it, so that such a read fetched the
        chunk itself, measured no different end to end here (five workloads, ``estargz``,
        ``wan``).

        Over an :class:`AheadBlob` that carries the whole region (the store's case) the
        pieces end where the early download's do, each has a worker waiting for its bytes
        (:meth:`AheadBlob.arrived`), and none takes a turn under ``limiter``: the bytes are
        on the wire already. With the turn, a layer's region sat downloaded for 0.6 s while
        another layer's prefetch held the turn, and a read in that region
        (``/usr/bin/dash``) waited as long (tomcat, ``wan``). Otherwise the pieces are
        fetched :data:`PREFETCH_STREAMS` at a time under one of ``limiter``'s tokens.
        """
        source = self.source
        end = source.index.prefetch_end
        if not end:
            return
        claimed = source.claim(
            (
                c
                for c in source.index.all_chunks()
                if c.compressed_end <= end and not source.off_trace(c)
            ),
            ahead=True,
        )
        # A piece is one request for the bytes from its first chunk to its last: a gap (bytes
        # outside the ranges, or chunks a reader claimed first) starts another piece, and so
        # does a chunk past the end of the early download's piece the first chunk is in, so
        # that each piece is handed on as soon as its bytes are in.
        ahead = source.blob if isinstance(source.blob, AheadBlob) else None
        pieces: list[list[ChunkRef]] = []
        piece_bytes = PREFETCH_PIECE
        piece_inflated = 0
        piece_end = -1
        cut: int | None = None
        for c in claimed:
            if (
                piece_bytes >= PREFETCH_PIECE
                or piece_inflated >= PREFETCH_PIECE_INFLATED
                or c.compressed_offset > piece_end
                or (cut is not None and c.compressed_end > cut)
            ):
                pieces.append([])
                piece_bytes = piece_inflated = 0
                cut = None if ahead is None else ahead.piece_end(c.compressed_offset)
            pieces[-1].append(c)
            piece_bytes += c.compressed_end - c.compressed_offset
            piece_inflated += c.size
            piece_end = max(piece_end, c.compressed_end)
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
        # The early download keeps each piece's bytes until its chunks are cached (done_with),
        # and waits for room past AHEAD_HELD: the region is never held whole.
        if ahead is not None:
            ahead.expect([_span(piece) for piece in pieces])
        # Pieces downloaded, not yet cached: what the download got ahead of the inflating.
        slots = trio.Semaphore(PREFETCH_DELIVERS)

        def done_with(piece: list[ChunkRef]) -> None:
            if ahead is not None:
                ahead.done_with(*_span(piece))

        async def deliver(got: Download, piece: list[ChunkRef]) -> None:
            try:
                await source.deliver(got, behind=True, keep=False)
            except Exception as exc:  # never cached; a reader's own fetch reports it
                log.warning("prefetch of %s: %s", source.key, exc)
            finally:
                slots.release()
                done_with(piece)

        async def arrived(piece: list[ChunkRef]) -> None:
            assert ahead is not None
            try:
                await ahead.arrived(piece[0].compressed_offset, piece[-1].compressed_end)
            except BaseException:  # cancelled: the claims go back to on-demand reads
                for c in piece:
                    source.cache.finish(c.digest, None, LayerFetchError("prefetch stopped"))
                raise

        async def worker(nursery: trio.Nursery) -> None:
            # Inflating a piece runs beside the next piece's download, not before it.
            async for piece in receive:
                try:
                    if ahead is not None:  # its workers bring the bytes in
                        await arrived(piece)
                    await slots.acquire()
                    try:
                        got = await source.download(piece, align=False)
                    except BaseException:
                        slots.release()
                        raise
                except Exception as exc:  # readers of these chunks fetch them on demand
                    log.warning("prefetch of %s failed: %s", source.key, exc)
                    done_with(piece)
                    continue
                except BaseException:  # cancelled: the claims go back, the region is dropped
                    done_with(piece)
                    raise
                nursery.start_soon(deliver, got, piece)

        # The limiter bounds the layers whose prefetch is on the wire at once; a region the
        # early download carries is on the wire already, without a turn, and each of its
        # pieces is handed on as soon as its bytes are in (a read may have hurried a later
        # one onto the wire: AheadBlob.hurry), so every piece has a worker waiting for it.
        carried = ahead is not None and all(
            ahead.carries(p[0].compressed_offset, p[-1].compressed_end) for p in pieces
        )
        streams = len(pieces) if carried else min(PREFETCH_STREAMS, len(pieces))
        try:
            async with nullcontext() if carried else limiter, trio.open_nursery() as nursery:
                for _ in range(streams):
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
        """Fetch every chunk of the layer not yet cached, in blob order, in batches
        (:func:`batches`: :data:`BACKGROUND_BATCH` compressed bytes,
        :data:`BACKGROUND_BATCH_INFLATED` uncompressed), each in the background of the
        store's foreground work (:meth:`Foreground.in_background
        <store.priority.Foreground.in_background>`) and under one of ``limiter``'s tokens.
        A batch the registry did not deliver (:class:`LayerFetchError`: unreachable, timed
        out) ends the pass: the rest of the layer is tried again after
        :data:`BACKGROUND_RETRY` seconds, doubled per attempt that fetched nothing up to
        :data:`BACKGROUND_RETRY_MOST`, until it is all in (or the layer is released). Skipped,
        a registry away for a minute ended the background fetch of every layer resolved then,
        marked done with nothing cached. Another failure (a chunk that does not verify) is
        logged, and the next batch waits a second (a batch interrupted in that second is
        taken up again at the next quiet)."""
        cache = self.source.cache
        wait = BACKGROUND_RETRY
        while True:
            unreachable: list[LayerFetchError] = []
            fetched = False
            missing = (c for c in self.source.index.all_chunks() if c.digest not in cache)
            for batch in batches(missing, BACKGROUND_BATCH, BACKGROUND_BATCH_INFLATED):
                work = partial(self._background_batch, batch, limiter, unreachable)
                await self.foreground.in_background(work)
                if unreachable:
                    break
                fetched = True
            if not unreachable:
                return
            if fetched:
                wait = BACKGROUND_RETRY
            log_at = logging.WARNING if wait == BACKGROUND_RETRY else logging.DEBUG
            log.log(
                log_at,
                "background fetch of %s: the registry did not deliver (%s); trying again in "
                "%gs, then less often while it fails",
                self.source.key,
                unreachable[0],
                wait,
            )
            await trio.sleep(wait)
            wait = min(2 * wait, BACKGROUND_RETRY_MOST)

    async def _background_batch(
        self,
        batch: list[ChunkRef],
        limiter: trio.CapacityLimiter,
        unreachable: list[LayerFetchError],
    ) -> None:
        """Fetch ``batch``; a registry failure goes into ``unreachable`` (for
        :meth:`background` to try again), another is logged and waited a second after."""
        async with limiter:
            try:
                await self._fetch_region(batch)  # an interrupted batch claims the rest again
            except LayerFetchError as exc:
                unreachable.append(exc)
            except Exception as exc:
                log.warning("background fetch of %s failed: %s", self.source.key, exc)
                await trio.sleep(1.0)

    async def _fetch_region(self, chunks: list[ChunkRef]) -> None:
        claimed = self.source.claim(chunks)
        if claimed:
            await self.source.fetch(claimed, behind=True, keep=False)

    def stop(self) -> None:
        """Cancel the prefetch and drop an early download's bytes (the layer is released)."""
        if self._scope is not None:
            self._scope.cancel()
        self._drop_ahead()

    def _drop_ahead(self) -> None:
        if isinstance(self.source.blob, AheadBlob):
            self.source.blob.drop()
