"""The TOC (``stargz.index.json``): decoding, digest check, and encoding for the writer.

The TOC digest is sha256 of the *uncompressed* TOC JSON bytes — what the manifest annotation
``containerd.io/snapshot/stargz/toc.digest`` carries. In gzip layers the JSON is the payload of
a tar entry named ``stargz.index.json`` inside its own gzip member; in zstd:chunked layers it
is a bare zstd frame (inside a skippable frame).

One decoder for every user: :func:`toc_json_pieces` inflates the TOC in bounded pieces (never
the whole JSON at once), :func:`scan_toc` hashes them, and :func:`iter_toc_entries` decodes
the JSON one entry object at a time, so a 100,000-entry TOC never exists as 100,000 dicts (or
as one 30 MB string) and a hostile one is refused as soon as it passes a :class:`TocLimits`
cap. :func:`parse_toc` (a list of entry dicts) and :meth:`LayerIndex.from_toc_json
<store.estargz.index.LayerIndex.from_toc_json>` (the validated tree) are both built on them;
the latter first tries :func:`typed_toc_entries` (a TOC up to :data:`WHOLE_DECODE_MAX` bytes
decoded whole into :class:`RawEntry` records, every field's type checked by msgspec) and
falls back to the entry-by-entry decoder for anything it does not vouch for.
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import io
import itertools
import json
import re
import sys
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from .errors import InvalidToc, TocDigestMismatch
from .footer import (
    MAX_PREFETCH_ORDER,
    MAX_PREFETCH_RANGES,
    PREFETCH_LANDMARK,
    PREFETCH_ORDER_KEY,
    PREFETCH_RANGES_KEY,
    TOC_TAR_NAME,
    Footer,
)

# Hard ceiling on a TOC, uncompressed, whatever the limits say (a decompression bomb).
MAX_TOC_SIZE = 1 << 30
PIECE = 1 << 20  # uncompressed bytes handed on at a time
# TOC JSON up to this size is decoded whole (about 25,000 entries; ~25 MB of dicts for a
# moment), larger ones one entry at a time (:func:`iter_toc_entries`).
WHOLE_DECODE_MAX = 8 << 20


@dataclass(frozen=True, slots=True)
class TocLimits:
    """Caps on one TOC, checked while it streams in (:class:`InvalidToc` past either).

    ``max_bytes``: uncompressed TOC JSON bytes (also bounds the compressed TOC fetched);
    ``max_entries``: entry objects (each costs the index ~0.7 KB). Defaults admit a layer of a
    million files; the store takes its own from its config (``toc_max_bytes``,
    ``toc_max_entries``). ``max_chunk_bytes``: the uncompressed size of one chunk, checked by
    the index (:class:`InvalidToc` past it): a chunk is inflated whole in memory to verify
    it, so a TOC claiming a 16 GiB chunk (a few MB of gzip'ed zeros) would otherwise make
    one 4 KiB read allocate 32 GiB. Writers cut files into chunks of 4 MiB (eStargz's
    default) or less (zstd:chunked's content-defined ones average tens of kB).
    """

    max_bytes: int = 256 << 20
    max_entries: int = 1_000_000
    max_chunk_bytes: int = 64 << 20


DEFAULT_LIMITS = TocLimits()


_Offset = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
_Id = Annotated[int, msgspec.Meta(ge=0, le=(1 << 32) - 1)]
_Mode = Annotated[int, msgspec.Meta(ge=0, le=0o177777)]


class RawEntry(msgspec.Struct, gc=False):
    """One TOC entry with every field of the right JSON type and in range: the attribute names
    are the JSON keys (stargz-snapshotter ``estargz.TOCEntry``), absent keys their zero value.

    msgspec checks what :class:`~store.estargz.index.LayerIndex` would check of each field
    alone (integers are JSON integers in range — ``true`` and ``1.0`` are not —, strings are
    strings), in C, while it decodes; the index checks the rest (types, names, offsets, chunk
    order). ``xattrs`` stays as given: values are base64, decoded by the index.
    """

    name: str
    type: str
    size: _Offset = 0
    modtime: str = ""
    linkName: str = ""
    mode: _Mode = 0
    uid: _Id = 0
    gid: _Id = 0
    userName: str = ""
    groupName: str = ""
    devMajor: _Id = 0
    devMinor: _Id = 0
    xattrs: dict[str, str] | None = None
    digest: str = ""
    offset: _Offset = 0
    endOffset: _Offset = 0
    chunkOffset: _Offset = 0
    chunkSize: _Offset = 0
    chunkDigest: str = ""
    innerOffset: _Offset = 0


class _TypedToc(msgspec.Struct, gc=False):
    version: int
    entries: list[RawEntry] | None


_TYPED_DECODER = msgspec.json.Decoder(_TypedToc)


@dataclass(slots=True)
class Toc:
    """A decoded TOC: the raw entry dicts in blob order, and where it came from."""

    version: int
    entries: list[dict[str, Any]]
    digest: str  # "sha256:<hex of the uncompressed JSON>"
    offset: int  # compressed offset of the TOC in the blob
    compression: str  # "gzip" | "zstd"
    json_size: int


@dataclass(frozen=True, slots=True)
class TocScan:
    """What one pass over the TOC's bytes tells before any JSON is decoded."""

    digest: str  # "sha256:…" of the uncompressed JSON
    json_size: int
    # The ``.prefetch.landmark`` entry's offset, a hint only: at most the TOC's offset (past
    # it the region stops at the TOC, as the index's does: index._landmark_end).
    landmark_offset: int | None
    json: bytes | None = None  # the whole JSON, when asked for and not over ``keep`` bytes
    # The landmark entry's ``PREFETCH_RANGES_KEY``: ``[start, end)`` blob ranges before the
    # landmark worth prefetching (None: the whole region). A hint only, as the offset is.
    prefetch_ranges: tuple[tuple[int, int], ...] | None = None
    # Its ``PREFETCH_ORDER_KEY``: the region's ranges with their fetch ranks
    # (:func:`prefetch_order`; None: blob order). A hint only, as the ranges are.
    prefetch_order: tuple[tuple[int, int, int], ...] | None = None

    @property
    def fetch_ranges(self) -> tuple[tuple[int, ...], ...] | None:
        """What the early download takes: the bytes of :attr:`prefetch_ranges` (None: the
        whole region, ``[0, landmark_offset)``) — with an order (:attr:`prefetch_order`) as
        ``(start, end, rank)`` triples: the order's ranges cut to those bytes, by rank, then
        the bytes it does not list, ascending, ranked :data:`UNLISTED_RANK`; else as
        :attr:`prefetch_ranges` gives them (``(start, end)``, ascending; None: the whole
        region in blob order). The order changes when bytes are fetched, never which: an
        order that does not list them all (a writer's other idea of the region, a malformed
        hint) cost the early download of the bytes it left out, and the prefetch, finding
        them missing from it, its fast path."""
        order, ranges, end = self.prefetch_order, self.prefetch_ranges, self.landmark_offset
        if order is None or end is None:
            return ranges
        ranked = confine_order(order, ranges if ranges is not None else ((0, end),))
        return ranked or ranges


# The rank TocScan.fetch_ranges gives the bytes an order does not list: after every listed
# one (store.prefetch.UNRANKED).
UNLISTED_RANK = sys.maxsize


def confine_order(
    order: Sequence[tuple[int, int, int]], ranges: Sequence[tuple[int, int]]
) -> tuple[tuple[int, int, int], ...]:
    """``order``'s ``(start, end, rank)`` triples (not overlapping) cut to ``ranges``
    (ascending ``[start, end)``, not overlapping; parts outside left out), in ``order``'s
    order, then the parts of ``ranges`` no triple holds, ascending, ranked
    :data:`UNLISTED_RANK`; ``()`` when no triple holds a byte of ``ranges``. O((n + m)
    log(n + m)) for n triples and m ranges, O(n + m) triples out."""
    starts = [lo for lo, _hi in ranges]
    out: list[tuple[int, int, int]] = []
    for lo, hi, rank in order:
        i = max(bisect.bisect_right(starts, lo) - 1, 0)
        while i < len(ranges) and ranges[i][0] < hi:
            a, b = max(lo, ranges[i][0]), min(hi, ranges[i][1])
            if a < b:
                out.append((a, b, rank))
            i += 1
    if not out:
        return ()
    listed = sorted((a, b) for a, b, _rank in out)  # each inside one of ranges
    j = 0
    for lo, hi in ranges:
        at = lo
        while j < len(listed) and listed[j][0] < hi:
            a, b = listed[j]
            if at < a:
                out.append((at, a, UNLISTED_RANK))
            at = max(at, b)
            j += 1
        if at < hi:
            out.append((at, hi, UNLISTED_RANK))
    return tuple(out)


def toc_digest(toc_json: bytes) -> str:
    return "sha256:" + hashlib.sha256(toc_json).hexdigest()


def parse_toc(
    data: bytes,
    footer: Footer,
    expected_digest: str | None = None,
    limits: TocLimits = DEFAULT_LIMITS,
) -> Toc:
    """Decode the compressed TOC bytes (see :func:`~store.estargz.footer.toc_range`).

    Checks the digest against ``expected_digest`` when given (:class:`TocDigestMismatch`);
    raises :class:`InvalidToc` if the bytes do not decode to a TOC object. ``"entries": null``
    is an empty TOC (as Go's ``AppendTar`` of an empty tar writes it).
    """
    where = f"TOC at offset {footer.toc_offset}"
    scan = scan_toc(data, footer, limits)
    if expected_digest is not None and scan.digest != expected_digest:
        raise TocDigestMismatch(
            f"{where}: digest {scan.digest} does not match the expected {expected_digest}"
        )
    entries = list(iter_toc_entries(toc_json_pieces(data, footer, limits), where, limits))
    if footer.compression == "zstd":
        from .zstdchunked import normalize_entries

        entries = normalize_entries(entries)
    return Toc(1, entries, scan.digest, footer.toc_offset, footer.compression, scan.json_size)


def toc_json_bytes(data: bytes, footer: Footer, limits: TocLimits = DEFAULT_LIMITS) -> bytes:
    """The whole uncompressed TOC JSON (its sha256 is the TOC digest); :class:`InvalidToc`."""
    return b"".join(toc_json_pieces(data, footer, limits))


def scan_toc(
    data: bytes, footer: Footer, limits: TocLimits = DEFAULT_LIMITS, keep: int = 0
) -> TocScan:
    """Inflate the TOC once, in pieces: its digest, size and landmark hint (no JSON decoded);
    with ``keep``, also the JSON itself when it is at most ``keep`` bytes (so a decoder need
    not inflate it again).

    Why before the decode: the store checks the digest against the manifest annotation
    first, so no JSON it was not promised ever reaches the decoder, and it can start the
    prefetch download on the hint while the index is built. A TOC with more ``"name"`` keys
    than ``limits.max_entries`` is refused here already, before any memory goes to entries
    (:class:`InvalidToc`); an entry key spelled with escapes is still counted by the decoder.
    """
    h = hashlib.sha256()
    size = 0
    hint: int | None = None
    carry = b""
    names = 0  # "name" keys: at least the entry count (a string can add, never hide one)
    ranges: tuple[tuple[int, int], ...] | None = None
    order: tuple[tuple[int, int, int], ...] | None = None
    kept: list[bytes] | None = [] if keep else None
    for piece in toc_json_pieces(data, footer, limits):
        h.update(piece)
        size += len(piece)
        if kept is not None and size <= keep:
            kept.append(piece)
        else:
            kept = None
        window = carry + piece
        names += window.count(b'"name"') - carry.count(b'"name"')
        if names > limits.max_entries:
            raise InvalidToc(
                f"TOC at offset {footer.toc_offset}: more than {limits.max_entries} entries "
                "(the limit on TOC entries: store config toc_max_entries)"
            )
        if hint is None:
            hint, ranges, order = _landmark_fields(window)
        carry = window[-_CARRY:]
    json = b"".join(kept) if kept is not None else None
    if hint is not None:
        hint = min(hint, footer.toc_offset)
    return TocScan(
        "sha256:" + h.hexdigest(),
        size,
        hint,
        json,
        ranges if hint else None,
        order if hint else None,
    )


# The landmark entry: a flat JSON object (no ``{`` or ``}`` inside, as the writer lays it out)
# holding this name pair.
_LANDMARK_PAIR = re.compile(
    rb'"name"\s*:\s*"(?:\./)?' + re.escape(PREFETCH_LANDMARK.encode()) + rb'"', re.ASCII
)
_LANDMARK_TAIL = PREFETCH_LANDMARK.encode() + b'"'


def _landmark_name(raw: bytes, pos: int) -> tuple[int, int] | None:
    """``[start, end)`` of the first JSON string ``".prefetch.landmark"`` or
    ``"./.prefetch.landmark"`` that starts at or after ``pos``, else None.

    Found with ``bytes.find`` on the name's tail, then its opening quote checked: a regex
    starting with ``"`` tried a match at every quote of the TOC (6 ms for 2.7 MB of JSON
    holding no landmark, under the GIL, while podman waits on the pull; ``find`` is memchr
    fast). The tail cannot overlap itself, so finds come in the order of their starts.
    """
    tail = _LANDMARK_TAIL
    i = raw.find(tail, pos + 1)
    while i >= 0:
        if i - 3 >= pos and raw[i - 3 : i] == b'"./':
            return i - 3, i + len(tail)
        if raw[i - 1] == 0x22:  # '"'; i - 1 >= pos, as the find started at pos + 1
            return i - 1, i + len(tail)
        i = raw.find(tail, i + 1)
    return None


_BRACE = re.compile(rb"[{}]")
_OFFSET_FIELD = re.compile(rb'"offset"\s*:\s*(\d+)')
_OFFSET_DIGITS = len(str((1 << 63) - 1))  # a longer number is no offset (nor an int() input)


# TOC text one window of :func:`scan_toc` carries into the next: the longest landmark entry
# the writer lays out (its ranges and order at their most, one number of up to
# _OFFSET_DIGITS digits a line, indented; the other fields within 4 KiB), so an entry a
# piece boundary cuts is found whole in the next window. 64 KiB held the ranges alone; with
# an order an entry reaches ~125 KB (offsets of ten digits), and one starting more than
# 64 KiB before a boundary gave no hint at all (no early download, no ranges).
_CARRY = (2 * MAX_PREFETCH_RANGES + 3 * MAX_PREFETCH_ORDER) * (_OFFSET_DIGITS + 8) + (4 << 10)


_RANGES_FIELD = re.compile(
    rb'"' + re.escape(PREFETCH_RANGES_KEY.encode()) + rb'"\s*:\s*\[([0-9,\s]*)\]', re.ASCII
)
_ORDER_FIELD = re.compile(
    rb'"' + re.escape(PREFETCH_ORDER_KEY.encode()) + rb'"\s*:\s*\[([0-9,\s]*)\]', re.ASCII
)


def landmark_offset_hint(raw: bytes) -> int | None:
    """The ``.prefetch.landmark`` entry's offset, found in TOC JSON text without decoding it.

    A hint only, to start downloading the prefetch region early: the validated index decides
    what is prefetched, and every chunk is verified before it is served, so a wrong hint
    costs bytes, never correctness.
    """
    return landmark_hint(raw)[0]


def landmark_hint(raw: bytes) -> tuple[int | None, tuple[tuple[int, int], ...] | None]:
    """The ``.prefetch.landmark`` entry's offset and its :data:`~.footer.PREFETCH_RANGES_KEY`
    ranges (:func:`prefetch_ranges`), found in TOC JSON text without decoding it; ``(None,
    None)`` when no landmark entry is in ``raw``. Hints only (:func:`landmark_offset_hint`).

    The entry is the first ``{…}`` with no brace inside that holds ``"name":
    ".prefetch.landmark"`` (or ``"./.prefetch.landmark"``); its first ``"offset"`` is the
    offset (none, or more digits than an offset can have: no hint). Linear in ``len(raw)``:
    the name is searched for literally, and each brace-free stretch of text around a find is
    looked at once, however many finds it holds (a hostile TOC may repeat the name as a key
    thousands of times in one object).
    """
    offset, ranges, _order = _landmark_fields(raw)
    return offset, ranges


def _landmark_fields(
    raw: bytes,
) -> tuple[int | None, tuple[tuple[int, int], ...] | None, tuple[tuple[int, int, int], ...] | None]:
    """:func:`landmark_hint`, and the entry's :data:`~.footer.PREFETCH_ORDER_KEY` ranges
    (:func:`prefetch_order`; None when absent or unreadable)."""
    pos = 0  # no byte before it is looked at again; past the start, raw[pos] is a brace
    while (name := _landmark_name(raw, pos)) is not None:
        start, end = name
        right = _BRACE.search(raw, end)
        if right is None:
            break  # no brace after it: no entry closes in raw
        hi = right.start()
        lo = max(raw.rfind(b"{", pos, start), raw.rfind(b"}", pos, start))
        pos = hi  # every find before hi lies in this same stretch: done with them
        if lo < 0 or raw[lo] != ord("{") or raw[hi] != ord("}"):
            continue  # not a brace-free object (or it starts before raw)
        if _LANDMARK_PAIR.search(raw, lo, hi) is None:
            continue  # the name is there as a key or another value, not as the name
        offset_field = _OFFSET_FIELD.search(raw, lo, hi)
        if offset_field is None or len(offset_field.group(1)) > _OFFSET_DIGITS:
            return None, None, None
        offset = int(offset_field.group(1))
        flat = _int_list(_RANGES_FIELD.search(raw, lo, hi))
        listed = _int_list(_ORDER_FIELD.search(raw, lo, hi))
        return (
            offset,
            None if flat is None else prefetch_ranges(flat, offset),
            None if listed is None else prefetch_order(listed, offset),
        )
    return None, None, None


def _int_list(found: re.Match[bytes] | None) -> list[int] | None:
    """The integers of a matched ``[…]`` list field; None when absent or not integers."""
    if found is None:
        return None
    try:
        return [int(v) for v in found.group(1).split(b",") if v.strip()]
    except ValueError:
        return None


def touches(ranges: Sequence[tuple[int, int]], lo: int, hi: int) -> bool:
    """Whether ascending, non-overlapping ``[start, end)`` ``ranges`` hold a byte of
    ``[lo, hi)`` (a bisection: ``O(log n)``)."""
    i = bisect.bisect_right(ranges, (lo, float("inf"))) - 1
    if i >= 0 and ranges[i][1] > lo:
        return True
    return i + 1 < len(ranges) and ranges[i + 1][0] < hi


def prefetch_ranges(flat: list[int], end: int) -> tuple[tuple[int, int], ...] | None:
    """``[start, end, start, end, …]`` as ``(start, end)`` pairs, touching ones joined, each
    cut at ``end`` (the landmark's offset); None (prefetch the whole region) unless the list
    is pairs of ascending, non-empty, non-overlapping ranges, at most
    :data:`~.footer.MAX_PREFETCH_RANGES` of them — a malformed hint costs bytes (and a
    bounded number of requests), nothing else.
    """
    if len(flat) % 2 or len(flat) > 2 * MAX_PREFETCH_RANGES:
        return None
    out: list[tuple[int, int]] = []
    prev = 0
    for lo, hi in zip(flat[::2], flat[1::2], strict=True):
        if not prev <= lo < hi:
            return None
        prev = hi
        if lo >= end:
            continue
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], min(hi, end))
        else:
            out.append((lo, min(hi, end)))
    return tuple(out)


def prefetch_order(flat: list[int], end: int) -> tuple[tuple[int, int, int], ...] | None:
    """``[start, end, rank, …]`` as ``(start, end, rank)`` triples sorted by rank (the listed
    order among equal ranks), each cut at ``end`` (the landmark's offset), those starting at
    or past it left out; None (blob order) unless the list is triples of a non-empty range
    and a rank of at least 0, the ranges not overlapping one another, at most
    :data:`~.footer.MAX_PREFETCH_ORDER` of them — a malformed hint costs the order, nothing
    else.
    """
    if len(flat) % 3 or len(flat) > 3 * MAX_PREFETCH_ORDER:
        return None
    triples = list(zip(flat[::3], flat[1::3], flat[2::3], strict=True))
    if any(not (0 <= lo < hi and rank >= 0) for lo, hi, rank in triples):
        return None
    ascending = sorted((lo, hi) for lo, hi, _ in triples)
    if any(a[1] > b[0] for a, b in itertools.pairwise(ascending)):
        return None
    ranked = sorted(triples, key=lambda t: t[2])  # stable: the listed order among equals
    return tuple((lo, min(hi, end), rank) for lo, hi, rank in ranked if lo < end)


# -- the container: gzip member + tar entry, or a zstd frame ------------------------------


def toc_json_pieces(
    data: bytes, footer: Footer, limits: TocLimits = DEFAULT_LIMITS
) -> Iterator[bytes]:
    """The uncompressed TOC JSON of the compressed TOC bytes (:func:`toc_range`), in pieces
    of at most :data:`PIECE` bytes; at most ``limits.max_bytes`` in all, else
    :class:`InvalidToc` (raised while iterating)."""
    where = f"TOC at offset {footer.toc_offset}"
    cap = min(limits.max_bytes, MAX_TOC_SIZE)
    if footer.compression == "zstd":
        return _zstd_pieces(data, footer, cap, where)
    return _gzip_tar_pieces(data, cap, where)


class _Members(io.RawIOBase):
    """Concatenated gzip members as one stream, inflating at most ``limit`` bytes."""

    def __init__(self, data: bytes, limit: int, where: str) -> None:
        self._rest = data  # members not started yet
        self._in = b""  # input of the current member not consumed yet
        self._d: Any = None
        self._left = limit
        self._where = where

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while True:
            if self._d is None:
                if not self._rest:
                    return 0
                self._d = zlib.decompressobj(wbits=31)
                self._in, self._rest = self._rest, b""
            if self._left <= 0:
                raise InvalidToc(
                    f"{self._where}: TOC inflates past the limit on TOC bytes (store config "
                    "toc_max_bytes)"
                )
            try:
                out = self._d.decompress(self._in, min(len(b), self._left))
            except zlib.error as exc:
                raise InvalidToc(f"{self._where}: TOC is not gzip: {exc}") from None
            self._in = self._d.unconsumed_tail
            if self._d.eof:
                self._rest, self._d = self._d.unused_data, None
            elif not out and not self._in:
                raise InvalidToc(f"{self._where}: TOC gzip member is truncated")
            if out:
                self._left -= len(out)
                b[: len(out)] = out
                return len(out)


# Bytes of PAX extended headers one untrusted tar stream may carry, in all. CPython's parse
# of one is quadratic in a run of digits before 3.11.10 and 3.12.6 (CVE-2024-6232: a
# 402-byte blob whose TOC member's PAX header held 160,000 digits cost 15 s of CPU); within
# this budget it costs at most ~10 ms. A TOC member needs none; a layer's first entries (the
# head probe, :mod:`.head`) a few hundred bytes each for long names or xattrs.
PAX_BUDGET = 4 << 10


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose PAX records are parsed only within the stream's PAX budget."""

    def _proc_pax(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        left = getattr(tarfile_, "pax_left", PAX_BUDGET)
        if self.size > left:
            raise tarfile.HeaderError(
                f"PAX extended header of {self.size} bytes, past the {PAX_BUDGET}-byte budget"
            )
        tarfile_.pax_left = left - self.size  # type: ignore[attr-defined]
        return super()._proc_pax(tarfile_)  # type: ignore[misc]


def open_tar_stream(fileobj: Any) -> tarfile.TarFile:
    """``tarfile.open(fileobj=fileobj, mode="r|")`` for an untrusted stream: its PAX extended
    headers together may hold :data:`PAX_BUDGET` bytes (more: ``tarfile.HeaderError``)."""
    return tarfile.open(fileobj=fileobj, mode="r|", tarinfo=_BoundedTarInfo)


def _gzip_tar_pieces(data: bytes, cap: int, where: str) -> Iterator[bytes]:
    raw = _Members(data, cap + (64 << 10), where)  # room for the tar headers
    try:
        with open_tar_stream(io.BufferedReader(raw, PIECE)) as tar:
            info = tar.next()
            if info is None:
                raise InvalidToc(f"{where}: TOC member holds no tar entry")
            if info.name != TOC_TAR_NAME or not info.isreg():
                raise InvalidToc(f"{where}: first tar entry is {info.name!r}, not {TOC_TAR_NAME}")
            if info.size > cap:
                raise InvalidToc(
                    f"{where}: TOC is {info.size} bytes, over the limit on TOC bytes ({cap}, "
                    "store config toc_max_bytes)"
                )
            f = tar.extractfile(info)
            assert f is not None
            left = info.size
            while left:
                piece = f.read(min(PIECE, left))
                if not piece:
                    raise InvalidToc(
                        f"{where}: TOC entry truncated ({info.size - left} of {info.size} bytes)"
                    )
                left -= len(piece)
                yield piece
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidToc(f"{where}: TOC member is not a tar entry: {exc}") from None


def _zstd_pieces(data: bytes, footer: Footer, cap: int, where: str) -> Iterator[bytes]:
    import zstandard

    expected = footer.toc_uncompressed_size
    if expected is not None and expected > cap:
        raise InvalidToc(
            f"{where}: TOC is {expected} bytes, over the limit on TOC bytes ({cap}, store config "
            "toc_max_bytes)"
        )
    limit = expected if expected is not None else cap
    total = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
        while True:
            piece = reader.read(PIECE)
            if not piece:
                break
            total += len(piece)
            if total > limit:
                raise InvalidToc(f"{where}: TOC inflates past {limit} bytes")
            yield piece
    except zstandard.ZstdError as exc:
        raise InvalidToc(f"{where}: zstd TOC does not decompress: {exc}") from None
    if expected is not None and total != expected:
        raise InvalidToc(f"{where}: TOC inflated to {total} bytes, footer says {expected}")


# -- the JSON, one entry at a time -------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class _JsonStream:
    """JSON text arriving in UTF-8 pieces; values decoded one at a time from a window.

    A value cut by the window's end is decoded again after reading more; the amount read
    doubles on each retry, so a gigantic value costs linear time, not quadratic.
    """

    def __init__(self, pieces: Iterable[bytes], where: str) -> None:
        self._pieces = iter(pieces)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("strict")
        self._where = where
        self.buf = ""
        self.pos = 0
        self.eof = False

    def _more(self, want: int) -> None:
        if self.pos:
            self.buf = self.buf[self.pos :]
            self.pos = 0
        parts = [self.buf]
        got = 0
        try:
            while got < want:
                piece = next(self._pieces, None)
                if piece is None:
                    parts.append(self._utf8.decode(b"", final=True))
                    self.eof = True
                    break
                parts.append(self._utf8.decode(piece))
                got += len(piece)
        except UnicodeDecodeError as exc:
            raise InvalidToc(f"{self._where}: TOC is not UTF-8: {exc}") from None
        self.buf = "".join(parts)

    def peek(self) -> str:
        """The next non-blank character ("" at the end)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos : self.pos + 1]
            self._more(PIECE)

    def expect(self, chars: str, what: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            found = repr(c) if c else "the end"
            raise InvalidToc(f"{self._where}: not JSON: expected {what}, found {found}")
        self.pos += 1
        return c

    def value(self) -> Any:
        self.peek()
        want = PIECE
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise InvalidToc(f"{self._where}: JSON nested too deeply") from None
            except ValueError as exc:
                if self.eof:
                    raise InvalidToc(f"{self._where}: not JSON: {exc}") from None
            else:
                if end < len(self.buf) or self.eof:  # a number may go on in the next piece
                    self.pos = end
                    return value
            self._more(want)
            want *= 2


def iter_toc_entries(
    pieces: Iterable[bytes], where: str = "TOC", limits: TocLimits = DEFAULT_LIMITS
) -> Iterator[dict[str, Any]]:
    """The entry objects of TOC JSON given in pieces, in order.

    Raises :class:`InvalidToc` (while iterating) when the text is not a JSON object, its
    ``entries`` is neither a list of objects nor ``null`` (``null`` = no entries), there are
    more than ``limits.max_entries`` entries, or ``version`` is not 1 (checked at the end:
    a consumer must discard what it built when iteration raises).

    A TOC of at most :data:`WHOLE_DECODE_MAX` bytes is decoded at once by msgspec (7x faster
    than the streaming decoder, here 35 ms → 5 ms for 8,000 entries); whatever that fast
    path cannot vouch for — any decode error, an unusual shape — goes through the streaming
    decoder (:func:`_stream_entries`), which alone words the errors. Larger TOCs are
    streamed one entry at a time, so they never exist as dicts all at once.
    """
    it = iter(pieces)
    head: list[bytes] = []
    size = 0
    for piece in it:
        head.append(piece)
        size += len(piece)
        if size > WHOLE_DECODE_MAX:
            yield from _stream_entries(itertools.chain(head, it), where, limits)
            return
    whole = b"".join(head)
    del head
    entries = _whole_entries(whole, limits)
    if entries is None:
        yield from _stream_entries((whole,), where, limits)
        return
    del whole
    yield from entries


def typed_toc_entries(data: bytes, limits: TocLimits) -> list[RawEntry] | None:
    """The entries of the TOC JSON ``data`` as :class:`RawEntry` records, decoded whole by
    msgspec, when it is at most :data:`WHOLE_DECODE_MAX` bytes, plainly well formed and every
    field of every entry has its JSON type and range; else ``None``: the caller then takes
    :func:`iter_toc_entries`, which accepts what this refuses (``null`` for an absent field,
    say) and words every error. Why: the checks run in C while decoding (gcc's 2.7 MB TOC:
    7 ms, where checking decoded dicts in Python cost ~25 ms).
    """
    if len(data) > WHOLE_DECODE_MAX or not _plain(data):
        return None
    try:
        toc = _TYPED_DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError):  # msgspec.ValidationError included
        return None
    if toc.version != 1 or toc.entries is None or len(toc.entries) > limits.max_entries:
        return None
    return toc.entries


def _plain(data: bytes) -> bool:
    """No key spelled with escapes, and ``"entries"`` spelled once: a decoder keeps the last
    of two ``entries`` keys, where :func:`_stream_entries` refuses them."""
    return data.count(b'"entries"') == 1 and b"\\u" not in data


def _whole_entries(data: bytes, limits: TocLimits) -> list[dict[str, Any]] | None:
    """The entries of a whole TOC when it is plainly well formed, else ``None``.

    Mirrors every check of :func:`_stream_entries` (which refuses ``entries`` given twice,
    where a decoder keeps the last: so a TOC that spells ``"entries"`` anywhere else, or
    holds any ``\\u`` escape that could spell it, goes the streaming way too)."""
    if not _plain(data):
        return None  # a key spelled with escapes could be a second "entries"
    try:
        toc = msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not isinstance(toc, dict) or "entries" not in toc:
        return None
    version, entries = toc.get("version"), toc["entries"]
    if version != 1 or isinstance(version, bool):
        return None
    if entries is None:
        return []
    if not isinstance(entries, list) or len(entries) > limits.max_entries:
        return None
    if not all(type(e) is dict for e in entries):
        return None
    return entries


def _stream_entries(
    pieces: Iterable[bytes], where: str, limits: TocLimits
) -> Iterator[dict[str, Any]]:
    """:func:`iter_toc_entries` one entry at a time, with every check worded."""
    s = _JsonStream(pieces, where)
    s.expect("{", "a JSON object")
    seen_entries = False
    version: Any = None
    count = 0
    if s.peek() == "}":
        s.pos += 1
    else:
        while True:
            key = s.value()
            if not isinstance(key, str):
                raise InvalidToc(f"{where}: not JSON: object key {key!r}")
            s.expect(":", "':'")
            if key == "entries":
                if seen_entries:
                    raise InvalidToc(f"{where}: 'entries' appears twice")
                seen_entries = True
                if s.peek() == "[":
                    s.pos += 1
                    if s.peek() == "]":
                        s.pos += 1
                    else:
                        while True:
                            entry = s.value()
                            if not isinstance(entry, dict):
                                raise InvalidToc(
                                    f"{where}: entry {count} is a {type(entry).__name__}, "
                                    "not an object"
                                )
                            count += 1
                            if count > limits.max_entries:
                                raise InvalidToc(
                                    f"{where}: more than {limits.max_entries} entries "
                                    "(the limit on TOC entries: store config toc_max_entries)"
                                )
                            yield entry
                            if s.expect(",]", "',' or ']'") == "]":
                                break
                elif (v := s.value()) is not None:
                    raise InvalidToc(f"{where}: 'entries' is a {type(v).__name__}, not a list")
            else:
                v = s.value()
                if key == "version":
                    version = v
            if s.expect(",}", "',' or '}'") == "}":
                break
    if s.peek():
        raise InvalidToc(f"{where}: not JSON: data after the TOC object")
    if not seen_entries:
        raise InvalidToc(f"{where}: no 'entries' list")
    if version != 1 or isinstance(version, bool):
        raise InvalidToc(f"{where}: unsupported TOC version {version!r}")


def encode_toc(entries: list[dict[str, Any]]) -> bytes:
    """TOC JSON laid out like Go's ``json.MarshalIndent(toc, "", "\\t")``.

    A name that is not valid UTF-8 (carried as surrogate escapes) gets the escape
    ``\\ufffd`` for each byte that is not, as Go's encoder writes it (``encoding/json``
    ``appendString``: a real U+FFFD it writes as itself); the tar headers keep the original
    bytes. A reader refuses such a name (:func:`store.estargz.index._tar_name`), which costs
    a normal pull: the TOC cannot say the name.
    """
    text = json.dumps({"version": 1, "entries": entries}, indent="\t", ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", _GO_NOT_UTF8).encode("utf-8")


def _escape_not_utf8(err: UnicodeError) -> tuple[str, int]:
    """Decode error handler: ``\\ufffd`` (JSON text, inside a string) for each byte of a
    sequence that is not UTF-8. Python reports a bad sequence's maximal subpart at once; Go's
    ``utf8.DecodeRuneInString`` gives ``RuneError`` of size 1 for each of its bytes."""
    assert isinstance(err, UnicodeDecodeError)
    return "\\ufffd" * (err.end - err.start), err.end


_GO_NOT_UTF8 = "lazybench.go-json-not-utf8"
codecs.register_error(_GO_NOT_UTF8, _escape_not_utf8)
