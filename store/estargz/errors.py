"""Typed errors for malformed eStargz / zstd:chunked input.

Why typed: the store turns each class into a different reaction (refuse the layer, EIO on
one read, retry a fetch), and the CLI prints them as one line. Every message says *what* is
wrong and *where* (offset, entry name, digest) so a bad layer can be found without a debugger.
"""

from __future__ import annotations


class EstargzError(Exception):
    """Base class: the blob or tar is not a valid eStargz layer (or not what was promised)."""


class BadFooter(EstargzError):
    """The blob's last bytes are not an eStargz, legacy stargz or zstd:chunked footer."""


class TruncatedBlob(EstargzError):
    """The blob is shorter than its footer or TOC say, or a read returned fewer bytes."""


class InvalidToc(EstargzError):
    """The TOC cannot be decoded, is not JSON, or its entries are inconsistent."""


class TocOutOfRange(InvalidToc):
    """A TOC entry points outside the blob (an offset at or past the TOC itself)."""


class InvalidEntryName(InvalidToc):
    """An entry name (or hardlink target) would escape the layer's root directory."""


class CorruptChunk(EstargzError):
    """A chunk's compressed bytes do not decompress to the size the TOC promises."""


class ChunkDigestMismatch(EstargzError):
    """A chunk's decompressed bytes do not hash to its ``chunkDigest``: never serve them."""


class TocDigestMismatch(EstargzError):
    """The TOC JSON does not hash to the expected digest (manifest annotation)."""


class FileDigestMismatch(EstargzError):
    """A whole regular file does not hash to its TOC ``digest``."""


class InvalidLayerTar(EstargzError):
    """The writer's input cannot be written as a layer: not a readable (plain, gzip or zstd)
    tar stream (:class:`UnreadableLayerTar`), or an entry the format cannot carry."""


class UnreadableLayerTar(InvalidLayerTar):
    """The writer's input does not read as a tar stream at all: its compression or tar
    framing is damaged (a CRC or length that does not match), or it is no tar."""
