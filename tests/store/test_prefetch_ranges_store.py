"""Chunk-level prioritization in the store: the landmark's prefetch ranges reach
``on_verified`` and the layer view; the early download (:class:`AheadBlob`) and the prefetch
(:class:`Prefetcher`) take only the region's bytes inside them, and everything else is read on
demand, correctly."""

from __future__ import annotations

import io
import itertools
import random
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from store.estargz import PREFETCH_RANGES_KEY, BytesBlobSource, EstargzReader, convert
from store.estargz_view import load_layer_index
from store.layer import AheadBlob, Layer
from tests.store.conftest import FileBlob, tar_of, view_layer

BIG = random.Random(17).randbytes(1 << 20)  # incompressible: every chunk is a real member
SMALL = b"read whole\n" * 30
OTHER = random.Random(18).randbytes(5000)
REST = random.Random(19).randbytes(300_000)
FILES = {"d/big": BIG, "d/small": SMALL, "d/other": OTHER, "rest": REST}
PRIORITIZED = ["d/big", "d/small", "d/other"]
BIG_READS = [(0, 4096), (600_000, 610_000)]
READS = {"d/big": BIG_READS, "d/small": [(0, len(SMALL))]}


TAR = tar_of(FILES)
_BLOBS: dict[str, tuple[bytes, str]] = {}


def _blob(tmp_path: Path, kind: str = "ranges") -> tuple[FileBlob, str]:
    """The layer converted (once per session) to a file: with read ranges, prioritized
    without them, or not optimized; its FileBlob and TOC digest."""
    if kind not in _BLOBS:
        kw: dict = {"prioritized_files": PRIORITIZED} if kind != "plain" else {}
        if kind == "ranges":
            kw["read_ranges"] = READS
        out = io.BytesIO()
        res = convert(io.BytesIO(TAR), out, level=1, **kw)
        _BLOBS[kind] = (out.getvalue(), res.toc_digest)
    data, toc_digest = _BLOBS[kind]
    path = tmp_path / f"{kind}.blob"
    path.write_bytes(data)
    return FileBlob(path), toc_digest


def _toc_ranges(blob: FileBlob, toc_digest: str) -> tuple[int, tuple[tuple[int, int], ...]]:
    """The landmark offset and the ranges its TOC entry lists, read the plain way."""
    reader = EstargzReader(BytesBlobSource(blob.data), toc_digest)
    (entry,) = [e for e in reader.toc.entries if e["name"] == ".prefetch.landmark"]
    flat = entry[PREFETCH_RANGES_KEY]
    return entry["offset"], tuple(zip(flat[::2], flat[1::2], strict=True))


def _inside(ranges, lo: int, hi: int) -> bool:
    return any(a <= lo and hi <= b for a, b in ranges)


def _touching(ranges, lo: int, hi: int) -> bool:
    return any(a < hi and lo < b for a, b in ranges)


def _layer(tmp_path: Path, view, blob, toc_digest: str) -> Layer:
    return view_layer(view, blob, toc_digest, tmp_path / "cache", "ranges")


async def _read_everything(layer: Layer) -> None:
    for path, node in layer.tree.walk():
        if stat.S_ISREG(node.mode) and path in FILES:
            assert await layer.read_file(node, 0, node.size + 10) == FILES[path], path
    big = next(n for p, n in layer.tree.walk() if p == "d/big")
    for off, size in [(599_000, 20_000), (65_530, 20), (len(BIG) - 3, 10)]:
        assert await layer.read_file(big, off, size) == BIG[off : off + size]


# -- the TOC scan's ranges reach the store ------------------------------------------------


@pytest.mark.anyio
async def test_load_layer_index_hands_the_ranges_to_on_verified_and_the_view(tmp_path):
    blob, toc_digest = _blob(tmp_path)
    end, expected = _toc_ranges(blob, toc_digest)
    calls = []
    view = await load_layer_index(blob, toc_digest, lambda e, r: calls.append((e, r)))
    assert calls == [(end, expected)]
    assert view.prefetch_end == end and view.prefetch_ranges == expected
    assert len(expected) == 3  # big's chunk 0, its chunk at 600000, small + other
    assert all(hi <= end for _, hi in expected)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["whole", "plain"])
async def test_no_key_means_the_whole_region(tmp_path, kind):
    blob, toc_digest = _blob(tmp_path, kind)
    calls = []
    view = await load_layer_index(blob, toc_digest, lambda e, r: calls.append((e, r)))
    assert calls == [(view.prefetch_end, None)] and view.prefetch_ranges is None
    assert (view.prefetch_end is None) == (kind == "plain")


# -- the early download -------------------------------------------------------------------


@pytest.mark.anyio
async def test_ahead_blob_downloads_only_the_ranges_and_serves_reads_inside_them(
    tmp_path, monkeypatch
):
    piece = 16 << 10
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", piece)
    blob, toc_digest = _blob(tmp_path)
    end, ranges = _toc_ranges(blob, toc_digest)
    ahead = AheadBlob(blob)
    async with trio.open_nursery() as nursery:
        ahead.start(end, nursery, ranges)
        ahead.start(end, nursery)  # once only: a second start changes nothing
    early = sorted(r for req in blob.requests for r in req)
    # Each request a batch of pieces in blob order, at most PREFETCH_PIECE bytes in all.
    assert all(sum(hi - lo for lo, hi in req) <= piece for req in blob.requests)
    # Exactly the ranges, in pieces of at most PREFETCH_PIECE: no byte of a gap.
    assert all(_inside(ranges, lo, hi) and hi - lo <= piece for lo, hi in early)
    assert sum(hi - lo for lo, hi in early) == sum(hi - lo for lo, hi in ranges)
    assert len(early) == sum(-(-(hi - lo) // piece) for lo, hi in ranges)
    assert len(blob.requests) < len(early)  # small pieces went together
    count = len(blob.requests)

    # Inside a range (across its pieces): served from the early download.
    (lo, hi) = ranges[1]
    inside = [(lo + 5, hi - 5), (lo, lo + piece + 100), (ranges[0][0] + 1, ranges[0][0] + 2)]
    assert await ahead.read_ranges(inside) == [blob.data[a:b] for a, b in inside]
    assert len(blob.requests) == count

    # In a gap, across a range's end, before the first range, past the region: the blob.
    gap = (ranges[0][1] + 10, ranges[1][0] - 10)
    straddle = (hi - 10, hi + 10)
    for asked in (gap, straddle, (0, 10), (end - 5, end + 5)):
        assert await ahead.read_ranges([asked]) == [blob.data[asked[0] : asked[1]]]
        assert blob.requests[-1] == [asked]
    # Mixed in one call: the inside part from the download, the rest in one request.
    mixed = [(lo + 1, lo + 2), gap]
    assert await ahead.read_ranges(mixed) == [blob.data[a:b] for a, b in mixed]
    assert blob.requests[-1] == [gap]


@pytest.mark.anyio
async def test_ahead_blob_asks_for_small_ranges_together_up_to_a_piece(tmp_path, monkeypatch):
    """Forty 3,000-byte ranges with gaps between them: batches of ten ranges (30,000 bytes of
    a 32 KiB piece) per request, not forty requests, after a first batch of two (8 KiB) and
    one of five (16 KiB)."""
    monkeypatch.setattr("store.prefetch.PREFETCH_STREAMS", 1)
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", 32 << 10)
    monkeypatch.setattr("store.prefetch.FIRST_BATCH", 8 << 10)
    blob, _ = _blob(tmp_path)
    ranges = [(lo, lo + 3000) for lo in range(0, 200_000, 5000)]
    ahead = AheadBlob(blob)
    async with trio.open_nursery() as nursery:
        ahead.start(200_000, nursery, ranges)
    cuts = [0, 2, 7, 17, 27, 37, 40]
    assert blob.requests == [ranges[a:b] for a, b in itertools.pairwise(cuts)]
    count = len(blob.requests)
    got = await ahead.read_ranges([(lo + 7, hi - 7) for lo, hi in ranges])
    assert got == [blob.data[lo + 7 : hi - 7] for lo, hi in ranges]
    assert len(blob.requests) == count

    monkeypatch.setattr("store.prefetch.BATCH_PIECES", 4)  # and never more than this many
    blob.requests.clear()
    async with trio.open_nursery() as nursery:
        AheadBlob(blob).start(200_000, nursery, ranges)
    assert [len(req) for req in blob.requests] == [2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 2]


@pytest.mark.anyio
async def test_ahead_blob_cuts_ranges_at_the_end_and_takes_none_when_none_listed(tmp_path):
    blob, _ = _blob(tmp_path)
    ahead = AheadBlob(blob)
    async with trio.open_nursery() as nursery:
        ahead.start(5000, nursery, [(100, 200), (4000, 9000), (9500, 9600)])
    assert sorted(r for req in blob.requests for r in req) == [(100, 200), (4000, 5000)]
    count = len(blob.requests)
    assert await ahead.read_ranges([(4100, 4200)]) == [blob.data[4100:4200]]
    assert len(blob.requests) == count
    assert await ahead.read_ranges([(4900, 5100)]) == [blob.data[4900:5100]]
    assert blob.requests[-1] == [(4900, 5100)]

    nothing = AheadBlob(blob)
    count = len(blob.requests)
    async with trio.open_nursery() as nursery:
        nothing.start(5000, nursery, ())
    assert len(blob.requests) == count
    assert await nothing.read_ranges([(0, 100)]) == [blob.data[:100]]
    assert blob.requests[-1] == [(0, 100)]


@pytest.mark.anyio
async def test_ahead_blob_speculation_then_ranges_skips_the_gaps_past_it(tmp_path, monkeypatch):
    """The head says a region comes first: a few hundred KiB download before the TOC; the
    TOC's ranges then bring in only their parts past what speculation already has."""
    monkeypatch.setattr("store.prefetch.SPECULATE_FIRST", 64 << 10)
    monkeypatch.setattr("store.prefetch.SPECULATE_BYTES", 256 << 10)
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", 1 << 20)
    blob, toc_digest = _blob(tmp_path)
    end, ranges = _toc_ranges(blob, toc_digest)
    ahead = AheadBlob(blob)
    async with trio.open_nursery() as nursery:
        ahead.speculate(nursery)
        await trio.testing.wait_all_tasks_blocked()
        speculated = [r for req in blob.requests[1:] for r in req]
        covered = speculated[-1][1]
        assert covered == 448 << 10 and covered < ranges[1][0]
        ahead.start(end, nursery, ranges)
    after = [r for req in blob.requests[1 + len(speculated) :] for r in req]
    assert after == [r for r in ranges if r[0] >= covered]  # nothing of the gaps past it
    count = len(blob.requests)
    # The speculated bytes and the ranges are served; a gap past speculation is not.
    for asked in [(10, 300_000), (ranges[1][0] + 3, ranges[1][1]), ranges[2]]:
        assert await ahead.read_ranges([asked]) == [blob.data[asked[0] : asked[1]]]
    assert len(blob.requests) == count
    gap = (covered + 10, ranges[1][0] - 10)
    assert await ahead.read_ranges([gap]) == [blob.data[gap[0] : gap[1]]]
    assert blob.requests[-1] == [gap]


# -- the prefetch -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_prefetch_takes_only_the_chunks_touching_the_ranges(tmp_path):
    blob, toc_digest = _blob(tmp_path)
    view = await load_layer_index(blob, toc_digest)
    layer = _layer(tmp_path, view, blob, toc_digest)
    ranges, end = view.prefetch_ranges, view.prefetch_end
    assert ranges and end
    region = [c for c in view.all_chunks() if c.compressed_end <= end]
    hinted = [c for c in region if _touching(ranges, c.compressed_offset, c.compressed_end)]
    unhinted = [c for c in region if c not in hinted]
    # big's chunks holding a read byte, and small and other whole.
    assert sorted((c.name, c.chunk_offset) for c in hinted) == [
        ("d/big", 0),
        ("d/big", 9 << 16),
        ("d/other", 0),
        ("d/small", 0),
    ]
    assert len(unhinted) == 14
    await layer.prefetch(trio.CapacityLimiter(1), timeout=30)
    assert all(c.digest in layer.cache for c in hinted)
    assert not any(c.digest in layer.cache for c in unhinted)
    assert not any(c.digest in layer.cache for c in view.all_chunks() if c not in region)

    # A hinted chunk is read from the cache; an unhinted one on demand; all reads correct.
    big = next(n for p, n in layer.tree.walk() if p == "d/big")
    count = len(blob.requests)
    assert await layer.read_file(big, 600_100, 5000) == BIG[600_100:605_100]
    assert len(blob.requests) == count
    assert await layer.read_file(big, 300_000, 10) == BIG[300_000:300_010]
    assert len(blob.requests) > count
    await _read_everything(layer)


@pytest.mark.anyio
async def test_prefetch_over_the_early_download_reads_back_everything(tmp_path):
    """The store's chain: the early download starts from on_verified with the ranges, the
    layer reads through it, the prefetch fills the cache, the rest comes on demand."""
    blob, toc_digest = _blob(tmp_path)
    ahead = AheadBlob(blob)
    async with trio.open_nursery() as nursery:
        view = await load_layer_index(ahead, toc_digest, lambda e, r: ahead.start(e, nursery, r))
        layer = _layer(tmp_path, view, ahead, toc_digest)
        await layer.prefetch(trio.CapacityLimiter(1), timeout=30)
    ranges = view.prefetch_ranges
    assert ranges
    for c in view.all_chunks():
        wanted = c.compressed_end <= view.prefetch_end and _touching(
            ranges, c.compressed_offset, c.compressed_end
        )
        assert (c.digest in layer.cache) == wanted, (c.name, c.chunk_offset)
    await _read_everything(layer)


@pytest.mark.anyio
@pytest.mark.parametrize("early", [False, True])
async def test_prefetch_requests_no_byte_outside_the_ranges(tmp_path, early):
    blob, toc_digest = _blob(tmp_path)
    view = await load_layer_index(blob, toc_digest)
    ranges = view.prefetch_ranges
    assert ranges
    before = len(blob.requests)
    async with trio.open_nursery() as nursery:
        reader = blob
        if early:
            reader = AheadBlob(blob)
            reader.start(view.prefetch_end, nursery, ranges)
        layer = _layer(tmp_path, view, reader, toc_digest)
        await layer.prefetch(trio.CapacityLimiter(1), timeout=30)
    asked = [r for req in blob.requests[before:] for r in req]
    assert asked and all(_inside(ranges, lo, hi) for lo, hi in asked), asked
    if early:  # the prefetch took its bytes from the early download: nothing fetched twice
        assert sum(hi - lo for lo, hi in asked) == sum(hi - lo for lo, hi in ranges)
