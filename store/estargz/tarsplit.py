"""A zstd:chunked TOC checked against the layer's tar-split (podman 5's layout).

The store serves a layer's tree from its TOC; a normal pull extracts the tar stream, whose
headers the tar-split frame records (github.com/vbatts/tar-split ``tar/storage`` JSON lines:
``{"type":2,"payload":<base64 raw tar bytes>}`` for headers and padding, ``{"type":1,
"size":N,…}`` for each entry's contents). A TOC can say anything the tar does not — a setuid
bit, another owner, a file the tar never had — and the manifest checksum vouches only for the
TOC. containers/storage ≥ 1.55 therefore refuses a partial pull whose TOC does not match its
tar-split (``pkg/chunked/compression_linux.go``: ``readZstdChunkedManifest`` authenticates
the tar-split by the TOC's ``tarSplitDigest`` — sha256 of its *compressed* bytes —, then
``ensureTOCMatchesTarSplit``: the same names, each with the same type, link target, mode,
size, owner, times, device numbers and xattrs). :func:`check_tar_split` applies that rule;
the caller refuses the layer on :class:`~.errors.InvalidToc`.

What is compared is what the store serves of an entry: the names (cleaned: the index
serves ``./a`` and ``a`` as one), type, link target, permission bits, owner, modification time
(as an instant; the zero time and the epoch count as none, as upstream), xattrs, a regular
file's size and a device's numbers. Upstream also compares the raw mode (with any file-type
bits), every size and device field, and the access and change times, which the store serves
nothing of (and which Python's ``tarfile`` does not read from a GNU header as Go does).
The check cannot see a tar stream that differs from its tar-split: that needs every byte
of the layer (upstream compares the diff ID after its pull).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import io
import re
import tarfile
from collections.abc import Iterator
from datetime import datetime

import msgspec

from .errors import InvalidEntryName, InvalidToc
from .index import clean_name
from .toc import DEFAULT_LIMITS, TocLimits
from .writer import _TYPES as _TAR_TYPES
from .writer import GO_ZERO_TIME_NS, NS, XATTR_PREFIX, tar_mtime_ns

_FRACTION = re.compile(r"\.([0-9]+)")


class _Meta(msgspec.Struct, gc=False):
    """The fields of one TOC entry the check compares (``null``: absent)."""

    type: str | None = None
    name: str | None = None
    linkName: str | None = None
    mode: int | None = None
    size: int | None = None
    uid: int | None = None
    gid: int | None = None
    modtime: str | None = None
    devMajor: int | None = None
    devMinor: int | None = None
    xattrs: dict[str, str] | None = None


class _SplitToc(msgspec.Struct, gc=False):
    tarSplitDigest: str | None = None
    entries: list[_Meta] | None = None


_DECODER = msgspec.json.Decoder(_SplitToc)


def tar_split_digest(toc_json: bytes, where: str) -> str:
    """The TOC's ``tarSplitDigest`` (``""``: none). :class:`InvalidToc` when the TOC's
    fields are not of the types the check reads."""
    return _decode(toc_json, where).tarSplitDigest or ""


def _decode(toc_json: bytes, where: str) -> _SplitToc:
    try:
        return _DECODER.decode(toc_json)
    except msgspec.DecodeError as exc:
        raise InvalidToc(f"{where}: cannot be checked against its tar-split: {exc}") from None


def check_tar_split(
    toc_json: bytes,
    tar_split: bytes | None,
    where: str,
    limits: TocLimits = DEFAULT_LIMITS,
) -> None:
    """Refuse (:class:`InvalidToc`) a TOC that does not match its tar-split, the rule
    containers/storage applies before a partial pull (module docstring).

    ``toc_json`` is the verified TOC; ``tar_split`` the compressed tar-split frame's payload
    (None: the layer's annotations locate none). A TOC without ``tarSplitDigest`` is not
    checked (nothing authenticates a tar-split then); one with it needs ``tar_split``, whose
    sha256 must be that digest and which may inflate to at most
    :func:`tar_split_max_bytes` for the TOC's tar members."""
    toc = _decode(toc_json, where)
    want = toc.tarSplitDigest
    if not want:
        return
    if tar_split is None:
        raise InvalidToc(
            f"{where}: the TOC names a tar-split ({want}) but the layer's annotations locate "
            "none (io.github.containers.zstd-chunked.tarsplit-position)"
        )
    got = "sha256:" + hashlib.sha256(tar_split).hexdigest()
    if got != want:
        raise InvalidToc(
            f"{where}: the tar-split hashes to {got}, the TOC's tarSplitDigest says {want}"
        )
    pending: dict[str, _Meta] = {}
    for i, e in enumerate(toc.entries or ()):
        if e.type == "chunk":
            continue
        name = _clean(e.name or "", f"{where}: TOC entry {i}")
        if name in pending:
            raise InvalidToc(f"{where}: the TOC names {name!r} twice (its tar-split cannot match)")
        pending[name] = e
    for ti in _headers(tar_split, where, limits, len(pending)):
        name = _clean(ti.name, f"{where}: tar-split")
        e = pending.pop(name, None)
        if e is None:
            raise InvalidToc(f"{where}: the tar-split holds {name!r}, which the TOC does not")
        diff = _mismatch(e, ti)
        if diff:
            raise InvalidToc(
                f"{where}: the TOC's entry {name!r} does not match the layer's tar-split: {diff}"
            )
    if pending:
        names = sorted(pending)[:5]
        raise InvalidToc(f"{where}: the TOC holds entries its tar-split does not: {names}")


def _clean(name: str, where: str) -> str:
    try:
        return clean_name(name, where=f"{where}: ")
    except InvalidEntryName as exc:
        raise InvalidToc(str(exc)) from None


def _mismatch(e: _Meta, ti: tarfile.TarInfo) -> str:
    """What of TOC entry ``e`` differs from tar header ``ti`` (``""``: nothing)."""
    etype = _TAR_TYPES.get(ti.type)
    if etype is None:
        return f"tar type {ti.type!r} is no TOC type"
    if e.type != etype:
        return f"type {e.type!r}, the tar's {etype!r}"
    if (e.linkName or "") != ti.linkname:
        return f"link target {e.linkName!r}, the tar's {ti.linkname!r}"
    if (e.mode or 0) & 0o7777 != ti.mode & 0o7777:
        return f"mode {(e.mode or 0) & 0o7777:o}, the tar's {ti.mode & 0o7777:o}"
    if etype == "reg" and (e.size or 0) != ti.size:
        return f"size {e.size or 0}, the tar's {ti.size}"
    if (e.uid or 0, e.gid or 0) != (ti.uid, ti.gid):
        return f"owner {e.uid or 0}:{e.gid or 0}, the tar's {ti.uid}:{ti.gid}"
    toc_ns = _rfc3339_ns(e.modtime)
    try:
        tar_ns = tar_mtime_ns(ti)
    except (OverflowError, ValueError):  # a PAX mtime tarfile reads as inf or nan
        return f"modtime {e.modtime!r}, the tar's {ti.pax_headers.get('mtime')!r}: no time"
    if _no_time(toc_ns) != _no_time(tar_ns):
        return f"modtime {e.modtime!r}, the tar's {tar_ns} ns since the epoch"
    if etype in ("char", "block") and (e.devMajor or 0, e.devMinor or 0) != (
        ti.devmajor,
        ti.devminor,
    ):
        return f"device {e.devMajor or 0}:{e.devMinor or 0}, the tar's {ti.devmajor}:{ti.devminor}"
    toc_x = _toc_xattrs(e.xattrs)
    tar_x = {
        k[len(XATTR_PREFIX) :]: v.encode("utf-8", "surrogateescape")
        for k, v in ti.pax_headers.items()
        if k.startswith(XATTR_PREFIX)
    }
    if toc_x != tar_x:
        return f"xattrs {sorted(toc_x)}, the tar's {sorted(tar_x)}"
    return ""


def _toc_xattrs(xattrs: dict[str, str] | None) -> dict[str, bytes] | None:
    out = {}
    for k, v in (xattrs or {}).items():
        try:
            out[k] = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            return None  # never equal to the tar's (the index refuses it anyway)
    return out


def _no_time(ns: int | None) -> int | None:
    """Upstream's ``ensureTimePointersMatch``: the zero time and the epoch are no time."""
    return None if ns in (0, GO_ZERO_TIME_NS) else ns


_UNPARSED = -(1 << 80)  # a TOC time that does not parse: no header's time


def _rfc3339_ns(value: str | None) -> int | None:
    """An RFC 3339 time to the nanosecond; None when absent; a value that does not parse
    is :data:`_UNPARSED`, no header's time."""
    if not value:
        return None
    fraction = _FRACTION.search(value)
    whole = value if fraction is None else _FRACTION.sub("", value, count=1)
    try:
        seconds = int(datetime.fromisoformat(whole.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return _UNPARSED
    digits = fraction.group(1)[:9].ljust(9, "0") if fraction is not None else "0"
    return seconds * NS + int(digits)  # the fraction counts forward, before 1970 too


class _SplitEntry(msgspec.Struct, gc=False):
    """One tar-split line: type 2 holds raw tar bytes (``payload``, base64), type 1 a
    file's contents (``size`` bytes, not in the tar-split)."""

    type: int
    size: int | None = None
    payload: bytes | None = None


_SPLIT_DECODER = msgspec.json.Decoder(_SplitEntry)


# The longest tar-split line read. One ``type 2`` line holds the raw tar bytes tar-split's
# packer read for one member's headers (vbatts/tar-split ``tar/asm``: ``RawBytes`` after each
# ``Next``): the last member's padding, its extension headers and its header. Go's
# archive/tar, which containers/storage and tar-split read tars with, refuses an extension
# header (PAX records, a GNU long name or link) over 1 MiB (``maxSpecialFileSize``), so one
# member's headers are about 3 MiB, 4 MiB in base64.
MAX_SPLIT_LINE = 16 << 20

# What a tar-split may inflate to beyond the limit on TOC bytes, for each tar member of its
# TOC. It records every member's raw headers in base64 within JSON, with a line for the
# member's contents: about 800 bytes for a member with a plain 512-byte header, about 2 KB
# with PAX records (a long name, xattrs), where the member's TOC entry takes about 80. Held
# to ``limits.max_bytes`` alone (256 MiB by default), a podman 5 zstd:chunked layer of
# about 340,000 files — a 30 MB TOC, a third of the entries ``max_entries`` admits — was
# refused ("tar-split: inflates past 268435456 bytes") and podman pulled it in full;
# containers/storage itself streams a tar-split to a file, its size unbounded
# (``pkg/chunked/compression_linux.go``: ``readZstdChunkedManifest``).
SPLIT_BYTES_PER_MEMBER = 4 << 10


def tar_split_max_bytes(members: int, limits: TocLimits) -> int:
    """The most a tar-split of a TOC naming ``members`` tar members may inflate to:
    ``limits.max_bytes`` plus :data:`SPLIT_BYTES_PER_MEMBER` for each member. Its lines are
    read one at a time (:func:`_lines`), so this bounds the time a hostile tar-split costs,
    not memory; with the limit on TOC entries it is at most ~4 GiB under the defaults."""
    return limits.max_bytes + SPLIT_BYTES_PER_MEMBER * members


def _lines(tar_split: bytes, what: str, limits: TocLimits, members: int = 0) -> Iterator[bytes]:
    """The lines of the compressed tar-split (each with its newline, the last one perhaps
    without), inflated a piece at a time (:func:`~.zstdchunked._inflate_pieces`, at most
    :func:`tar_split_max_bytes` for ``members`` tar members in all): never all at once, and
    no line longer than :data:`MAX_SPLIT_LINE` (:class:`InvalidToc`, before it is decoded;
    podman then pulls the layer itself). One line of a 5 KB frame inflating to 60 MiB, held
    whole, copied, decoded and its PAX header parsed, took 240 MB and 13 s to refuse."""
    from .zstdchunked import _inflate_pieces

    carry = bytearray()  # the start of a line that goes on in the next piece
    n = 0
    for piece in _inflate_pieces(tar_split, tar_split_max_bytes(members, limits), what):
        start = 0
        while (newline := piece.find(b"\n", start)) >= 0:
            n += 1
            if len(carry) + newline + 1 - start > MAX_SPLIT_LINE:
                break
            if carry:
                carry += piece[start : newline + 1]
                yield bytes(carry)
                carry.clear()
            else:
                yield piece[start : newline + 1]
            start = newline + 1
        else:
            carry += piece[start:]
            if len(carry) <= MAX_SPLIT_LINE:
                continue
            n += 1
        raise InvalidToc(
            f"{what}: line {n} is longer than {MAX_SPLIT_LINE} bytes, more than one tar "
            "member's headers take (Go's archive/tar reads extension headers of at most 1 MiB)"
        )
    if carry:
        yield bytes(carry)


def _headers(
    tar_split: bytes, where: str, limits: TocLimits, members: int = 0
) -> Iterator[tarfile.TarInfo]:
    """The tar headers the tar-split of a TOC naming ``members`` tar members records, in
    order (:class:`InvalidToc` for a tar-split that does not inflate within
    :func:`tar_split_max_bytes`, has more lines than
    ``limits.max_entries`` members need, is not tar-split JSON, or whose headers ``tarfile``
    cannot read, :class:`_PaxCheckedTarInfo`'s included, or has a line longer than
    :data:`MAX_SPLIT_LINE`). Its lines are inflated and decoded one at a time (:func:`_lines`):
    a list of them all was 60 bytes of memory per line (64 MiB of 3-byte lines, 1.3 GB)."""
    what = f"{where}: tar-split"
    stream = _SkippedPayloads(what)
    # Two lines per tar member (its raw headers, then its contents' entry), a member per TOC
    # entry at most, and the end-of-archive padding.
    most = 2 * limits.max_entries + 16
    for n, line in enumerate(_lines(tar_split, what, limits, members)):
        if n >= most:
            raise InvalidToc(
                f"{what}: more than {most} lines, more than the limit on TOC entries "
                f"({limits.max_entries}, store config toc_max_entries) allows"
            )
        if not line.strip():
            continue
        try:
            entry = _SPLIT_DECODER.decode(line)
        except msgspec.DecodeError as exc:
            raise InvalidToc(f"{what}: line {n + 1} is not a tar-split entry: {exc}") from None
        if entry.type == 2:
            stream.add(entry.payload or b"")
        elif entry.type == 1 and (entry.size or 0) >= 0:
            stream.skip(entry.size or 0)
        else:
            raise InvalidToc(f"{what}: line {n + 1} is of type {entry.type}, size {entry.size}")
    try:
        tf = tarfile.TarFile(
            fileobj=stream,
            mode="r",
            encoding="utf-8",
            errors="surrogateescape",
            tarinfo=_PaxCheckedTarInfo,
        )
        while True:
            ti = tf.next()
            if ti is None:
                return
            tf.members.clear()  # one header at a time, not a list of all
            yield ti
    except (tarfile.TarError, EOFError, ValueError, OverflowError) as exc:
        raise InvalidToc(f"{what}: its tar headers do not read: {exc}") from None


# A run of more digits than any PAX record needs (a length field, a size, a time with its
# fraction: at most about 20). CPython before 3.11.10 and 3.12.6 parses a PAX header in time
# quadratic in such a run (CVE-2024-6232: 120,000 digits, 16 s). The TOC's own tar stream
# takes a budget of PAX bytes for all its headers (toc.open_tar_stream); a tar-split holds a
# whole layer's headers, long names and xattrs in PAX records, so each header is checked.
_DIGIT_RUN = re.compile(rb"[0-9]{65}")


class _PaxCheckedTarInfo(tarfile.TarInfo):
    """A tar header whose PAX records are parsed only when they hold no run of 65 digits
    (``tarfile.HeaderError``): within that, CPython's parse is linear."""

    def _proc_pax(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        if self.type == tarfile.XGLTYPE:
            # tarfile applies its records (uid, gid, mtime, path ...) to every later member;
            # Go's reader returns it as an entry of its own, which containers/storage finds
            # in no TOC entry and refuses (ensureTOCMatchesTarSplit): so is it here.
            raise tarfile.HeaderError("a PAX global header, which no TOC entry can match")
        stream = tarfile_.fileobj
        at = stream.tell()
        records = stream.read(self._block(self.size))  # type: ignore[attr-defined]
        stream.seek(at)
        if _DIGIT_RUN.search(records):
            raise tarfile.HeaderError(
                f"PAX extended header of {self.size} bytes holds a run of more than 64 digits"
            )
        return super()._proc_pax(tarfile_)  # type: ignore[misc]


class _SkippedPayloads(io.RawIOBase):
    """The tar stream a tar-split describes, its files' contents left out: ``tarfile`` seeks
    over them (it reads the byte before each header: zeros), and a read of more of them is
    refused (:class:`InvalidToc`: a PAX header claiming an exabyte of data that the
    tar-split puts in a file's contents is not read as zeros)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._starts: list[int] = []
        self._pieces: list[bytes | int] = []  # bytes, or the length of a skipped payload
        self._size = 0
        self._pos = 0

    def add(self, data: bytes) -> None:
        if data:
            self._starts.append(self._size)
            self._pieces.append(data)
            self._size += len(data)

    def skip(self, n: int) -> None:
        if n:
            self._starts.append(self._size)
            self._pieces.append(n)
            self._size += n

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        out = bytearray()
        skipped = 0
        while self._pos < end:
            i = bisect.bisect_right(self._starts, self._pos) - 1
            piece, start = self._pieces[i], self._starts[i]
            length = piece if isinstance(piece, int) else len(piece)
            take = min(end, start + length) - self._pos
            if isinstance(piece, int):
                # tarfile reads the byte before each header; more is header data there
                skipped += take
                if skipped > tarfile.BLOCKSIZE:
                    raise InvalidToc(
                        f"{self.where}: tar header data at offset {self._pos} lies in a "
                        "file's contents"
                    )
                out += bytes(take)
            else:
                out += piece[self._pos - start : self._pos - start + take]
            self._pos += take
        return bytes(out)
