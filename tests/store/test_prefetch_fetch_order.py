"""Fetch order: the writer lists the prioritized region's chunks in the order a traced
workload first read them (``read_order`` → :data:`PREFETCH_ORDER_KEY`), the TOC scan hands
that order to the early download, and :class:`AheadBlob` puts the region on the wire in it —
across files, where blob order keeps each file whole."""

from __future__ import annotations

import gzip
import io
import json
import random
import stat
import tarfile

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from store.estargz import (
    MAX_PREFETCH_ORDER,
    MAX_PREFETCH_RANGES,
    PREFETCH_ORDER_KEY,
    PREFETCH_RANGES_KEY,
    BytesBlobSource,
    EstargzReader,
    convert,
    parse_footer,
    prefetch_order,
    scan_toc,
)
from store.estargz.footer import estargz_footer_bytes
from store.estargz.toc import (
    PIECE,
    UNLISTED_RANK,
    TocScan,
    confine_order,
    encode_toc,
    landmark_hint,
)
from store.estargz.writer import DEFAULT_CHUNK_SIZE, ORDER_CHUNK_SIZE, _fetch_order
from store.estargz_view import load_layer_index
from store.layer import AheadBlob
from store.prefetch import WireOrder
from store.spans import merge_spans
from tests.store.conftest import FileBlob, tar_of, view_layer

LIB = random.Random(21).randbytes(1 << 20)  # read in three goes, early, late, later
ARCHIVE = random.Random(22).randbytes(600_000)  # read whole, in one go, between them
PART = random.Random(23).randbytes(700_000)  # read in part
REST = random.Random(24).randbytes(100_000)  # not read
FILES = {"lib.so": LIB, "archive": ARCHIVE, "part": PART, "rest": REST}
PRIORITIZED = ["lib.so", "archive", "part"]
ORDER = {
    "lib.so": [(0, 65536, 0), (65536, 1 << 19, 9), ((1 << 19) + 65536, 1 << 20, 20)],
    "archive": [(0, 600_000, 3)],
    "part": [(300_000, 320_000, 1)],
}
RANGES = {"lib.so": [(0, 1 << 19), ((1 << 19) + 65536, 1 << 20)], "part": [(300_000, 320_000)]}


def _convert(**kw) -> tuple[bytes, str]:
    out = io.BytesIO()
    res = convert(io.BytesIO(tar_of(FILES)), out, level=1, prioritized_files=PRIORITIZED, **kw)
    return out.getvalue(), res.toc_digest


def _landmark(data: bytes, toc_digest: str) -> tuple[dict, EstargzReader]:
    reader = EstargzReader(BytesBlobSource(data), toc_digest)
    (entry,) = [e for e in reader.toc.entries if e["name"] == ".prefetch.landmark"]
    return entry, reader


def _pairs(flat: list[int]) -> list[tuple[int, int]]:
    return list(zip(flat[::2], flat[1::2], strict=True))


def _triples(flat: list[int]) -> list[tuple[int, int, int]]:
    return list(zip(flat[::3], flat[1::3], flat[2::3], strict=True))


def _chunks(reader: EstargzReader, name: str) -> list[tuple[int, int]]:
    """``(chunk offset in the file, blob offset)`` of each of a file's chunks."""
    return [
        (e.get("chunkOffset", 0), e["offset"])
        for e in reader.toc.entries
        if e["name"] == name and e["type"] in ("reg", "chunk")
    ]


def test_the_landmark_lists_the_chunks_in_first_read_order():
    data, toc_digest = _convert(read_order=ORDER)
    entry, reader = _landmark(data, toc_digest)
    order = _triples(entry[PREFETCH_ORDER_KEY])
    starts = {name: dict(_chunks(reader, name)) for name in PRIORITIZED}
    # Each listed range starts at a chunk: which file's, at what file offset.
    where = {blob: (name, off) for name in starts for off, blob in starts[name].items()}
    firsts = [where[lo] for lo, _hi, _rank in order]
    # lib.so's first chunk (read 0), part (1), archive (3), then the rest of lib.so (9, 20:
    # its chunks follow one another both in blob order and in read order, so one range).
    assert firsts == [("lib.so", 0), ("part", 0), ("archive", 0), ("lib.so", 262144)]
    assert [rank for _lo, _hi, rank in order] == [0, 1, 3, 9]  # each range's first read
    assert order[-1][1] == starts["archive"][0]  # the rest of lib.so runs up to archive
    # lib.so was read whole in several goes: cut for the order; archive in one go: whole.
    assert [off for off, _ in _chunks(reader, "lib.so")] == [0, 262144, 524288, 786432]
    assert ORDER_CHUNK_SIZE == 262144 and len(_chunks(reader, "archive")) == 1


def test_the_order_covers_exactly_what_the_ranges_key_prefetches():
    data, toc_digest = _convert(read_order=ORDER, read_ranges=RANGES)
    entry, _reader = _landmark(data, toc_digest)
    ranges = _pairs(entry[PREFETCH_RANGES_KEY])
    order = [t[:2] for t in _triples(entry[PREFETCH_ORDER_KEY])]
    assert ranges == sorted(ranges) and order != sorted(order)
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(order):
        if merged and merged[-1][1] == lo:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    assert merged == ranges


def test_no_order_key_without_an_order_or_when_it_is_blob_order():
    data, toc_digest = _convert()
    assert PREFETCH_ORDER_KEY not in _landmark(data, toc_digest)[0]
    in_blob_order = {"lib.so": [(0, 1 << 20, 0)], "archive": [(0, 600_000, 1)]}
    data, toc_digest = _convert(read_order=in_blob_order)
    entry, reader = _landmark(data, toc_digest)
    assert PREFETCH_ORDER_KEY not in entry
    assert len(_chunks(reader, "lib.so")) == -(-len(LIB) // DEFAULT_CHUNK_SIZE)


def test_the_converted_layer_reads_back_the_same():
    data, toc_digest = _convert(read_order=ORDER, read_ranges=RANGES)
    _entry, reader = _landmark(data, toc_digest)
    for name, content in FILES.items():
        assert reader.read_file(name) == content, name


@st.composite
def _traced_layers(draw):
    """A small layer tar's files, the prioritized ones, and random read ranges and first
    reads of them (some files read whole, some in part, some not at all)."""
    sizes = draw(
        st.lists(st.sampled_from([0, 1, 5000, 70_000, 300_000, 600_000]), min_size=2, max_size=6)
    )
    files = {f"f{i}": random.Random(i * 7 + n).randbytes(n) for i, n in enumerate(sizes)}
    prioritized = draw(st.permutations(list(files)))[: draw(st.integers(2, len(files)))]
    ranges: dict[str, list[tuple[int, int]]] = {}
    order: dict[str, list[tuple[int, int, int]]] = {}
    for name in prioritized:
        size = len(files[name])
        if not size:
            continue
        if draw(st.booleans()):
            starts = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=3))
            ranges[name] = [(a, draw(st.integers(a + 1, size))) for a in starts]
        if draw(st.integers(0, 4)):
            starts = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=4))
            order[name] = [
                (a, draw(st.integers(a + 1, size + 65536)), draw(st.integers(0, 30)))
                for a in starts
            ]
    return files, prioritized, ranges, order


@settings(max_examples=150, deadline=None)
@given(_traced_layers())
def test_the_written_order_lists_exactly_what_the_prefetch_claims(tmp_path_factory, layer):
    """Converted with random read ranges and first reads, the landmark's order (when
    written) lists the bytes of the ranges key exactly (without one: the region from its
    first chunk), so every chunk the prefetch claims is in the early download's pieces
    (Prefetcher's ``carried``: else it takes its slow path)."""
    files, prioritized, ranges, order = layer
    out = io.BytesIO()
    res = convert(
        io.BytesIO(tar_of(files)),
        out,
        level=1,
        prioritized_files=prioritized,
        read_ranges=ranges,
        read_order=order,
    )
    path = tmp_path_factory.mktemp("layer") / "blob"
    path.write_bytes(out.getvalue())
    entry, _reader = _landmark(out.getvalue(), res.toc_digest)
    listed = _triples(entry.get(PREFETCH_ORDER_KEY, []))

    async def check() -> None:
        ahead = AheadBlob(FileBlob(path))
        async with trio.open_nursery() as nursery:
            view = await load_layer_index(
                ahead, res.toc_digest, lambda e, r: ahead.start(e, nursery, r)
            )
            layer = view_layer(view, ahead, res.toc_digest, path.parent / "cache")
            end = view.prefetch_end
            claimed = [
                c
                for c in view.all_chunks()
                if c.compressed_end <= end and not layer.source.off_trace(c)
            ]
            for c in claimed:
                assert ahead.carries(c.offset, c.compressed_end), (c.offset, listed)
            if listed:
                covered = merge_spans((lo, hi) for lo, hi, _rank in listed)
                if view.prefetch_ranges is not None:
                    assert covered == list(view.prefetch_ranges)
                else:
                    assert covered == [(min(c.offset for c in claimed), end)]
            ahead.drop()

    trio.run(check)


@settings(max_examples=60, deadline=None)
@given(
    seqs=st.lists(st.one_of(st.none(), st.integers(0, 40)), min_size=1, max_size=60),
    most=st.integers(1, 12),
    data=st.data(),
)
def test_fetch_order_covers_the_fetched_spans_within_most(seqs, most, data):
    spans = [(i * 10, i * 10 + 10) for i in range(len(seqs))]
    keep = data.draw(st.lists(st.booleans(), min_size=len(seqs), max_size=len(seqs)))
    fetched = [s for s, k in zip(spans, keep, strict=True) if k] or None
    out = _fetch_order(spans, seqs, fetched, most)
    if out is None:
        return
    spans_out = [t[:2] for t in out]
    assert len(out) <= most and spans_out != sorted(spans_out)
    assert [t[2] for t in out] == sorted(t[2] for t in out)  # listed by rank
    covered = sorted(p for lo, hi, _rank in out for p in range(lo, hi, 10))
    want = [lo for lo, _ in (fetched or spans)]
    assert covered == want  # every fetched span once, nothing else


def test_fetch_order_coarsens_to_stay_within_most():
    spans = [(i, i + 1) for i in range(8)]
    seqs = [5, 4, 7, 6, 1, 0, 3, 2]  # the second half first, each pair read backwards
    exact = [(5, 6, 0), (4, 5, 1), (7, 8, 2), (6, 7, 3), (1, 2, 4), (0, 1, 5), (3, 4, 6), (2, 3, 7)]
    assert _fetch_order(spans, seqs, None) == exact
    # Reads in twos: each group's spans in blob order, ranked by the group's first read.
    assert _fetch_order(spans, seqs, None, most=4) == [(4, 8, 0), (0, 4, 4)]
    assert _fetch_order(spans, seqs, None, most=1) is None  # only blob order is one range


@pytest.mark.parametrize(
    ("flat", "end", "want"),
    [
        ([50, 60, 0, 0, 10, 1, 20, 30, 1], 100, ((50, 60, 0), (0, 10, 1), (20, 30, 1))),
        ([0, 10, 7, 50, 60, 2], 55, ((50, 55, 2), (0, 10, 7))),  # by rank, cut at the end
        ([150, 160, 0, 0, 10, 1], 100, ((0, 10, 1),)),
        ([0, 10, 0, 5, 20, 1], 100, None),  # overlapping
        ([10, 10, 0], 100, None),  # empty
        ([0, 10, -1], 100, None),  # a negative rank
        ([0, 10, 20, 30], 100, None),  # not triples
    ],
)
def test_prefetch_order_reads_a_valid_list_and_refuses_others(flat, end, want):
    assert prefetch_order(flat, end) == want


def test_prefetch_order_refuses_a_list_over_the_most():
    flat = [v for i in range(MAX_PREFETCH_ORDER + 1) for v in (2 * i, 2 * i + 1, i)]
    assert prefetch_order(flat, 1 << 40) is None
    assert prefetch_order(flat[:-3], 1 << 40) is not None


M = UNLISTED_RANK


@pytest.mark.parametrize(
    ("order", "ranges", "want"),
    [
        # the writer's: the order lists exactly the ranges' bytes
        (((20, 30, 0), (0, 10, 4)), ((0, 10), (20, 30)), ((20, 30, 0), (0, 10, 4))),
        # it lists part of them: the rest after it, ascending
        (((20, 25, 0),), ((0, 10), (20, 30)), ((20, 25, 0), (0, 10, M), (25, 30, M))),
        # bytes outside them: left out; a listed range across two: cut in two
        (
            ((5, 25, 3), (40, 50, 0)),
            ((0, 10), (20, 30)),
            ((5, 10, 3), (20, 25, 3), (0, 5, M), (25, 30, M)),
        ),
        # nothing of them: no order
        (((40, 50, 0),), ((0, 10),), ()),
        ((), ((0, 10),), ()),
    ],
)
def test_confine_order_keeps_the_ranges_bytes_and_only_them(order, ranges, want):
    assert confine_order(order, ranges) == want


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 60), unique=True),
    st.lists(st.integers(0, 60), unique=True),
    st.randoms(),
)
def test_confine_order_covers_the_ranges_once(order_cuts, range_cuts, rnd):
    """Whatever the order lists, the triples hold each byte of the ranges once, nothing
    else; the listed ones first, by the order's ranks."""

    def spans(cuts):
        cuts = sorted(cuts)
        return [(a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False)]

    ranges = spans(range_cuts)
    order = [(a, b, rnd.randrange(5)) for a, b in spans(order_cuts)]
    rnd.shuffle(order)
    out = confine_order(sorted(order, key=lambda t: t[2]), ranges)
    got = sorted(p for a, b, _ in out for p in range(a, b))
    want = sorted(p for a, b in ranges for p in range(a, b))
    assert got == (want if out else [])
    ranks = [r for _a, _b, r in out]
    assert ranks == sorted(ranks)


def test_fetch_ranges_download_what_the_ranges_say_in_the_order_given():
    """An order that leaves bytes of the ranges out (or the region, without ranges) no longer
    leaves them out of the early download: they come after the listed ones."""
    scan = TocScan("sha256:x", 1, 100, None, ((0, 10), (20, 30)), ((20, 25, 0), (90, 95, 1)))
    assert scan.fetch_ranges == ((20, 25, 0), (0, 10, M), (25, 30, M))
    whole = TocScan("sha256:x", 1, 100, None, None, ((50, 60, 7),))
    assert whole.fetch_ranges == ((50, 60, 7), (0, 50, M), (60, 100, M))
    listed_none = TocScan("sha256:x", 1, 100, None, ((0, 10),), ((40, 50, 0),))
    assert listed_none.fetch_ranges == ((0, 10),)  # blob order
    assert TocScan("sha256:x", 1, 100, None, (), ((0, 10, 0),)).fetch_ranges == ()
    assert TocScan("sha256:x", 1, 100, None, None, ()).fetch_ranges is None


def test_the_landmark_hint_is_unchanged_by_an_order():
    data, toc_digest = _convert(read_order=ORDER, read_ranges=RANGES)
    entry, _reader = _landmark(data, toc_digest)
    offset, ranges = landmark_hint(json.dumps({"entries": [entry]}).encode())
    assert offset == entry["offset"] and ranges == tuple(_pairs(entry[PREFETCH_RANGES_KEY]))


def _toc_member(toc_json: bytes) -> bytes:
    """The TOC's gzip member (a tar of ``stargz.index.json``), as a blob ends with it."""
    ti = tarfile.TarInfo("stargz.index.json")
    ti.size = len(toc_json)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(ti, io.BytesIO(toc_json))
    return gzip.compress(buf.getvalue())


@pytest.mark.parametrize("before", [1000, 70_000, 120_000])
def test_a_landmark_entry_at_its_longest_is_found_across_a_toc_piece_boundary(before):
    """The TOC is scanned 1 MiB at a time, each window carrying the end of the one before:
    a landmark entry listing ranges and an order at their most (~125 KB as the writer lays
    it out, a number of ten digits a line) starting ``before`` bytes ahead of a boundary is
    found whole.
    The carry was 64 KiB: such an entry gave no hint at all (no early download, no ranges)."""
    base = 10**9  # offsets of ten digits
    ranges = [v for i in range(MAX_PREFETCH_RANGES) for v in (base + 2 * i, base + 2 * i + 1)]
    order = [v for i in range(MAX_PREFETCH_ORDER) for v in (base + 2 * i, base + 2 * i + 1, -i)]
    order[2::3] = [10**6 - i for i in range(MAX_PREFETCH_ORDER)]  # backwards
    landmark = {
        "name": ".prefetch.landmark",
        "type": "reg",
        "size": 1,
        "offset": base + 10**6,
        "digest": "sha256:" + "0" * 64,
        "chunkDigest": "sha256:" + "0" * 64,
        PREFETCH_RANGES_KEY: ranges,
        PREFETCH_ORDER_KEY: order,
    }

    def toc(pad: int) -> bytes:
        filler = {"name": "d", "type": "dir", "x": "y" * pad}
        return encode_toc([filler, landmark, {"name": "z", "type": "dir"}])

    at = toc(0).index(b'"name": ".prefetch.landmark"')
    start = toc(0).rindex(b"{", 0, at)
    toc_json = toc(PIECE - before - start)
    start = toc_json.rindex(b"{", 0, toc_json.index(b'"name": ".prefetch.landmark"'))
    stop = toc_json.index(b"}", start)
    assert start == PIECE - before and stop - start > 120_000 and stop > PIECE
    member = _toc_member(toc_json)
    toc_at = base + 2 * 10**6
    footer = parse_footer(estargz_footer_bytes(toc_at), toc_at + len(member) + 51)
    scan = scan_toc(member, footer)
    assert scan.landmark_offset == base + 10**6
    assert scan.prefetch_ranges is not None and scan.prefetch_order is not None
    assert scan.prefetch_ranges == landmark_hint(toc_json)[1]
    assert scan.prefetch_order == prefetch_order(order, base + 10**6)


@pytest.mark.anyio
async def test_the_early_download_puts_the_region_on_the_wire_in_the_listed_order(
    tmp_path, monkeypatch
):
    """One stream, pieces of 64 KiB: the requests follow the TOC's order (through
    ``on_verified``), and the layer still reads back every byte."""
    monkeypatch.setattr("store.prefetch.PREFETCH_STREAMS", 1)
    monkeypatch.setattr("store.prefetch.AHEAD_PIECE", 64 << 10)
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", 64 << 10)
    data, toc_digest = _convert(read_order=ORDER, read_ranges=RANGES)
    entry, _reader = _landmark(data, toc_digest)
    order = _triples(entry[PREFETCH_ORDER_KEY])
    path = tmp_path / "layer.blob"
    path.write_bytes(data)
    blob = FileBlob(path)
    ahead = AheadBlob(blob)
    async with trio.open_nursery() as nursery:
        view = await load_layer_index(ahead, toc_digest, lambda e, r: ahead.start(e, nursery, r))
    asked = [r for req in blob.requests for r in req if r[1] <= entry["offset"]]
    # Each request's pieces lie in the listed range being worked on, ranges in their order.
    rank = [next(n for n, (lo, hi, _) in enumerate(order) if lo < b and a < hi) for a, b in asked]
    assert rank == sorted(rank) and rank[-1] == len(order) - 1
    layer = view_layer(view, ahead, toc_digest, tmp_path / "cache", "order")
    for p, node in layer.tree.walk():
        if stat.S_ISREG(node.mode) and p in FILES:
            assert await layer.read_file(node, 0, node.size) == FILES[p], p


class _Wire:
    """Blobs whose requests land in one shared list, each taking a moment on the wire."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []

    def blob(self, name: str, size: int) -> object:
        wire = self

        class Blob:
            def __init__(self) -> None:
                self.size = size

            async def read_ranges(self, ranges):
                wire.requests.extend((name, lo) for lo, _hi in ranges)
                await trio.sleep(0.01)
                return [bytes(hi - lo) for lo, hi in ranges]

        return Blob()


@pytest.mark.anyio
@pytest.mark.parametrize("shared", [True, False])
async def test_ranked_downloads_of_two_layers_take_turns_on_the_wire_by_rank(monkeypatch, shared):
    """Two layers loaded together, one stream each: with the store's WireOrder, layer b's
    pieces (ranks 3-5) wait while layer a's (0-2) go; without it, they go side by side."""
    monkeypatch.setattr("store.prefetch.PREFETCH_STREAMS", 1)
    monkeypatch.setattr("store.prefetch.AHEAD_PIECE", 1000)
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", 1000)
    monkeypatch.setattr("store.prefetch.FIRST_BATCH", 1000)
    wire = _Wire()
    order = WireOrder() if shared else None
    a = AheadBlob(wire.blob("a", 10_000), wire=order)
    b = AheadBlob(wire.blob("b", 10_000), wire=order)
    async with trio.open_nursery() as nursery:
        a.start(5000, nursery, [(0, 1000, 0), (1000, 2000, 1), (2000, 3000, 2)])
        await trio.testing.wait_all_tasks_blocked()  # a's first piece is on the wire
        b.start(5000, nursery, [(2000, 3000, 5), (0, 1000, 3), (1000, 2000, 4)])
    a_first = [("a", 0), ("a", 1000), ("a", 2000), ("b", 0), ("b", 1000), ("b", 2000)]
    if shared:
        assert wire.requests == a_first
    else:  # b's pieces go beside a's
        assert sorted(wire.requests) == a_first
        assert wire.requests.index(("b", 0)) < wire.requests.index(("a", 2000))
    assert order is None or (order.on_wire_bytes == 0 and not order._regions)


@pytest.mark.anyio
async def test_a_region_that_does_not_rank_lowest_goes_while_the_wire_has_room(monkeypatch):
    """Small first batches leave the wire room (less than a full batch of bytes on it):
    layer b's first piece goes beside layer a's, though a ranks lower."""
    monkeypatch.setattr("store.prefetch.PREFETCH_STREAMS", 1)
    monkeypatch.setattr("store.prefetch.AHEAD_PIECE", 200)
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", 1000)  # room: a full batch, 1000 bytes
    monkeypatch.setattr("store.prefetch.FIRST_BATCH", 200)
    wire = _Wire()
    order = WireOrder()
    a = AheadBlob(wire.blob("a", 10_000), wire=order)
    b = AheadBlob(wire.blob("b", 10_000), wire=order)
    async with trio.open_nursery() as nursery:
        a.start(5000, nursery, [(0, 200, 0), (200, 400, 1), (400, 600, 2)])
        await trio.testing.wait_all_tasks_blocked()  # a's first piece (200 bytes) is on the wire
        assert order.on_wire_bytes == 200
        b.start(5000, nursery, [(0, 200, 3), (200, 400, 4), (400, 600, 5)])
        await trio.testing.wait_all_tasks_blocked()
        assert wire.requests[:2] == [("a", 0), ("b", 0)]
    assert order.on_wire_bytes == 0
