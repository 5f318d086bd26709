"""The validated entry tree of one layer: the one path from a TOC to a tree.

Every user of a TOC (the store's mounted layers, the reader, the CLI) gets its tree here, so
every check runs for all of them. Entries are applied in TOC order, the way ``tar -x`` (and
containers/storage's layer extraction) applies members, with the Go reader's conventions
(containerd/stargz-snapshotter ``estargz.Reader.initFields``) for what a TOC adds to a tar:

* names are cleaned (``./a//b/`` → ``a/b``; the root is ``""``); a name or hardlink target
  whose ``..`` climbs above the root is refused (:class:`InvalidEntryName`), as is a name
  with a NUL, a component over 255 bytes or a path over 4095 (nothing could extract it);
* a ``chunk`` entry belongs to the last non-chunk entry before it; ``chunkSize`` 0 means "to
  the end of the file"; a ``reg`` entry with ``chunkSize`` < ``size`` is its own first chunk;
  a file's chunks must follow each other without gap or overlap and cover it exactly, and
  every data offset must lie before the TOC (:class:`TocOutOfRange`);
* ``userName``/``groupName`` missing for a non-zero uid/gid carry forward from the last entry
  that named that id (the writer omits repeats);
* directories the TOC never names but that hold entries are created (mode 0755), at most
  ``max_entries`` of them holding ``max_bytes`` of names (the TOC's limits); an entry under a
  name that is not a directory (at that point) is refused;
* a whiteout under a name this layer whited out (the first missing directory of its path has
  ``.wh.<dir>`` beside it, at any depth) is ignored, and so is an opaque marker right in such
  a directory, as containers/storage's overlay extraction ignores them (pkg/archive
  ``Unpack``, ``overlayWhiteoutConverter.ConvertRead``: the whiteout is a 0:0 character
  device there, its ``mknod`` under it fails with ``ENOTDIR``, which is ignored; the marker's
  ``setxattr`` marks the device); see ``_Builder._whiteout_parent``;
* a later entry with the same name wins, for every type: a directory re-declared keeps its
  children and takes the new metadata; any other replacement drops what was there (a
  directory with its subtree), as ``tar -x`` does;
* a hardlink resolves, when it is reached, to the entry its target names then (a target that
  is missing or comes later is refused); the target gets the link's name as another parent
  reference (``nlink``, which counts only names still in the tree at the end); the target's
  own metadata stays (the Go reader's view), the last link header of each file is kept in
  ``LayerIndex.link_headers`` for views that follow extraction's chown/chmod after linking,
  its ``xattrs`` the target's with every link header's set on top in TOC order (extraction
  calls ``Lsetxattr`` on the shared inode for each header's), less ``security.capability``
  where a link header's ids differ from the inode's owner and it does not set it again
  (extraction chowns the inode then, and the kernel's chown removes it: ``CAPABILITY_XATTR``);
* a name (or link target) decoded from a ``\\udcXX`` JSON escape is spelled as its bytes
  decode (surrogateescape), so two spellings of one byte string are one name, as extraction
  sees them; one holding U+FFFD is refused (:class:`InvalidEntryName`): Go's
  ``encoding/json``, which writes both formats' TOCs, puts it for each byte that is not
  UTF-8, so the layer's own name is unknown (a normal pull gets it from the tar header);
* a chunk's compressed bytes end where the next member starts (the next distinct offset of a
  data entry with ``innerOffset`` 0, or a file's ``endOffset`` — zstd:chunked writes it:
  where the file's last frame ends, see :mod:`.zstdchunked`), or at the TOC;
* integer fields must be JSON integers in range, string fields strings (``null`` = absent):
  ``"size": "5"`` is refused, not converted.

Memory: entries are structs without a per-instance dict, sharing interned strings and small
integers, files keep their chunks in tuples, and no per-name dict is kept: a 100,000-entry
layer costs ~65 MB (``tests/estargz/test_memory.py``).

The garbage collector never sees a tree: entries and chunks are ``msgspec`` structs it does not
track (``gc=False``), safe because they can be in no reference cycle (an entry has no link up
to its directory: the index keeps each entry's parent inode, read by
:meth:`LayerIndex.parent`), and a directory's children dict, holding only untracked values, is
untracked too. Why: a layer has tens of thousands of entries and an image's layers are all held
while a container runs; every full collection scanned all of them, and each young one scanned
what the last build made. Against the same builds with tracked slotted dataclasses (as they
were, parent links included): 1.43 times less CPU, the collector's own time 31 times less
(``benchmarks/bench_index_build.py``). The collector is also paused while an index is built
(:data:`gc_paused`): the build's chunk tuples are tracked when made; that pause gains little
since (1.04 there).
"""

from __future__ import annotations

import array
import base64
import binascii
import bisect
import contextlib
import gc
import itertools
import logging
import operator
import re
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import msgspec

from .errors import InvalidEntryName, InvalidToc, TocOutOfRange
from .footer import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, Footer
from .toc import (
    DEFAULT_LIMITS,
    WHOLE_DECODE_MAX,
    RawEntry,
    Toc,
    TocLimits,
    iter_toc_entries,
    typed_toc_entries,
)

log = logging.getLogger(__name__)

_MAX_INT = (1 << 63) - 1
_MAX_SIZE = (1 << 63) - 1
_MAX_ID = (1 << 32) - 1


# Shared empty containers: a layer can have 100,000 entries, and most have no xattrs, no
# children and (unless regular files) no chunks; one object each instead of three per entry.
class _EmptyMapping(Mapping[str, Any]):
    """An immutable, hashable empty mapping (one shared default for every entry)."""

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "{}"


_NO_XATTRS: Mapping[str, bytes] = _EmptyMapping()
_NO_CHILDREN: Mapping[str, Entry] = _EmptyMapping()
_NO_CHUNKS: tuple[Chunk, ...] = ()

ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})
_TYPES = {t: t for t in ENTRY_TYPES}  # one string object per type name


class Chunk(msgspec.Struct, gc=False, eq=False):
    """One independently decompressible piece of a regular file.

    Never tracked by the garbage collector (``gc=False``): it holds only strings and integers,
    so it can be in no reference cycle, and a layer has one per file (the collector scanned
    each again after every build; a file's chunk tuple, tracked when made, is untracked by
    the first collection that sees it)."""

    name: str  # the file's cleaned path (for messages)
    chunk_offset: int  # offset of this chunk in the file
    size: int  # uncompressed bytes of the file in this chunk
    offset: int  # compressed blob offset of the member holding it
    compressed_end: int  # where that member's bytes end (next member or the TOC)
    inner_offset: int  # where the chunk starts inside the decompressed member
    digest: str  # chunkDigest ("sha256:…"), "" if the TOC has none
    compression: str  # "gzip" | "zstd"

    @property
    def compressed_size(self) -> int:
        return self.compressed_end - self.offset

    # The names the store's data path uses (store.layer).
    @property
    def compressed_offset(self) -> int:
        return self.offset

    @property
    def file_offset(self) -> int:
        return self.chunk_offset


class Entry(msgspec.Struct, gc=False, eq=False):
    """A node of the tree (hardlinks share their target's Entry).

    ``children`` is a dict for directories (read-only empty mapping otherwise), ``chunks`` a
    tuple for regular files with content (empty otherwise), ``xattrs`` read-only when there
    are none. An entry holds no link up (:meth:`LayerIndex.parent` finds a parent by inode):
    the tree has no reference cycles, so entries need not be, and are not, tracked by the
    garbage collector (``gc=False``) — a layer's tens of thousands of entries are never
    scanned, and a dropped tree is freed by reference counting alone. Nothing may give an
    entry a reference back to itself or an ancestor (it would never be freed).
    """

    name: str
    type: str
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    modtime: str = ""
    link_name: str = ""  # symlink target as written; for hardlinks the cleaned target path
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: Mapping[str, bytes] = _NO_XATTRS
    digest: str = ""  # sha256 of the whole file (reg), "" if absent
    nlink: int = 0
    children: Mapping[str, Entry] = _NO_CHILDREN  # a dict for directories
    chunks: list[Chunk] | tuple[Chunk, ...] = _NO_CHUNKS  # a tuple once the file is complete
    implicit: bool = False  # a directory the TOC never named
    ino: int = -1  # position in LayerIndex.entries (-1: not in the final tree)

    def __post_init__(self) -> None:
        if self.type == "dir" and self.children is _NO_CHILDREN:
            self.children = {}

    @property
    def mtime(self) -> float:
        return parse_modtime(self.modtime)

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"


def parse_modtime(value: str) -> float:
    if not value:
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def clean_name(name: str, *, where: Where = "") -> str:
    """Go's ``cleanEntryName`` (``path.Clean("/"+name)[1:]``), refusing escapes of the root."""
    if name and name[0] not in "./" and "/." not in name and "//" not in name and ".." not in name:
        return name.rstrip("/")  # already clean but for a trailing slash: the usual case
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise InvalidEntryName(f"{where}name {name!r} escapes the layer root")
            parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


def parent_dir(name: str) -> str:
    return name.rpartition("/")[0]


class _CollectorPause:
    """Pauses (``gc.disable``) the process's garbage collector while at least one caller is
    inside; thread-safe, nestable. The collector is enabled again when the last caller leaves,
    unless it was disabled before the first came."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._was_enabled = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._inside == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if self._inside == 0 and self._was_enabled:
                    gc.enable()


# The collector paused while an index is built (module doc); for the build's duration only.
gc_paused = _CollectorPause()


class LayerIndex:
    """Tree + chunk table of one layer, validated. Build with :meth:`from_toc_json` (the store:
    TOC JSON in pieces, bounded memory), :meth:`from_toc` or :meth:`from_entries`.

    ``entries[i]`` is the entry numbered ``i`` (``Entry.ino``): every node of the final tree
    once (a hardlinked file once), the root first, parents before children; ``_parents[i]`` is
    the inode of its parent. Both are set by the build's numbering pass only.

    ``after_whiteout`` holds the inodes of the directories whose name first came, in TOC
    order, after a ``.wh.<name>`` in the same directory (the order of the names' first
    entries, which each ``children`` dict keeps): which of the two came first is what an
    overlay view of the layer needs (:mod:`store.tree`), in constant time; the set is empty
    but for such layers.
    """

    def __init__(self) -> None:
        self.root: Entry = Entry(name="", type="dir", mode=0o755, nlink=2, implicit=True)
        self.entries: list[Entry] = [self.root]
        self._parents = array.array("i", (0,))  # _parents[i]: the inode of entries[i]'s parent
        self._hardlinks: dict[str, str] = {}  # link name -> target name
        self._all_chunks: list[Chunk] = []
        self.toc_offset = 0
        self.compression = "gzip"
        self.prefetch_end_offset: int | None = None
        self.has_no_prefetch_landmark = False
        self.chunk_count = 0
        # Where the first chunk without a digest to verify it by is (its TOC entry), None when
        # every chunk has one: such a chunk is never served (_Builder._chunk_digest).
        self.unverifiable: str | None = None
        # ino of a hardlinked file -> its last hardlink header (TOC order): extraction chowns,
        # chmods and sets the times of the shared inode from each link header it applies
        self.link_headers: dict[int, Entry] = {}
        # inos of implicit directories extraction makes set-group-ID (_Builder._dir)
        self.setgid_implicit: set[int] = set()
        # inos of directories whose name came after ``.wh.<name>`` in their parent (_Builder)
        self.after_whiteout: set[int] = set()
        # ino -> (uid, gid) extraction leaves where a header's id is 2**32-1 (_Builder._owner)
        self.owners: dict[int, tuple[int, int]] = {}

    # -- queries -------------------------------------------------------------------------

    def lookup(self, path: str) -> Entry | None:
        """The entry at ``path`` (any spelling: ``./a/b/`` works); hardlinks give the target."""
        try:
            name = clean_name(path)
        except InvalidEntryName:
            return None
        e: Entry | None = self.root
        for part in name.split("/") if name else ():
            assert e is not None
            e = e.children.get(part)
            if e is None:
                return None
        return e

    def parent(self, entry: Entry) -> Entry | None:
        """The directory holding ``entry`` in the final tree (for a hardlinked file, the
        directory of one of its names); None for the root and for an entry not in the tree.
        Constant time: the parents' inode numbers are kept beside the entries (4 bytes an
        entry), as entries hold no link up (module doc)."""
        ino = entry.ino
        if ino <= 0 or ino >= len(self._parents) or self.entries[ino] is not entry:
            return None
        return self.entries[self._parents[ino]]

    def hardlink_target(self, path: str) -> str | None:
        """For a name that is a hardlink, the cleaned path of its target; else None."""
        name = clean_name(path)
        target = self._hardlinks.get(name)
        if target is None or self.lookup(name) is not self.lookup(target):
            return None  # replaced by a later entry since
        return target

    def hardlinks(self) -> Iterator[tuple[str, Entry]]:
        """``(link name, entry)`` for every name a hardlink entry gave that is still in the
        final tree (cleaned paths): the entry is the file the name shows, whose own ``name``
        is the one it was first given — maybe replaced since."""
        for name in self._hardlinks:
            e = self.lookup(name)
            if e is not None:
                yield name, e

    def names(self) -> Iterator[tuple[str, Entry]]:
        """Every path in the layer (hardlink names included) with its entry."""
        return self.walk()

    def walk(self) -> Iterator[tuple[str, Entry]]:
        """Depth-first ``(path, entry)`` from the root, children in name order."""
        stack = [("", self.root)]
        while stack:
            path, e = stack.pop()
            yield path, e
            for child_name in sorted(e.children, reverse=True):
                stack.append(((path + "/" if path else "") + child_name, e.children[child_name]))

    def chunks(self) -> Iterator[Chunk]:
        """Every chunk of every regular file of the tree (each file once)."""
        return iter(self._all_chunks)

    def all_chunks(self) -> list[Chunk]:
        """Every chunk of the tree's files, sorted by compressed offset (then inner offset)."""
        return self._all_chunks

    def chunks_for_range(self, entry: Entry, offset: int, size: int) -> list[Chunk]:
        """The chunks of ``entry`` that hold bytes of ``[offset, offset+size)``, in order."""
        end = min(entry.size, offset + size)
        if size <= 0 or offset >= end:
            return []
        i = max(0, bisect.bisect_right(entry.chunks, offset, key=_chunk_start) - 1)
        out = []
        for c in entry.chunks[i:]:
            if c.chunk_offset >= end:
                break
            if c.chunk_offset + c.size > offset:
                out.append(c)
        return out

    @staticmethod
    def is_landmark(name: str) -> bool:
        return name in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK)

    # -- building ------------------------------------------------------------------------

    @classmethod
    @gc_paused()  # per call (a contextmanager decorates as a fresh context each time)
    def from_toc_json(
        cls,
        pieces: Iterable[bytes],
        *,
        toc_offset: int,
        compression: str = "gzip",
        limits: TocLimits = DEFAULT_LIMITS,
    ) -> LayerIndex:
        """The validated index of TOC JSON given in pieces (:func:`~store.estargz.toc.
        toc_json_pieces`), decoded one entry at a time: memory is the index, not the JSON.

        The entry point for any container of the TOC schema (eStargz's gzip+tar, a
        zstd:chunked frame): hand its uncompressed JSON pieces here. ``toc_offset`` is where
        the TOC starts in the blob: every data offset must lie before it. Raises
        :class:`InvalidToc` and subclasses.
        """
        it = iter(pieces)
        head: list[bytes] = []
        size = 0
        for piece in it:
            head.append(piece)
            size += len(piece)
            if size > WHOLE_DECODE_MAX:
                break
        else:  # small enough to decode whole: typed records when every field checks out
            head = [b"".join(head)]
            typed = typed_toc_entries(head[0], limits)
            if typed is not None:
                del head
                return cls.from_entries(
                    typed, toc_offset=toc_offset, compression=compression, limits=limits
                )
        where = f"TOC at offset {toc_offset}"
        entries = iter_toc_entries(itertools.chain(head, it), where, limits)
        return cls.from_entries(
            entries, toc_offset=toc_offset, compression=compression, limits=limits
        )

    @classmethod
    def from_toc(cls, toc: Toc, footer: Footer | None = None) -> LayerIndex:
        """Build the tree of a decoded :class:`Toc`. Raises :class:`InvalidToc` (and
        subclasses) on bad entries."""
        return cls.from_entries(toc.entries, toc_offset=toc.offset, compression=toc.compression)

    @classmethod
    def from_entries(
        cls,
        raw_entries: Iterable[RawEntry | Mapping[str, Any]],
        *,
        toc_offset: int,
        compression: str,
        limits: TocLimits = DEFAULT_LIMITS,
    ) -> LayerIndex:
        """Apply TOC entries in order, as ``tar -x`` applies members (module doc): decoded
        JSON objects, checked field by field, or :class:`~store.estargz.toc.RawEntry`
        records msgspec already typed. A chunk larger than ``limits.max_chunk_bytes`` is
        refused, and so are directories the TOC never names past ``limits.max_entries`` of
        them or ``limits.max_bytes`` of their names (:meth:`_Builder._implicit`). The
        garbage collector is paused meanwhile (:data:`gc_paused`, module doc)."""
        idx = cls()
        idx.toc_offset = toc_offset
        idx.compression = compression
        with gc_paused():
            _Builder(idx, limits.max_chunk_bytes, limits).run(raw_entries)
        return idx


# A chunk's compressed member is read as at most twice its inflated bytes (``innerOffset +
# size``) plus this: its headers, and those of entries without content that follow it in the
# same member. Deflate at level 1 took 5.5 % more than a 4 MiB chunk of random bytes (a
# vector's); twice is for memory's sake, against a TOC naming nothing between a small file
# and a far-off TOC or endOffset, which had one read fetch and hold every byte in between.
# A member longer than that is cut there when fetched; what it then lacks fails its inflate.
COMPRESSED_SLACK = 64 << 10


# The OCI layer's whiteout name prefix and opaque marker (image-spec layer.md); the overlay
# view is store.tree's.
WHITEOUT_PREFIX = ".wh."
# The file capability xattr. Extraction chowns a hardlink header's inode when the header's
# ids differ from the inode's (containers/storage ``idtools.SafeLchown``: ``Lchown`` unless
# ``Lstat`` shows the same uid and gid; an id of 2**32-1 never matches), and the kernel's
# chown of anything but a directory removes it (``chown_common`` sets ``ATTR_KILL_PRIV``,
# ``cap_inode_killpriv``), even when the ids are -1; only then does extraction set the
# header's own xattrs (pkg/archive ``createTarFile``). Checked with podman 4.3 and 5.4.
CAPABILITY_XATTR = "security.capability"
OPAQUE_MARKER = ".wh..wh..opq"


class _Where:
    """``"TOC entry <i> (<name>): "``, the prefix of an entry's error messages, formatted only
    when a message is (building it for every entry cost a tenth of the index build)."""

    __slots__ = ("i", "name")

    def __init__(self, i: int) -> None:
        self.i = i
        self.name: str | None = None

    def __format__(self, spec: str) -> str:
        if self.name is None:
            return f"TOC entry {self.i}: "
        return f"TOC entry {self.i} ({self.name!r}): "

    def __str__(self) -> str:
        return self.__format__("")


Where = str | _Where


_SHA256_HEX = re.compile(r"sha256:[0-9a-f]{64}")


def _is_sha256(digest: str) -> bool:
    """``digest`` is ``sha256:`` and 64 lowercase hex digits (go-digest's form)."""
    return _SHA256_HEX.fullmatch(digest) is not None


def _landmark_end(offset: int, toc_offset: int, where: Where) -> int:
    """The end of the prefetch region a ``.prefetch.landmark`` entry at blob ``offset``
    gives: ``offset``, or ``toc_offset`` (all the layer's data) when it is at or past the TOC.

    A landmark of size 0 carries no data, so the check on data offsets
    (:class:`TocOutOfRange`) never saw its offset, and any number made the region the
    whole blob. It is a hint, as in the Go reader (``fs/layer``'s prefetch takes the
    landmark's offset as its prefetch size unchecked; ``fs/remote/blob.go`` stops at the
    blob's end, and every chunk before it is cached): the layer is not refused for it, and
    the region stops at the TOC, where the layer's data ends. Logged at warning level.
    """
    if offset < toc_offset:
        return offset
    log.warning(
        "%soffset %d is at or past the TOC (offset %d): the prefetch region ends at the TOC",
        where,
        offset,
        toc_offset,
    )
    return toc_offset


class _Builder:
    """Applies entries one by one to a :class:`LayerIndex`, validating each."""

    def __init__(
        self,
        idx: LayerIndex,
        max_chunk: int = DEFAULT_LIMITS.max_chunk_bytes,
        limits: TocLimits = DEFAULT_LIMITS,
    ) -> None:
        self.idx = idx
        self.max_chunk = max_chunk
        self.limits = limits
        # What implicit directories (_dir) may still take: their number, their names' bytes
        self.implicit_left = limits.max_entries
        self.implicit_bytes_left = limits.max_bytes
        self.unames: dict[int, str] = {}
        self.gnames: dict[int, str] = {}
        self.ints: dict[int, int] = {}
        self.starts: list[int] = [idx.toc_offset]  # compressed offsets where members start
        self.last: Entry | None = None  # the last non-chunk entry (chunks continue it)
        self.last_dir: tuple[str, Entry] = ("", idx.root)
        self.link_headers: dict[int, tuple[Entry, Entry]] = {}  # id(target) -> (target, link)
        # id(target) -> the xattrs its link headers carry so far (link_headers keeps it alive)
        self.link_xattrs: dict[int, dict[str, bytes]] = {}
        self.setgid_implicit: dict[int, Entry] = {}  # id(dir) -> dir (see _dir)
        self.owners: dict[int, tuple[Entry, int, int]] = {}  # id(inode) -> (it, uid, gid): _owner
        # (directory, name): a name first added to a directory holding .wh.<name> already
        self.after_whiteout: list[tuple[Entry, str]] = []
        # (id(dir), name) -> (dir, [(whiteout, where)]): whiteouts ignored deeper under a name
        # the layer whited out in that directory, made after all if the name is (_replay)
        self.ignored: dict[tuple[int, str], tuple[Entry, list[tuple[Entry, Where]]]] = {}
        self.compression = idx.compression

    def run(self, raw_entries: Iterable[RawEntry | Mapping[str, Any]]) -> None:
        for i, raw in enumerate(raw_entries):
            self.apply(i, raw)
        self._finish_file()
        self._number()

    def apply(self, i: int, raw: RawEntry | Mapping[str, Any]) -> None:
        # The hot loop of every layer load (~8,000 entries for a big layer, while podman
        # waits): the usual case is spelled out inline, the rest goes to the helpers.
        where = _Where(i)
        if type(raw) is RawEntry:
            etype = _TYPES.get(raw.type)
            if etype is None:
                raise InvalidToc(f"{where}unknown type {raw.type!r}")
            name = raw.name
            if (
                0 < len(name) <= 63  # within Linux's limits (see _checked_name)
                and name[0] not in "./"
                and "/." not in name
                and "//" not in name
                and ".." not in name
                and "\0" not in name
            ):
                name = name.rstrip("/")  # already clean (clean_name's fast path)
            else:
                name = _checked_name(name, where)
            where.name = name
        else:
            raw, etype, name = _typed(raw, where)  # type: ignore[arg-type]
        assert type(raw) is RawEntry
        offset = raw.offset
        inner = raw.innerOffset
        size = raw.size
        toc_offset = self.idx.toc_offset
        is_data = etype == "chunk" or (etype == "reg" and size > 0)
        if is_data and offset >= toc_offset:
            raise TocOutOfRange(
                f"{where}offset {offset} is at or past the TOC (offset {toc_offset})"
            )
        end_offset = raw.endOffset
        if end_offset and is_data:
            if not offset < end_offset <= toc_offset:
                raise TocOutOfRange(
                    f"{where}endOffset {end_offset} is not in ({offset}, {toc_offset}] "
                    f"(after its offset, not past the TOC)"
                )
            self.starts.append(end_offset)  # the next frame starts there
        last = self.last
        if etype == "chunk":
            if last is None or last.type != "reg" or last.name != name:
                raise InvalidToc(f"{where}chunk does not follow its file")
            chunk_offset = raw.chunkOffset
            chunk_size = raw.chunkSize or last.size - chunk_offset
            chunk_digest = raw.chunkDigest
            if len(chunk_digest) != 71 or not _is_sha256(chunk_digest):
                chunk_digest = self._chunk_digest(chunk_digest, "", where)
            self._add_chunk(last, chunk_digest, chunk_offset, chunk_size, offset, inner, where)
            return
        if last is not None and type(last.chunks) is list:
            self._finish_file()  # the last file has content: check its chunks cover it
        link_name = raw.linkName
        if etype == "hardlink":
            link_name = _checked_name(link_name, f"{where}hardlink target: ")
        elif etype == "symlink":
            if not 0 < len(link_name.encode("utf-8", "surrogateescape")) < 4096:
                raise InvalidToc(f"{where}symlink target is empty or longer than 4095 bytes")
            if "\0" in link_name:  # symlink(2) takes a C string: no tar makes this target
                raise InvalidEntryName(f"{where}symlink target {link_name[:80]!r} holds a NUL")
        small = self.ints.setdefault  # an integer most entries share: one object per value
        intern = sys.intern
        uid = small(raw.uid, raw.uid)
        gid = small(raw.gid, raw.gid)
        uname = intern(raw.userName)
        gname = intern(raw.groupName)
        if uid != 0 and not uname:
            uname = self.unames.get(uid, "")
        else:
            self.unames[uid] = uname
        if gid != 0 and not gname:
            gname = self.gnames.get(gid, "")
        else:
            self.gnames[gid] = gname
        xattrs = raw.xattrs
        digest = raw.digest
        e = Entry(
            name,
            etype,
            size if etype == "reg" else 0,
            small(raw.mode, raw.mode),
            uid,
            gid,
            uname,
            gname,
            intern(raw.modtime),
            link_name,
            small(raw.devMajor, raw.devMajor),
            small(raw.devMinor, raw.devMinor),
            _xattrs(xattrs, where) if xattrs else _NO_XATTRS,
            digest,
        )
        if etype == "reg":
            if size > 0:
                # The file's first chunk: it starts the file, so it continues nothing.
                chunk_size = raw.chunkSize
                if not chunk_size or chunk_size > size:
                    chunk_size = size
                if chunk_size + inner > self.max_chunk:  # inflated: innerOffset + size
                    self._too_big(chunk_size, where, inner)
                chunk_digest = raw.chunkDigest
                if chunk_digest == digest:
                    chunk_digest = digest  # one string object for the usual single-chunk file
                if len(chunk_digest) != 71 or not _is_sha256(chunk_digest):
                    whole = digest if chunk_size == size else ""
                    chunk_digest = self._chunk_digest(chunk_digest, whole, where)
                e.chunks = [
                    Chunk(name, 0, chunk_size, offset, 0, inner, chunk_digest, self.compression)
                ]
                if inner == 0:
                    self.starts.append(offset)
                self.idx.chunk_count += 1
            if name == PREFETCH_LANDMARK:
                self.idx.prefetch_end_offset = _landmark_end(offset, toc_offset, where)
            elif name == NO_PREFETCH_LANDMARK:
                self.idx.has_no_prefetch_landmark = True
        self.last = e
        self._insert(e, where)

    def _add_chunk(
        self,
        owner: Entry,
        digest: str,
        chunk_offset: int,
        chunk_size: int,
        offset: int,
        inner: int,
        where: Where,
    ) -> None:
        prev_end = owner.chunks[-1].chunk_offset + owner.chunks[-1].size if owner.chunks else 0
        if chunk_size + inner > self.max_chunk:  # inflated: innerOffset + size
            self._too_big(chunk_size, where, inner)
        if chunk_offset != prev_end or chunk_size <= 0 or chunk_offset + chunk_size > owner.size:
            raise InvalidToc(
                f"{where}chunk [{chunk_offset}, {chunk_offset + chunk_size}) "
                f"does not continue the file (expected offset {prev_end}, size {owner.size})"
            )
        if owner.chunks is _NO_CHUNKS:
            owner.chunks = []
        if digest == owner.digest:
            digest = owner.digest  # one string object for the usual single-chunk file
        c = Chunk(
            name=owner.name,
            chunk_offset=chunk_offset,
            size=chunk_size,
            offset=offset,
            compressed_end=0,
            inner_offset=inner,
            digest=digest,
            compression=self.compression,
        )
        owner.chunks.append(c)  # type: ignore[union-attr]
        if inner == 0:
            self.starts.append(offset)
        self.idx.chunk_count += 1

    def _chunk_digest(self, chunk_digest: str, file_digest: str, where: Where) -> str:
        """The digest a chunk whose ``chunkDigest`` is not a ``sha256:`` digest is verified by.

        A ``chunkDigest`` that is there but is no sha256 digest refuses the layer at load
        (:class:`InvalidToc`; the runtime then pulls it whole), as the Go reader refuses one
        that does not parse (estargz ``genVerifier``); go-digest's sha384 and sha512 are
        refused too, as chunks are verified and cached by sha256 (:mod:`store.cache`). A
        missing one is the file's ``digest`` when the chunk is the whole file (``file_digest``;
        the Go reader verifies such layers by their files' digests), else ``""``: the chunk
        cannot be verified and is never served (:func:`~store.estargz.chunk.decompress_chunk`),
        and the index notes the first such place (:attr:`LayerIndex.unverifiable`): the store
        refuses that layer at load as the Go store does (estargz ``Reader.Verifiers``: "some
        ChunkDigest not found in TOC JSON"), :func:`store.estargz_view.refuse_unverifiable`.
        """
        if not chunk_digest:
            if len(file_digest) == 71 and _is_sha256(file_digest):
                return file_digest
            if self.idx.unverifiable is None:
                self.idx.unverifiable = str(where).removesuffix(": ")
            return ""
        raise InvalidToc(
            f"{where}chunkDigest {chunk_digest[:80]!r} is no sha256 digest "
            "(sha256: and 64 lowercase hex digits), by which the store verifies each chunk"
        )

    def _too_big(self, chunk_size: int, where: Where, inner: int = 0) -> None:
        at = f" at innerOffset {inner}" if inner else ""
        raise InvalidToc(
            f"{where}a chunk of {chunk_size} bytes{at} is over the limit on chunk size "
            f"({self.max_chunk}, store config chunk_max_bytes): it would be inflated whole "
            "in memory"
        )

    def _finish_file(self) -> None:
        """The last file's chunks are all there: they must cover it exactly."""
        e = self.last
        if e is not None and e.type == "reg" and e.size > 0:
            covered = e.chunks[-1].chunk_offset + e.chunks[-1].size
            if covered != e.size:
                raise InvalidToc(f"{e.name!r}: chunks cover {covered} of its {e.size} bytes")
            if isinstance(e.chunks, list):
                e.chunks = tuple(e.chunks)
        self.last = None

    # -- the tree, sequentially ------------------------------------------------------------

    def _dir(self, name: str, where: Where) -> Entry:
        """The directory ``name``, creating missing ones (implicit) on the way.

        An implicit directory is 0755 root:root, as extraction's ``MkdirAll`` makes it and as
        the Go reader lists it. One made while its parent has set-group-ID (named with the bit
        at this point of the tar, or itself made so; never the layer root, which
        containers/storage keeps 0555) is noted in ``LayerIndex.setgid_implicit``: the kernel
        gives a new directory that bit at ``mkdir`` time, and a view that follows extraction
        shows it (:mod:`store.tree`); a parent named later with the bit does not change it.
        """
        if self.last_dir[0] == name:
            return self.last_dir[1]
        e = self.idx.root
        path = ""
        for part in name.split("/") if name else ():
            path = f"{path}/{part}" if path else part
            child = e.children.get(part)
            if child is None:
                self._implicit(path, where)
                child = Entry(name=path, type="dir", mode=0o755, nlink=2, implicit=True)
                if e is not self.idx.root and (
                    id(e) in self.setgid_implicit if e.implicit else e.mode & _S_ISGID
                ):
                    self.setgid_implicit[id(child)] = child
                self._attach(e, part, child)
                if self.ignored:
                    self._replay(e, part)
            elif child.type != "dir":
                raise InvalidToc(f"{where}{path!r} is a {child.type}, not a directory")
            e = child
        self.last_dir = (name, e)
        return e

    def _implicit(self, path: str, where: Where) -> None:
        """Count the implicit directory ``path`` against the TOC's limits: each holds its
        whole path, so one 4 KB name ``x1/a/a/…/f`` made 2,000 of them holding 4 MB of
        names, and 800 KB of such TOC entries took 950 MB (entries and names, which the caps
        on TOC entries and bytes never saw). A layer's real implicit directories are far
        fewer than its entries, their names shorter than its TOC."""
        self.implicit_left -= 1
        self.implicit_bytes_left -= len(path)
        if self.implicit_left < 0 or self.implicit_bytes_left < 0:
            raise InvalidToc(
                f"{where}the directories the TOC never names are over the limit on TOC "
                f"entries ({self.limits.max_entries}) or TOC bytes ({self.limits.max_bytes}) "
                "in their number or the bytes of their names"
            )

    def _attach(self, parent: Entry, base: str, e: Entry) -> None:
        old = parent.children.get(base)
        if old is not None:
            if old.type == "dir":
                parent.nlink -= 1
                self.last_dir = ("", self.idx.root)  # it may have been cached
                _unlink_subtree(old)
            old.nlink -= 1
        elif WHITEOUT_PREFIX + base in parent.children:
            self.after_whiteout.append((parent, base))
        parent.children[base] = e  # type: ignore[index]  # parents are directories
        if e.type == "dir":
            parent.nlink += 1

    def _insert(self, e: Entry, where: Where) -> None:
        name = e.name
        if name == "":
            # The tar named the root itself: take its metadata, keep the children.
            if e.type != "dir":
                raise InvalidToc(f"{where}the layer root is a {e.type}, not a directory")
            _copy_meta(self.idx.root, e)
            return
        parent_name, _, base = name.rpartition("/")
        if base.startswith(WHITEOUT_PREFIX):
            parent = self._whiteout_parent(e, parent_name, base, where)
            if parent is None:
                return  # as containers/storage ignores it: see _whiteout_parent
        else:
            last_dir = self.last_dir
            parent = last_dir[1] if last_dir[0] == parent_name else self._dir(parent_name, where)
        children = parent.children
        old = children.get(base)
        etype = e.type
        if old is None and etype != "hardlink":  # the usual case: a new name
            if self.idx._hardlinks:
                self.idx._hardlinks.pop(name, None)
            if WHITEOUT_PREFIX + base in children:
                self.after_whiteout.append((parent, base))
            children[base] = e  # type: ignore[index]  # parents are directories
            if etype == "dir":
                e.nlink = 2
                parent.nlink += 1
            else:
                e.nlink = 1
            if e.uid == _MAX_ID or e.gid == _MAX_ID:
                self._owner(e, e, parent)
            return
        if etype == "hardlink":
            # Resolved now, as tar -x links to what exists when it reaches the link.
            target = self.idx.lookup(e.link_name)
            if target is None:
                raise InvalidToc(
                    f"{where}hardlink target not found: {e.link_name!r} (missing, or later)"
                )
            if target.type == "dir":
                raise InvalidToc(f"{where}hardlink target {e.link_name!r} is a directory")
            if e.link_name.startswith(name + "/"):
                # Extraction removes what the link replaces (a directory: all under it)
                # before it links: the target is gone (containers/storage fails the pull).
                raise InvalidToc(
                    f"{where}hardlink target {e.link_name!r} lies under {name!r}, which the "
                    "link replaces"
                )
            # Each header's xattrs are set on the shared inode in turn: the last header
            # carries them all (the target's, then every link's, a later value winning),
            # in one dict per target updated in place (a copy per header took quadratic
            # time: 80,000 links each naming its own xattr, 18 s of the GIL).
            last = self.link_headers.get(id(target), (target, target))[1]
            _, *was = self.owners.get(id(target), (target, last.uid, last.gid))
            if e.uid == _MAX_ID or e.gid == _MAX_ID or id(target) in self.owners:
                self._owner(target, e, None, last)
            before = last.xattrs
            # A header whose ids differ from the inode's is chowned, and the kernel drops a
            # file capability on chown (CAPABILITY_XATTR); its own xattrs are set after that.
            drop = CAPABILITY_XATTR in before and [e.uid, e.gid] != was
            if e.xattrs or drop:
                merged = self.link_xattrs.get(id(target))
                if merged is None:
                    merged = self.link_xattrs[id(target)] = dict(before)
                if drop:
                    del merged[CAPABILITY_XATTR]
                merged.update(e.xattrs)
                e.xattrs = merged
            else:
                e.xattrs = before
            self.link_headers[id(target)] = (target, e)
            if target is old:
                return  # a link to itself changes nothing else
            self.idx._hardlinks[name] = e.link_name
            self._attach(parent, base, target)
            target.nlink += 1
            return
        if old is not None and old.type == "dir" and etype == "dir":
            # A repeated directory entry updates metadata; its children stay.
            if e.uid == _MAX_ID or e.gid == _MAX_ID or id(old) in self.owners:
                self._owner(old, e, None, old)
            _copy_meta(old, e)
            return
        self.idx._hardlinks.pop(name, None)
        e.nlink = 2 if etype == "dir" else 1
        self._attach(parent, base, e)
        if e.uid == _MAX_ID or e.gid == _MAX_ID:
            self._owner(e, e, parent)

    def _owner(
        self, inode: Entry, header: Entry, parent: Entry | None, prev: Entry | None = None
    ) -> None:
        """Note the owner extraction gives ``inode`` when ``header`` has an id of 2**32-1:
        ``lchown`` takes it as ``(uid_t)-1``, "leave this id as it is". A new inode (made in
        ``parent``) keeps what it was made with: uid 0 (extraction runs as root), gid 0, or its
        parent's group where the parent has set-group-ID at this point of the tar (the
        kernel's rule). A header applied to an existing inode (a directory named again,
        ``prev`` its last header; a hardlink, ``prev`` its target's last header) keeps that
        id as it was. Served as it is, the id showed as the overflow id 65534."""
        if prev is None:
            assert parent is not None
            setgid = parent is not self.idx.root and (
                id(parent) in self.setgid_implicit if parent.implicit else parent.mode & _S_ISGID
            )
            was = (0, self.owners.get(id(parent), (parent, 0, parent.gid))[2] if setgid else 0)
        else:
            _, *ids = self.owners.get(id(inode), (inode, prev.uid, prev.gid))
            was = (ids[0], ids[1])
        uid = was[0] if header.uid == _MAX_ID else header.uid
        gid = was[1] if header.gid == _MAX_ID else header.gid
        if (uid, gid) == (header.uid, header.gid):
            self.owners.pop(id(inode), None)
        else:
            self.owners[id(inode)] = (inode, uid, gid)

    def _whiteout_parent(self, e: Entry, parent_name: str, base: str, where: Where) -> Entry | None:
        """The directory that gets the whiteout or opaque marker ``base``, made if missing
        (:meth:`_dir`); None where containers/storage's overlay extraction ignores it: under a
        name this layer whited out (the first missing directory of ``parent_name`` has
        ``.wh.<dir>`` beside it, at any depth; "rm -rf /foo/bar" makes some tools write
        ``.wh.foo`` and ``foo/.wh.bar``). Extraction (pkg/archive ``Unpack``) makes an entry's
        missing parents only when their ``Lstat`` gives ``ENOENT``; under the whiteout's
        character device it gives ``ENOTDIR``, so nothing is made, the whiteout's ``mknod``
        fails with ``ENOTDIR`` and ``overlayWhiteoutConverter.ConvertRead`` ignores that. An
        opaque marker right under the device is ignored too (its ``setxattr`` marks the
        device); one deeper is not (its ``setxattr`` fails, which extraction does not ignore):
        :meth:`_dir` handles it as any entry.

        Likewise under a name the layer holds as a file, device or fifo: a whiteout at any
        depth below it is ignored (its ``mknod`` gives ``ENOTDIR``), and so is an opaque
        marker right under it (its ``setxattr`` marks that inode, which overlayfs reads on
        directories only); one deeper is refused by :meth:`_dir`. Under a symlink extraction
        would follow the link, and under a whiteout's own ``.wh.<name>`` (no file there:
        extraction makes a directory of that name): :meth:`_dir` refuses both, which costs a
        normal pull.

        A whiteout ignored below the directory right under the device is kept aside: should
        a later entry make that directory (extraction fails there: ``ENOTDIR``, and the tree
        served is then the OCI spec's, whose layer holds the whiteouts' directories) it is
        applied then (:meth:`_replay`).
        """
        last_dir = self.last_dir
        if last_dir[0] == parent_name:
            parent = last_dir[1]
        else:
            parent = self.idx.root
            parts = parent_name.split("/") if parent_name else ()
            for i, part in enumerate(parts):
                child = parent.children.get(part)
                if child is None or child.type != "dir":
                    # Does extraction find a non-directory here (ENOTDIR)? The whiteout's
                    # device, or a file, device or fifo of the layer; not a symlink (it would
                    # follow it), nor ``.wh.<name>`` (no file there: it makes a directory).
                    whiteout = WHITEOUT_PREFIX + part
                    device = (
                        child is None
                        and whiteout != OPAQUE_MARKER
                        and _is_whiteout(parent.children.get(whiteout))
                    )
                    not_dir = device or (
                        child is not None
                        and child.type != "symlink"
                        and not part.startswith(WHITEOUT_PREFIX)
                    )
                    if not_dir and (base != OPAQUE_MARKER or i == len(parts) - 1):
                        if device and i < len(parts) - 1:
                            held = self.ignored.setdefault((id(parent), part), (parent, []))
                            held[1].append((e, where))
                        return None
                    # _dir makes the missing directories (or refuses a non-directory)
                    parent = self._dir(parent_name, where)
                    break
                parent = child
            else:
                self.last_dir = (parent_name, parent)
        return parent

    def _replay(self, parent: Entry, base: str) -> None:
        """``base`` was just made an implicit directory in ``parent``: apply the whiteouts
        :meth:`_whiteout_parent` kept aside under it, in their order (with their directories).
        Only where the layer whited ``base`` out, so containers/storage's extraction refuses
        the layer (the entry that made ``base`` gives ``ENOTDIR``), and the store serves the OCI
        spec's tree, as it did before whiteouts under a whited-out name were ignored."""
        held = self.ignored.pop((id(parent), base), None)  # (its entry keeps the id its own)
        if held is not None:
            for e, where in held[1]:
                self._insert(e, where)

    def _number(self) -> None:
        """Number the final tree (``Entry.ino``), list its chunks, set their compressed ends."""
        idx = self.idx
        starts = self.starts
        starts.sort()
        toc_offset = idx.toc_offset
        entries = idx.entries = [idx.root]
        parents = idx._parents = array.array("i", (0,))
        chunks: list[Chunk] = []
        stack = [idx.root]
        idx.root.ino = 0
        while stack:
            d = stack.pop()
            for child in d.children.values():
                if child.ino >= 0:
                    continue  # another name of a hardlinked file
                child.ino = len(entries)
                entries.append(child)
                parents.append(d.ino)
                if child.type == "dir":
                    stack.append(child)
                elif child.chunks:
                    chunks.extend(child.chunks)
        for c in chunks:
            j = bisect.bisect_right(starts, c.offset)
            end = starts[j] if j < len(starts) else toc_offset
            # Bounded by its inflated size (COMPRESSED_SLACK).
            n = c.inner_offset + c.size
            c.compressed_end = min(end, c.offset + 2 * n + COMPRESSED_SLACK)
        self.starts = []
        idx.link_headers = {t.ino: h for t, h in self.link_headers.values() if t.ino >= 0}
        idx.setgid_implicit = {
            d.ino for d in self.setgid_implicit.values() if d.ino >= 0 and d.implicit
        }
        idx.owners = {e.ino: (uid, gid) for e, uid, gid in self.owners.values() if e.ino >= 0}
        # A name keeps its place in its directory's dict when its entry is replaced (and no
        # name is ever removed): what the name finally holds, if a directory still in the tree.
        idx.after_whiteout = {
            d.ino
            for parent, base in self.after_whiteout
            if parent.ino >= 0 and (d := parent.children.get(base)) is not None and d.type == "dir"
        }
        self.after_whiteout = []
        # Blob order: by offset, then inner offset (two stable sorts: no key tuples).
        chunks.sort(key=_CHUNK_INNER)
        chunks.sort(key=_CHUNK_OFFSET)
        idx._all_chunks = chunks


def _unlink_subtree(d: Entry) -> None:
    """A replaced directory's files lose their names in it (a hardlinked file elsewhere
    keeps the others: ``nlink`` counts only names that remain)."""
    stack = [d]
    while stack:
        for child in stack.pop().children.values():
            if child.type == "dir":
                stack.append(child)
            else:
                child.nlink -= 1


def _is_whiteout(e: Entry | None) -> bool:
    """Whether ``e``, the entry at a ``.wh.<name>`` name, made extraction's whiteout device
    ``<name>``: any entry there did (``ConvertRead`` goes by the name, whatever the type), not
    a directory made for entries under that name (extraction makes it as it is)."""
    return e is not None and not e.implicit


def _checked_name(raw: str, where: Where) -> str:
    """:func:`clean_name`, refusing what no tar extraction could create: a NUL, a component
    over 255 bytes or a path over 4095 bytes (Linux NAME_MAX / PATH_MAX)."""
    name = clean_name(raw, where=where)
    if "\0" in name:
        raise InvalidEntryName(f"{where}name {raw[:80]!r} holds a NUL byte")
    if len(name) <= 63:  # at most 4 bytes a character: within both limits
        return name
    if len(name) <= 1023 and max(map(len, name.split("/"))) <= 63:  # the same, by component
        return name
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > 4095 or any(len(p) > 255 for p in encoded.split(b"/")):
        raise InvalidEntryName(
            f"{where}name {raw[:80]!r}… ({len(encoded)} bytes) is longer than Linux allows"
        )
    return name


_S_ISGID = 0o2000  # stat.S_ISGID


def _chunk_start(c: Chunk) -> int:
    return c.chunk_offset


_CHUNK_INNER = operator.attrgetter("inner_offset")
_CHUNK_OFFSET = operator.attrgetter("offset")


def _copy_meta(dst: Entry, src: Entry) -> None:
    for attr in ("mode", "uid", "gid", "uname", "gname", "modtime", "xattrs"):
        setattr(dst, attr, getattr(src, attr))
    dst.implicit = False


def _type_and_name(rawtype: Any, rawname: Any, where: _Where) -> tuple[str, str]:
    """An entry's type (one of :data:`ENTRY_TYPES`) and its cleaned name (:func:`_checked_name`,
    which ``where`` names from then on); :class:`InvalidToc` for anything else."""
    etype = _TYPES.get(rawtype) if isinstance(rawtype, str) else None
    if etype is None:
        raise InvalidToc(f"{where}unknown type {rawtype!r}")
    if not isinstance(rawname, str):
        raise InvalidToc(f"{where}name is {rawname!r}, not a string")
    name = _checked_name(_tar_name(rawname, "name", where), where)
    where.name = name
    return etype, name


def _encodable(value: str, what: str, where: Where) -> str:
    """``value`` if it has a byte form: a ``\\ud800`` escape decodes to a lone surrogate that
    no file name can hold (:class:`InvalidEntryName`). Only decoded objects need this: the
    typed path decodes UTF-8 bytes and refuses escapes (:func:`~.toc.typed_toc_entries`)."""
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InvalidEntryName(
            f"{where}{what} {value[:80]!r} holds a lone surrogate (no byte form)"
        ) from None
    return value


def _tar_name(value: str, what: str, where: Where) -> str:
    """A decoded ``name`` or ``linkName`` in the one spelling of its bytes (module doc): a
    ``\\udcXX`` escape stands for the byte ``XX``, so ``caf\\udcc3\\udca9`` is ``café``
    (two spellings would be two entries where extraction makes one file, and a listing would
    hold one name twice). :class:`InvalidEntryName` for a lone surrogate with no byte form
    (:func:`_encodable`) or for U+FFFD, Go's ``encoding/json`` stand-in for a byte that is not
    UTF-8 (containers/storage ≥ 1.55 refuses such a zstd:chunked layer for its own partial
    pull: "tar-split and TOC data is inconsistent"). Only the dict path sees these: the typed
    path refuses every ``\\u`` escape, so a real U+FFFD, written as itself, stays lazy unless
    the TOC escapes something else too."""
    if value.isascii():
        return value
    canonical = (
        _encodable(value, what, where)
        .encode("utf-8", "surrogateescape")
        .decode("utf-8", "surrogateescape")
    )
    if _NOT_UTF8 in canonical:
        raise InvalidEntryName(
            f"{where}{what} {value[:80]!r} holds U+FFFD, what Go's encoding/json writes for a "
            "byte that is not UTF-8: the layer's own name is unknown"
        )
    return canonical


_NOT_UTF8 = "\ufffd"


def _typed(raw: Mapping[str, Any], where: _Where) -> tuple[RawEntry, str, str]:
    """A decoded entry object checked field by field as :class:`RawEntry` is typed (``null``
    is the field's zero value), each error worded: ``(record, type, cleaned name)``."""
    etype, name = _type_and_name(raw.get("type"), raw.get("name"), where)
    return (
        RawEntry(
            name=name,
            type=etype,
            offset=_int(raw, "offset", where),
            innerOffset=_int(raw, "innerOffset", where),
            size=_int(raw, "size", where, _MAX_SIZE),
            endOffset=_int(raw, "endOffset", where),
            chunkOffset=_int(raw, "chunkOffset", where, _MAX_SIZE),
            chunkSize=_int(raw, "chunkSize", where, _MAX_SIZE),
            linkName=_tar_name(_str(raw, "linkName", where), "linkName", where),
            mode=_int(raw, "mode", where, 0o177777),
            uid=_int(raw, "uid", where, _MAX_ID),
            gid=_int(raw, "gid", where, _MAX_ID),
            userName=_str(raw, "userName", where),
            groupName=_str(raw, "groupName", where),
            modtime=_str(raw, "modtime", where),
            devMajor=_int(raw, "devMajor", where, _MAX_ID),
            devMinor=_int(raw, "devMinor", where, _MAX_ID),
            xattrs=raw.get("xattrs"),
            digest=_str(raw, "digest", where),
            chunkDigest=_str(raw, "chunkDigest", where),
        ),
        etype,
        name,
    )


def _int(raw: Mapping[str, Any], key: str, where: Where, limit: int = _MAX_INT) -> int:
    v = raw.get(key)
    if v is None:
        return 0
    if type(v) is not int or v < 0 or v > limit:  # bool is not an int here
        raise InvalidToc(f"{where}{key} is {v!r}, not an integer in [0, {limit}]")
    return v


def _str(raw: Mapping[str, Any], key: str, where: Where) -> str:
    v = raw.get(key)
    if type(v) is str:
        return v
    if v is None:
        return ""
    raise InvalidToc(f"{where}{key} is {v!r}, not a string")


# Linux's limits on one extended attribute (include/uapi/linux/limits.h): a name or value past
# them no file could hold and no extraction could set. (The total of a file's names,
# XATTR_LIST_MAX, is not checked.)
XATTR_NAME_MAX = 255  # bytes
XATTR_SIZE_MAX = 65536  # bytes


def _xattrs(v: Any, where: Where) -> Mapping[str, bytes]:
    """An entry's ``xattrs`` value (base64 strings by name) decoded; falsy: none. A name must
    be 1–:data:`XATTR_NAME_MAX` bytes without NUL, a value at most :data:`XATTR_SIZE_MAX`
    (:class:`InvalidToc`): a NUL would split the name in a listxattr answer."""
    if not v:
        return _NO_XATTRS
    if not isinstance(v, dict):
        raise InvalidToc(f"{where}xattrs is not an object")
    out = {}
    for k, b64 in v.items():
        size = len(_encodable(k, "xattr name", where).encode("utf-8", "surrogateescape"))
        if not 0 < size <= XATTR_NAME_MAX or "\0" in k:
            raise InvalidToc(
                f"{where}xattr name {k[:80]!r} is not 1-{XATTR_NAME_MAX} bytes without NUL"
            )
        try:
            value = base64.b64decode(b64, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise InvalidToc(f"{where}xattr {k!r} is not base64") from None
        if len(value) > XATTR_SIZE_MAX:
            raise InvalidToc(
                f"{where}xattr {k!r} is {len(value)} bytes, over Linux's {XATTR_SIZE_MAX}"
            )
        out[k] = value
    return out
