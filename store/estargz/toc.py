"""The TOC (``stargz.index.json``): decoding, digest check, and encoding for the writer.

The TOC digest is sha256 of the *uncompressed* TOC JSON bytes — what the manifest annotation
``containerd.io/snapshot/stargz/toc.digest`` carries. In gzip layers the JSON is the payload of
a tar entry named ``stargz.index.json`` inside its own gzip member; in zstd:chunked layers it
is a bare zstd frame (inside a skippable frame).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any

from .errors import InvalidToc, TocDigestMismatch
from .footer import TOC_TAR_NAME, Footer

# A TOC larger than this, uncompressed, is refused (a decompression bomb, not a layer).
MAX_TOC_SIZE = 1 << 30


@dataclass(slots=True)
class Toc:
    """A decoded TOC: the raw entry dicts in blob order, and where it came from."""

    version: int
    entries: list[dict[str, Any]]
    digest: str  # "sha256:<hex of the uncompressed JSON>"
    offset: int  # compressed offset of the TOC in the blob
    compression: str  # "gzip" | "zstd"
    json_size: int


def toc_digest(toc_json: bytes) -> str:
    return "sha256:" + hashlib.sha256(toc_json).hexdigest()


def parse_toc(data: bytes, footer: Footer, expected_digest: str | None = None) -> Toc:
    """Decode the compressed TOC bytes (see :func:`~store.estargz.footer.toc_range`).

    Checks the digest against ``expected_digest`` when given (:class:`TocDigestMismatch`);
    raises :class:`InvalidToc` if the bytes do not decode to a TOC object.
    """
    where = f"TOC at offset {footer.toc_offset}"
    raw = toc_json_bytes(data, footer)
    digest = toc_digest(raw)
    if expected_digest is not None and digest != expected_digest:
        raise TocDigestMismatch(
            f"{where}: digest {digest} does not match the expected {expected_digest}"
        )
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise InvalidToc(f"{where}: not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidToc(f"{where}: JSON is a {type(obj).__name__}, not an object")
    entries = obj.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InvalidToc(f"{where}: 'entries' is not a list of objects")
    version = obj.get("version")
    if version != 1:
        raise InvalidToc(f"{where}: unsupported TOC version {version!r}")
    if footer.compression == "zstd":
        from .zstdchunked import normalize_entries

        entries = normalize_entries(entries)
    return Toc(version, entries, digest, footer.toc_offset, footer.compression, len(raw))


def toc_json_bytes(data: bytes, footer: Footer) -> bytes:
    """The uncompressed TOC JSON from the compressed TOC bytes (:func:`toc_range`): a gzip
    member holding the ``stargz.index.json`` tar entry, or a zstd frame. Its sha256 is the TOC
    digest (:func:`toc_digest`). For callers that decode the JSON their own way (e.g. into
    compact records for huge layers); raises :class:`InvalidToc`."""
    where = f"TOC at offset {footer.toc_offset}"
    if footer.compression == "zstd":
        return _unzstd(data, footer, where)
    return _toc_json_from_gzip_tar(data, where)


def _unzstd(data: bytes, footer: Footer, where: str) -> bytes:
    import zstandard

    limit = footer.toc_uncompressed_size or MAX_TOC_SIZE
    try:
        d = zstandard.ZstdDecompressor().decompressobj()
        raw = d.decompress(data)
    except zstandard.ZstdError as exc:
        raise InvalidToc(f"{where}: zstd TOC does not decompress: {exc}") from None
    if len(raw) > limit:
        raise InvalidToc(f"{where}: TOC inflates past {limit} bytes")
    if footer.toc_uncompressed_size is not None and len(raw) != footer.toc_uncompressed_size:
        raise InvalidToc(
            f"{where}: TOC inflated to {len(raw)} bytes, footer says {footer.toc_uncompressed_size}"
        )
    return raw


def _toc_json_from_gzip_tar(data: bytes, where: str) -> bytes:
    out = bytearray()
    rest = data
    try:
        while rest:
            d = zlib.decompressobj(wbits=31)
            out += d.decompress(rest, MAX_TOC_SIZE + 4096 - len(out))
            if d.unconsumed_tail:
                raise InvalidToc(f"{where}: TOC inflates past {MAX_TOC_SIZE} bytes")
            if not d.eof:
                raise InvalidToc(f"{where}: TOC gzip member is truncated")
            rest = d.unused_data
    except zlib.error as exc:
        raise InvalidToc(f"{where}: TOC is not gzip: {exc}") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(bytes(out)), mode="r:") as tar:
            info = tar.next()
            if info is None:
                raise InvalidToc(f"{where}: TOC member holds no tar entry")
            if info.name != TOC_TAR_NAME or not info.isreg():
                raise InvalidToc(f"{where}: first tar entry is {info.name!r}, not {TOC_TAR_NAME}")
            f = tar.extractfile(info)
            assert f is not None
            raw = f.read()
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidToc(f"{where}: TOC member is not a tar entry: {exc}") from None
    if len(raw) != info.size:
        raise InvalidToc(f"{where}: TOC entry truncated ({len(raw)} of {info.size} bytes)")
    return raw


def encode_toc(entries: list[dict[str, Any]]) -> bytes:
    """TOC JSON laid out like Go's ``json.MarshalIndent(toc, "", "\\t")``.

    Names that are not valid UTF-8 (carried as surrogate escapes) get U+FFFD for each bad
    byte, as Go's encoder does; the tar headers keep the original bytes.
    """
    text = json.dumps({"version": 1, "entries": entries}, indent="\t", ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace").encode("utf-8")
