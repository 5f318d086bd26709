"""Decompress one chunk's member(s) and verify it against ``chunkDigest``.

Sans-IO: the caller fetched ``[chunk.offset, chunk.compressed_end)`` however it likes. Only
``inner_offset + size`` bytes are inflated (the member may hold tar padding and following
headers after the payload), so a hostile member cannot make us inflate gigabytes.
"""

from __future__ import annotations

import hashlib
import io
import zlib

from .errors import ChunkDigestMismatch, CorruptChunk
from .index import Chunk

try:  # zlib-ng inflates ~1.8x faster than stdlib zlib: this is the store's read path
    from zlib_ng import zlib_ng as _inflate

    _INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error, _inflate.error)
except ImportError:  # pragma: no cover - zlib-ng is a dependency; stdlib zlib still works
    _inflate = zlib  # type: ignore[no-redef]
    _INFLATE_ERRORS = (zlib.error,)


def decompress_chunk(chunk: Chunk, compressed: bytes, *, verify: bool = True) -> bytes:
    """The chunk's file bytes, checked against ``chunk.digest`` (when ``verify``).

    A chunk without a ``chunkDigest`` cannot be verified: with ``verify`` it is refused
    (:class:`ChunkDigestMismatch`), because the store never serves unverified bytes.
    """
    where = f"{chunk.name!r} chunk at file offset {chunk.chunk_offset} (blob offset {chunk.offset})"
    want = chunk.inner_offset + chunk.size
    if chunk.compression == "zstd":
        out = _unzstd(compressed, want, where)
    else:
        out = _gunzip(compressed, want, where)
    payload = out[chunk.inner_offset : want]
    if len(payload) != chunk.size:
        raise CorruptChunk(
            f"{where}: inflated to {max(0, len(out) - chunk.inner_offset)} bytes past inner "
            f"offset {chunk.inner_offset}, expected {chunk.size}"
        )
    if verify:
        if not chunk.digest.startswith("sha256:"):
            raise ChunkDigestMismatch(f"{where}: no sha256 chunkDigest, cannot verify")
        got = "sha256:" + hashlib.sha256(payload).hexdigest()
        if got != chunk.digest:
            raise ChunkDigestMismatch(f"{where}: content hashes to {got}, TOC says {chunk.digest}")
    return payload


def _gunzip(data: bytes, want: int, where: str) -> bytes:
    out = bytearray()
    rest = data
    try:
        while len(out) < want and rest:
            d = _inflate.decompressobj(wbits=31)
            out += d.decompress(rest, want - len(out))
            if not d.eof:
                break  # got what we wanted (or the data ran out: checked by the caller)
            rest = d.unused_data
    except _INFLATE_ERRORS as exc:
        raise CorruptChunk(f"{where}: not gzip: {exc}") from None
    return bytes(out)


def _unzstd(data: bytes, want: int, where: str) -> bytes:
    """At most ``want`` bytes of the concatenated zstd frames in ``data`` (a frame that
    inflates to more is cut there, never inflated whole)."""
    import zstandard

    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=True
        )
        while len(out) < want:
            piece = reader.read(want - len(out))
            if not piece:
                break
            out += piece
    except zstandard.ZstdError as exc:
        raise CorruptChunk(f"{where}: not zstd: {exc}") from None
    return bytes(out)
