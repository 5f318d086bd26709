"""Synchronous eStargz / zstd:chunked reader over a :class:`BlobSource`.

Built only from the sans-IO pieces (footer → TOC → :class:`LayerIndex` → chunks), so it
doubles as the reference for how the async store strings them together.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from .chunk import decompress_chunk
from .errors import FileDigestMismatch
from .footer import Footer, parse_footer, tail_fetch_size, toc_bytes_from_tail, toc_range
from .index import Entry, LayerIndex
from .source import BlobSource, read_exact
from .toc import Toc, parse_toc
from .zstdchunked import ZstdChunkedLayer, parse_manifest


class EstargzReader:
    def __init__(
        self,
        source: BlobSource,
        expected_toc_digest: str | None = None,
        *,
        tail_guess: int | None = None,
        zstd_chunked: ZstdChunkedLayer | None = None,
    ) -> None:
        """Read the footer and TOC; with ``zstd_chunked`` (a layer descriptor's zstd:chunked
        annotations, :func:`~store.estargz.zstdchunked.from_annotations`) the TOC is read where
        they say and checked against their checksum, as containers/storage does; the footer is
        still parsed (a zstd:chunked footer)."""
        self.source = source
        size = source.size()
        n = tail_fetch_size(size) if tail_guess is None else tail_fetch_size(size, tail_guess)
        tail = read_exact(source, size - n, n, "blob tail (footer)")
        self.footer: Footer = parse_footer(tail, size)
        if zstd_chunked is not None:
            start, end = zstd_chunked.toc_range
            toc_bytes = read_exact(source, start, end - start, f"zstd:chunked TOC at {start}")
            self.toc: Toc = parse_manifest(toc_bytes, zstd_chunked.position, zstd_chunked.checksum)
            self.index: LayerIndex = LayerIndex.from_toc(self.toc, self.footer)
            return
        toc_bytes = toc_bytes_from_tail(tail, size, self.footer)
        if toc_bytes is None:
            start, end = toc_range(self.footer, size)
            toc_bytes = read_exact(source, start, end - start, f"TOC at offset {start}")
        self.toc = parse_toc(toc_bytes, self.footer, expected_toc_digest)
        self.index = LayerIndex.from_toc(self.toc, self.footer)

    @property
    def toc_digest(self) -> str:
        return self.toc.digest

    def lookup(self, path: str) -> Entry:
        e = self.index.lookup(path)
        if e is None:
            raise FileNotFoundError(path)
        return e

    def read_file(self, path: str | Entry, offset: int = 0, size: int | None = None) -> bytes:
        """Bytes ``[offset, offset+size)`` of a regular file, every chunk verified."""
        e = self.lookup(path) if isinstance(path, str) else path
        if e.type != "reg":
            raise IsADirectoryError(e.name) if e.is_dir else ValueError(f"{e.name!r} is a {e.type}")
        if size is None:
            size = e.size - offset
        end = min(e.size, offset + size)
        out = bytearray()
        for c in self.index.chunks_for_range(e, offset, size):
            data = read_exact(self.source, c.offset, c.compressed_size, f"chunk of {c.name!r}")
            payload = decompress_chunk(c, data)
            lo = max(offset, c.chunk_offset) - c.chunk_offset
            hi = min(end, c.chunk_offset + c.size) - c.chunk_offset
            out += payload[lo:hi]
        return bytes(out)

    def iter_file(self, e: Entry) -> Iterator[bytes]:
        for c in e.chunks:
            data = read_exact(self.source, c.offset, c.compressed_size, f"chunk of {c.name!r}")
            yield decompress_chunk(c, data)

    def file_sha256(self, e: Entry) -> str:
        """Hex sha256 of a whole regular file (chunks verified on the way); checks the TOC
        ``digest`` of the file when there is one (:class:`FileDigestMismatch`)."""
        h = hashlib.sha256()
        for piece in self.iter_file(e):
            h.update(piece)
        got = h.hexdigest()
        if e.digest and e.digest != "sha256:" + got:
            raise FileDigestMismatch(
                f"{e.name!r}: content hashes to sha256:{got}, TOC digest says {e.digest}"
            )
        return got

    def verify_all(self) -> dict[str, str]:
        """Read and verify every regular file; returns ``{path: sha256 hex}`` (one per
        distinct file; hardlink names are not repeated)."""
        out: dict[str, str] = {}
        seen: set[int] = set()
        for _name, e in sorted(self.index.names(), key=lambda ne: ne[0]):
            if e.type == "reg" and id(e) not in seen:
                seen.add(id(e))
                out[e.name] = self.file_sha256(e)
        return out
