"""The TOC of a zstd:chunked layer: a zstd frame the footer points at, same JSON schema.

Input: first byte's low bit chooses the form — 0: the rest is TOC JSON, compressed here and
described by a footer with the right sizes; 1: the rest is taken as the compressed frame
itself (bytes from the wire), described by a footer that claims the next 4 bytes' value as
the uncompressed size. Both go through :func:`parse_toc` and :class:`LayerIndex`.
"""

from __future__ import annotations

import zstandard

from fuzz.targets._common import TOC_OFFSET, index_from_compressed_toc
from store.estargz import ZSTD_FOOTER_SIZE, EstargzError, Footer, FooterKind

ALLOWED: tuple[type[BaseException], ...] = (EstargzError,)


def one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1 == 0:
        compressed = zstandard.ZstdCompressor(level=1).compress(data[1:])
        usize: int | None = len(data) - 1
    else:
        usize = int.from_bytes(data[1:5], "little") if len(data) >= 5 else None
        compressed = data[5:]
    footer = Footer(FooterKind.ZSTD_CHUNKED, TOC_OFFSET, len(compressed), usize, ZSTD_FOOTER_SIZE)
    index_from_compressed_toc(compressed, footer)
