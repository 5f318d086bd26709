"""The store's loading of one eStargz layer: fetch footer and TOC, verify, build the index.

The tree and its checks are the format library's (:meth:`store.estargz.LayerIndex.
from_toc_json`, the one TOC → validated index path); this module only decides *how* the
bytes arrive and which thread does the work:

1. one ranged read of the blob's tail (footer, and the TOC when it fits :data:`TAIL_GUESS`),
   else one more read of the rest of the TOC, in pieces on several connections at once
   (:func:`store.chunks.read_split`) — refused before fetching when the TOC is larger than
   the configured ``toc_max_bytes`` allows;
2. in a worker thread, :func:`store.estargz.scan_toc` inflates the TOC in pieces and hashes
   it; a digest other than the manifest annotation's is :class:`TocMismatchError`, so no
   JSON it was not promised is ever decoded. ``on_verified`` then receives the landmark
   hint (its offset, and the ranges before it worth prefetching), to start the prefetch
   download while
3. a worker thread builds the validated index from the TOC (decoded whole into typed
   records by msgspec when it is small enough, else one entry at a time); a big TOC costs
   ~70 ms of CPU per 10,000 entries, which would otherwise stall every FUSE request the
   store is answering meanwhile.

zstd:chunked layers written by containers/storage are found through their descriptor's
annotations instead (:mod:`store.estargz.zstdchunked`): one read (in pieces, as above) of
exactly the compressed TOC where ``manifest-position`` says — with the tar-split frame after
it where ``tarsplit-position`` says (podman 5's layout) —, the TOC's sha256 checked against
``manifest-checksum`` before anything is decompressed, then the same streaming decode into
the validated index, and the TOC checked against the tar-split it names
(:mod:`store.estargz.tarsplit`: a TOC that disagrees with its tar is refused). Their tar's
size, which no annotation carries and podman 4.3 needs, is measured from the frames between
the files, when podman first asks for it (:func:`measure_tar_size`).

Every error of the layer's own bytes is an :class:`store.estargz.EstargzError` (or
:class:`TocError` for a format the store does not serve): the caller refuses the layer.
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

import trio

from store import estargz
from store.chunks import ONE_WINDOW, BlobReader, read_split, split_spans
from store.estargz import Chunk, Entry, LayerIndex, TocLimits, landmark_offset_hint, zstdchunked
from store.estargz.index import gc_paused
from store.estargz.toc import WHOLE_DECODE_MAX
from store.timeline import BoundTimeline, span

# First read from the blob's end: the footer, and TOCs that small. One TCP window: on a new
# connection anything longer costs another round trip before the footer is known (64 KiB took
# three), and only then can the rest of a larger TOC be asked for. Why not the format
# module's 1 MiB: the layers of an image are loaded at once over one link, and real TOCs are
# 4-470 KB, so a 1 MiB guess spent ~4-5 MB of a 100 Mbit/s link per image (gcc: 5.2 MB read
# for 1.2 MB of TOC).
TAIL_GUESS = ONE_WINDOW

# A gzip TOC member is its JSON plus tar headers and a few bytes of framing; incompressible
# JSON grows a little under deflate. A compressed TOC longer than the JSON cap plus this is
# refused before it is fetched.
_COMPRESSED_SLACK = 64 << 10

__all__ = [
    "TAIL_GUESS",
    "EstargzLayerView",
    "FetchRanges",
    "TocError",
    "footer_read_takes_whole",
    "landmark_offset_hint",
]


def footer_read_takes_whole(blob_size: int) -> bool:
    """Whether :func:`load_layer_index`'s first read of an eStargz blob of ``blob_size``
    bytes (its tail, :data:`TAIL_GUESS`) is the whole blob: a small layer's every byte is on
    the wire with its footer."""
    return estargz.tail_fetch_size(blob_size, TAIL_GUESS) >= blob_size


class TocError(estargz.EstargzError):
    """The blob is not a layer the store serves (bad footer, a TOC outside the blob)."""


TocMismatchError = estargz.TocDigestMismatch

# ``[start, end)`` compressed blob ranges before the landmark to prefetch; None: all of them.
PrefetchRanges = tuple[tuple[int, int], ...] | None
# What the early download takes (TocScan.fetch_ranges): those ranges as ``(start, end)``
# pairs, ascending, or as ``(start, end, rank)`` triples by rank; None: the whole region.
FetchRanges = tuple[tuple[int, ...], ...] | None


async def load_layer_index(
    blob: BlobReader,
    toc_digest: str,
    on_verified: Callable[[int | None, FetchRanges], None] | None = None,
    limits: TocLimits = estargz.DEFAULT_LIMITS,
    zstd_chunked: estargz.ZstdChunkedLayer | None = None,
    timeline: BoundTimeline | None = None,
    *,
    parse_turn: Callable[[], AbstractAsyncContextManager[None]] | None = None,
) -> EstargzLayerView:
    """Fetch footer+TOC of ``blob``, verify the TOC digest, build the validated index.

    Raises :class:`TocMismatchError` (digest), :class:`TocError` (footer) or another
    :class:`store.estargz.EstargzError` naming the bad entry; the layer is then refused.
    ``on_verified`` is called (in the trio thread) with the ``.prefetch.landmark`` offset
    hint of the verified TOC and its prefetch ranges in the order to fetch them
    (:attr:`TocScan.fetch_ranges <store.estargz.TocScan.fetch_ranges>`: ``(start, end,
    rank)`` triples by the TOC's order, else ascending pairs; None: the whole region in blob
    order) before the index is built; the view
    keeps the ranges, ascending (:attr:`EstargzLayerView.prefetch_ranges`). With
    ``zstd_chunked`` (the layer's annotations) the TOC is read where they say and
    ``toc_digest`` is its manifest checksum (sha256 of the compressed TOC); the footer is not
    read. ``timeline`` (the layer's view of :class:`store.timeline.Timeline`) receives the
    footer, toc_fetch, verify and parse spans. The TOC's decode and index build wait for
    ``parse_turn()`` (:meth:`store.pullorder.Turns.turn`), if given. The view keeps each
    digest the TOC is now known by (:meth:`EstargzLayerView.verified_as`): its JSON's and,
    for a zstd blob, its compressed bytes'.
    """
    if zstd_chunked is not None:
        return await _load_zstd_chunked(
            blob, toc_digest, on_verified, limits, zstd_chunked, timeline, parse_turn
        )
    tail_len = estargz.tail_fetch_size(blob.size, TAIL_GUESS)
    with span(timeline, "footer", bytes=tail_len, requests=1):
        (tail,) = await blob.read_ranges([(blob.size - tail_len, blob.size)])
    # A zstd footer here is stargz-snapshotter's zstdchunked: eStargz's annotation, the TOC
    # digest of its uncompressed JSON, read like eStargz's.
    footer = estargz.parse_footer(tail, blob.size)
    lo, hi = estargz.toc_range(footer, blob.size)
    if hi - lo > limits.max_bytes + _COMPRESSED_SLACK:
        raise estargz.InvalidToc(
            f"TOC at offset {footer.toc_offset}: {hi - lo} compressed bytes, over the limit on "
            f"TOC bytes ({limits.max_bytes}, store config toc_max_bytes)"
        )
    toc_bytes = estargz.toc_bytes_from_tail(tail, blob.size, footer)
    if toc_bytes is None:  # the TOC starts before the tail: read the rest, keep the tail's part
        tail_start = blob.size - len(tail)
        with span(
            timeline, "toc_fetch", bytes=tail_start - lo, requests=len(split_spans(lo, tail_start))
        ):
            toc_bytes = await read_split(blob, lo, tail_start) + tail[: max(0, hi - tail_start)]
    elif timeline is not None:  # it came with the footer: the same span, no request of its own
        timeline.event("toc_fetch", bytes=len(toc_bytes), requests=0, in_tail=True)
    del tail
    where = f"TOC at offset {footer.toc_offset}"
    with span(timeline, "verify"):
        scan = await trio.to_thread.run_sync(
            estargz.scan_toc, toc_bytes, footer, limits, WHOLE_DECODE_MAX
        )
    if scan.digest != toc_digest:
        raise TocMismatchError(
            f"{where}: digest {scan.digest} does not match the expected {toc_digest}"
        )
    checksum = None  # stargz-snapshotter's zstd: also its zstd:chunked manifest checksum
    if footer.compression == "zstd":
        checksum = await trio.to_thread.run_sync(estargz.manifest_checksum, toc_bytes)
    if on_verified is not None:
        on_verified(scan.landmark_offset, scan.fetch_ranges)

    def build() -> LayerIndex:
        # Inflated once: the scan kept a TOC small enough to be decoded whole.
        pieces = [scan.json] if scan.json is not None else None
        if pieces is None:
            pieces = estargz.toc_json_pieces(toc_bytes, footer, limits)
        return LayerIndex.from_toc_json(
            pieces, toc_offset=footer.toc_offset, compression=footer.compression, limits=limits
        )

    async with _turn(parse_turn):
        with span(timeline, "parse") as out:
            view = EstargzLayerView(await trio.to_thread.run_sync(build))
            out["entries"] = len(view.index.entries)
    refuse_unverifiable(view.index, where)
    view.prefetch_ranges = scan.prefetch_ranges
    view.toc_json_digest, view.manifest_checksum = scan.digest, checksum
    return view


async def _load_zstd_chunked(
    blob: BlobReader,
    toc_digest: str,
    on_verified: Callable[[int | None, FetchRanges], None] | None,
    limits: TocLimits,
    layer: estargz.ZstdChunkedLayer,
    timeline: BoundTimeline | None = None,
    parse_turn: Callable[[], AbstractAsyncContextManager[None]] | None = None,
) -> EstargzLayerView:
    lo, hi = layer.toc_range
    where = f"zstd:chunked TOC at offset {lo}"
    if hi > blob.size:
        raise TocError(f"{where}: [{lo}, {hi}) is past the blob's {blob.size} bytes")
    if max(hi - lo, layer.position.uncompressed_length) > limits.max_bytes + _COMPRESSED_SLACK:
        raise estargz.InvalidToc(
            f"{where}: {hi - lo} bytes ({layer.position.uncompressed_length} uncompressed), "
            f"over the limit on TOC bytes ({limits.max_bytes}, store config toc_max_bytes)"
        )
    split = _tar_split_range(layer, blob.size, limits)
    reads = _toc_reads((lo, hi), split)
    with span(
        timeline,
        "toc_fetch",
        bytes=sum(b - a for a, b in reads),
        requests=sum(len(split_spans(a, b)) for a, b in reads),
    ):
        toc_bytes, split_bytes = await _read_toc_and_tar_split(blob, (lo, hi), split, reads)
    with span(timeline, "verify"):
        digest = await trio.to_thread.run_sync(estargz.manifest_checksum, toc_bytes)
        if digest != toc_digest:
            raise TocMismatchError(
                f"{where}: compressed TOC hashes to {digest}, the annotation says {toc_digest}"
            )
        # The TOC JSON's digest too: eStargz's annotation of the same blob names that one.
        # The JSON, inflated once here, goes on to the decode and the tar-split check.
        toc_json, json_digest = await trio.to_thread.run_sync(
            zstdchunked.toc_json_and_digest, toc_bytes, layer.position, limits
        )
    if on_verified is not None:
        on_verified(None, None)  # zstd:chunked has no prefetch landmark
    async with _turn(parse_turn):
        with span(timeline, "parse") as out:
            index, files = await trio.to_thread.run_sync(
                functools.partial(
                    zstd_chunked_index,
                    toc_bytes,
                    layer.position,
                    limits,
                    toc_json=toc_json,
                    tar_split=split_bytes,
                )
            )
            view = EstargzLayerView(index)
            out["entries"] = len(view.index.entries)
    refuse_unverifiable(index, where)
    view._zstd_files = files
    view.toc_json_digest, view.manifest_checksum = json_digest, digest
    return view


# The tar-split frame follows the TOC's (containers/storage writes them one after the other):
# read with it when at most this far apart, in one range.
_TAR_SPLIT_GAP = 64 << 10


def _tar_split_range(
    layer: estargz.ZstdChunkedLayer, blob_size: int, limits: TocLimits
) -> tuple[int, int] | None:
    """``[start, end)`` of the compressed tar-split the annotations locate (None: none, as
    containers/storage reads a zero offset). :class:`TocError` past the blob,
    :class:`~store.estargz.InvalidToc` when longer than ``toc_max_bytes`` allows."""
    if layer.tar_split is None or layer.tar_split[0] == 0:
        return None
    offset, length, _ = layer.tar_split
    where = f"zstd:chunked tar-split at offset {offset}"
    if offset + length > blob_size:
        raise TocError(f"{where}: [{offset}, +{length}) is past the blob's {blob_size} bytes")
    if length > limits.max_bytes + _COMPRESSED_SLACK:
        raise estargz.InvalidToc(
            f"{where}: {length} bytes, over the limit on TOC bytes ({limits.max_bytes}, store "
            "config toc_max_bytes)"
        )
    return offset, offset + length


def _toc_reads(toc: tuple[int, int], split: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges that fetch the compressed TOC and the tar-split (None:
    none): one when the two lie within :data:`_TAR_SPLIT_GAP` of each other, else one each."""
    if split is None:
        return [toc]
    (lo, hi), (s_lo, s_hi) = toc, split
    a, b = min(lo, s_lo), max(hi, s_hi)
    if (b - a) - (hi - lo) - (s_hi - s_lo) <= _TAR_SPLIT_GAP:
        return [(a, b)]
    return [toc, split]


async def _read_toc_and_tar_split(
    blob: BlobReader,
    toc: tuple[int, int],
    split: tuple[int, int] | None,
    reads: list[tuple[int, int]],
) -> tuple[bytes, bytes | None]:
    """The compressed TOC's bytes and the tar-split's (None without ``split``), fetched as
    ``reads`` (:func:`_toc_reads`) says, each in pieces (:func:`~store.chunks.read_split`)."""
    got = [(a, await read_split(blob, a, b)) for a, b in reads]

    def cut(lo: int, hi: int) -> bytes:
        a, data = next((a, data) for a, data in got if a <= lo and hi <= a + len(data))
        return data[lo - a : hi - a]

    return cut(*toc), (None if split is None else cut(*split))


def _turn(
    parse_turn: Callable[[], AbstractAsyncContextManager[None]] | None,
) -> AbstractAsyncContextManager[None]:
    return nullcontext() if parse_turn is None else parse_turn()


# zstd_chunked_index's default: no tar-split check (a caller that has none to make).
NO_TAR_SPLIT_CHECK: Any = object()


@gc_paused()  # per call, the decode included (store.estargz.index)
def zstd_chunked_index(
    toc_bytes: bytes,
    position: estargz.ManifestPosition,
    limits: TocLimits,
    *,
    toc_json: bytes | None = None,
    tar_split: bytes | None = NO_TAR_SPLIT_CHECK,
) -> tuple[LayerIndex, array]:
    """The validated index of a verified zstd:chunked TOC, and each regular file's frames
    (``offset, endOffset, size`` triples, 24 bytes a file). Typed msgspec records when
    :func:`~store.estargz.zstdchunked.typed_manifest_entries` vouches for the TOC, else the
    entries one at a time (every error worded). ``toc_json``: the TOC JSON already inflated
    (:func:`~store.estargz.zstdchunked.toc_json_and_digest`), if at hand. With ``tar_split``
    (the compressed tar-split's bytes, None when the annotations locate none) the TOC is then
    checked against it (:func:`~store.estargz.zstdchunked.check_manifest_tar_split`), a check
    skipped when the typed TOC names no tar-split
    (:func:`~store.estargz.zstdchunked.names_no_tar_split`). Raises
    :class:`~store.estargz.InvalidToc`. The collector is paused throughout
    (:data:`~store.estargz.index.gc_paused`)."""
    files = array("q")
    records = zstdchunked.typed_manifest_entries(toc_bytes, position, limits, toc_json)
    if records is not None:
        index = LayerIndex.from_entries(
            records, toc_offset=position.offset, compression="zstd", limits=limits
        )
        files.extend(v for frame in zstdchunked.file_frames(records) for v in frame)
        if toc_json is not None and zstdchunked.names_no_tar_split(toc_json):
            return index, files
    else:
        entries = estargz.manifest_entries(toc_bytes, position, None, limits)
        index = LayerIndex.from_entries(
            _tap(entries, files), toc_offset=position.offset, compression="zstd", limits=limits
        )
    if tar_split is not NO_TAR_SPLIT_CHECK:
        zstdchunked.check_manifest_tar_split(toc_bytes, position, tar_split, limits, toc_json)
    return index, files


def _tap(entries: Iterable[dict[str, Any]], files: array) -> Iterator[dict[str, Any]]:
    """Pass ``entries`` on, noting each file's frames once the index took the entry (asking
    for the next one means it was checked: a hostile ``offset`` of 2.5 is the index's
    worded :class:`~store.estargz.InvalidToc`, not a ``TypeError`` here)."""
    for e in entries:
        yield e
        for frame in zstdchunked.file_frames((e,)):
            files.extend(frame)


# Header frames whose header leaves their content size out are read and inflated to count it:
# at most this many compressed bytes of them per layer (a TOC may put any gap between two
# files), read this many at a time, their output counted, never kept.
MEASURE_UNSIZED_MAX = 64 << 20
MEASURE_READ_BYTES = 4 << 20


async def measure_tar_size(view: EstargzLayerView, blob: BlobReader) -> int | None:
    """The size of the tar a zstd:chunked blob decompresses to (None for other layers),
    measured once: podman < 5.1 wants it in ``info`` (``diff-size``; ``podman save`` writes a
    tar entry that long) and no annotation carries it. The files' sizes from the TOC plus each
    header frame's content size — read from the frame's header (18 bytes; one ranged read of
    up to 32 frames at a time) where the writer recorded it, else by inflating that frame
    (counted, not kept; :class:`store.estargz.InvalidToc` when such frames hold more than
    :data:`MEASURE_UNSIZED_MAX` bytes or do not inflate; the blob's read errors pass)."""
    if view.uncompressed_size is not None or view._zstd_files is None:
        return view.uncompressed_size
    flat = view._zstd_files
    files = [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]
    frames = zstdchunked.header_frames(files, view.toc_offset)
    heads = await blob.read_ranges([(lo, min(hi, lo + 18)) for lo, hi in frames])
    total = sum(size for _, _, size in files)
    unknown = []
    for frame, head in zip(frames, heads, strict=True):
        size = zstdchunked.frame_content_size(head)
        if size is None:
            unknown.append(frame)
        else:
            total += size
    unknown_bytes = sum(hi - lo for lo, hi in unknown)
    if unknown_bytes > MEASURE_UNSIZED_MAX:
        raise estargz.InvalidToc(
            f"zstd:chunked: {len(unknown)} header frames without a content size hold "
            f"{unknown_bytes} bytes, over the {MEASURE_UNSIZED_MAX} this measure reads"
        )
    batch: list[tuple[int, int]] = []
    batch_bytes = 0
    for i, (start, end) in enumerate(unknown):
        batch.append((start, end))
        batch_bytes += end - start
        if i + 1 < len(unknown) and batch_bytes < MEASURE_READ_BYTES:
            continue
        for (lo, hi), data in zip(batch, await blob.read_ranges(batch), strict=True):
            where = f"zstd:chunked header frame at offset {lo}"
            total += zstdchunked.inflated_size(data, 64 * (hi - lo) + (1 << 20), where)
        batch, batch_bytes = [], 0
    view.uncompressed_size = total
    view._zstd_files = None
    return total


def refuse_unverifiable(index: LayerIndex, where: str) -> None:
    """Refuse (:class:`~store.estargz.InvalidToc`) a layer with a chunk that no digest
    verifies (:attr:`LayerIndex.unverifiable`: no ``chunkDigest``, and not a whole file with a
    ``digest``), as the Go store refuses it at mount (estargz ``Reader.Verifiers``, from
    ``VerifyTOC``: "some ChunkDigest not found in TOC JSON"). The runtime then pulls the layer
    whole; mounted, every read of that file failed with EIO and the container with it."""
    if index.unverifiable is not None:
        raise estargz.InvalidToc(
            f"{where}: {index.unverifiable}: no chunkDigest, and not a whole file with a "
            "sha256 digest to verify it by: its bytes could never be served (the runtime "
            "pulls the layer whole)"
        )


class EstargzLayerView:
    """What the data path needs of a validated index (implements ``LayerIndexView``)."""

    def __init__(self, index: LayerIndex) -> None:
        self.index = index
        # zstd:chunked: the decompressed blob's size, measured on first need from the file
        # frames noted while the TOC was read (:func:`measure_tar_size`).
        self.uncompressed_size: int | None = None
        self._zstd_files: array | None = None
        # The landmark's prefetch ranges (the TOC scan's hint): the prefetch takes only the
        # region's chunks that touch them; None: the whole region.
        self.prefetch_ranges: PrefetchRanges = None
        # The digests the TOC was verified under (load_layer_index): its JSON's (eStargz's
        # annotation) and, for a zstd blob, its compressed bytes' (zstd:chunked's manifest
        # checksum). One blob may be annotated either way by two images.
        self.toc_json_digest: str | None = None
        self.manifest_checksum: str | None = None

    def verified_as(self, toc_digest: str, zstd_chunked: bool) -> bool:
        """Whether the TOC was verified under ``toc_digest``, a zstd:chunked manifest
        checksum if ``zstd_chunked``, else an eStargz TOC digest."""
        verified = self.manifest_checksum if zstd_chunked else self.toc_json_digest
        return verified is not None and verified == toc_digest

    def chunks_of(self, entry: Entry) -> Sequence[Chunk]:
        return entry.chunks

    def all_chunks(self) -> Sequence[Chunk]:
        """Every chunk of the layer's files, in blob order."""
        return self.index.all_chunks()

    @property
    def prefetch_end(self) -> int | None:
        return self.index.prefetch_end_offset

    @property
    def toc_offset(self) -> int:
        return self.index.toc_offset

    def decompress(self, chunk: Chunk, data: bytes) -> bytes:
        """Inflate one chunk and check it against ``chunkDigest`` (raises if it differs)."""
        return estargz.decompress_chunk(chunk, data)
