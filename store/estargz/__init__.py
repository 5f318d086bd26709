"""eStargz (and zstd:chunked) layer format: read, verify, write. No network, no FUSE.

Sans-IO pieces for the async store (it fetches bytes itself):

    tail = fetch(blob_size - tail_fetch_size(blob_size), ...)      # one ranged read
    footer = parse_footer(tail, blob_size)
    toc_bytes = toc_bytes_from_tail(tail, blob_size, footer)        # None → fetch toc_range()
    scan = scan_toc(toc_bytes, footer, limits)                      # digest, landmark hint
    # compare scan.digest with the manifest annotation, then (bounded memory, validated):
    index = LayerIndex.from_toc_json(toc_json_pieces(toc_bytes, footer, limits),
                                     toc_offset=footer.toc_offset,
                                     compression=footer.compression, limits=limits)
    for c in index.chunks_for_range(entry, off, size):
        data = fetch(c.offset, c.compressed_end - c.offset)
        payload = decompress_chunk(c, data)                         # ChunkDigestMismatch

``LayerIndex.from_toc_json`` is the one TOC → validated tree path (module doc of
:mod:`store.estargz.index` for its rules); any container of the TOC schema (a zstd:chunked
frame too) feeds it uncompressed JSON pieces. Synchronous convenience: :class:`EstargzReader`
over a :class:`BlobSource`; writers: :func:`convert` (eStargz) and
:func:`write_zstd_chunked`.

zstd:chunked as containers/storage writes it (:mod:`.zstdchunked`): the TOC is found and
verified through the layer's annotations instead of the footer, then streams into the same
index::

    layer = zstd_chunked_layer(descriptor_annotations)             # None: not zstd:chunked
    entries = manifest_entries(fetch(*layer.toc_range), layer.position, layer.checksum)
    index = LayerIndex.from_entries(entries, toc_offset=layer.position.offset,
                                    compression="zstd")
"""

from .chunk import decompress_chunk
from .errors import (
    BadFooter,
    ChunkDigestMismatch,
    CorruptChunk,
    EstargzError,
    FileDigestMismatch,
    InvalidEntryName,
    InvalidLayerTar,
    InvalidToc,
    TocDigestMismatch,
    TocOutOfRange,
    TruncatedBlob,
    UnreadableLayerTar,
)
from .footer import (
    DEFAULT_TAIL_FETCH,
    ESTARGZ_FOOTER_SIZE,
    LANDMARK_CONTENTS,
    LEGACY_FOOTER_SIZE,
    MAX_FOOTER_SIZE,
    MAX_PREFETCH_ORDER,
    MAX_PREFETCH_RANGES,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    PREFETCH_ORDER_KEY,
    PREFETCH_RANGES_KEY,
    TOC_TAR_NAME,
    ZSTD_FOOTER_SIZE,
    ZSTD_FOOTER_V2_SIZE,
    Footer,
    FooterKind,
    estargz_footer_bytes,
    parse_footer,
    tail_fetch_size,
    toc_bytes_from_tail,
    toc_range,
)
from .index import Chunk, Entry, LayerIndex, clean_name
from .reader import EstargzReader
from .source import BlobSource, BytesBlobSource, FileBlobSource
from .toc import (
    DEFAULT_LIMITS,
    Toc,
    TocLimits,
    TocScan,
    iter_toc_entries,
    landmark_hint,
    landmark_offset_hint,
    parse_toc,
    prefetch_order,
    prefetch_ranges,
    scan_toc,
    toc_digest,
    toc_json_bytes,
    toc_json_pieces,
    touches,
)
from .writer import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_LEVEL,
    RANGE_CHUNK_SIZE,
    ConvertResult,
    convert,
)
from .zstdchunked import (
    LEGACY_MANIFEST_CHECKSUM_KEY,
    LEGACY_MANIFEST_POSITION_KEY,
    MANIFEST_CHECKSUM_KEY,
    MANIFEST_POSITION_KEY,
    TARSPLIT_POSITION_KEY,
    ZSTD_COMPRESSION,
    ManifestPosition,
    ZstdChunkedLayer,
    ZstdChunkedResult,
    manifest_checksum,
    manifest_entries,
    parse_manifest,
    toc_json_digest,
    write_zstd_chunked,
)
from .zstdchunked import from_annotations as zstd_chunked_layer

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_LEVEL",
    "DEFAULT_LIMITS",
    "DEFAULT_TAIL_FETCH",
    "ESTARGZ_FOOTER_SIZE",
    "LANDMARK_CONTENTS",
    "LEGACY_FOOTER_SIZE",
    "LEGACY_MANIFEST_CHECKSUM_KEY",
    "LEGACY_MANIFEST_POSITION_KEY",
    "MANIFEST_CHECKSUM_KEY",
    "MANIFEST_POSITION_KEY",
    "MAX_FOOTER_SIZE",
    "MAX_PREFETCH_ORDER",
    "MAX_PREFETCH_RANGES",
    "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK",
    "PREFETCH_ORDER_KEY",
    "PREFETCH_RANGES_KEY",
    "RANGE_CHUNK_SIZE",
    "TARSPLIT_POSITION_KEY",
    "TOC_DIGEST_ANNOTATION",
    "TOC_TAR_NAME",
    "UNCOMPRESSED_SIZE_ANNOTATION",
    "ZSTD_COMPRESSION",
    "ZSTD_FOOTER_SIZE",
    "ZSTD_FOOTER_V2_SIZE",
    "BadFooter",
    "BlobSource",
    "BytesBlobSource",
    "Chunk",
    "ChunkDigestMismatch",
    "ConvertResult",
    "CorruptChunk",
    "Entry",
    "EstargzError",
    "EstargzReader",
    "FileBlobSource",
    "FileDigestMismatch",
    "Footer",
    "FooterKind",
    "InvalidEntryName",
    "InvalidLayerTar",
    "InvalidToc",
    "LayerIndex",
    "ManifestPosition",
    "Toc",
    "TocDigestMismatch",
    "TocLimits",
    "TocOutOfRange",
    "TocScan",
    "TruncatedBlob",
    "UnreadableLayerTar",
    "ZstdChunkedLayer",
    "ZstdChunkedResult",
    "clean_name",
    "convert",
    "decompress_chunk",
    "estargz_footer_bytes",
    "iter_toc_entries",
    "landmark_hint",
    "landmark_offset_hint",
    "manifest_checksum",
    "manifest_entries",
    "parse_footer",
    "parse_manifest",
    "parse_toc",
    "prefetch_order",
    "prefetch_ranges",
    "scan_toc",
    "tail_fetch_size",
    "toc_bytes_from_tail",
    "toc_digest",
    "toc_json_bytes",
    "toc_json_digest",
    "toc_json_pieces",
    "toc_range",
    "touches",
    "write_zstd_chunked",
    "zstd_chunked_layer",
]
