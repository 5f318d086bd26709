"""Chunk-level prioritization: ``convert(read_ranges=…)`` cuts a prioritized file read in part
into ``range_chunk_size`` chunks and lists the blob ranges of the chunks read in the
``.prefetch.landmark`` TOC entry (``PREFETCH_RANGES_KEY``); the TOC scan finds them again
without decoding the JSON; the extra key changes nothing for the one TOC → index path."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import random
import re
import tarfile
import time
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.estargz import (
    DEFAULT_LIMITS,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    PREFETCH_RANGES_KEY,
    RANGE_CHUNK_SIZE,
    BytesBlobSource,
    EstargzReader,
    LayerIndex,
    convert,
    landmark_hint,
    parse_footer,
    prefetch_ranges,
    scan_toc,
    toc_json_bytes,
    toc_json_pieces,
)
from store.estargz.toc import touches as _intersects
from store.estargz.toc import typed_toc_entries
from store.estargz.writer import MAX_PREFETCH_RANGES, _covers, _joined, _merged

MTIME = 1_700_000_000
BIG = random.Random(7).randbytes(1 << 20)  # incompressible: every chunk is a real member
SMALL = b"a small file, read whole\n" * 20
OTHER = random.Random(8).randbytes(3000)  # prioritized, not in the trace: read whole too
REST = random.Random(9).randbytes(200_000)  # not prioritized: after the landmark
FILES = {"d/big": BIG, "d/small": SMALL, "d/other": OTHER, "rest": REST}
PRIORITIZED = ["d/big", "d/small", "d/other"]
BIG_READS = [(0, 4096), (600_000, 610_000)]
READS = {"d/big": BIG_READS, "./d/small": [(0, 10), (5, len(SMALL))]}  # small: whole


def _tar(files: dict[str, bytes] = FILES) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        ti = tarfile.TarInfo("d")
        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
        tar.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), MTIME
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


TAR = _tar()


@dataclass
class Converted:
    blob: bytes
    reader: EstargzReader
    toc_json: bytes
    toc_offset: int

    @property
    def landmark(self) -> dict:
        (entry,) = [e for e in self.reader.toc.entries if e["name"] == PREFETCH_LANDMARK]
        return entry


def _convert(tar: bytes = TAR, **kw) -> Converted:
    kw.setdefault("level", 1)
    out = io.BytesIO()
    res = convert(io.BytesIO(tar), out, **kw)
    blob = out.getvalue()
    reader = EstargzReader(BytesBlobSource(blob), res.toc_digest)
    footer = parse_footer(blob[-51:], len(blob))
    toc = blob[footer.toc_offset : len(blob) - 51]
    return Converted(blob, reader, toc_json_bytes(toc, footer), footer.toc_offset)


def _flat_pairs(flat: list[int]) -> list[tuple[int, int]]:
    assert len(flat) % 2 == 0
    return list(zip(flat[::2], flat[1::2], strict=True))


def _hit(reads: list[tuple[int, int]], lo: int, hi: int) -> bool:
    return any(a < hi and lo < b for a, b in reads)


def _adjacent_joined(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in spans:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _assert_reads_back(c: Converted) -> None:
    """Every file equal to its source through the reader (chunks verified, file digests
    checked), and the blob is still a plain tar.gz holding the same files."""
    sums = c.reader.verify_all()
    assert set(sums) - {PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK} == set(FILES)
    for name, data in FILES.items():
        assert c.reader.read_file(name) == data
    assert c.reader.read_file("d/big", 599_990, 20_000) == BIG[599_990:619_990]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(c.blob))) as tar:
        for name, data in FILES.items():
            f = tar.extractfile(name)
            assert f is not None and f.read() == data


# -- (a) a file read in part ------------------------------------------------------------


@pytest.mark.parametrize("range_chunk", [RANGE_CHUNK_SIZE, 16 << 10, 100_000])
def test_partly_read_file_is_range_chunked_and_its_read_chunks_are_hinted(range_chunk):
    c = _convert(prioritized_files=PRIORITIZED, read_ranges=READS, range_chunk_size=range_chunk)
    landmark = c.landmark
    end = landmark["offset"]
    assert end == c.reader.index.prefetch_end_offset
    hinted = _flat_pairs(landmark[PREFETCH_RANGES_KEY])

    # The big file is cut at range_chunk (not the 4 MiB default); the others are one chunk.
    big = c.reader.index.lookup("d/big")
    assert big is not None
    assert [ch.chunk_offset for ch in big.chunks] == list(range(0, len(BIG), range_chunk))
    assert all(ch.size == range_chunk for ch in big.chunks[:-1])
    raw_big = [e for e in c.reader.toc.entries if e["name"] == "d/big"]
    assert all(e.get("chunkSize") == range_chunk for e in raw_big[: len(BIG) // range_chunk])
    for name in ("d/small", "d/other"):
        entry = c.reader.index.lookup(name)
        assert entry is not None and len(entry.chunks) == 1

    # Expected: the members of every region chunk that was read, adjacent ones joined.
    region = sorted(
        (ch for ch in c.reader.index.all_chunks() if ch.compressed_end <= end),
        key=lambda ch: ch.offset,
    )
    assert {ch.name for ch in region} == set(PRIORITIZED)

    def wanted(ch) -> bool:
        if ch.name != "d/big":
            return True  # read whole or not in the trace
        return _hit(BIG_READS, ch.chunk_offset, ch.chunk_offset + ch.size)

    expected = _adjacent_joined([(ch.offset, ch.compressed_end) for ch in region if wanted(ch)])
    assert hinted == expected
    read_big = [ch.chunk_offset for ch in big.chunks if wanted(ch)]
    assert read_big == sorted(
        {lo // range_chunk * range_chunk for lo, _ in BIG_READS}
        | {(hi - 1) // range_chunk * range_chunk for _, hi in BIG_READS}
    )
    # Each range ascending and apart, before the landmark; unread chunks in none of them.
    assert all(lo < hi for lo, hi in hinted)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(hinted))
    assert hinted[-1][1] <= end
    for ch in region:
        inside = any(lo <= ch.offset and ch.compressed_end <= hi for lo, hi in hinted)
        assert inside == wanted(ch), (ch.name, ch.chunk_offset)
        if not wanted(ch):
            assert not _hit(hinted, ch.offset, ch.compressed_end)

    # The raw-JSON hint and the TOC scan find the same ranges.
    toc = c.blob[c.toc_offset : len(c.blob) - 51]
    scan = scan_toc(toc, parse_footer(c.blob[-51:], len(c.blob)))
    assert scan.landmark_offset == end
    assert scan.prefetch_ranges == tuple(hinted)
    assert landmark_hint(c.toc_json) == (end, tuple(hinted))
    _assert_reads_back(c)


def test_read_ranges_of_several_files_and_ranges_in_many_chunks():
    """Two files read in part: ranges follow each file's chunks; a run of read chunks is one
    range, and reads out of order or overlapping count as their union."""
    reads = {
        "d/big": [(300_000, 400_000), (10, 20), (350_000, 350_001)],
        "rest": [(0, 1)],  # not prioritized: ignored
        "d/other": [(0, 100)],  # read in part, one chunk: wanted all the same
    }
    c = _convert(prioritized_files=PRIORITIZED, read_ranges=reads, range_chunk_size=32 << 10)
    big = c.reader.index.lookup("d/big")
    assert big is not None
    hinted = _flat_pairs(c.landmark[PREFETCH_RANGES_KEY])
    by_offset = {ch.chunk_offset: ch for ch in big.chunks}
    # 300000..400000 covers chunks 9..12 (of 32 KiB): one range from chunk 9 to chunk 12's end.
    first, last = by_offset[9 * (32 << 10)], by_offset[12 * (32 << 10)]
    assert (first.offset, last.compressed_end) in hinted
    assert (big.chunks[0].offset, big.chunks[0].compressed_end) in hinted
    assert len(hinted) == 3  # big's chunk 0, chunks 9-12, then other+small together
    _assert_reads_back(c)


# -- (b) nothing to skip: no key, same blob ------------------------------------------------


def test_without_partial_reads_the_blob_is_unchanged_and_has_no_key():
    plain = _convert(prioritized_files=PRIORITIZED)
    assert PREFETCH_RANGES_KEY not in plain.landmark
    assert PREFETCH_RANGES_KEY.encode() not in plain.toc_json
    whole = {
        "d/big": [(0, 500_000), (500_000, len(BIG) + 10)],
        "small": [(0, 1)],  # not a file of the layer
        "rest": [(0, 1)],  # not prioritized
        "d/small": [(-5, len(SMALL))],
    }
    for reads in (None, {}, whole):
        again = _convert(prioritized_files=PRIORITIZED, read_ranges=reads)
        assert again.blob == plain.blob, reads
    _assert_reads_back(plain)


def test_every_chunk_read_gives_no_key_but_range_chunks():
    """Read in part, but a byte of every range chunk: the whole region is wanted, so no key
    (the file is still cut at range_chunk_size: the trace asked for it)."""
    reads = {"d/big": [(i, i + 1) for i in range(0, len(BIG), RANGE_CHUNK_SIZE)]}
    c = _convert(prioritized_files=PRIORITIZED, read_ranges=reads)
    assert PREFETCH_RANGES_KEY not in c.landmark
    big = c.reader.index.lookup("d/big")
    assert big is not None and len(big.chunks) == len(BIG) // RANGE_CHUNK_SIZE
    _assert_reads_back(c)


def test_no_prioritized_files_ignores_read_ranges():
    plain = _convert()
    with_reads = _convert(read_ranges=READS)
    assert with_reads.blob == plain.blob
    names = [e["name"] for e in plain.reader.toc.entries]
    assert names[0] == NO_PREFETCH_LANDMARK and PREFETCH_LANDMARK not in names
    assert plain.reader.index.prefetch_end_offset is None


def test_bad_range_chunk_size_is_refused():
    with pytest.raises(ValueError):
        _convert(prioritized_files=PRIORITIZED, read_ranges=READS, range_chunk_size=0)


# -- (c) the helpers, against brute force -------------------------------------------------


@st.composite
def apart_ranges(draw, touching: bool = True, max_size: int = 12) -> list[tuple[int, int]]:
    """Ascending, non-empty, non-overlapping ``[lo, hi)`` ranges (touching when allowed)."""
    out: list[tuple[int, int]] = []
    pos = draw(st.integers(0, 50))
    for _ in range(draw(st.integers(0, max_size))):
        lo = pos + draw(st.integers(0 if touching else 1, 40))
        hi = lo + draw(st.integers(1, 40))
        out.append((lo, hi))
        pos = hi
    return out


def _flat(ranges: list[tuple[int, int]]) -> list[int]:
    return [v for r in ranges for v in r]


@settings(max_examples=300, deadline=None)
@given(apart_ranges(), st.integers(0, 800))
def test_prefetch_ranges_round_trip_and_cut_at_end(ranges, end):
    assert prefetch_ranges(_flat(ranges), 10**9) == _touching_joined(ranges)
    got = prefetch_ranges(_flat(ranges), end)
    assert got == _touching_joined([(lo, min(hi, end)) for lo, hi in ranges if lo < end])
    assert got is not None and all(lo < hi <= end for lo, hi in got)
    assert all(x[1] < y[0] for x, y in itertools.pairwise(got))


def _touching_joined(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


def test_prefetch_ranges_refuses_more_than_the_cap():
    flat = _flat([(2 * i, 2 * i + 1) for i in range(MAX_PREFETCH_RANGES + 1)])
    assert prefetch_ranges(flat, 10**9) is None
    assert prefetch_ranges(flat[:-2], 10**9) is not None


@st.composite
def malformed(draw) -> list[int]:
    ranges = draw(apart_ranges(max_size=6))
    flat = _flat(ranges)
    kind = draw(st.sampled_from(["odd", "empty", "reversed", "overlap", "before"]))
    if kind == "odd":
        return [*flat, draw(st.integers(0, 1000))]
    if kind == "empty":
        i = draw(st.integers(0, len(ranges)))
        lo = ranges[i - 1][1] if i else 0
        v = draw(st.integers(lo, lo + 30))
        return [*_flat(ranges[:i]), v, v, *_flat([(a + v, b + v) for a, b in ranges[i:]])]
    if kind == "reversed":
        lo = draw(st.integers(1, 500))
        return [*flat, flat[-1] + lo + 5 if flat else lo + 5, (flat[-1] if flat else 0) + lo]
    if kind == "overlap":
        if not ranges:
            return [5, 10, 9, 12]
        lo, hi = ranges[-1]
        return [*flat, draw(st.integers(lo, hi - 1)), hi + draw(st.integers(1, 9))]
    # "before": a range that starts before the previous one (not ascending)
    if not ranges:
        return [50, 60, 10, 20]
    lo, _hi = ranges[-1]
    start = draw(st.integers(0, lo))
    return [*flat, start, start + 1] if start + 1 <= lo else [*flat, lo, lo]


@settings(max_examples=300, deadline=None)
@given(malformed(), st.integers(0, 2000))
def test_malformed_prefetch_ranges_are_refused(flat, end):
    assert prefetch_ranges(flat, end) is None


def test_prefetch_ranges_corner_cases():
    assert prefetch_ranges([], 10) == ()
    assert prefetch_ranges([0, 5, 5, 9], 100) == ((0, 9),)  # touching: joined
    assert prefetch_ranges([20, 30], 10) == ()  # all past the landmark: none left
    assert prefetch_ranges([0, 30], 10) == ((0, 10),)
    assert prefetch_ranges([0, 5, 4, 9], 100) is None
    assert prefetch_ranges([5, 5], 100) is None
    assert prefetch_ranges([1], 100) is None


def _landmark_json(offset: int, listed: str) -> bytes:
    head = b'{"version":1,"entries":[{"name":"a","type":"reg","size":3,"offset":72},'
    entry = (
        f'{{"name":".prefetch.landmark","type":"reg","size":1,"offset":{offset},'
        f'"digest":"sha256:00","chunkDigest":"sha256:00","{PREFETCH_RANGES_KEY}":{listed}}}'
    )
    return head + entry.encode() + b',{"name":"z","type":"dir"}]}'


@settings(max_examples=200, deadline=None)
@given(apart_ranges(), st.integers(0, 900))
def test_landmark_hint_reads_the_listed_ranges(ranges, offset):
    listed = json.dumps(_flat(ranges))
    assert landmark_hint(_landmark_json(offset, listed)) == (
        offset,
        prefetch_ranges(_flat(ranges), offset),
    )


@pytest.mark.parametrize("listed", ["[1.5, 3]", "[-1, 3]", '["1", "3"]', "null", "[[1, 2]]"])
def test_landmark_hint_ignores_a_list_it_cannot_read(listed):
    assert landmark_hint(_landmark_json(4242, listed)) == (4242, None)


def test_landmark_hint_on_any_prefix_or_suffix_is_all_or_nothing():
    """The TOC is scanned piece by piece: a piece boundary anywhere in the landmark entry
    gives no hint or the whole one, never a partial list of ranges."""
    c = _convert(prioritized_files=PRIORITIZED, read_ranges=READS)
    full = landmark_hint(c.toc_json)
    assert full[1] is not None and len(full[1]) == 3
    start = c.toc_json.index(b'"' + PREFETCH_LANDMARK.encode())
    stop = c.toc_json.index(b"}", start) + 1
    for cut in range(start - 40, stop + 2):
        assert landmark_hint(c.toc_json[:cut]) in ((None, None), full), cut
        assert landmark_hint(c.toc_json[cut:]) in ((None, None), full), cut


def _name_as_keys(k: int, landmark: bytes = b"") -> bytes:
    """TOC JSON whose one entry object (valid JSON, not a landmark entry) holds ``k`` keys
    ``".prefetch.landmark"``, then ``landmark`` as a further entry."""
    keys = ",".join(f'"{PREFETCH_LANDMARK}":{i}' for i in range(k)).encode()
    return b'{"version":1,"entries":[{"name":"a","type":"dir",' + keys + b"}" + landmark + b"]}"


def test_landmark_hint_is_linear_in_a_name_repeated_as_keys():
    """Every find of the name in one object once cost a scan of the whole object (scan_toc
    of a 42 KB blob: 20 s); now 4x the keys cost about 4x the time, not 16x."""

    def best(raw: bytes) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            assert landmark_hint(raw) == (None, None)
            times.append(time.perf_counter() - t)
        return min(times)

    small, big = best(_name_as_keys(500)), best(_name_as_keys(2000))
    assert big <= 6 * max(small, 1e-3), (small, big)


def test_landmark_hint_past_or_with_the_name_repeated_as_keys():
    real = f',{{"name":"./{PREFETCH_LANDMARK}","type":"reg","offset":4242}}'.encode()
    assert landmark_hint(_name_as_keys(3000, real)) == (4242, None)
    keys = ",".join(f'"{PREFETCH_LANDMARK}":{i}' for i in range(3000))
    entry = f'{{"name":"{PREFETCH_LANDMARK}",{keys},"offset":7}}'.encode()
    assert landmark_hint(entry) == (7, None)


def test_landmark_hint_ignores_an_offset_no_int_can_be():
    """A JSON number of 5,000 digits is valid JSON, but past int()'s default digit limit."""
    entry = f'{{"name":"{PREFETCH_LANDMARK}","offset":{"1" * 5000}}}'.encode()
    assert landmark_hint(entry) == (None, None)
    assert landmark_hint(entry.replace(b"1" * 5000, b"1" * 20)) == (None, None)
    assert landmark_hint(entry.replace(b"1" * 5000, str((1 << 63) - 1).encode())) == (
        (1 << 63) - 1,
        None,
    )


_OLD_ENTRY = re.compile(
    rb'\{[^{}]*"name"\s*:\s*"(?:\./)?' + re.escape(PREFETCH_LANDMARK.encode()) + rb'"[^{}]*\}'
)
_OLD_NAME = re.compile(rb'"(?:\./)?' + re.escape(PREFETCH_LANDMARK.encode()) + rb'"')


def _old_landmark_entry(raw: bytes) -> bytes | None:
    """The entry the quadratic landmark_hint took: for each find of the name in turn, the
    ``{…}`` around it when it holds no brace and holds the name pair."""
    for name in _OLD_NAME.finditer(raw):
        lo, hi = raw.rfind(b"{", 0, name.start()), raw.find(b"}", name.end())
        if lo >= 0 and hi >= 0 and (found := _OLD_ENTRY.fullmatch(raw, lo, hi + 1)):
            return found.group(0)
    return None


_TOKENS = [
    b"{",
    b"}",
    b'"name"',
    b":",
    b" ",
    b",",
    b'"' + PREFETCH_LANDMARK.encode() + b'"',
    b'"./' + PREFETCH_LANDMARK.encode() + b'"',
    b'"offset":',
    b"7",
    b"42",
    b'"x"',
    b'"' + PREFETCH_RANGES_KEY.encode() + b'":[1,2]',
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=40).map(b"".join))
def test_landmark_hint_takes_the_entry_the_quadratic_scan_took(raw):
    entry = _old_landmark_entry(raw)
    assert landmark_hint(raw) == ((None, None) if entry is None else landmark_hint(entry))


@settings(max_examples=300, deadline=None)
@given(apart_ranges(max_size=30), st.integers(1, 35))
def test_joined_keeps_at_most_most_spans_and_covers_every_input(spans, most):
    out = _joined(list(spans), most)
    if not spans:
        assert out == []
        return
    assert 1 <= len(out) <= most
    assert all(lo < hi for lo, hi in out)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(out))  # ascending, apart
    for lo, hi in spans:
        assert any(a <= lo and hi <= b for a, b in out)
    starts = {lo for lo, _ in spans}
    ends = {hi for _, hi in spans}
    assert all(lo in starts and hi in ends for lo, hi in out)  # no byte beyond the inputs
    touching = _adjacent_joined(spans)
    if len(touching) <= most:
        assert out == touching  # nothing joined across a gap that need not be
    else:
        # The spans joined across gaps: only the narrowest gaps are bridged.
        bridged = [
            b[0] - a[1]
            for a, b in itertools.pairwise(touching)
            if any(x <= a[0] and b[1] <= y for x, y in out)
        ]
        kept = [
            b[0] - a[1]
            for a, b in itertools.pairwise(touching)
            if not any(x <= a[0] and b[1] <= y for x, y in out)
        ]
        assert not kept or not bridged or max(bridged) <= min(kept)


def test_joined_at_the_writer_limit():
    spans = [(i * 10, i * 10 + 5) for i in range(3 * MAX_PREFETCH_RANGES)]
    out = _joined(spans, MAX_PREFETCH_RANGES)
    assert len(out) <= MAX_PREFETCH_RANGES
    assert out[0][0] == 0 and out[-1][1] == spans[-1][1]


raw_ranges = st.lists(st.tuples(st.integers(-20, 200), st.integers(-20, 200)), max_size=10)


@settings(max_examples=400, deadline=None)
@given(raw_ranges, st.integers(-20, 220), st.integers(1, 60))
def test_merged_and_intersects_match_brute_force(ranges, lo, width):
    merged = _merged(ranges)
    held = {b for a, z in ranges for b in range(max(a, 0), z)}  # file offsets: none below 0
    assert {b for a, z in merged for b in range(a, z)} == held
    assert all(a < z for a, z in merged)
    assert all(x[1] < y[0] for x, y in itertools.pairwise(merged))
    hi = lo + width
    assert _intersects(merged, lo, hi) == any(b in held for b in range(lo, hi))
    assert _covers(merged, width) == all(b in held for b in range(width))


# -- (d) the extra key and the one TOC path ------------------------------------------------


def test_toc_with_the_key_parses_on_the_one_toc_path(monkeypatch):
    c = _convert(prioritized_files=PRIORITIZED, read_ranges=READS)
    assert PREFETCH_RANGES_KEY.encode() in c.toc_json
    end = c.landmark["offset"]
    footer = parse_footer(c.blob[-51:], len(c.blob))
    toc = c.blob[c.toc_offset : len(c.blob) - 51]

    def index(json_bytes: bytes | None = None) -> LayerIndex:
        pieces = toc_json_pieces(toc, footer) if json_bytes is None else [json_bytes]
        return LayerIndex.from_toc_json(pieces, toc_offset=c.toc_offset, compression="gzip")

    def shape(idx: LayerIndex) -> list:
        return sorted(
            (name, e.type, e.size, [(ch.chunk_offset, ch.offset, ch.digest) for ch in e.chunks])
            for name, e in idx.names()
        )

    # The fast typed decode still vouches for the TOC (an unknown key is no reason to fall
    # back), and the entry-by-entry decoder agrees.
    assert typed_toc_entries(c.toc_json, DEFAULT_LIMITS) is not None
    typed = index()
    assert typed.prefetch_end_offset == end == landmark_hint(c.toc_json)[0]
    monkeypatch.setattr("store.estargz.index.WHOLE_DECODE_MAX", 0)
    streamed = index()
    assert streamed.prefetch_end_offset == end
    assert shape(streamed) == shape(typed)
    # The same TOC without the key: the same index.
    doc = json.loads(c.toc_json)
    for e in doc["entries"]:
        e.pop(PREFETCH_RANGES_KEY, None)
    assert shape(index(json.dumps(doc).encode())) == shape(typed)
