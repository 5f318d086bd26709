"""Footers of the three layouts we read, and which tail bytes to fetch to reach the TOC.

Sans-IO: callers fetch bytes however they like (sync file, async ranged HTTP) and hand them
here. Layouts (checked against containerd/stargz-snapshotter ``estargz`` and
``estargz/zstdchunked``, v0.12):

* eStargz, 51 bytes: an empty gzip member whose header has FEXTRA with subfield ``SG``
  (length 22) holding ``%016x`` TOC offset + ``STARGZ``, then an empty stored block.
* legacy stargz, 47 bytes: the same without the ``SG`` subfield header (extra = 22 bytes).
* (not served) eStargz with an external TOC (stargz-snapshotter >= 0.13,
  ``--estargz-external-toc``), 46 bytes: the same empty gzip member with ``SG`` subfield
  ``STARGZEXTERNALTOC`` and no offset; the TOC is in a separate "TOC image". Recognised only
  to name it in the refusal.
* zstd:chunked, 48 bytes: a zstd skippable frame (magic ``50 2a 4d 18``, length 40) holding
  little-endian u64 TOC offset, compressed TOC length, uncompressed TOC length, manifest type
  (1) and the magic ``GnUlInUx``. The offset points at the zstd-compressed TOC JSON itself.
  containers/storage ``pkg/chunked`` writes a 64-byte payload instead (72 bytes in all): the
  same four fields, then tar-split offset and lengths, then ``GNUlInUx``.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

from .errors import BadFooter, TruncatedBlob

ESTARGZ_FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
EXTERNAL_TOC_FOOTER_SIZE = 46
EXTERNAL_TOC_MARKER = b"STARGZEXTERNALTOC"
ZSTD_FOOTER_SIZE = 48  # stargz-snapshotter's zstdchunked: 8 + 40
ZSTD_FOOTER_V2_SIZE = 72  # containers/storage pkg/chunked (with tar-split): 8 + 64
MAX_FOOTER_SIZE = ZSTD_FOOTER_V2_SIZE
ZSTD_SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_CHUNKED_MAGIC = b"GnUlInUx"
ZSTD_CHUNKED_MAGICS = (ZSTD_CHUNKED_MAGIC, b"GNUlInUx")  # containers/storage spells it so
ZSTD_MANIFEST_TYPE_CRFS = 1
TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"
# The ``.prefetch.landmark`` TOC entry's key for the byte ranges of the prioritized region
# worth prefetching: a flat JSON list ``[start, end, start, end, …]`` of compressed blob
# offsets, ascending and not overlapping. This project's extension (the Go reader ignores
# unknown keys, as every ``encoding/json`` decoder does): written when the access trace shows
# files read in part, whose unread chunks a whole-region prefetch would fetch for nothing.
PREFETCH_RANGES_KEY = "lazybench.prefetchRanges"
# At most this many ranges (a longer list is ignored: the whole region is prefetched). The
# writer joins the nearest to stay within it; the landmark entry stays a few KiB of TOC text.
MAX_PREFETCH_RANGES = 1024
# The ``.prefetch.landmark`` TOC entry's key for the order to fetch the region in: a flat
# JSON list ``[start, end, rank, start, end, rank, …]`` of compressed blob ranges before the
# landmark, not overlapping, each with ``rank``, the number of the traced read that first took
# its bytes (one count across the image's layers, so a store fetching several layers at once
# can interleave them: lower ranks first), listed by rank. A big file read a page at a time
# interleaves with the files read meanwhile: a JVM reads ``libjvm.so``, then ``classes.jsa``
# whole, then more of both ``libjvm.so`` and ``modules``, from two layers. This project's
# extension, beside :data:`PREFETCH_RANGES_KEY` (which stays ascending, for readers that know
# only it): a reader that knows it downloads the region's pieces by rank; without it, in blob
# order (the region's files are in first-access order).
PREFETCH_ORDER_KEY = "lazybench.prefetchOrder"
# At most this many ranges (a longer list is ignored: blob order). The writer coarsens the
# order to stay within it; ~25 bytes of TOC text per range.
MAX_PREFETCH_ORDER = 2048
# Tail bytes fetched in one go: enough for the TOC of most layers (a compressed TOC is
# ~25 bytes per entry), so footer and TOC usually come in a single read.
DEFAULT_TAIL_FETCH = 1 << 20


class FooterKind(enum.Enum):
    ESTARGZ = "estargz"
    LEGACY_STARGZ = "stargz"
    ZSTD_CHUNKED = "zstd:chunked"

    @property
    def compression(self) -> str:
        return "zstd" if self is FooterKind.ZSTD_CHUNKED else "gzip"


@dataclass(frozen=True, slots=True)
class Footer:
    kind: FooterKind
    toc_offset: int
    toc_size: int  # compressed TOC bytes: [toc_offset, toc_offset + toc_size)
    toc_uncompressed_size: int | None  # known for zstd:chunked only
    footer_size: int

    @property
    def compression(self) -> str:
        return self.kind.compression


def estargz_footer_bytes(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer for a TOC at ``toc_offset`` (what the Go writer emits)."""
    payload = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(payload)) + payload
    header = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", len(extra)) + extra
    # Empty final stored block, then CRC32 and ISIZE of nothing.
    return header + b"\x01\x00\x00\xff\xff" + b"\x00" * 8


def tail_fetch_size(blob_size: int, guess: int = DEFAULT_TAIL_FETCH) -> int:
    """How many bytes from the end to fetch first: footer plus (usually) the whole TOC."""
    return max(0, min(blob_size, max(guess, MAX_FOOTER_SIZE)))


def toc_range(footer: Footer, blob_size: int) -> tuple[int, int]:
    """``(start, end)`` of the compressed TOC bytes in the blob (end exclusive)."""
    return footer.toc_offset, footer.toc_offset + footer.toc_size


def toc_bytes_from_tail(tail: bytes, blob_size: int, footer: Footer) -> bytes | None:
    """The compressed TOC sliced out of ``tail`` (the blob's last bytes), or None if the
    tail does not reach back far enough and a second read of :func:`toc_range` is needed."""
    start, end = toc_range(footer, blob_size)
    tail_start = blob_size - len(tail)
    if start < tail_start:
        return None
    return tail[start - tail_start : end - tail_start]


def parse_footer(tail: bytes, blob_size: int) -> Footer:
    """Parse the footer from ``tail``, the last ``len(tail)`` bytes of a ``blob_size`` blob.

    Tries zstd:chunked, then eStargz, then legacy stargz (the order the Go reader uses for
    gzip). Raises :class:`BadFooter` or :class:`TruncatedBlob`.
    """
    if len(tail) > blob_size:
        raise ValueError(f"tail of {len(tail)} bytes is longer than the blob ({blob_size})")
    if blob_size < LEGACY_FOOTER_SIZE or len(tail) < LEGACY_FOOTER_SIZE:
        raise TruncatedBlob(
            f"blob of {blob_size} bytes is too short for any footer "
            f"(need at least {LEGACY_FOOTER_SIZE} bytes at the end, got {len(tail)})"
        )
    errors: list[str] = []
    if len(tail) >= ZSTD_FOOTER_SIZE and tail[-8:] in ZSTD_CHUNKED_MAGICS:
        return _parse_zstd(tail, blob_size)
    for size, parse in ((ESTARGZ_FOOTER_SIZE, _parse_estargz), (LEGACY_FOOTER_SIZE, _parse_legacy)):
        if len(tail) < size:
            continue
        try:
            toc_offset = parse(tail[-size:])
        except _NotThisFooter as exc:
            errors.append(str(exc))
            continue
        kind = FooterKind.ESTARGZ if size == ESTARGZ_FOOTER_SIZE else FooterKind.LEGACY_STARGZ
        toc_end = blob_size - size
        if not 0 <= toc_offset < toc_end:
            raise BadFooter(
                f"{kind.value} footer at offset {toc_end}: TOC offset {toc_offset} is outside "
                f"the blob's payload [0, {toc_end})"
            )
        return Footer(kind, toc_offset, toc_end - toc_offset, None, size)
    if _is_external_toc(tail[-EXTERNAL_TOC_FOOTER_SIZE:]):
        raise BadFooter(
            f"the footer at offset {blob_size - EXTERNAL_TOC_FOOTER_SIZE} marks an eStargz layer "
            f"with its TOC outside the blob ({EXTERNAL_TOC_MARKER.decode()}): the TOC is in a "
            "separate TOC image, which this store does not read; convert the image without "
            "--estargz-external-toc"
        )
    raise BadFooter(
        f"no eStargz, stargz or zstd:chunked footer in the last {ESTARGZ_FOOTER_SIZE} bytes "
        f"of the {blob_size}-byte blob ({'; '.join(dict.fromkeys(errors))})"
    )


class _NotThisFooter(Exception):
    pass


def _gzip_extra(footer: bytes) -> bytes:
    """The FEXTRA field of a footer that must be an empty gzip member."""
    if footer[:3] != b"\x1f\x8b\x08":
        raise _NotThisFooter("no gzip magic")
    if not footer[3] & 0x04:
        raise _NotThisFooter("gzip header has no FEXTRA")
    (xlen,) = struct.unpack_from("<H", footer, 10)
    extra = footer[12 : 12 + xlen]
    if len(extra) != xlen:
        raise _NotThisFooter("FEXTRA runs past the footer")
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(footer)
    except zlib.error as exc:
        raise _NotThisFooter(f"not a gzip member: {exc}") from None
    if out or not d.eof or d.unused_data:
        raise _NotThisFooter("not an empty gzip member")
    return extra


def _toc_offset_field(payload: bytes) -> int:
    if len(payload) != 22 or payload[16:] != b"STARGZ":
        raise _NotThisFooter("no STARGZ marker")
    try:
        text = payload[:16].decode("ascii")
        return int(text, 16)
    except ValueError:
        raise _NotThisFooter(f"TOC offset {payload[:16]!r} is not hex") from None


def _parse_estargz(footer: bytes) -> int:
    extra = _gzip_extra(footer)
    if len(extra) != 26 or extra[:2] != b"SG" or struct.unpack_from("<H", extra, 2)[0] != 22:
        raise _NotThisFooter("no SG subfield of length 22")
    return _toc_offset_field(extra[4:])


def _is_external_toc(footer: bytes) -> bool:
    """Whether ``footer`` is the 46-byte footer of an eStargz layer with an external TOC."""
    try:
        extra = _gzip_extra(footer)
    except _NotThisFooter:
        return False
    marker = EXTERNAL_TOC_MARKER
    return extra == b"SG" + struct.pack("<H", len(marker)) + marker


def _parse_legacy(footer: bytes) -> int:
    return _toc_offset_field(_gzip_extra(footer))


def _parse_zstd(tail: bytes, blob_size: int) -> Footer:
    for size in (ZSTD_FOOTER_V2_SIZE, ZSTD_FOOTER_SIZE):
        footer = tail[-size:]
        if (
            len(footer) == size
            and footer[:4] == ZSTD_SKIPPABLE_MAGIC
            and struct.unpack_from("<I", footer, 4)[0] == size - 8
        ):
            break
    else:
        raise BadFooter(
            f"zstd:chunked magic at offset {blob_size - 8} but no 40- or 64-byte zstd "
            f"skippable frame holding the footer"
        )
    where = f"zstd:chunked footer at offset {blob_size - size}"
    offset, csize, usize, mtype = struct.unpack_from("<QQQQ", footer, 8)
    if mtype != ZSTD_MANIFEST_TYPE_CRFS:
        raise BadFooter(f"{where}: manifest type {mtype} is not CRFS (1)")
    payload_end = blob_size - size
    if not (8 <= offset <= payload_end and csize <= payload_end - offset):
        raise BadFooter(
            f"{where}: TOC [{offset}, {offset + csize}) is outside the payload [0, {payload_end})"
        )
    return Footer(FooterKind.ZSTD_CHUNKED, offset, csize, usize, size)
