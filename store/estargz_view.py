"""The store's view of a parsed eStargz layer: TOC → tree entries and chunk locations.

Why an adapter: the data path (:mod:`store.layer`) and the tree (:mod:`store.tree`) need a
few things in a compact shape — chunk spans sorted by compressed offset, the chunks of each
regular file, the landmark offset, and "decompress and verify this chunk". Keeping that shape
here lets the FUSE side stay independent of the TOC's JSON field names.

Loading (:func:`load_layer_index`) reads the footer, then the TOC (one request when the TOC
sits in the blob's tail), checks the TOC digest against the manifest annotation — a mismatch
is :class:`TocMismatchError` and the layer is refused — and builds the chunk table.

zstd:chunked layers written by containers/storage are found through their descriptor's
annotations instead (:mod:`store.estargz.zstdchunked`): one read of exactly the compressed
TOC, checked against ``manifest-checksum`` before it is decompressed, then validated by the
format library's :class:`~store.estargz.LayerIndex` before the view is built.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import trio

from store import estargz
from store.layer import BlobReader, ChunkRef
from store.tree import EntryView

PREFETCH_LANDMARK = ".prefetch.landmark"

# First read from the blob's end: footer plus small TOCs. Why not the format module's 1 MiB:
# the layers of an image are loaded at once over one link, and real TOCs are 4-470 KB, so a
# 1 MiB guess spent ~4-5 MB of a 100 Mbit/s link per image (gcc: 5.2 MB read for 1.2 MB of
# TOC) — more than the one extra round trip a large TOC now costs.
TAIL_GUESS = 64 << 10


class TocError(ValueError):
    """The blob is not a readable eStargz layer (bad footer, bad TOC)."""


TocMismatchError = estargz.TocDigestMismatch


async def load_layer_index(
    blob: BlobReader,
    toc_digest: str,
    on_verified: Callable[[int | None], None] | None = None,
    zstd_chunked: estargz.ZstdChunkedLayer | None = None,
) -> EstargzLayerView:
    """Fetch footer+TOC of ``blob`` (one request when the TOC fits :data:`TAIL_GUESS`, else
    two), verify the TOC digest (:class:`TocMismatchError` → the layer is refused), and build
    the view.

    ``on_verified`` is called with :func:`landmark_offset_hint` of the verified TOC before
    the (CPU-heavy) parse, so the caller can start downloading the prefetch region meanwhile.

    With ``zstd_chunked`` (the layer's annotations) the TOC is read where they say and
    ``toc_digest`` is its manifest checksum (sha256 of the compressed TOC).
    """
    if zstd_chunked is not None:
        return await _load_zstd_chunked(blob, toc_digest, on_verified, zstd_chunked)
    tail_len = estargz.tail_fetch_size(blob.size, TAIL_GUESS)
    (tail,) = await blob.read_ranges([(blob.size - tail_len, blob.size)])
    try:
        footer = estargz.parse_footer(tail, blob.size)
        toc_bytes = estargz.toc_bytes_from_tail(tail, blob.size, footer)
    except estargz.EstargzError as exc:
        raise TocError(str(exc)) from exc
    if toc_bytes is None:
        (toc_bytes,) = await blob.read_ranges([estargz.toc_range(footer, blob.size)])
    where = f"TOC at offset {footer.toc_offset}"
    try:
        # The format module's TOC extraction; the JSON is decoded here, straight into compact
        # records, because 100,000 entry dicts would cost ~120 MB (and fragment the heap).
        raw = estargz.toc_json_bytes(toc_bytes, footer)
    except estargz.EstargzError as exc:
        raise TocError(str(exc)) from exc
    digest = estargz.toc_digest(raw)
    if digest != toc_digest:
        raise TocMismatchError(f"{where}: digest {digest} does not match the expected {toc_digest}")
    if on_verified is not None:
        on_verified(landmark_offset_hint(raw))
    # Parsed in a worker thread: a big TOC costs ~0.1 s of CPU per 10,000 entries, which
    # would otherwise stall every FUSE request the store is answering meanwhile.
    return await trio.to_thread.run_sync(
        _parse_view, raw, where, footer.toc_offset, footer.compression
    )


async def _load_zstd_chunked(
    blob: BlobReader,
    toc_digest: str,
    on_verified: Callable[[int | None], None] | None,
    layer: estargz.ZstdChunkedLayer,
) -> EstargzLayerView:
    start, end = layer.toc_range
    if end > blob.size:
        raise TocError(f"zstd:chunked TOC [{start}, {end}) is past the blob's {blob.size} bytes")
    (toc_bytes,) = await blob.read_ranges([(start, end)])
    try:
        toc = estargz.parse_manifest(toc_bytes, layer.position, toc_digest)
    except estargz.TocDigestMismatch:
        raise
    except estargz.EstargzError as exc:
        raise TocError(str(exc)) from exc
    if on_verified is not None:
        on_verified(None)  # zstd:chunked has no prefetch landmark
    view = await trio.to_thread.run_sync(_zstd_view, toc)
    view.uncompressed_size = await _zstd_tar_size(blob, toc)
    return view


async def _zstd_tar_size(blob: BlobReader, toc: estargz.Toc) -> int:
    """The size of the tar the blob decompresses to, which podman < 5.1 wants in ``info``
    (``diff-size``; ``podman save`` writes a tar entry that long) and no annotation carries:
    the files' sizes from the TOC plus each header frame's content size — read from the
    frame's header (18 bytes) where the writer recorded it, else by inflating that frame."""
    from store.estargz import zstdchunked

    frames = zstdchunked.header_frames(toc)
    heads = await blob.read_ranges([(lo, min(hi, lo + 18)) for lo, hi in frames])
    total = zstdchunked.payload_size(toc)
    unknown = []
    for frame, head in zip(frames, heads, strict=True):
        size = zstdchunked.frame_content_size(head)
        if size is None:
            unknown.append(frame)
        else:
            total += size
    if unknown:
        for (lo, hi), data in zip(unknown, await blob.read_ranges(unknown), strict=True):
            where = f"zstd:chunked header frame at offset {lo}"
            try:
                total += len(zstdchunked.inflate_bounded(data, 64 * (hi - lo) + (1 << 20), where))
            except estargz.EstargzError as exc:
                raise TocError(str(exc)) from exc
    return total


def _zstd_view(toc: estargz.Toc) -> EstargzLayerView:
    try:
        estargz.LayerIndex.from_toc(toc)  # the format library's checks of every entry
    except estargz.EstargzError as exc:
        raise TocError(f"zstd:chunked TOC at offset {toc.offset}: {exc}") from exc
    entries = [_record(e) for e in toc.entries]
    return EstargzLayerView({"entries": entries}, toc.offset, compression="zstd")


def _parse_view(
    raw: bytes, where: str, toc_offset: int, compression: str = "gzip"
) -> EstargzLayerView:
    try:
        toc = json.loads(raw, object_hook=_record)
    except ValueError as exc:
        raise TocError(f"{where}: not JSON: {exc}") from None
    del raw
    if not isinstance(toc, dict) or not isinstance(toc.get("entries"), list):
        raise TocError(f"{where}: no entries list")
    if not all(isinstance(e, TocRecord) for e in toc["entries"]):
        raise TocError(f"{where}: an entry lacks name or type")
    return EstargzLayerView(toc, toc_offset, compression)


_LANDMARK_ENTRY = re.compile(
    rb'\{[^{}]*"name"\s*:\s*"(?:\./)?\.prefetch\.landmark"[^{}]*\}', re.ASCII
)
_OFFSET_FIELD = re.compile(rb'"offset"\s*:\s*(\d+)')


def landmark_offset_hint(raw: bytes) -> int | None:
    """The ``.prefetch.landmark`` entry's offset, found in the TOC's JSON text without parsing it.

    A hint only, to start downloading the prefetch region early: the parsed index decides
    what is prefetched, and every chunk is verified before it is served, so a wrong hint
    costs bytes, never correctness.
    """
    found = _LANDMARK_ENTRY.search(raw)
    if found is None:
        return None
    offset = _OFFSET_FIELD.search(found.group(0))
    return int(offset.group(1)) if offset is not None else None


_FIELDS = {
    "name": "name",
    "type": "type",
    "size": "size",
    "modtime": "modtime",
    "linkName": "link_name",
    "mode": "mode",
    "uid": "uid",
    "gid": "gid",
    "offset": "offset",
    "endOffset": "end_offset",
    "innerOffset": "inner_offset",
    "devMajor": "dev_major",
    "devMinor": "dev_minor",
    "xattrs": "xattrs",
    "chunkOffset": "chunk_offset",
    "chunkSize": "chunk_size",
    "chunkDigest": "chunk_digest",
}


class TocRecord:
    """One TOC entry with only the fields the store uses (``get`` like the JSON dict)."""

    __slots__ = tuple(_FIELDS.values())

    def get(self, key: str, default: Any = None) -> Any:
        attr = _FIELDS.get(key)
        if attr is None:
            return default
        return getattr(self, attr, default)


def _record(d: dict[str, Any]) -> Any:
    if "name" not in d or "type" not in d:
        return d  # the TOC object itself, or an xattrs table
    rec = TocRecord()
    for key, value in d.items():
        attr = _FIELDS.get(key)
        if attr is not None and value not in (None, "", 0):
            if isinstance(value, str) and key in ("type", "modtime"):
                value = sys.intern(value)
            setattr(rec, attr, value)
    return rec


class EstargzLayerView:
    """Chunk table and tree entries of one layer (implements ``LayerIndexView``)."""

    def __init__(self, toc: dict[str, Any], toc_offset: int, compression: str = "gzip") -> None:
        self._entries: list[dict[str, Any]] | None = toc["entries"]
        self.toc_offset = toc_offset
        self.compression = compression
        # The decompressed blob's size when the format does not say it elsewhere (zstd:chunked).
        self.uncompressed_size: int | None = None
        self._prefetch_end: int | None = None
        self._file_chunks: dict[int, list[ChunkRef]] = {}
        chunks: list[ChunkRef] = []
        # A member (frame) ends where the next starts, or at a zstd:chunked file's endOffset.
        offsets = sorted(
            {int(e.get("offset") or 0) for e in toc["entries"]}
            | {int(e.get("endOffset") or 0) for e in toc["entries"]}
            | {toc_offset}
        )
        next_offset = {o: offsets[i + 1] for i, o in enumerate(offsets[:-1])}
        self._raw_by_name: dict[str, int] = {}
        for i, e in enumerate(toc["entries"]):
            name = _clean(e.get("name", ""))
            etype = e.get("type")
            if name == PREFETCH_LANDMARK and etype == "reg":
                self._prefetch_end = int(e.get("offset") or 0) or None
            if etype == "reg":
                self._raw_by_name[name] = i
                if int(e.get("size") or 0) == 0:
                    continue
            elif etype != "chunk":
                continue
            owner = self._raw_by_name.get(name)
            if owner is None:
                raise TocError(f"chunk entry for unknown file {name!r}")
            offset = int(e.get("offset") or 0)
            file_size = int(toc["entries"][owner].get("size") or 0)
            chunk_offset = int(e.get("chunkOffset") or 0)
            chunk_size = int(e.get("chunkSize") or 0) or file_size - chunk_offset
            ref = ChunkRef(
                compressed_offset=offset,
                compressed_end=next_offset.get(offset, toc_offset),
                inner_offset=int(e.get("innerOffset") or 0),
                file_offset=chunk_offset,
                size=chunk_size,
                digest=str(e.get("chunkDigest") or ""),
            )
            chunks.append(ref)
            self._file_chunks.setdefault(owner, []).append(ref)
        chunks.sort(key=lambda c: (c.compressed_offset, c.inner_offset))
        self._chunks = chunks

    # -- LayerIndexView ----------------------------------------------------------------------

    def chunks_of(self, entry: Any) -> Sequence[ChunkRef]:
        return self._file_chunks.get(entry, ())

    def all_chunks(self) -> Sequence[ChunkRef]:
        return self._chunks

    @property
    def prefetch_end(self) -> int | None:
        return self._prefetch_end

    def decompress(self, chunk: ChunkRef, data: bytes) -> bytes:
        """Inflate one chunk and check it against ``chunkDigest`` (raises if it differs)."""
        ref = estargz.Chunk(
            name="",
            chunk_offset=chunk.file_offset,
            size=chunk.size,
            offset=chunk.compressed_offset,
            compressed_end=chunk.compressed_end,
            inner_offset=chunk.inner_offset,
            digest=chunk.digest,
            compression=self.compression,
        )
        return estargz.decompress_chunk(ref, data)

    # -- tree --------------------------------------------------------------------------------

    def tree_entries(self) -> Iterator[tuple[EntryView, Any]]:
        """``(EntryView, key)`` for every non-chunk entry; the key finds its chunks again."""
        assert self._entries is not None, "TOC entries already dropped"
        for i, e in enumerate(self._entries):
            if e.get("type") == "chunk":
                continue
            xattrs = {k: base64.b64decode(v) for k, v in (e.get("xattrs") or {}).items()}
            yield (
                EntryView(
                    name=_clean(e.get("name", "")),
                    type=str(e.get("type")),
                    size=int(e.get("size") or 0),
                    mode=int(e.get("mode") or 0),
                    uid=int(e.get("uid") or 0),
                    gid=int(e.get("gid") or 0),
                    mtime=_mtime(e.get("modtime")),
                    link_name=_clean(e.get("linkName") or "")
                    if e.get("type") == "hardlink"
                    else str(e.get("linkName") or ""),
                    dev_major=int(e.get("devMajor") or 0),
                    dev_minor=int(e.get("devMinor") or 0),
                    xattrs=xattrs,
                ),
                i,
            )

    def drop_toc_entries(self) -> None:
        """Free the decoded TOC once the tree is built (the chunk table stays)."""
        self._entries = None
        self._raw_by_name = {}


def _clean(name: str) -> str:
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    return "" if name == "." else name.rstrip("/")


def _mtime(value: Any) -> int:
    if not value:
        return 0
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
