"""The store-wide turns on the wire of ranked early downloads (:class:`WireOrder`): every
wait ends — whatever holds the lowest rank (a download waiting for the prefetch to catch up,
a dropped one, a woken one that does not take its turn) — and the turns cost O(regions) per
batch, not O(regions²)."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from store.prefetch import AheadBlob, WireOrder, _Region

PIECE = 1000
_JITTER = random.Random(7)


@pytest.fixture(autouse=True)
def _small_pieces(monkeypatch):
    """One stream per layer, pieces (and batches) of PIECE bytes, room for two pieces."""
    monkeypatch.setattr("store.prefetch.PREFETCH_STREAMS", 1)
    monkeypatch.setattr("store.prefetch.AHEAD_PIECE", PIECE)
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", PIECE)
    monkeypatch.setattr("store.prefetch.FIRST_BATCH", PIECE)
    monkeypatch.setattr("store.prefetch.AHEAD_HELD", 2 * PIECE)


class Blob:
    """A blob of zeros whose reads of a range starting at a gated offset wait for its gate;
    ``read`` lists the first offsets asked for."""

    def __init__(self, pieces: int, gated: tuple[int, ...] = (), delay: float = 0.0) -> None:
        self.size = pieces * PIECE + 10
        self.gates = {lo: trio.Event() for lo in gated}
        self.delay = delay  # seconds a request takes, about (0.1-1.9 times it)
        self.read: list[int] = []

    async def read_ranges(self, ranges):
        for lo, _hi in ranges:
            self.read.append(lo)
            if lo in self.gates:
                await self.gates[lo].wait()
        if self.delay:
            await trio.sleep(self.delay * _JITTER.uniform(0.1, 1.9))
        return [bytes(hi - lo) for lo, hi in ranges]


def _ranked(ranks: list[int]) -> list[tuple[int, int, int]]:
    """Piece ``i`` of a region, ranked ``ranks[i]``."""
    return [(i * PIECE, (i + 1) * PIECE, r) for i, r in enumerate(ranks)]


def _start(
    wire: WireOrder, nursery: trio.Nursery, ranks: list[int], gated=(), delay: float = 0.0
) -> AheadBlob:
    blob = AheadBlob(Blob(len(ranks), gated, delay), wire=wire)  # type: ignore[arg-type]
    blob.start(len(ranks) * PIECE, nursery, _ranked(ranks))
    return blob


def _run(test) -> None:
    """``test(wire, nursery)`` under a clock that jumps ahead when all tasks wait: a wait
    that never ends fails the test after 60 s of virtual time."""

    async def main() -> None:
        wire = WireOrder()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await test(wire, nursery)
        assert wire.on_wire_bytes == 0 and not wire._regions and not wire._waiting

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _done(ahead: AheadBlob) -> bool:
    region = ahead._region
    return region is not None and all(d.is_set() for d in region.done)


def test_a_lowest_ranked_download_waiting_for_room_holds_nobody_up():
    """Layer a holds the lowest ranks but keeps two pieces no prefetch takes: its worker
    waits for room for good; b's download still ends."""

    async def test(wire, nursery):
        a = _start(wire, nursery, [0, 1, 2, 3])
        await trio.testing.wait_all_tasks_blocked()
        b = _start(wire, nursery, [10, 11])
        while not _done(b):
            await trio.sleep(0.01)
        assert not _done(a) and a._region.next_rank() == 2
        a.drop()
        b.drop()  # its worker waits for room too (no prefetch takes its pieces)

    _run(test)


def test_a_dropped_download_on_the_wire_lets_the_others_go():
    """Layer a's batch hangs on the wire; b waits its turn, then a is dropped: b goes."""

    async def test(wire, nursery):
        a = _start(wire, nursery, [0, 1], gated=(0,))
        await trio.testing.wait_all_tasks_blocked()
        b = _start(wire, nursery, [10, 11])
        await trio.testing.wait_all_tasks_blocked()
        assert b.blob.read == [] and wire.on_wire_bytes == PIECE  # waiting for its turn
        a.drop()
        while not _done(b):
            await trio.sleep(0.01)
        assert b.blob.read == [0, PIECE]
        b.drop()

    _run(test)


def test_a_woken_download_that_waits_for_room_passes_its_turn_on():
    """The only batch on the wire (a's) leaves while l (waiting for room) holds the lowest
    rank: the free place goes to v, the lowest waiting, whose worker then finds no room either
    (a read hurried two of its pieces in, and no prefetch takes them) — w, waiting behind v,
    gets the place, not a wait that never ends."""

    async def test(wire, nursery):
        low = _start(wire, nursery, [1, 2, 3])  # takes two pieces, then waits for room
        await trio.testing.wait_all_tasks_blocked()
        assert low._region.next_rank() == 3
        a = _start(wire, nursery, [0, 6, 7], gated=(0,))  # its first batch hangs on the wire
        await trio.testing.wait_all_tasks_blocked()
        await a.hurry([(2 * PIECE, 3 * PIECE)])  # one piece held: room for one more
        v = _start(wire, nursery, [10, 11, 12])
        w = _start(wire, nursery, [20])
        await trio.testing.wait_all_tasks_blocked()
        assert v.blob.read == w.blob.read == []  # both wait for their turn
        await v.hurry([(0, 2 * PIECE)])  # v's room is full
        a.blob.gates[0].set()  # a's batch leaves the wire; a's worker then waits for room
        while not _done(w):
            await trio.sleep(0.01)
        for blob in (low, a, v, w):
            blob.drop()

    _run(test)


def test_turns_cost_o_regions_per_batch():
    """40 layers of 15 ranked pieces loaded at once, one piece a batch: the turns look at each
    region's next rank a bounded number of times per batch (they once woke every waiting
    worker at every change, each looking at every region: ~40 times a region per batch here;
    ~5 now)."""
    calls = 0
    next_rank = _Region.next_rank

    def counted(self):
        nonlocal calls
        calls += 1
        return next_rank(self)

    regions, pieces = 40, 15
    rng = random.Random(5)

    async def test(wire, nursery):
        blobs = [
            _start(wire, nursery, [rng.randrange(10**6) for _ in range(pieces)], delay=0.01)
            for _ in range(regions)
        ]
        while not all(_done(b) for b in blobs):
            await trio.sleep(0.1)
        assert sum(len(b.blob.read) for b in blobs) == regions * pieces

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_Region, "next_rank", counted)
        mp.setattr("store.prefetch.AHEAD_HELD", 1 << 30)
        _run(test)
    assert calls <= 15 * regions * (regions * pieces), calls


class _Counted(list):
    """A list that counts the items looked up."""

    looked = 0

    def __getitem__(self, i):
        self.looked += 1
        return super().__getitem__(i)


@pytest.mark.parametrize("ranked", [False, True])
def test_claiming_a_region_piece_by_piece_looks_at_each_piece_a_few_times(ranked):
    """3000 pieces claimed one at a time (in blob order, or ranked backwards): each claim
    once stepped over every piece claimed before it (~4.5 million looks, quadratic in the
    pieces: a 1 GB region has 4096)."""
    pieces = 3000
    region = _Region(end=pieces * PIECE)
    region.add(0, pieces * PIECE, PIECE)
    if ranked:
        region.rank(_ranked(list(range(pieces))[::-1]))
    region.claimed = _Counted(region.claimed)
    claims = []
    while batch := region.claim_batch(PIECE):
        claims += batch
    assert claims == (list(range(pieces))[::-1] if ranked else list(range(pieces)))
    assert region.claimed.looked <= 5 * pieces, region.claimed.looked  # 4 a piece
