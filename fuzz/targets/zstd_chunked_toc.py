"""The TOC of a zstd:chunked layer, from the wire to the validated index.

Input: the first byte picks the form (modulo 5), the rest is the payload —

* ``0``: TOC JSON, compressed here, found as containers/storage finds it: a
  ``manifest-position`` with the right sizes and the right ``manifest-checksum`` (so the JSON
  itself is what is fuzzed), through :func:`store.estargz.parse_manifest`;
* ``1``: as 0, but the payload is the compressed frame itself (bytes from the wire); its first
  4 bytes are the uncompressed size the position claims;
* ``2``: the payload (as text) is the value of both zstd:chunked annotations, parsed by
  :func:`store.estargz.zstd_chunked_layer`;
* ``3`` and ``4``: as 0 and 1, but found through a zstd:chunked footer (stargz-snapshotter's
  zstdchunked, read by :func:`store.estargz.toc.parse_toc`).

Every TOC goes through :class:`store.estargz.LayerIndex` and the index's invariants; forms 0
and 1 also through the header-frame spans the store measures the tar with.
"""

from __future__ import annotations

import itertools

import zstandard

from fuzz.targets._common import TOC_OFFSET, check_index, index_from_compressed_toc
from store.estargz import (
    LEGACY_MANIFEST_CHECKSUM_KEY,
    LEGACY_MANIFEST_POSITION_KEY,
    ZSTD_FOOTER_SIZE,
    EstargzError,
    Footer,
    FooterKind,
    LayerIndex,
    ManifestPosition,
    manifest_checksum,
    parse_manifest,
    zstd_chunked_layer,
)
from store.estargz.zstdchunked import file_frames, header_frames

ALLOWED: tuple[type[BaseException], ...] = (EstargzError,)


def one_input(data: bytes) -> None:
    if not data:
        return
    form, payload = data[0] % 5, data[1:]
    if form == 2:
        text = payload.decode("utf-8", "replace")
        layer = zstd_chunked_layer(
            {LEGACY_MANIFEST_CHECKSUM_KEY: text, LEGACY_MANIFEST_POSITION_KEY: text}
        )
        assert layer is not None
        assert layer.position.offset >= 8 and layer.position.length > 0
        return
    usize: int | None
    if form in (0, 3):
        compressed = zstandard.ZstdCompressor(level=1).compress(payload)
        usize = len(payload)
    else:
        usize = int.from_bytes(payload[:4], "little") if len(payload) >= 4 else None
        compressed = payload[4:]
    if form in (3, 4):
        footer = Footer(
            FooterKind.ZSTD_CHUNKED, TOC_OFFSET, len(compressed), usize, ZSTD_FOOTER_SIZE
        )
        index_from_compressed_toc(compressed, footer)
        return
    if not compressed or not usize:
        return
    position = ManifestPosition(TOC_OFFSET, len(compressed), usize)
    toc = parse_manifest(compressed, position, manifest_checksum(compressed))
    assert toc.digest == manifest_checksum(compressed) and toc.compression == "zstd"
    check_index(LayerIndex.from_toc(toc), TOC_OFFSET)
    spans = header_frames(file_frames(toc.entries), toc.offset)
    assert all(lo < hi for lo, hi in spans), spans
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans
