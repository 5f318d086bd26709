"""Helpers shared by the targets: wrapping TOC JSON as a layer would, index invariants."""

from __future__ import annotations

import io
import tarfile
import zlib

from store.estargz import Footer, FooterKind, LayerIndex, clean_name, toc_json_bytes
from store.estargz.toc import parse_toc

# Where the TOC claims to start in the (imaginary) blob: entry offsets are checked against it.
TOC_OFFSET = 1 << 40


def gzip_toc_member(toc_json: bytes) -> bytes:
    """``toc_json`` as the eStargz writer stores it: a tar entry in its own gzip member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc_json)
        tar.addfile(info, io.BytesIO(toc_json))
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    return z.compress(buf.getvalue()) + z.flush()


def index_from_compressed_toc(compressed: bytes, footer: Footer) -> LayerIndex:
    """The library's path from TOC bytes to a validated index, then the index's invariants."""
    toc = parse_toc(compressed, footer)
    assert toc.digest.startswith("sha256:"), toc.digest
    assert toc_json_bytes(compressed, footer) is not None
    index = LayerIndex.from_toc(toc, footer)
    check_index(index, footer.toc_offset)
    return index


def gzip_footer(compressed_toc: bytes) -> Footer:
    return Footer(FooterKind.ESTARGZ, TOC_OFFSET, len(compressed_toc), None, 51)


def check_index(index: LayerIndex, toc_offset: int) -> None:
    """What the store relies on once an index is built; a violation is a bug (AssertionError).

    - every path is clean (no ``..``, no empty or ``.`` parts) and its parents are directories;
    - a regular file's chunks cover ``[0, size)`` exactly, in order, and every chunk's
      compressed bytes lie before the TOC;
    - ranges asked of ``chunks_for_range`` come back covered.
    """
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
            assert 0 <= c.offset < c.compressed_end <= toc_offset, (path, c)
            pos += c.size
        assert pos == entry.size or (entry.size == 0 and not entry.chunks), (path, pos)
        if entry.size:
            got = index.chunks_for_range(entry, 0, entry.size)
            assert got and got[0].chunk_offset == 0, path
            assert got[-1].chunk_offset + got[-1].size == entry.size, path
