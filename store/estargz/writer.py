"""Layer tar (plain, gzip or zstd) → eStargz blob, streaming, compressing on all cores.

Layout follows the Go writer (containerd/stargz-snapshotter ``estargz.Writer``/``Build``):

* a new gzip member starts at every regular file's payload and at every ``chunk_size`` piece
  of it; tar headers (and padding) of the entries that follow ride in the current member;
* prioritized files (and their parent directories, and hardlink targets) come first, then
  ``.prefetch.landmark``; with no prioritized files ``.no.prefetch.landmark`` comes first.
  Landmarks hold one byte ``0x0f``; landmarks or a TOC already in the input are dropped;
* chunk-level prioritization (``read_ranges``, from an access trace): a prioritized file the
  workload read only in part is cut into :data:`RANGE_CHUNK_SIZE` chunks, and the
  ``.prefetch.landmark`` TOC entry lists the blob ranges of the chunks that were read
  (:data:`~.footer.PREFETCH_RANGES_KEY`), so a prefetch can skip the rest of the region.
  Readers that do not know the key prefetch the whole region, as before;
* fetch order (``read_order``, from the same trace): the ``.prefetch.landmark`` entry also
  lists the region's chunks in the order the workload first read them
  (:data:`~.footer.PREFETCH_ORDER_KEY`), so a prefetch brings in what is read first first,
  across files; a prioritized file read whole but in more than one go is cut into
  :data:`ORDER_CHUNK_SIZE` chunks for it;
* TOC entries carry ``digest`` (sha256 of the whole file) and ``chunkDigest`` (sha256 of the
  chunk's bytes); the reg entry doubles as its first chunk; ``chunkSize`` is written for
  every chunk except a trailing partial one;
* the TOC is the tar entry ``stargz.index.json`` (followed by the end-of-archive blocks) in
  its own gzip member, then the 51-byte footer. ``diff_id`` covers everything up to the
  footer, decompressed;
* a name that appears more than once in the input is written once, as extracting the input
  would leave it (the later entry wins; see :func:`_extracted`), so ``tar -xf`` of the output,
  the TOC and a normal pull of either agree whatever the order of entries;
* a modification time with a fraction of a second is written in the tar header as the whole
  second the TOC holds (:func:`toc_time_header`): an eStargz TOC has whole seconds only, and
  a normal pull (the header's time) and a lazy pull (the TOC's) must show the same time.

Members are independent, so they are compressed in a thread pool (``compress`` releases the
GIL) and written in order. Deflate comes from zlib-ng when installed (a dependency): its level
9 is about 3x cheaper than classic zlib's at a slightly better ratio; stdlib zlib otherwise.
Members are written in order; at most a few batches are in flight, so memory stays bounded
whatever the layer size. The input is read twice (its headers, then the payloads in the
output's order): a plain tar in a seekable file is read in place, anything else (compressed,
a pipe) is first spooled decompressed to a temporary file, as the Go ``Build`` does.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import copy
import gzip
import hashlib
import io
import os
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, BinaryIO

from zstandard import ZstdDecompressor, ZstdError

from .errors import InvalidLayerTar, InvalidToc, UnreadableLayerTar

try:
    from zlib_ng import zlib_ng as _deflate
except ImportError:  # pragma: no cover - zlib-ng is a dependency; stdlib zlib still works
    _deflate = zlib  # type: ignore[no-redef]
from ..spans import merge_spans
from .footer import (
    LANDMARK_CONTENTS,
    MAX_PREFETCH_ORDER,
    MAX_PREFETCH_RANGES,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    PREFETCH_ORDER_KEY,
    PREFETCH_RANGES_KEY,
    TOC_TAR_NAME,
    estargz_footer_bytes,
)
from .index import LayerIndex, clean_name, parent_dir
from .toc import DEFAULT_LIMITS, encode_toc, toc_digest, touches

DEFAULT_CHUNK_SIZE = 4 << 20
# Chunks of a prioritized file read only in part: what a prefetch of the chunks read fetches
# beyond the bytes read is at most one chunk per range end. 64 KiB: readers take 4-128 KiB at
# a time (pages, the kernel's read-ahead), and each chunk costs a TOC entry (~150 bytes).
RANGE_CHUNK_SIZE = 64 << 10
# Chunks of a prioritized file read whole but at different times (``read_order``): what the
# fetch order can tell apart. 256 KiB: the unit a store's early download fetches in
# (store.prefetch.AHEAD_PIECE); smaller members compress a little worse.
ORDER_CHUNK_SIZE = 256 << 10
DEFAULT_LEVEL = 9  # the Go library's default (gzip.BestCompression)
BATCH_BYTES = 1 << 20  # small members are compressed in batches of about this size
XATTR_PREFIX = "SCHILY.xattr."
_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


@dataclass(frozen=True, slots=True)
class ConvertResult:
    digest: str  # sha256 of the blob
    size: int  # blob bytes
    diff_id: str  # sha256 of the blob decompressed (the tar we wrote)
    toc_digest: str  # sha256 of the TOC JSON
    uncompressed_size: int  # bytes of that tar

    def as_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "size": self.size,
            "diff_id": self.diff_id,
            "toc_digest": self.toc_digest,
            "uncompressed_size": self.uncompressed_size,
        }


def convert(
    tar_in: BinaryIO,
    out: BinaryIO,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int = DEFAULT_LEVEL,
    prioritized_files: Iterable[str] = (),
    read_ranges: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    range_chunk_size: int = RANGE_CHUNK_SIZE,
    read_order: Mapping[str, Sequence[tuple[int, int, int]]] | None = None,
    workers: int | None = None,
    landmark_mtime: int = 0,
) -> ConvertResult:
    """Write the eStargz form of the layer tar read from ``tar_in`` to ``out``.

    ``read_ranges`` maps a prioritized file's path to the ``[start, end)`` byte ranges of it
    a workload read (an access trace; a file not in it counts as read whole): a file read in
    part is chunked at ``range_chunk_size`` bytes, and the landmark's TOC entry names the
    chunks read (module doc).

    ``read_order`` maps a prioritized file's path to ``(start, end, seq)`` tuples: its
    ``[start, end)`` bytes were first read by the workload's read number ``seq`` (one count
    over every file of every layer of the run). The landmark's TOC entry then lists the
    region's chunks in that order, ranked by those numbers (:data:`~.footer.PREFETCH_ORDER_KEY`;
    a chunk with no read of its own goes with the chunk before it), and a file read whole in
    more than one read is chunked at :data:`ORDER_CHUNK_SIZE` (at most ``chunk_size``).

    ``landmark_mtime`` is the landmark's modification time (whole seconds since the epoch;
    default 0). One layer tar always converts to the same blob and TOC, and an image that
    lists a layer twice lists one blob twice, which no layer store can serve at both places
    (overlayfs cannot stack one directory twice): a converter gives each repeat of a layer
    within an image its own value (1, 2, …), so each gets a blob, TOC digest and diff ID of
    its own while its files stay the same.

    Raises :class:`InvalidLayerTar` if the input is not a readable tar, has a tar entry type
    eStargz cannot carry, or holds what no layer can (checked at the end with the reader's
    rules, :meth:`LayerIndex.from_entries`; ``out`` then holds an unfinished blob), and
    :class:`ValueError` before writing anything for a chunk size that is not positive or over
    what readers accept (:func:`check_chunk_size`), or a level outside 0..9. ``out`` only
    needs ``write``.
    """
    if chunk_size <= 0 or range_chunk_size <= 0:
        raise ValueError(f"chunk sizes must be positive, got {chunk_size}, {range_chunk_size}")
    check_chunk_size(max(chunk_size, range_chunk_size))
    if not 0 <= level <= 9:
        raise ValueError(f"gzip level must be 0..9, got {level}")
    prioritized = [p for p in prioritized_files if clean_name(p)]
    plain = _decompressed(tar_in)
    members = _MemberWriter(out, level, workers or os.cpu_count() or 2)
    try:
        w = _LayerWriter(members, chunk_size, landmark_mtime)
        try:
            if not prioritized:
                w.add_landmark(NO_PREFETCH_LANDMARK)
            else:
                w.start_region(read_ranges or {}, range_chunk_size, read_order or {})
            with _seekable(plain) as spool:
                for item in _ordered(spool, prioritized):
                    w.add(*item)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, ZstdError) as exc:
            raise UnreadableLayerTar(f"input is not a readable tar: {exc}") from None
        return w.finish()
    finally:
        members.close()


def check_chunk_size(chunk_size: int) -> None:
    """Raise :class:`ValueError` for a chunk size readers refuse (a chunk is inflated whole to
    be checked: :attr:`TocLimits.max_chunk_bytes <.toc.TocLimits>`), before anything is
    written."""
    if chunk_size > DEFAULT_LIMITS.max_chunk_bytes:
        raise ValueError(
            f"chunk size {chunk_size} is over {DEFAULT_LIMITS.max_chunk_bytes} bytes, the most "
            "a reader accepts in one chunk"
        )


# -- input ----------------------------------------------------------------------------------


class _Prefixed(io.RawIOBase):
    """A read-only stream: some already-read bytes, then the rest of ``f``."""

    def __init__(self, head: bytes, f: BinaryIO) -> None:
        self._head = head
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)


def _decompressed(f: BinaryIO) -> BinaryIO:
    """The plain tar stream from plain, gzip or zstd input (sniffed from the magic bytes);
    empty input is the end-of-archive marker alone.

    A plain tar in a seekable file is returned as is (positioned where it was), so it need not
    be spooled."""
    start = f.tell() if _is_seekable(f) else None
    head = f.read(4)
    if not head:
        # No bytes at all is an archive of no entries, as Go's archive/tar reads it (io.EOF at
        # once): estargz.Build writes a layer of none, podman pulls a 0-byte layer as empty.
        return io.BytesIO(bytes(1024))
    if start is not None and head[:2] != b"\x1f\x8b" and head != b"\x28\xb5\x2f\xfd":
        f.seek(start)
        return f
    stream: BinaryIO = io.BufferedReader(_Prefixed(head, f), 1 << 20)  # type: ignore[arg-type]
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    if head == b"\x28\xb5\x2f\xfd":
        reader = ZstdDecompressor().stream_reader(stream, read_across_frames=True)
        return reader  # type: ignore[return-value]
    return stream


def _is_seekable(f: BinaryIO) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def _seekable(plain: BinaryIO) -> Iterator[BinaryIO]:
    """``plain`` itself when it can seek, else a temporary file holding a copy of it."""
    if _is_seekable(plain) and not isinstance(plain, gzip.GzipFile):
        yield plain
        return
    with tempfile.TemporaryFile(prefix="lazybench-estargz-") as spool:
        _copy(plain, spool)
        spool.seek(0)
        yield spool  # type: ignore[misc]


def _copy(src: BinaryIO, dst: BinaryIO) -> None:
    while piece := src.read(1 << 20):
        dst.write(piece)


class _Reader:
    """Reads exactly ``size`` bytes of one member's payload, in pieces."""

    def __init__(self, f: BinaryIO | None, size: int, name: str) -> None:
        self.f, self.size, self.name = f, size, name

    def read(self, n: int) -> bytes:
        if self.f is None:
            raise InvalidLayerTar(f"{self.name!r}: no payload")
        data = self.f.read(n)
        if len(data) != n:
            raise InvalidLayerTar(
                f"{self.name!r}: tar truncated inside the payload ({len(data)} of {n} bytes)"
            )
        return data


class _UnappliedGlobalHeaders(dict[str, str]):
    """The records of PAX global headers (type ``g``) as extraction keeps them: none.

    :mod:`tarfile` applies a global header's records (``uid``, ``mtime``,
    ``SCHILY.xattr.*`` ...) to every later member, as POSIX says; Go's ``archive/tar`` returns
    the header as an entry of its own and applies nothing, and containers/storage's
    extraction (pkg/archive ``createTarFile``) skips that entry: a normal pull of the input
    gives every file its own header's metadata only. Handed to :class:`tarfile.TarFile` as its
    ``pax_headers``, where a global header's records are stored, it keeps none.
    """

    def __setitem__(self, key: str, value: str) -> None:
        pass


def _skip(ti: tarfile.TarInfo) -> bool:
    return clean_name(ti.name) in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME)


def _extracted(infos: Iterable[tarfile.TarInfo]) -> list[tarfile.TarInfo]:
    """The entries that survive extracting the tar in order: one per name, the later wins.

    What containers/storage's layer extraction (``UnpackLayer``) and ``tar -xf`` leave, applied
    to the entry list, so the written layer, its TOC and any reordering agree with a normal
    pull (the Go writer's ``Build`` also keeps only the last entry of a name):

    * a later entry of a name replaces the earlier one, whatever the types (a file replacing a
      symlink, a directory replacing a file ...);
    * a non-directory replacing a directory removes what was under it (``os.RemoveAll``),
      also a directory the tar never named but made for the entries under it;
    * a directory re-declared over a directory keeps its children and takes the later mode and
      owner; extended attributes accumulate (extraction sets them, never clears them), the
      later value of a key winning;
    * a file replaced after hardlinks to it were made lives on in those hardlinks: the first
      becomes a regular file with the old content, the others link to it;
    * a hardlink to its own name keeps the file, with the link header's owner and mode.
    """
    kept: dict[int, tarfile.TarInfo] = {}  # input position -> entry (possibly rewritten)
    where: dict[str, int] = {}  # clean name -> position in `kept`
    links_to: dict[str, list[int]] = {}  # clean target name -> positions of hardlinks to it
    parents: set[str] = set()  # every directory some entry was put under (named or not)
    for pos, ti in enumerate(infos):
        name = clean_name(ti.name)
        old_pos = where.get(name)
        if (
            ti.islnk()
            and clean_name(ti.linkname) == name
            and old_pos is not None
            and not kept[old_pos].isdir()
        ):
            # A hardlink to its own name: the spec's tree keeps the file, its owner and mode
            # from the link's header (as every link header applies to the shared inode).
            heir = copy.copy(kept[old_pos])
            heir.mode, heir.uid, heir.gid = ti.mode, ti.uid, ti.gid
            heir.uname, heir.gname = ti.uname, ti.gname
            kept[old_pos] = heir
            continue
        if old_pos is not None:
            old = kept[old_pos]
            if ti.isdir() and old.isdir():
                ti = copy.copy(ti)
                ti.pax_headers = {
                    **{k: v for k, v in old.pax_headers.items() if k.startswith(XATTR_PREFIX)},
                    **ti.pax_headers,
                }
            _drop(kept, where, links_to, name)
        if not ti.isdir() and name in parents:  # a directory (even one made implicitly) goes
            parents.discard(name)
            for sub in [n for n in where if n.startswith(name + "/")]:
                _drop(kept, where, links_to, sub)
        kept[pos] = ti
        where[name] = pos
        parent = parent_dir(name)
        while parent and parent not in parents:
            parents.add(parent)
            parent = parent_dir(parent)
        if ti.islnk():
            links_to.setdefault(clean_name(ti.linkname), []).append(pos)
    return [kept[pos] for pos in sorted(kept)]


def _drop(
    kept: dict[int, tarfile.TarInfo],
    where: dict[str, int],
    links_to: dict[str, list[int]],
    name: str,
) -> None:
    """Remove ``name``'s entry; hardlinks made to it keep its content (see :func:`_extracted`)."""
    pos = where.pop(name)
    old = kept.pop(pos)
    live = [p for p in links_to.pop(name, []) if p in kept and kept[p].islnk()]
    live = [p for p in live if clean_name(kept[p].linkname) == name]
    if not live:
        return
    first = live[0]
    heir = copy.copy(old)  # keeps offset_data: the payload is read from the old entry
    heir.name = kept[first].name
    # A PAX "path" (or "linkpath") record outranks the field when the header is written
    # (tarfile, as the format says): the old one would put the heir back under the old name.
    heir.pax_headers = {k: v for k, v in old.pax_headers.items() if k != "path"}
    kept[first] = heir
    heir_name = clean_name(heir.name)
    if old.islnk():  # the dropped entry was itself a link: the heir links where it did
        links_to.setdefault(clean_name(old.linkname), []).append(first)
    for p in live[1:]:
        link = copy.copy(kept[p])
        link.linkname = heir.name
        link.pax_headers = {k: v for k, v in link.pax_headers.items() if k != "linkpath"}
        kept[p] = link
        links_to.setdefault(heir_name, []).append(p)


def _ordered(
    spool: BinaryIO, prioritized: list[str]
) -> Iterator[tuple[tarfile.TarInfo | None, _Reader | None]]:
    """The entries :func:`_extracted` keeps, in the Go writer's order (``sortEntries`` /
    ``moveRec``): prioritized files (with parents and hardlink targets), the landmark, then the
    rest. Yields ``(None, None)`` where ``.prefetch.landmark`` goes; with no prioritized files
    there is none (the caller writes ``.no.prefetch.landmark`` first)."""
    with tarfile.open(
        fileobj=spool,
        mode="r:",
        encoding="utf-8",
        errors="surrogateescape",
        pax_headers=_UnappliedGlobalHeaders(),
    ) as tar:
        infos = _extracted(ti for ti in tar.getmembers() if not _skip(ti))
    by_name = {clean_name(ti.name): i for i, ti in enumerate(infos)}
    moved: list[int] = []
    taken: set[int] = set()

    def move(name: str) -> None:
        name = clean_name(name)
        i = by_name.get(name)
        if name:
            move(parent_dir(name))
        if i is None or i in taken:
            return
        if infos[i].islnk():
            move(infos[i].linkname)
        taken.add(i)
        moved.append(i)

    for p in prioritized:
        move(p)
    rest = [i for i in range(len(infos)) if i not in taken]
    for i in moved:
        yield _with_payload(spool, infos[i])
    if prioritized:
        yield None, None
    for i in rest:
        yield _with_payload(spool, infos[i])


@contextlib.contextmanager
def layer_members(
    tar_in: BinaryIO, prioritized: Iterable[str] = ()
) -> Iterator[Iterator[tuple[tarfile.TarInfo | None, _Reader | None]]]:
    """The members of the layer tar ``tar_in`` (plain, gzip or zstd) as extraction leaves them
    (:func:`_extracted`: one per name, the later wins), in write order (:func:`_ordered`):
    ``(TarInfo, payload reader or None)``, with ``(None, None)`` where ``.prefetch.landmark``
    goes when ``prioritized`` is not empty. Shared by every writer of this package so that all
    formats agree with a normal pull. Raises what :mod:`tarfile` raises on a bad tar."""
    prioritized = [p for p in prioritized if clean_name(p)]
    with _seekable(_decompressed(tar_in)) as spool:
        yield _ordered(spool, prioritized)


def _with_payload(spool: BinaryIO, ti: tarfile.TarInfo) -> tuple[tarfile.TarInfo, _Reader | None]:
    if ti.isreg() and ti.size:
        spool.seek(ti.offset_data)
        return ti, _Reader(spool, ti.size, ti.name)
    return ti, None


# -- output ---------------------------------------------------------------------------------


def _compress_batch(jobs: list[tuple[bytes, int]], level: int) -> list[tuple[bytes, str]]:
    """Compress each member; hash its leading payload bytes (the chunk) while we're here."""
    out = []
    for data, payload_len in jobs:
        digest = "sha256:" + hashlib.sha256(data[:payload_len]).hexdigest() if payload_len else ""
        out.append((_deflate.compress(data, level, wbits=31), digest))
    return out


class _MemberWriter:
    """Gzip members in order: compressed in a pool, written sequentially, hashed."""

    def __init__(self, out: BinaryIO, level: int, workers: int) -> None:
        self.out = out
        self.level = level
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="estargz-gz")
        self.max_inflight = max(2, workers * 2)
        self.pending: collections.deque[Future[list[tuple[bytes, str]]]] = collections.deque()
        self.batch: list[tuple[bytes, int]] = []
        self.batch_bytes = 0
        self.cur = bytearray()
        self.cur_payload = 0
        self.count = 0  # members closed so far (the current one has index `count`)
        self.offsets: list[int] = []  # compressed offset of each written member
        self.chunk_digests: list[str] = []  # digest of each member's leading payload
        self.written = 0
        self.blob_hash = hashlib.sha256()
        self.diff_hash = hashlib.sha256()
        self.uncompressed = 0

    def write(self, data: bytes) -> None:
        self.cur += data
        self.diff_hash.update(data)
        self.uncompressed += len(data)

    def start_payload_member(self, payload: bytes) -> int:
        """Close the current member and start one with ``payload``; returns its index."""
        self.cut()
        self.cur_payload = len(payload)
        self.write(payload)
        return self.count

    def cut(self) -> None:
        if self.cur:
            self.batch.append((bytes(self.cur), self.cur_payload))
            self.batch_bytes += len(self.cur)
            self.cur = bytearray()
            self.cur_payload = 0
            self.count += 1
            if self.batch_bytes >= BATCH_BYTES:
                self._submit()

    def _submit(self) -> None:
        if self.batch:
            self.pending.append(self.pool.submit(_compress_batch, self.batch, self.level))
            self.batch, self.batch_bytes = [], 0
            while len(self.pending) > self.max_inflight:
                self._drain_one()

    def _drain_one(self) -> None:
        for data, digest in self.pending.popleft().result():
            self.offsets.append(self.written)
            self.chunk_digests.append(digest)
            self._emit(data)

    def _emit(self, data: bytes) -> None:
        self.out.write(data)
        self.blob_hash.update(data)
        self.written += len(data)

    def flush(self) -> None:
        self.cut()
        self._submit()
        while self.pending:
            self._drain_one()

    def write_raw_member(self, uncompressed: bytes) -> None:
        """Compress and write one member right now (the TOC), after everything pending."""
        self.flush()
        self.diff_hash.update(uncompressed)
        self.uncompressed += len(uncompressed)
        self._emit(_deflate.compress(uncompressed, self.level, wbits=31))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _LayerWriter:
    """Turns tar entries into members and TOC entries."""

    def __init__(self, members: _MemberWriter, chunk_size: int, landmark_mtime: int = 0) -> None:
        self.m = members
        self.chunk_size = chunk_size
        self.landmark_mtime = landmark_mtime
        self.entries: list[dict[str, Any]] = []
        # (entry dict, member index) whose offset/chunkDigest are filled in at the end
        self.fixups: list[tuple[dict[str, Any], int]] = []
        self.unames: dict[int, str] = {}
        self.gnames: dict[int, str] = {}
        # The prioritized region, while it is written: each payload member's index and
        # whether a chunk the trace read starts it; then the landmark's TOC entry.
        self.region: list[tuple[int, bool]] | None = None
        self.region_seq: list[int | None] = []  # per region member: its first read's number
        self.read_ranges: dict[str, list[tuple[int, int]]] = {}
        self.read_order: dict[str, list[tuple[int, int, int]]] = {}
        self.range_chunk_size = chunk_size
        self.landmark_entry: dict[str, Any] | None = None

    def start_region(
        self,
        read_ranges: Mapping[str, Sequence[tuple[int, int]]],
        range_chunk_size: int,
        read_order: Mapping[str, Sequence[tuple[int, int, int]]] | None = None,
    ) -> None:
        """The prioritized files come next, until the prefetch landmark: note their chunks."""
        self.region = []
        self.region_seq = []
        self.read_ranges = {clean_name(k): _merged(v) for k, v in read_ranges.items()}
        self.read_order = {
            clean_name(k): sorted((max(0, int(a)), int(b), int(q)) for a, b, q in v if b > a)
            for k, v in (read_order or {}).items()
        }
        self.range_chunk_size = range_chunk_size

    def add_landmark(self, name: str) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = len(LANDMARK_CONTENTS), 0, self.landmark_mtime
        ti.uname = ti.gname = ""
        region, self.region = self.region, None
        self.add(ti, _BytesReader(LANDMARK_CONTENTS))
        self.region = region
        if name == PREFETCH_LANDMARK:
            self.landmark_entry = self.entries[-1]

    def add(self, ti: tarfile.TarInfo | None, payload: _Reader | _BytesReader | None) -> None:
        if ti is None:
            self.add_landmark(PREFETCH_LANDMARK)
            return
        if ti.issparse():
            raise InvalidLayerTar(f"{ti.name!r}: sparse tar entries are not supported")
        etype = _TYPES.get(ti.type)
        if etype is None:
            raise InvalidLayerTar(f"{ti.name!r}: tar entry type {ti.type!r} is not supported")
        self.m.write(_header(toc_time_header(ti)))
        entry = self._toc_entry(ti, etype)
        self.entries.append(entry)
        if etype != "reg":
            return
        if ti.size == 0:
            entry["digest"] = "sha256:" + hashlib.sha256(b"").hexdigest()
            return
        assert payload is not None
        chunk_size = self.chunk_size
        read: list[tuple[int, int]] | None = None  # None: read whole (or not prioritized)
        order: list[tuple[int, int, int]] = []  # its first reads, by start
        if self.region is not None and self.landmark_entry is None:
            read = self.read_ranges.get(clean_name(ti.name))
            order = self.read_order.get(clean_name(ti.name), [])
            if read is not None and _covers(read, ti.size):
                read = None
            if read is not None:
                chunk_size = self.range_chunk_size
            elif len({q for _, _, q in order}) > 1:
                chunk_size = min(chunk_size, ORDER_CHUNK_SIZE)
        k = 0  # order[:k] lie wholly before the chunk being written
        whole = hashlib.sha256() if ti.size > chunk_size else None
        done = 0
        chunk_entry = entry
        while done < ti.size:
            n = min(chunk_size, ti.size - done)
            data = payload.read(n)
            if whole is not None:
                whole.update(data)
            else:
                entry["digest"] = None  # the chunk digest, filled in at the end
            if chunk_entry is not entry:
                chunk_entry["chunkOffset"] = done
            if n == chunk_size:
                chunk_entry["chunkSize"] = n
            idx = self.m.start_payload_member(data)
            self.fixups.append((chunk_entry, idx))
            if self.region is not None and self.landmark_entry is None:
                self.region.append((idx, read is None or touches(read, done, done + n)))
                # the earliest read of this chunk's bytes (order: by start)
                while k < len(order) and order[k][1] <= done:
                    k += 1
                seq: int | None = None
                j = k
                while j < len(order) and order[j][0] < done + n:
                    if order[j][1] > done and (seq is None or order[j][2] < seq):
                        seq = order[j][2]
                    j += 1
                self.region_seq.append(seq)
            done += n
            if done < ti.size:
                chunk_entry = {"name": ti.name, "type": "chunk"}
                self.entries.append(chunk_entry)
        if whole is not None:
            entry["digest"] = "sha256:" + whole.hexdigest()
        pad = -ti.size % tarfile.BLOCKSIZE
        if pad:
            self.m.write(b"\0" * pad)

    def _region_spans(self, toc_offset: int) -> list[tuple[int, int]]:
        """The compressed ``[start, end)`` blob span of each region member (its chunk and the
        tar headers riding in it), in blob order."""
        offsets = self.m.offsets
        return [
            (offsets[i], offsets[i + 1] if i + 1 < len(offsets) else toc_offset)
            for i, _wanted in self.region or ()
        ]

    def _toc_entry(self, ti: tarfile.TarInfo, etype: str) -> dict[str, Any]:
        e: dict[str, Any] = {"name": ti.name + ("/" if etype == "dir" else ""), "type": etype}
        if etype == "reg" and ti.size:
            e["size"] = ti.size
        modtime = estargz_modtime(ti)
        if modtime is not None:
            e["modtime"] = modtime
        if ti.linkname and etype in ("symlink", "hardlink"):
            e["linkName"] = ti.linkname
        if ti.mode:
            e["mode"] = ti.mode
        if ti.uid:
            e["uid"] = ti.uid
        if ti.gid:
            e["gid"] = ti.gid
        if un := _name_if_changed(self.unames, ti.uid, ti.uname):
            e["userName"] = un
        if gn := _name_if_changed(self.gnames, ti.gid, ti.gname):
            e["groupName"] = gn
        if etype in ("reg",) and ti.size:
            e["offset"] = None  # placeholder keeps Go's field order; filled in at the end
        if etype in ("char", "block"):
            if ti.devmajor:
                e["devMajor"] = ti.devmajor
            if ti.devminor:
                e["devMinor"] = ti.devminor
        xattrs = {
            k[len(XATTR_PREFIX) :]: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode(
                "ascii"
            )
            for k, v in ti.pax_headers.items()
            if k.startswith(XATTR_PREFIX)
        }
        if xattrs:
            e["xattrs"] = dict(sorted(xattrs.items()))
        if etype == "reg":
            e["digest"] = ""
        return e

    def finish(self) -> ConvertResult:
        self.m.flush()
        for entry, idx in self.fixups:
            entry["offset"] = self.m.offsets[idx]
            entry["chunkDigest"] = self.m.chunk_digests[idx]
            if entry.get("digest", "") is None:
                entry["digest"] = self.m.chunk_digests[idx]
        toc_offset = self.m.written
        region = self.region
        if self.landmark_entry is not None and region and not all(w for _, w in region):
            every = self._region_spans(toc_offset)
            spans = [span for span, (_i, wanted) in zip(every, region, strict=True) if wanted]
            flat = [v for span in _joined(spans, MAX_PREFETCH_RANGES) for v in span]
            self.landmark_entry[PREFETCH_RANGES_KEY] = flat
        if (
            self.landmark_entry is not None
            and region
            and any(q is not None for q in self.region_seq)
        ):
            listed = self.landmark_entry.get(PREFETCH_RANGES_KEY)
            fetched = None if listed is None else list(zip(listed[::2], listed[1::2], strict=True))
            order = _fetch_order(self._region_spans(toc_offset), self.region_seq, fetched)
            if order is not None:
                self.landmark_entry[PREFETCH_ORDER_KEY] = [v for t in order for v in t]
        for e in self.entries:
            if e.get("type") == "chunk":
                # Go's field order: name, type, offset, chunkOffset, chunkSize, chunkDigest
                order = ("name", "type", "offset", "chunkOffset", "chunkSize", "chunkDigest")
                items = {k: e[k] for k in order if k in e}
                e.clear()
                e.update(items)
        toc_json = encode_toc(self.entries)
        # A tar can hold what no layer can (an entry named "" that is a file, a hardlink to
        # nothing, a file replacing a directory that has entries, a name that is not UTF-8):
        # check the TOC as the store reads it, so that whatever converts also reads back.
        try:
            LayerIndex.from_toc_json([toc_json], toc_offset=toc_offset, compression="gzip")
        except InvalidToc as exc:
            raise InvalidLayerTar(f"the tar cannot be an eStargz layer: {exc}") from None
        ti = tarfile.TarInfo(TOC_TAR_NAME)
        ti.size, ti.mode, ti.mtime = len(toc_json), 0, 0
        ti.uname = ti.gname = ""
        pad = -len(toc_json) % tarfile.BLOCKSIZE
        member = (
            ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
            + toc_json
            + b"\0" * pad
            + b"\0" * (2 * tarfile.BLOCKSIZE)
        )
        self.m.write_raw_member(member)
        self.m._emit(estargz_footer_bytes(toc_offset))
        return ConvertResult(
            digest="sha256:" + self.m.blob_hash.hexdigest(),
            size=self.m.written,
            diff_id="sha256:" + self.m.diff_hash.hexdigest(),
            toc_digest=toc_digest(toc_json),
            uncompressed_size=self.m.uncompressed,
        )


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.f = io.BytesIO(data)

    def read(self, n: int) -> bytes:
        return self.f.read(n)


def _header(ti: tarfile.TarInfo) -> bytes:
    try:
        return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    except ValueError as exc:
        raise InvalidLayerTar(f"{ti.name!r}: cannot write its tar header: {exc}") from None


def _name_if_changed(seen: dict[int, str], ident: int, name: str) -> str:
    """Go's ``nameIfChanged``: a user/group name is written only when it changes per id."""
    if not name or seen.get(ident) == name:
        return ""
    seen[ident] = name
    return name


NS = 1_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
GO_ZERO_TIME_NS = -62_135_596_800 * NS  # Go's zero time.Time, 0001-01-01T00:00:00Z
# The seconds RFC 3339's four-digit year holds: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_RFC3339_SECONDS = range(-62_135_596_800, 253_402_300_800)
# Written for a time whose year RFC 3339 cannot hold (after 9999, before 1): a normal pull
# extracts such a file with the epoch as its time (containers/storage pkg/system Chtimes sets
# any time before 1970 or after 2262, time.Unix(0, 1<<63-1), to time.Unix(0, 0)), so the lazy
# view shows what the pull would. The Go writers do not help: estargz writes a year of five
# digits that its own reader cannot parse, and time.Time.MarshalJSON fails the zstd:chunked TOC.
EPOCH_RFC3339 = "1970-01-01T00:00:00Z"


def tar_mtime_ns(ti: tarfile.TarInfo) -> int:
    """``ti``'s modification time in nanoseconds since the epoch, as Go's archive/tar reads
    it: a PAX ``mtime`` record to the nanosecond (``parsePAXTime``: at most 9 fraction digits,
    the rest cut off; a minus sign applies to the fraction too), else the header's seconds.
    ``tarfile`` keeps only a float (about 0.2 µs apart in 2023), so the record is read again."""
    record = ti.pax_headers.get("mtime")
    ns = None if record is None else pax_time_ns(record)
    if ns is not None:
        return ns
    return int(Decimal(repr(ti.mtime)) * NS)  # no usable record: tarfile read the header's


def pax_time_ns(record: str) -> int | None:
    """A PAX time record (``mtime``, ``atime``, ``ctime``: seconds with an optional fraction)
    in nanoseconds since the epoch as Go's ``parsePAXTime`` reads it (at most 9 fraction
    digits, the rest cut off; a minus sign applies to the fraction too); None if malformed."""
    whole, _, fraction = record.partition(".")
    try:
        seconds = int(whole)
        nanos = int(fraction[:9].ljust(9, "0")) if fraction.isdigit() else 0
    except ValueError:
        return None
    return seconds * NS + (-nanos if whole.lstrip().startswith("-") else nanos)


def _rfc3339_seconds(seconds: int) -> str | None:
    """``YYYY-MM-DDTHH:MM:SSZ``; None when the year is outside RFC 3339's 1 to 9999."""
    if seconds not in _RFC3339_SECONDS:
        return None
    t = _EPOCH + timedelta(seconds=seconds)  # not strftime: glibc's %Y does not pad year 1
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}Z"


def estargz_modtime(ti: tarfile.TarInfo) -> str | None:
    """The eStargz TOC ``modtime`` of ``ti`` (None: left out), as the Go reference writer
    writes it: containerd/stargz-snapshotter estargz ``formatModtime`` leaves out the zero
    time and any time whose ``Unix()`` (seconds, floored) is 0, and otherwise writes
    ``t.UTC().Round(time.Second).Format(time.RFC3339)``. Go's ``Round`` rounds a half
    second up (toward the later second, also before 1970: it counts from year 1), where
    Python's ``round`` went to the even second. A year RFC 3339 cannot hold: see
    :data:`EPOCH_RFC3339`."""
    ns = tar_mtime_ns(ti)
    if ns == GO_ZERO_TIME_NS or ns // NS == 0:
        return None
    return _rfc3339_seconds((ns + NS // 2) // NS) or EPOCH_RFC3339


def toc_time_header(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    """``ti``, or a copy of it whose time is the whole second its TOC ``modtime`` holds
    (:func:`estargz_modtime`; the epoch where that is left out) when its own time has a
    fraction of a second. The TOC cannot hold the fraction, and the header is what a normal
    pull of the blob extracts: with both at the TOC's time, the lazy view (store/tree.py)
    and a normal pull agree (a header at 12:00:00.7 gave 12:00:00.7 extracted, 12:00:01
    lazily). Whole-second times are left as they are (the TOC holds them, or both views
    clamp them to the epoch)."""
    if tar_mtime_ns(ti) % NS == 0:
        return ti
    modtime = estargz_modtime(ti)
    seconds = 0
    if modtime is not None:
        seconds = int(
            (datetime.fromisoformat(modtime.replace("Z", "+00:00")) - _EPOCH).total_seconds()
        )
    out = copy.copy(ti)
    out.mtime = seconds
    out.pax_headers = {k: v for k, v in ti.pax_headers.items() if k != "mtime"}
    return out


def rfc3339_nano(ns: int) -> str:
    """``ns`` (since the epoch) in Go's ``time.RFC3339Nano``, as ``time.Time``'s JSON form
    writes it (containers/storage's zstd:chunked TOC ``modtime``): the fraction to the
    nanosecond without trailing zeros, none for a whole second; before 1970 the seconds are
    floored and the fraction counts up from them (-5.25 s is ``23:59:54.75Z``). A year
    RFC 3339 cannot hold: see :data:`EPOCH_RFC3339`."""
    seconds, nanos = divmod(ns, NS)
    whole = _rfc3339_seconds(seconds)
    if whole is None:
        return EPOCH_RFC3339
    if not nanos:
        return whole
    return f"{whole[:-1]}.{nanos:09d}".rstrip("0") + "Z"


def _merged(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[start, end)`` ranges sorted, empty ones dropped, overlapping or touching ones joined
    (:func:`store.spans.merge_spans`; a start before the file is read as 0)."""
    return merge_spans((max(0, int(a)), int(b)) for a, b in ranges)


def _covers(ranges: list[tuple[int, int]], size: int) -> bool:
    """Whether merged ``ranges`` hold all of ``[0, size)``."""
    return bool(ranges) and ranges[0][0] <= 0 and ranges[0][1] >= size


def _fetch_order(
    spans: Sequence[tuple[int, int]],
    seqs: Sequence[int | None],
    fetched: Sequence[tuple[int, int]] | None,
    most: int = MAX_PREFETCH_ORDER,
) -> list[tuple[int, int, int]] | None:
    """The :data:`~.footer.PREFETCH_ORDER_KEY` triples ``(start, end, rank)``: the region
    members' ``spans`` (blob order) that a prefetch takes — those inside ``fetched`` (the
    ranges key's, ascending; None: all) — sorted by the number of the read that first took
    their bytes (``seqs``, one per span; None: the member before it's, the first ones' first
    of all), then by offset; neighbours in both orders joined, each range ranked by its first
    read. Coarsened until at most ``most`` ranges remain: the reads taken in groups of 2, 4,
    8, … (a group's spans in blob order, ranked by the group's first read). None when the
    order is blob order anyway, or cannot be listed within ``most``."""
    rows: list[tuple[int, int, int]] = []  # (seq, start, end)
    last = -1
    for (lo, hi), seq in zip(spans, seqs, strict=True):
        if seq is not None:
            last = seq
        if fetched is None or touches(fetched, lo, hi):
            rows.append((last if seq is None else seq, lo, hi))
    if not rows:
        return None
    ordered = sorted({q for q, _, _ in rows})
    rank = {q: n for n, q in enumerate(ordered)}
    group = 1
    while True:
        out: list[tuple[int, int, int]] = []
        for q, lo, hi in sorted(rows, key=lambda r: (rank[r[0]] // group, r[1])):
            first = ordered[rank[q] // group * group]  # the group's first read
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi, out[-1][2])
            else:
                out.append((lo, hi, max(0, first)))
        if [r[:2] for r in out] == sorted(r[:2] for r in out) or group >= len(rank):
            return None  # blob order: the key would say nothing
        if len(out) <= most:
            return out
        group *= 2


def _joined(spans: list[tuple[int, int]], most: int) -> list[tuple[int, int]]:
    """``[start, end)`` spans merged (:func:`_merged`), then the nearest joined across their
    gaps until at most ``most`` remain."""
    out = _merged(spans)
    if len(out) > most:
        gaps = sorted(out[i + 1][0] - out[i][1] for i in range(len(out) - 1))
        cut = gaps[len(out) - most - 1]  # joining every gap up to this leaves at most `most`
        joined: list[tuple[int, int]] = [out[0]]
        for lo, hi in out[1:]:
            if lo - joined[-1][1] <= cut:
                joined[-1] = (joined[-1][0], hi)
            else:
                joined.append((lo, hi))
        out = joined
    return out
