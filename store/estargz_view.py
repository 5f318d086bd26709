"""The store's view of a parsed eStargz layer: TOC → tree entries and chunk locations.

Why an adapter: the data path (:mod:`store.layer`) and the tree (:mod:`store.tree`) need a
few things in a compact shape — chunk spans sorted by compressed offset, the chunks of each
regular file, the landmark offset, and "decompress and verify this chunk". Keeping that shape
here lets the FUSE side stay independent of the TOC's JSON field names.

Loading (:func:`load_layer_index`) reads the footer, then the TOC (one request when the TOC
sits in the blob's tail), checks the TOC digest against the manifest annotation — a mismatch
is :class:`TocMismatchError` and the layer is refused — and builds the chunk table.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

from store.layer import BlobReader, ChunkRef
from store.tree import EntryView

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
TAIL_GUESS = 1 << 20


class TocError(ValueError):
    """The blob is not a readable eStargz layer (bad footer, bad TOC)."""


class TocMismatchError(TocError):
    """The TOC does not hash to the digest the manifest promised: the layer is refused."""


def parse_footer(tail: bytes) -> tuple[int, int]:
    """``(toc_offset, footer_size)`` from the blob's last bytes (eStargz or legacy stargz)."""
    for size in (FOOTER_SIZE, LEGACY_FOOTER_SIZE):
        if len(tail) < size:
            continue
        footer = tail[-size:]
        if footer[:2] != b"\x1f\x8b" or not footer[3] & 0x04:
            continue
        xlen = struct.unpack("<H", footer[10:12])[0]
        extra = footer[12 : 12 + xlen]
        if size == FOOTER_SIZE:
            if extra[:2] != b"SG" or len(extra) < 4 + 22:
                continue
            payload = extra[4 : 4 + 22]
        else:
            payload = extra[:22]
        if len(payload) != 22 or payload[16:] != b"STARGZ":
            continue
        try:
            return int(payload[:16], 16), size
        except ValueError:
            continue
    raise TocError("no eStargz/stargz footer at the end of the blob")


def decode_toc(member: bytes) -> tuple[dict[str, Any], str]:
    """The TOC JSON and its sha256 digest from the gzip member(s) holding the TOC tar entry."""
    try:
        raw = zlib.decompressobj(wbits=31).decompress(member)
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            info = tar.next()
            if info is None or info.name != TOC_NAME:
                raise TocError(f"first entry after the TOC offset is not {TOC_NAME}")
            f = tar.extractfile(info)
            assert f is not None
            data = f.read()
    except (zlib.error, tarfile.TarError, EOFError) as exc:
        raise TocError(f"cannot decode TOC: {exc}") from None
    try:
        toc = json.loads(data)
    except ValueError as exc:
        raise TocError(f"TOC is not JSON: {exc}") from None
    if not isinstance(toc, dict) or not isinstance(toc.get("entries"), list):
        raise TocError("TOC has no entries list")
    return toc, "sha256:" + hashlib.sha256(data).hexdigest()


async def load_layer_index(blob: BlobReader, toc_digest: str) -> EstargzLayerView:
    """Fetch footer+TOC of ``blob``, verify the TOC digest, and build the view."""
    tail_len = min(blob.size, TAIL_GUESS)
    (tail,) = await blob.read_ranges([(blob.size - tail_len, blob.size)])
    toc_offset, footer_size = parse_footer(tail)
    toc_end = blob.size - footer_size
    if not 0 <= toc_offset < toc_end:
        raise TocError(f"TOC offset {toc_offset} outside the blob")
    if toc_offset >= blob.size - tail_len:
        member = tail[toc_offset - (blob.size - tail_len) : len(tail) - footer_size]
    else:
        (member,) = await blob.read_ranges([(toc_offset, toc_end)])
    toc, digest = decode_toc(member)
    if digest != toc_digest:
        raise TocMismatchError(f"TOC digest {digest} does not match annotation {toc_digest}")
    return EstargzLayerView(toc, toc_offset)


class EstargzLayerView:
    """Chunk table and tree entries of one layer (implements ``LayerIndexView``)."""

    def __init__(self, toc: dict[str, Any], toc_offset: int) -> None:
        self._entries: list[dict[str, Any]] | None = toc["entries"]
        self.toc_offset = toc_offset
        self._prefetch_end: int | None = None
        self._file_chunks: dict[int, list[ChunkRef]] = {}
        chunks: list[ChunkRef] = []
        offsets = sorted({int(e.get("offset") or 0) for e in toc["entries"]} | {toc_offset})
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
        """Inflate one chunk's gzip member(s) and check the bytes against ``chunkDigest``."""
        if not chunk.digest.startswith("sha256:"):
            raise TocError("chunk has no sha256 chunkDigest: cannot verify, not serving")
        want = chunk.inner_offset + chunk.size
        out = bytearray()
        rest = data
        while len(out) < want and rest:
            d = zlib.decompressobj(wbits=31)
            out += d.decompress(rest, want - len(out))
            rest = d.unused_data if d.eof else b""
        payload = bytes(out[chunk.inner_offset : want])
        if len(payload) != chunk.size:
            raise TocError(f"chunk inflated to {len(payload)} bytes, expected {chunk.size}")
        if "sha256:" + hashlib.sha256(payload).hexdigest() != chunk.digest:
            raise TocError(f"chunk content does not match {chunk.digest}")
        return payload

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
