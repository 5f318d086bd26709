"""The zstd:chunked TOC as containers/storage writes it, from the wire to the validated index.

Input: the first byte picks the form, the rest is the payload —

* ``0``: TOC JSON, compressed here, described by a ``manifest-position`` with the right sizes
  and checked against the right ``manifest-checksum`` (so the JSON itself is what is fuzzed);
* ``1``: the compressed frame itself (bytes from the wire); the next 4 payload bytes are the
  uncompressed size the position claims;
* ``2``: the payload (as text) is the value of both zstd:chunked annotations, parsed by
  :func:`store.estargz.zstd_chunked_layer`.

Forms 0 and 1 go through :func:`store.estargz.parse_manifest` and
:class:`store.estargz.LayerIndex`; the index's invariants are checked (clean paths under
directories, chunks covering each file in order, every frame before the TOC), and so are the
header-frame spans the store measures the tar with.
"""

from __future__ import annotations

import itertools

import zstandard

from store.estargz import (
    LEGACY_MANIFEST_CHECKSUM_KEY,
    LEGACY_MANIFEST_POSITION_KEY,
    EstargzError,
    LayerIndex,
    ManifestPosition,
    clean_name,
    manifest_checksum,
    parse_manifest,
    zstd_chunked_layer,
)
from store.estargz.zstdchunked import file_frames, header_frames

ALLOWED: tuple[type[BaseException], ...] = (EstargzError,)

TOC_OFFSET = 1 << 40  # where the TOC claims to be: every frame must come before it


def one_input(data: bytes) -> None:
    if not data:
        return
    form, payload = data[0] % 3, data[1:]
    if form == 2:
        text = payload.decode("utf-8", "replace")
        layer = zstd_chunked_layer(
            {LEGACY_MANIFEST_CHECKSUM_KEY: text, LEGACY_MANIFEST_POSITION_KEY: text}
        )
        assert layer is not None
        assert layer.position.offset >= 8 and layer.position.length > 0
        return
    if form == 0:
        compressed = zstandard.ZstdCompressor(level=1).compress(payload)
        usize = len(payload)
    else:
        usize = int.from_bytes(payload[:4].ljust(4, b"\0"), "little")
        compressed = payload[4:]
    if not compressed or not usize:
        return
    position = ManifestPosition(TOC_OFFSET, len(compressed), usize)
    toc = parse_manifest(compressed, position, manifest_checksum(compressed))
    assert toc.digest == manifest_checksum(compressed) and toc.compression == "zstd"
    index = LayerIndex.from_toc(toc)
    _check_index(index)
    spans = header_frames(file_frames(toc.entries), toc.offset)
    assert all(lo < hi for lo, hi in spans), spans
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans


def _check_index(index: LayerIndex) -> None:
    for path, entry in index.names():
        assert clean_name(path) == path, path
        if path:
            parent = index.lookup(path.rpartition("/")[0])
            assert parent is not None and parent.type == "dir", path
        if entry.type != "reg":
            continue
        pos = 0
        for c in entry.chunks:
            assert c.chunk_offset == pos and c.size > 0, (path, c)
            assert 0 <= c.offset < c.compressed_end <= TOC_OFFSET, (path, c)
            assert c.compression == "zstd"
            pos += c.size
        assert pos == entry.size, (path, pos, entry.size)
