"""zstd:chunked as containers/storage writes it: annotations, TOC ("manifest"), writer.

Facts, read from containers/storage ``pkg/chunked`` (``compressor/compressor.go``,
``internal/compression.go`` — moved to ``internal/minimal/compression.go`` in newer releases —,
``compression_linux.go``, ``toc/toc.go``) and checked against blobs written here by skopeo 1.9.3
(containers/storage 1.43, the compressor podman 4.3 uses) and skopeo 1.18 (containers/storage
1.57, podman 5.4's, in a Debian trixie root) — both are test vectors:

* The blob is a concatenation of zstd frames; decompressed in one go it is the layer tar.
  Compression restarts (a new frame) where each regular file's payload starts and at each of
  its chunks; the tar headers (and the previous payload's padding) of the entries that follow
  ride in a frame of their own. Then the TOC in a *skippable* frame (magic ``50 2a 4d 18``,
  u32 LE length, payload = the zstd-compressed TOC JSON), then the footer, another skippable
  frame. Plain zstd decoders skip both, so the blob still decompresses to the tar.
* Two generations of that tail:

  - containers/storage < ~1.45 (podman 4.3): footer payload 40 bytes = u64 LE TOC offset,
    compressed length, uncompressed length, manifest type (1 = CRFS), magic ``GnUlInUx``;
    layer annotations ``io.containers.zstd-chunked.manifest-checksum`` and
    ``io.containers.zstd-chunked.manifest-position``.
  - newer (podman 5.x): after the TOC frame a *tar-split* frame (skippable, payload = the
    zstd-compressed JSON lines of github.com/vbatts/tar-split ``tar/storage``:
    ``{"type":2,"payload":<base64 raw tar bytes>,"position":N}`` for headers and padding,
    ``{"type":1,"name":…,"size":…,"payload":<base64 CRC-64/ISO of the contents, null when
    empty>,"position":N}`` per entry); footer payload 64 bytes =
    the four fields above, then tar-split offset, compressed and uncompressed length, then
    magic ``GNUlInUx``; annotations under ``io.github.containers.zstd-chunked.`` plus
    ``…tarsplit-position`` (``offset:length:uncompressed``); the TOC gains ``tarSplitDigest``
    (sha256 of the *compressed* tar-split bytes). This writer also keeps the tar's record
    padding after the end-of-archive marker in the last frame; 1.43's drops it.

* ``manifest-position`` is ``offset:length:uncompressedLength:type``: the offset of the
  compressed TOC (just past the skippable frame's 8-byte header), its compressed and
  uncompressed sizes, type 1.
* ``manifest-checksum`` is ``sha256:`` of the **compressed** TOC bytes (exactly
  ``[offset, offset+length)``, no skippable header). containers/storage ≥ 1.54 takes this
  annotation, unchanged, as the layer's TOC digest (``toc.GetTOCDigest``: the eStargz
  annotation ``containerd.io/snapshot/stargz/toc.digest`` first, else
  ``io.github.containers.zstd-chunked.manifest-checksum``; both present is an error) and
  checks the fetched TOC bytes against it before decompressing (``validateBlob``). An
  additional layer store is therefore looked up by that value, and so we verify it here.
  Only the ``io.github.`` key is a TOC digest there: layers written by podman 4.3 (the
  ``io.containers.`` keys) are looked up by compressed digest only.
* TOC JSON: ``{"version":1,"entries":[…]}`` (compact ``json.Marshal``), entry fields
  ``type, name, linkName, mode, size, uid, gid, modtime, accesstime, changetime, devMajor,
  devMinor, xattrs`` (base64 values), ``digest`` (``sha256:`` of the whole file), ``offset``
  (where the file's first frame starts), ``endOffset`` (where its last frame ends),
  ``chunkSize, chunkOffset, chunkDigest`` (``sha256:`` of the chunk's bytes), ``chunkType``
  (``""`` data, ``"zeros"`` a run of zero bytes — containers/storage 1.43 writes them already;
  the frame still holds the zeros). A file in one frame has no chunk fields: its ``digest`` is
  its only chunk's digest. A file in several has ``chunkSize``/``chunkDigest`` on the ``reg``
  entry (its first chunk) followed by ``chunk`` entries carrying ``offset`` but no
  ``endOffset`` (a chunk's frame ends where the next chunk's starts, the last at the file's
  ``endOffset``). No ``userName``/``groupName``, no ``innerOffset`` (always 0).

:func:`parse_manifest` turns the verified TOC into a :class:`~store.estargz.toc.Toc` whose
entries the one validated index (:class:`~store.estargz.index.LayerIndex`) builds a tree
from: :func:`normalize_entries` gives single-frame files their ``chunkDigest`` and checks chunk
types; ``endOffset`` bounds each frame exactly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar, Literal

import zstandard

from .errors import (
    BadFooter,
    InvalidLayerTar,
    InvalidToc,
    TocDigestMismatch,
    UnreadableLayerTar,
)
from .footer import (
    ZSTD_CHUNKED_MAGIC,
    ZSTD_MANIFEST_TYPE_CRFS,
    ZSTD_SKIPPABLE_MAGIC,
    Footer,
    FooterKind,
)
from .index import LayerIndex, clean_name
from .toc import (
    DEFAULT_LIMITS,
    MAX_TOC_SIZE,
    WHOLE_DECODE_MAX,
    RawEntry,
    Toc,
    TocLimits,
    iter_toc_entries,
    toc_json_pieces,
    typed_toc_entries,
)

# podman ≥ 5 / containers/storage ≥ ~1.45 (internal/minimal/compression.go)
MANIFEST_CHECKSUM_KEY = "io.github.containers.zstd-chunked.manifest-checksum"
MANIFEST_POSITION_KEY = "io.github.containers.zstd-chunked.manifest-position"
TARSPLIT_POSITION_KEY = "io.github.containers.zstd-chunked.tarsplit-position"
# podman 4.3 / containers/storage 1.43 (internal/compression.go)
LEGACY_MANIFEST_CHECKSUM_KEY = "io.containers.zstd-chunked.manifest-checksum"
LEGACY_MANIFEST_POSITION_KEY = "io.containers.zstd-chunked.manifest-position"
ZSTD_CHUNKED_MAGIC_V2 = b"GNUlInUx"
ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"  # RFC 8878 3.1.1
CHUNK_TYPES = ("", "zeros")
# containers/storage archive.Compression: Uncompressed, Bzip2, Gzip, Xz, Zstd
ZSTD_COMPRESSION = 4

Generation = Literal["podman4", "podman5"]
# What a writer makes when not told: podman 4.3's layout (this machine's podman).
DEFAULT_GENERATION: Generation = "podman4"
# A position field: ASCII digits that fit a u64, as Go's strconv.ParseUint reads them
# (str.isdigit also takes "²", which int() refuses, and int() refuses 4301 digits).
_DECIMAL = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True, slots=True)
class ManifestPosition:
    """Where the compressed TOC is: ``[offset, offset + length)``; ``manifest-position``."""

    offset: int
    length: int
    uncompressed_length: int
    manifest_type: int = ZSTD_MANIFEST_TYPE_CRFS

    @classmethod
    def parse(cls, value: str, key: str = MANIFEST_POSITION_KEY) -> ManifestPosition:
        """Parse ``offset:length:uncompressed:type``; :class:`InvalidToc` names the key."""
        parts = value.split(":")
        if len(parts) != 4 or not all(_DECIMAL.fullmatch(p) for p in parts):
            raise InvalidToc(f"annotation {key}={value!r} is not offset:length:size:type")
        offset, length, usize, mtype = (int(p) for p in parts)
        if mtype != ZSTD_MANIFEST_TYPE_CRFS:
            raise InvalidToc(f"annotation {key}={value!r}: manifest type {mtype} is not CRFS (1)")
        if offset < 8 or length <= 0 or usize <= 0 or usize > MAX_TOC_SIZE:
            raise InvalidToc(f"annotation {key}={value!r}: offset or sizes out of range")
        return cls(offset, length, usize, mtype)

    def __str__(self) -> str:
        return f"{self.offset}:{self.length}:{self.uncompressed_length}:{self.manifest_type}"


@dataclass(frozen=True, slots=True)
class ZstdChunkedLayer:
    """A layer descriptor's zstd:chunked annotations, parsed (:func:`from_annotations`)."""

    checksum: str  # sha256 of the compressed TOC: the TOC digest containers/storage uses
    position: ManifestPosition
    generation: Generation  # which annotation keys: podman4 = io.containers., podman5 = io.github.
    tar_split: tuple[int, int, int] | None = None  # offset, length, uncompressed length

    @property
    def toc_range(self) -> tuple[int, int]:
        return self.position.offset, self.position.offset + self.position.length


def from_annotations(annotations: Mapping[str, str]) -> ZstdChunkedLayer | None:
    """The zstd:chunked facts of a layer descriptor, None if it carries none.

    Raises :class:`InvalidToc` when the annotations are there but malformed (a value that is
    not a string, a checksum that is not ``sha256:<64 hex>``, a position that is not four
    integers, one key without the other).
    """
    for gen, ck, pk in (
        ("podman5", MANIFEST_CHECKSUM_KEY, MANIFEST_POSITION_KEY),
        ("podman4", LEGACY_MANIFEST_CHECKSUM_KEY, LEGACY_MANIFEST_POSITION_KEY),
    ):
        checksum, position = annotations.get(ck), annotations.get(pk)
        if checksum is None and position is None:
            continue
        if checksum is None or position is None:
            missing = ck if checksum is None else pk
            raise InvalidToc(f"zstd:chunked layer without its {missing} annotation")
        for key in (ck, pk, TARSPLIT_POSITION_KEY):
            if key in annotations and not isinstance(annotations[key], str):
                raise InvalidToc(f"annotation {key}={annotations[key]!r} is not a string")
        if not _is_sha256(checksum):
            raise InvalidToc(f"annotation {ck}={checksum!r} is not a sha256 digest")
        tar_split = None
        ts = annotations.get(TARSPLIT_POSITION_KEY) if gen == "podman5" else None
        if ts is not None:
            parts = ts.split(":")
            if len(parts) != 3 or not all(_DECIMAL.fullmatch(p) for p in parts):
                raise InvalidToc(f"annotation {TARSPLIT_POSITION_KEY}={ts!r} is malformed")
            tar_split = (int(parts[0]), int(parts[1]), int(parts[2]))
        return ZstdChunkedLayer(checksum, ManifestPosition.parse(position, pk), gen, tar_split)  # type: ignore[arg-type]
    return None


def manifest_checksum(compressed_toc: bytes) -> str:
    """``sha256:`` of the compressed TOC bytes: the ``manifest-checksum`` / TOC digest."""
    return "sha256:" + hashlib.sha256(compressed_toc).hexdigest()


def toc_json_digest(
    compressed: bytes, position: ManifestPosition, limits: TocLimits = DEFAULT_LIMITS
) -> str:
    """``sha256:`` of the TOC JSON the compressed TOC inflates to: the digest eStargz's TOC
    annotation gives (stargz-snapshotter's zstd writer annotates its blobs with both). Raises
    :class:`InvalidToc` if it does not inflate within ``limits``."""
    h = hashlib.sha256()
    for piece in toc_json_pieces(compressed, _annotated_footer(position), limits):
        h.update(piece)
    return "sha256:" + h.hexdigest()


def toc_json_and_digest(
    compressed: bytes, position: ManifestPosition, limits: TocLimits = DEFAULT_LIMITS
) -> tuple[bytes | None, str]:
    """The TOC JSON the compressed TOC inflates to, when small enough to be decoded whole
    (:data:`~store.estargz.toc.WHOLE_DECODE_MAX`; else ``None``), and its ``sha256:`` digest
    (:func:`toc_json_digest`). Inflating once and handing the JSON on saves the typed decode
    and the tar-split check an inflate each (python's 3.9 MB TOC: 16 ms each). Raises
    :class:`InvalidToc` as :func:`toc_json_digest`."""
    if position.uncompressed_length > WHOLE_DECODE_MAX:
        return None, toc_json_digest(compressed, position, limits)
    data = b"".join(toc_json_pieces(compressed, _annotated_footer(position), limits))
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def parse_manifest(
    compressed: bytes,
    position: ManifestPosition,
    expected_checksum: str | None,
    limits: TocLimits = DEFAULT_LIMITS,
) -> Toc:
    """Verify and decode the compressed TOC read from ``position`` into a :class:`Toc` (a
    list of entry dicts; the store streams :func:`manifest_entries` into the index instead).

    The returned :class:`Toc` carries the checksum as its digest and
    :func:`normalize_entries`'d entries; errors as :func:`manifest_entries`.
    """
    entries = list(manifest_entries(compressed, position, expected_checksum, limits))
    return Toc(
        1,
        entries,
        manifest_checksum(compressed),
        position.offset,
        "zstd",
        position.uncompressed_length,
    )


def manifest_entries(
    compressed: bytes,
    position: ManifestPosition,
    expected_checksum: str | None,
    limits: TocLimits = DEFAULT_LIMITS,
) -> Iterator[dict[str, Any]]:
    """The TOC's entries, normalized, decoded one at a time (the format library's streaming
    decoder, :func:`~store.estargz.toc.iter_toc_entries`, under ``limits``).

    Order (containers/storage ``readZstdChunkedManifest``): the compressed bytes must hash to
    ``expected_checksum`` (:class:`TocDigestMismatch`, raised before anything is yielded or
    decompressed); they must inflate to exactly ``position.uncompressed_length`` bytes of TOC
    JSON version 1 (:class:`InvalidToc`, possibly while iterating: discard what was built).
    """
    where = f"zstd:chunked TOC at offset {position.offset}"
    if len(compressed) != position.length:
        raise InvalidToc(f"{where}: got {len(compressed)} bytes, position says {position.length}")
    digest = manifest_checksum(compressed)
    if expected_checksum is not None and digest != expected_checksum:
        raise TocDigestMismatch(
            f"{where}: compressed TOC hashes to {digest}, the annotation says {expected_checksum}"
        )
    pieces = toc_json_pieces(compressed, _annotated_footer(position), limits)
    return _normalized(iter_toc_entries(pieces, where, limits))


def check_manifest_tar_split(
    compressed: bytes,
    position: ManifestPosition,
    tar_split: bytes | None,
    limits: TocLimits = DEFAULT_LIMITS,
    toc_json: bytes | None = None,
) -> None:
    """Refuse (:class:`InvalidToc`) a verified compressed TOC that does not match the layer's
    tar-split (``tar_split``: the compressed bytes ``tarsplit-position`` locates, None when it
    locates none), as containers/storage refuses it for its own partial pull:
    :func:`~store.estargz.tarsplit.check_tar_split`. ``toc_json``: the TOC JSON already
    inflated from ``compressed`` (:func:`toc_json_and_digest`), if at hand."""
    from .tarsplit import check_tar_split

    where = f"zstd:chunked TOC at offset {position.offset}"
    if toc_json is None:
        toc_json = b"".join(toc_json_pieces(compressed, _annotated_footer(position), limits))
    check_tar_split(toc_json, tar_split, where, limits)


def names_no_tar_split(toc_json: bytes) -> bool:
    """True when the TOC JSON has no ``tarSplitDigest`` key, *given* that
    :func:`typed_manifest_entries` accepted it: its keys are then spelled without escapes
    (:func:`~store.estargz.toc.typed_toc_entries`), so the key is absent when its plain
    spelling is, and every field :func:`~store.estargz.tarsplit.check_tar_split` decodes is
    of its type — that check would decode the whole TOC again (python's 14,554-entry TOC:
    about 25 ms under the GIL) only to find nothing to check."""
    return b'"tarSplitDigest"' not in toc_json


def _annotated_footer(position: ManifestPosition) -> Footer:
    """The TOC's place as the annotation gives it, in the shape the TOC decoders take (not
    read from a footer)."""
    return Footer(
        FooterKind.ZSTD_CHUNKED, position.offset, position.length, position.uncompressed_length, 0
    )


# A "chunkType" key with a value _normalize accepts. The key spelled plainly (no escapes:
# typed_toc_entries refuses any \u) can only be a key: inside a string value its quotes would
# be escaped.
_CHUNK_TYPE_KEY = b'"chunkType"'
_CHUNK_TYPE_OK = re.compile(rb'"chunkType"[ \t\n\r]*:[ \t\n\r]*(?:""|"zeros"|null)')


def typed_manifest_entries(
    compressed: bytes,
    position: ManifestPosition,
    limits: TocLimits = DEFAULT_LIMITS,
    toc_json: bytes | None = None,
) -> list[RawEntry] | None:
    """The entries of an (already verified) compressed TOC as normalized
    :class:`~store.estargz.toc.RawEntry` records decoded whole by msgspec
    (:func:`~store.estargz.toc.typed_toc_entries`), or ``None``: the caller then takes
    :func:`manifest_entries`, which accepts what this refuses and words every error.

    ``None`` when the TOC is longer than its position says or inflates past
    :data:`~store.estargz.toc.WHOLE_DECODE_MAX`, does not inflate to exactly its
    uncompressed length, holds a ``chunkType`` other than ``""``, ``"zeros"`` or ``null``,
    or anything the typed decode refuses. The records get :func:`normalize_entries`'s rule:
    a one-frame ``reg`` entry's ``digest`` becomes its ``chunkDigest``. Why: the pull phase
    decoded zstd:chunked TOCs one dict at a time (python's two large layers: 0.35 s each
    under the GIL), where eStargz TOCs took the typed path. ``toc_json``: the JSON already
    inflated from ``compressed`` (:func:`toc_json_and_digest`), if at hand.
    """
    if len(compressed) != position.length or position.uncompressed_length > WHOLE_DECODE_MAX:
        return None
    if toc_json is not None:
        data = toc_json
    else:
        try:
            data = b"".join(toc_json_pieces(compressed, _annotated_footer(position), limits))
        except InvalidToc:
            return None
    if data.count(_CHUNK_TYPE_KEY) != len(_CHUNK_TYPE_OK.findall(data)):
        return None
    records = typed_toc_entries(data, limits)
    if records is None:
        return None
    for r in records:
        if r.type == "reg" and not r.chunkDigest and not r.chunkSize:
            r.chunkDigest = r.digest
    return records


def _normalized(entries: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for i, e in enumerate(entries):
        yield _normalize(i, e)


# The most a zstd input byte can inflate to: an RLE block is 4 bytes (a 3-byte header and the
# byte) for up to 128 KiB of output (RFC 8878, 3.1.1.2).
_MAX_RATIO = 1 << 15
# The most one piece of :func:`_inflate_pieces` holds: what its smallest slice (64 bytes) of
# RLE blocks inflates to. Slices that small cost no more than larger ones: an 88 MB
# tar-split (459 KB of zstd) inflated in 20-33 ms either way.
_PIECE_MAX = 64 * _MAX_RATIO


def inflate_bounded(data: bytes, limit: int, where: str) -> bytes:
    """Decompress zstd ``data`` (one or more frames), refusing more than ``limit`` bytes
    (:class:`InvalidToc`, as for a truncated frame or bytes that are not zstd). Memory stays
    within about ``limit`` plus 2 MiB (:func:`_inflate_pieces`)."""
    return b"".join(_inflate_pieces(data, limit, where))


def inflated_size(data: bytes, limit: int, where: str) -> int:
    """How many bytes zstd ``data`` (one or more frames) decompresses to, without keeping
    them: errors as :func:`inflate_bounded`'s, memory about 2 MiB beside ``data``."""
    return sum(len(piece) for piece in _inflate_pieces(data, limit, where))


def _inflate_pieces(data: bytes, limit: int, where: str) -> Iterator[bytes]:
    """The decompressed pieces of zstd ``data``, in order, at most ``limit`` bytes in all
    (:class:`InvalidToc` past it, for a truncated frame, or bytes that are not zstd), each at
    most :data:`_PIECE_MAX` bytes. The decompressor has no output bound, so it is fed slices
    small enough that even RLE blocks (:data:`_MAX_RATIO`) cannot inflate one past what is
    left of ``limit`` (a 64 KiB slice of them made 4 GiB before the check ran), nor past
    :data:`_PIECE_MAX` (a slice of what was left of 64 MiB made one 60 MiB piece, which a
    reader of lines then held with its copy)."""
    total = 0
    rest = data
    try:
        while rest:
            d = zstandard.ZstdDecompressor().decompressobj()
            i = 0
            while i < len(rest):
                step = min(1 << 16, max(64, min(limit - total, _PIECE_MAX) // _MAX_RATIO + 1))
                piece = d.decompress(rest[i : i + step])
                i += step
                total += len(piece)
                if total > limit:
                    raise InvalidToc(f"{where}: inflates past {limit} bytes")
                yield piece
                if d.eof:
                    rest = d.unused_data + rest[i:]
                    break
            else:
                if not d.eof:
                    raise InvalidToc(f"{where}: zstd frame is truncated")
                rest = b""
    except zstandard.ZstdError as exc:
        raise InvalidToc(f"{where}: not zstd: {exc}") from None


def normalize_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """containers/storage TOC entries in the shape :class:`LayerIndex` reads.

    A ``reg`` entry without chunk fields is one frame: its ``digest`` is that chunk's digest,
    so it becomes ``chunkDigest`` too (else the chunk could not be verified). ``chunkType``
    must be ``""`` or ``"zeros"`` (:class:`InvalidToc` otherwise). (A ``name`` or
    ``linkName`` holding U+FFFD, which containers/storage writes for bytes that are not UTF-8,
    is refused by the index, as in eStargz: :func:`store.estargz.index._tar_name`.) Entries
    are returned as new dicts only where something changes.
    """
    return [_normalize(i, e) for i, e in enumerate(entries)]


def _normalize(i: int, e: dict[str, Any]) -> dict[str, Any]:
    ctype = e.get("chunkType", "")
    if ctype not in CHUNK_TYPES and ctype is not None:
        raise InvalidToc(f"TOC entry {i}: unknown chunkType {ctype!r}")
    if (
        e.get("type") == "reg"
        and not e.get("chunkDigest")
        and not e.get("chunkSize")
        and isinstance(e.get("digest"), str)
    ):
        e = dict(e)
        e["chunkDigest"] = e["digest"]
    return e


def file_frames(entries: Iterable[Mapping[str, Any] | RawEntry]) -> list[tuple[int, int, int]]:
    """``(offset, endOffset, size)`` of every regular file with contents whose entry says
    where its frames end (containers/storage's writers always do); entries as decoded dicts
    or :class:`~store.estargz.toc.RawEntry` records."""
    out = []
    for e in entries:
        if type(e) is RawEntry:
            if e.type == "reg" and e.size and e.endOffset:
                out.append((e.offset, e.endOffset, e.size))
        elif e.get("type") == "reg" and e.get("size") and e.get("endOffset"):  # type: ignore[union-attr]
            out.append((e.get("offset") or 0, e["endOffset"], e["size"]))  # type: ignore[index,union-attr]
    return out


def header_frames(files: Iterable[tuple[int, int, int]], toc_offset: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the frames between file payloads (``files`` from
    :func:`file_frames`): tar headers, padding, and the end-of-archive marker — the blob's
    frames no TOC entry describes. Each is one frame in containers/storage's layout
    (compression restarts only at payloads and chunks). The entries must have passed
    :class:`LayerIndex` (offsets are then non-negative integers, each file's in order)."""
    out, prev = [], 0
    for start, end, _size in sorted(files):
        if start > prev:
            out.append((prev, start))
        prev = max(prev, end)
    toc_frame = toc_offset - 8  # the TOC's skippable frame header
    if toc_frame > prev:
        out.append((prev, toc_frame))
    return out


def frame_content_size(head: bytes) -> int | None:
    """The Frame_Content_Size in a zstd frame header (its first up to 18 bytes), None if the
    writer left it out (klauspost's streaming encoder does for some frames) or ``head`` is not
    a zstd frame's: a skippable frame's header holds its payload's length, which decoders
    skip (zstandard reports it as the content size)."""
    if head[:4] != ZSTD_FRAME_MAGIC:
        return None
    try:
        size = zstandard.get_frame_parameters(head).content_size
    except zstandard.ZstdError:
        return None
    return None if size == zstandard.CONTENTSIZE_UNKNOWN else size


def footer_bytes(
    position: ManifestPosition, tar_split: tuple[int, int, int] | None = None
) -> bytes:
    """The footer skippable frame: 48 bytes (podman 4.3) or, with ``tar_split``, 72 bytes."""
    fields = [
        position.offset,
        position.length,
        position.uncompressed_length,
        position.manifest_type,
    ]
    if tar_split is None:
        payload = struct.pack("<4Q", *fields) + ZSTD_CHUNKED_MAGIC
    else:
        payload = struct.pack("<7Q", *fields, *tar_split) + ZSTD_CHUNKED_MAGIC_V2
    return skippable_frame(payload)


def skippable_frame(payload: bytes) -> bytes:
    """A zstd skippable frame (RFC 8878 §3.1.2) holding ``payload``."""
    return ZSTD_SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload


def check_footer(tail: bytes, blob_size: int, layer: ZstdChunkedLayer) -> None:
    """Check that the footer in ``tail`` (the blob's last bytes) agrees with the annotations
    (optional: containers/storage never reads the footer). Raises :class:`BadFooter`."""
    from .footer import parse_footer

    footer = parse_footer(tail, blob_size)
    if (footer.toc_offset, footer.toc_size) != (layer.position.offset, layer.position.length):
        raise BadFooter(
            f"zstd:chunked footer says TOC [{footer.toc_offset}, +{footer.toc_size}), the "
            f"annotation {layer.position}"
        )


# -- writer ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZstdChunkedResult:
    digest: str  # sha256 of the blob
    size: int  # blob bytes
    diff_id: str  # sha256 of the tar the blob decompresses to
    toc_digest: str  # manifest-checksum: sha256 of the compressed TOC
    annotations: dict[str, str]  # what the layer descriptor must carry
    uncompressed_size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "size": self.size,
            "diff_id": self.diff_id,
            "toc_digest": self.toc_digest,
            "annotations": dict(self.annotations),
            "uncompressed_size": self.uncompressed_size,
        }


DEFAULT_ZSTD_CHUNK_SIZE = 1 << 20
DEFAULT_ZSTD_LEVEL = 10  # containers/storage's ZstdCompressor default
# The TOC and tar-split frames: every lazy pull fetches them before the container starts, so
# they are compressed harder than the data (the format takes any zstd frame there). On the
# default workloads' images level 19 makes the TOCs 13 % smaller than level 10 (python's six:
# 2.16 -> 1.89 MB) for about 1 s more of conversion per 2 MB of TOC; inflating is no slower.
METADATA_ZSTD_LEVEL = 19


def write_zstd_chunked(
    tar_in: BinaryIO,
    out: BinaryIO,
    *,
    generation: Generation = DEFAULT_GENERATION,
    prioritized_files: Iterable[str] = (),
    chunk_size: int = DEFAULT_ZSTD_CHUNK_SIZE,
    level: int = DEFAULT_ZSTD_LEVEL,
) -> ZstdChunkedResult:
    """Write the zstd:chunked form of the layer tar read from ``tar_in`` (plain, gzip or zstd)
    to ``out``, in the layout containers/storage's compressor writes (module docstring).

    ``generation`` picks the tail and annotation keys: ``podman4`` (40-byte footer,
    ``io.containers.`` keys, what podman 4.3's partial pull reads) or ``podman5`` (tar-split
    frame, 64-byte footer, ``io.github.containers.`` keys). ``prioritized_files`` (with their
    parents and hardlink targets) are written first, the rest after: the optimized layout
    (zstd:chunked has no landmark; the order is the only hint). Files are cut into
    ``chunk_size`` chunks, each its own frame; a chunk of only zero bytes is typed ``zeros``.
    Tar headers are re-encoded (PAX), so ``diff_id`` is that of the tar written, returned with
    the annotations the layer descriptor needs. Raises :class:`InvalidLayerTar` for an
    unreadable tar and for what no layer can hold (the reader's rules,
    :meth:`LayerIndex.from_entries`; ``out`` then holds an unfinished blob).
    """
    from . import writer as _w

    if chunk_size <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk_size}")
    _w.check_chunk_size(chunk_size)
    prioritized = [p for p in prioritized_files if clean_name(p)]
    lw = _ZstdLayerWriter(out, level, chunk_size, generation)
    try:
        with _w.layer_members(tar_in, prioritized) as members:
            for ti, payload in members:
                if ti is not None:  # no landmark in zstd:chunked
                    lw.add(ti, payload)
    except (tarfile.TarError, EOFError, OSError, zstandard.ZstdError) as exc:
        raise UnreadableLayerTar(f"input is not a readable tar: {exc}") from None
    return lw.finish()


class _ZstdLayerWriter:
    def __init__(self, out: BinaryIO, level: int, chunk_size: int, generation: Generation):
        self.out = out
        self.cctx = zstandard.ZstdCompressor(level=level)
        self.meta_cctx = zstandard.ZstdCompressor(level=max(level, METADATA_ZSTD_LEVEL))
        self.chunk_size = chunk_size
        self.generation = generation
        self.written = 0
        self.uncompressed = 0
        self.blob_hash = hashlib.sha256()
        self.diff_hash = hashlib.sha256()
        self.pending = bytearray()  # tar bytes waiting for the next frame
        self.entries: list[dict[str, Any]] = []
        self.tar_split: list[dict[str, Any]] = []

    def _emit(self, data: bytes) -> None:
        self.out.write(data)
        self.blob_hash.update(data)
        self.written += len(data)

    def _frame(self, plain: bytes) -> int:
        """Compress ``plain`` as one frame; returns its start offset."""
        start = self.written
        self.diff_hash.update(plain)
        self.uncompressed += len(plain)
        self._emit(self.cctx.compress(plain))
        return start

    def _flush_pending(self) -> None:
        if self.pending:
            self._frame(bytes(self.pending))
            self.pending.clear()

    def _segment(self, data: bytes) -> None:
        self.pending += data
        if self.generation == "podman5" and data:
            self.tar_split.append({"type": 2, "payload": base64.b64encode(data).decode()})

    def add(self, ti: tarfile.TarInfo, payload: Any) -> None:
        from . import writer as _w

        if ti.issparse():
            raise InvalidLayerTar(f"{ti.name!r}: sparse tar entries are not supported")
        etype = _w._TYPES.get(ti.type)
        if etype is None:
            raise InvalidLayerTar(f"{ti.name!r}: tar entry type {ti.type!r} is not supported")
        self._segment(_w._header(ti))
        entry = _toc_entry(ti, etype)
        self.entries.append(entry)
        whole = hashlib.sha256()
        crc = _Crc64() if self.generation == "podman5" else None
        size = ti.size if etype == "reg" else 0
        if size:
            self._flush_pending()
            chunks: list[dict[str, Any]] = []
            done = 0
            while done < size:
                n = min(self.chunk_size, size - done)
                data = payload.read(n)
                whole.update(data)
                if crc is not None:
                    crc.update(data)
                c: dict[str, Any] = {"offset": self._frame(data), "chunkOffset": done}
                c["chunkSize"] = n
                c["chunkDigest"] = "sha256:" + hashlib.sha256(data).hexdigest()
                if data.count(0) == n:
                    c["chunkType"] = "zeros"
                chunks.append(c)
                done += n
            entry["digest"] = "sha256:" + whole.hexdigest()
            entry["offset"] = chunks[0]["offset"]
            entry["endOffset"] = self.written
            if len(chunks) > 1:
                for k in ("chunkSize", "chunkDigest", "chunkType"):
                    if k in chunks[0]:
                        entry[k] = chunks[0][k]
                for c in chunks[1:]:
                    self.entries.append({"type": "chunk", "name": ti.name, **c})
        if self.generation == "podman5":
            fe: dict[str, Any] = {"type": 1, "name": ti.name}
            if size:
                fe["size"] = size
            fe["payload"] = base64.b64encode(crc.digest()).decode() if crc and size else None
            self.tar_split.append(fe)
        pad = -size % tarfile.BLOCKSIZE
        if pad:
            self._segment(b"\0" * pad)

    def finish(self) -> ZstdChunkedResult:
        self._segment(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
        self._flush_pending()
        toc: dict[str, Any] = {"version": 1, "entries": self.entries}
        split_frame = b""
        if self.generation == "podman5":
            lines = b"".join(
                json.dumps({**e, "position": i}, separators=(",", ":")).encode() + b"\n"
                for i, e in enumerate(self.tar_split)
            )
            split_frame = self.meta_cctx.compress(lines)
            toc["tarSplitDigest"] = manifest_checksum(split_frame)
        toc_json = json.dumps(toc, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogateescape"
        )
        # What no layer can hold (an entry under a file, a hardlink to nothing ...) is refused
        # here with the reader's own rules, as the eStargz writer does: whatever converts
        # also reads back, in the store too.
        try:
            LayerIndex.from_entries(
                normalize_entries(list(iter_toc_entries([toc_json]))),
                toc_offset=self.written + 8,
                compression="zstd",
            )
        except InvalidToc as exc:
            raise InvalidLayerTar(f"the tar cannot be a zstd:chunked layer: {exc}") from None
        compressed = self.meta_cctx.compress(toc_json)
        position = ManifestPosition(self.written + 8, len(compressed), len(toc_json))
        self._emit(skippable_frame(compressed))
        checksum = manifest_checksum(compressed)
        tar_split = None
        if self.generation == "podman5":
            tar_split = (self.written + 8, len(split_frame), len(lines))
            self._emit(skippable_frame(split_frame))
            annotations = {
                MANIFEST_CHECKSUM_KEY: checksum,
                MANIFEST_POSITION_KEY: str(position),
                TARSPLIT_POSITION_KEY: ":".join(str(v) for v in tar_split),
            }
        else:
            annotations = {
                LEGACY_MANIFEST_CHECKSUM_KEY: checksum,
                LEGACY_MANIFEST_POSITION_KEY: str(position),
            }
        self._emit(footer_bytes(position, tar_split))
        return ZstdChunkedResult(
            digest="sha256:" + self.blob_hash.hexdigest(),
            size=self.written,
            diff_id="sha256:" + self.diff_hash.hexdigest(),
            toc_digest=checksum,
            annotations=annotations,
            uncompressed_size=self.uncompressed,
        )


def _toc_entry(ti: tarfile.TarInfo, etype: str) -> dict[str, Any]:
    """A TOC entry in containers/storage's field order (``FileMetadata``), empty fields left
    out; names as in the tar header."""
    from . import writer as _w

    e: dict[str, Any] = {"type": etype, "name": ti.name + ("/" if etype == "dir" else "")}
    # Every field containers/storage's NewFileMetadata copies from the header, as the header
    # this writer emits (and podman 5's tar-split) has it: podman >= 5 compares them all
    # before a partial pull (pkg/chunked ensureFileMetadataAttributesMatch). A linkname on
    # any type (containers/storage leaves one on whiteout files).
    if ti.linkname:
        e["linkName"] = ti.linkname
    # Go's tar writer (buildah, podman save) puts the file-type bits in the header's mode
    # (0o40755 for a directory); the header this writer emits keeps only the low 12 bits
    # (tarfile's tobuf), and podman >= 5 refuses a layer whose TOC disagrees with its
    # tar-split (containers/storage pkg/chunked, "TOC and tar-split metadata doesn't match").
    if mode := ti.mode & 0o7777:
        e["mode"] = mode
    if etype == "reg" and ti.size:
        e["size"] = ti.size
    if ti.uid:
        e["uid"] = ti.uid
    if ti.gid:
        e["gid"] = ti.gid
    # Times as Go's timeIfNotZero leaves them: only year 1 is no time; the epoch is written
    # (podman's partial pull leaves a file without modtime at the time it made it).
    mtime_ns = _w.tar_mtime_ns(ti)
    if mtime_ns != _w.GO_ZERO_TIME_NS:
        e["modtime"] = _w.rfc3339_nano(mtime_ns)
    for record, key in (("atime", "accesstime"), ("ctime", "changetime")):
        value = ti.pax_headers.get(record)  # re-emitted as they are: tarfile keeps them
        ns = None if value is None else _w.pax_time_ns(value)
        if ns is not None and ns != _w.GO_ZERO_TIME_NS:
            e[key] = _w.rfc3339_nano(ns)
    if etype in ("char", "block"):
        if ti.devmajor:
            e["devMajor"] = ti.devmajor
        if ti.devminor:
            e["devMinor"] = ti.devminor
    xattrs = {
        k[len(_w.XATTR_PREFIX) :]: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
        for k, v in ti.pax_headers.items()
        if k.startswith(_w.XATTR_PREFIX)
    }
    if xattrs:
        e["xattrs"] = dict(sorted(xattrs.items()))
    return e


def _is_sha256(value: str) -> bool:
    hexpart = value.removeprefix("sha256:")
    return (
        value.startswith("sha256:")
        and len(hexpart) == 64
        and all(c in "0123456789abcdef" for c in hexpart)
    )


class _Crc64:
    """CRC-64/GO-ISO (Go ``hash/crc64`` with the ISO table), as tar-split's ``FileType``
    entries carry it (github.com/vbatts/tar-split ``tar/asm``). Check value of ``123456789``:
    ``0xb90956c775a41001``."""

    _TABLE: ClassVar[list[int]] = []

    def __init__(self) -> None:
        if not _Crc64._TABLE:
            poly = 0xD800000000000000
            for i in range(256):
                crc = i
                for _ in range(8):
                    crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
                _Crc64._TABLE.append(crc)
        self.crc = 0

    def update(self, data: bytes) -> None:
        t = self._TABLE
        crc = ~self.crc & 0xFFFFFFFFFFFFFFFF
        for b in data:
            crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
        self.crc = ~crc & 0xFFFFFFFFFFFFFFFF

    def digest(self) -> bytes:
        return self.crc.to_bytes(8, "big")
