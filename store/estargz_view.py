"""The store's loading of one eStargz layer: fetch footer and TOC, verify, build the index.

The tree and its checks are the format library's (:meth:`store.estargz.LayerIndex.
from_toc_json`, the one TOC → validated index path); this module only decides *how* the
bytes arrive and which thread does the work:

1. one ranged read of the blob's tail (footer, and the TOC when it fits :data:`TAIL_GUESS`),
   else one more read of exactly the TOC — refused before fetching when the TOC is larger
   than the configured ``toc_max_bytes`` allows;
2. in a worker thread, :func:`store.estargz.scan_toc` inflates the TOC in pieces and hashes
   it; a digest other than the manifest annotation's is :class:`TocMismatchError`, so no
   JSON it was not promised is ever decoded. ``on_verified`` then receives the landmark
   hint, to start the prefetch download while
3. a worker thread decodes the TOC one entry at a time into the validated index (a big
   TOC costs ~0.1 s of CPU per 10,000 entries, which would otherwise stall every FUSE
   request the store is answering meanwhile).

Every error of the layer's own bytes is an :class:`store.estargz.EstargzError` (or
:class:`TocError` for a format the store does not serve): the caller refuses the layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from store import estargz
from store.estargz import Chunk, Entry, LayerIndex, TocLimits, landmark_offset_hint
from store.layer import BlobReader

# First read from the blob's end: footer plus small TOCs. Why not the format module's 1 MiB:
# the layers of an image are loaded at once over one link, and real TOCs are 4-470 KB, so a
# 1 MiB guess spent ~4-5 MB of a 100 Mbit/s link per image (gcc: 5.2 MB read for 1.2 MB of
# TOC) — more than the one extra round trip a large TOC now costs.
TAIL_GUESS = 64 << 10

# A gzip TOC member is its JSON plus tar headers and a few bytes of framing; incompressible
# JSON grows a little under deflate. A compressed TOC longer than the JSON cap plus this is
# refused before it is fetched.
_COMPRESSED_SLACK = 64 << 10

__all__ = ["TAIL_GUESS", "EstargzLayerView", "TocError", "landmark_offset_hint"]


class TocError(estargz.EstargzError):
    """The blob is not an eStargz layer the store serves (bad footer, zstd:chunked)."""


TocMismatchError = estargz.TocDigestMismatch


async def load_layer_index(
    blob: BlobReader,
    toc_digest: str,
    on_verified: Callable[[int | None], None] | None = None,
    limits: TocLimits = estargz.DEFAULT_LIMITS,
) -> EstargzLayerView:
    """Fetch footer+TOC of ``blob``, verify the TOC digest, build the validated index.

    Raises :class:`TocMismatchError` (digest), :class:`TocError` (footer) or another
    :class:`store.estargz.EstargzError` naming the bad entry; the layer is then refused.
    ``on_verified`` is called (in the trio thread) with the ``.prefetch.landmark`` offset
    hint of the verified TOC before the index is built.
    """
    tail_len = estargz.tail_fetch_size(blob.size, TAIL_GUESS)
    (tail,) = await blob.read_ranges([(blob.size - tail_len, blob.size)])
    footer = estargz.parse_footer(tail, blob.size)
    if footer.kind is estargz.FooterKind.ZSTD_CHUNKED:
        raise TocError("zstd:chunked layers are not served (podman pulls them itself)")
    lo, hi = estargz.toc_range(footer, blob.size)
    if hi - lo > limits.max_bytes + _COMPRESSED_SLACK:
        raise estargz.InvalidToc(
            f"TOC at offset {footer.toc_offset}: {hi - lo} compressed bytes, over the limit on "
            f"TOC bytes ({limits.max_bytes}, store config toc_max_bytes)"
        )
    toc_bytes = estargz.toc_bytes_from_tail(tail, blob.size, footer)
    del tail
    if toc_bytes is None:
        (toc_bytes,) = await blob.read_ranges([(lo, hi)])
    where = f"TOC at offset {footer.toc_offset}"
    scan = await trio.to_thread.run_sync(estargz.scan_toc, toc_bytes, footer, limits)
    if scan.digest != toc_digest:
        raise TocMismatchError(
            f"{where}: digest {scan.digest} does not match the expected {toc_digest}"
        )
    if on_verified is not None:
        on_verified(scan.landmark_offset)

    def build() -> LayerIndex:
        pieces = estargz.toc_json_pieces(toc_bytes, footer, limits)
        return LayerIndex.from_toc_json(
            pieces, toc_offset=footer.toc_offset, compression=footer.compression, limits=limits
        )

    return EstargzLayerView(await trio.to_thread.run_sync(build))


class EstargzLayerView:
    """What the data path needs of a validated index (implements ``LayerIndexView``)."""

    def __init__(self, index: LayerIndex) -> None:
        self.index = index

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
