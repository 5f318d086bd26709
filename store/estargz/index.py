"""The entry tree of one layer, built from its TOC the way the Go reader builds it.

Rules taken from containerd/stargz-snapshotter ``estargz.Reader.initFields``:

* names are cleaned (``./a//b/`` → ``a/b``; the root is ``""``); we additionally refuse a
  name or hardlink target whose ``..`` climbs above the root (:class:`InvalidEntryName`);
* a ``chunk`` entry belongs to the last non-chunk entry before it; ``chunkSize`` 0 means "to
  the end of the file"; a ``reg`` entry with ``chunkSize`` < ``size`` is its own first chunk;
* ``userName``/``groupName`` missing for a non-zero uid/gid carry forward from the last entry
  that named that id (the writer omits repeats);
* directories the TOC never names but that hold entries are created (mode 0755);
* a hardlink resolves to its target entry, which gets the link's name as another parent
  reference (``nlink``); a later entry with the same name replaces the earlier one;
* a chunk's compressed bytes end where the next member starts (the next distinct offset of a
  data entry with ``innerOffset`` 0), or at the TOC.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .errors import InvalidEntryName, InvalidToc, TocOutOfRange
from .footer import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, Footer
from .toc import Toc


# Shared empty containers: a layer can have 100,000 entries, and most have no xattrs, no
# children and (unless regular files) no chunks; one object each instead of three per entry.
class _EmptyMapping(Mapping[str, Any]):
    """An immutable, hashable empty mapping (a valid dataclass default)."""

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


@dataclass(slots=True, eq=False)
class Chunk:
    """One independently decompressible piece of a regular file."""

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


@dataclass(slots=True, eq=False)
class Entry:
    """A node of the tree (hardlinks share their target's Entry).

    ``children`` is a dict for directories (read-only empty mapping otherwise), ``chunks`` a
    list for regular files with content (empty tuple otherwise), ``xattrs`` read-only when
    there are none.
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
    parent: Entry | None = None
    children: Mapping[str, Entry] = _NO_CHILDREN  # a dict for directories
    chunks: list[Chunk] | tuple[Chunk, ...] = _NO_CHUNKS  # a list for regular files
    implicit: bool = False  # a directory the TOC never named

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


def clean_name(name: str, *, where: str = "") -> str:
    """Go's ``cleanEntryName`` (``path.Clean("/"+name)[1:]``), refusing escapes of the root."""
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


def base_name(name: str) -> str:
    return name.rpartition("/")[2]


class LayerIndex:
    """Tree + chunk table of one layer. Build with :meth:`from_toc`."""

    def __init__(self) -> None:
        self.root: Entry = Entry(name="", type="dir", mode=0o755, nlink=2, implicit=True)
        self._by_name: dict[str, Entry] = {"": self.root}
        self._hardlinks: dict[str, str] = {}  # link name -> target name
        self.toc_offset = 0
        self.compression = "gzip"
        self.prefetch_end_offset: int | None = None
        self.has_no_prefetch_landmark = False
        self.chunk_count = 0

    # -- queries -------------------------------------------------------------------------

    def lookup(self, path: str) -> Entry | None:
        """The entry at ``path`` (any spelling: ``./a/b/`` works); hardlinks give the target."""
        try:
            name = clean_name(path)
        except InvalidEntryName:
            return None
        return self._by_name.get(name)

    def hardlink_target(self, path: str) -> str | None:
        """For a name that is a hardlink, the cleaned path of its target; else None."""
        return self._hardlinks.get(clean_name(path))

    def names(self) -> Iterator[tuple[str, Entry]]:
        """Every path in the layer (hardlink names included) with its entry, unordered."""
        yield from self._by_name.items()

    def walk(self) -> Iterator[tuple[str, Entry]]:
        """Depth-first ``(path, entry)`` from the root, children in name order."""
        stack = [("", self.root)]
        while stack:
            path, e = stack.pop()
            yield path, e
            for child_name in sorted(e.children, reverse=True):
                stack.append(((path + "/" if path else "") + child_name, e.children[child_name]))

    def chunks(self) -> Iterator[Chunk]:
        """Every chunk of every regular file (each file once), in no particular order."""
        seen: set[int] = set()
        for e in self._by_name.values():
            if e.type == "reg" and id(e) not in seen:
                seen.add(id(e))
                yield from e.chunks

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
    def from_toc(cls, toc: Toc, footer: Footer | None = None) -> LayerIndex:
        """Build the tree. Raises :class:`InvalidToc` (and subclasses) on bad entries."""
        idx = cls()
        idx.toc_offset = toc.offset
        idx.compression = toc.compression
        idx._build(toc.entries)
        return idx

    def _build(self, raw_entries: list[dict[str, Any]]) -> None:
        toc_offset = self.toc_offset
        unames: dict[int, str] = {}
        gnames: dict[int, str] = {}
        order: list[Entry] = []
        # (entry, raw dict) of data entries, to compute compressed ends afterwards
        data: list[tuple[Chunk, int]] = []
        last: Entry | None = None
        for i, raw in enumerate(raw_entries):
            where = f"TOC entry {i}: "
            etype = raw.get("type")
            if etype not in ENTRY_TYPES:
                raise InvalidToc(f"{where}unknown type {etype!r}")
            rawname = raw.get("name")
            if not isinstance(rawname, str):
                raise InvalidToc(f"{where}name is not a string")
            name = clean_name(rawname, where=where)
            offset = _int(raw, "offset", where)
            inner = _int(raw, "innerOffset", where)
            is_data = etype == "chunk" or (etype == "reg" and _int(raw, "size", where) > 0)
            if is_data and offset >= toc_offset:
                raise TocOutOfRange(
                    f"{where}{name!r}: offset {offset} is at or past the TOC (offset {toc_offset})"
                )
            if etype == "chunk":
                if last is None or last.type != "reg" or last.name != name:
                    raise InvalidToc(f"{where}chunk of {name!r} does not follow its file")
                chunk_offset = _int(raw, "chunkOffset", where)
                chunk_size = _int(raw, "chunkSize", where) or last.size - chunk_offset
                self._add_chunk(last, raw, chunk_offset, chunk_size, offset, inner, data, where)
                continue
            e = Entry(
                name=name,
                type=etype,
                size=_int(raw, "size", where),
                mode=_int(raw, "mode", where),
                uid=_int(raw, "uid", where),
                gid=_int(raw, "gid", where),
                uname=_str(raw, "userName", where),
                gname=_str(raw, "groupName", where),
                modtime=sys.intern(_str(raw, "modtime", where)),
                link_name=_str(raw, "linkName", where),
                dev_major=_int(raw, "devMajor", where),
                dev_minor=_int(raw, "devMinor", where),
                xattrs=_xattrs(raw, where),
                digest=_str(raw, "digest", where),
            )
            if e.uid != 0 and not e.uname:
                e.uname = unames.get(e.uid, "")
            else:
                unames[e.uid] = e.uname
            if e.gid != 0 and not e.gname:
                e.gname = gnames.get(e.gid, "")
            else:
                gnames[e.gid] = e.gname
            if etype == "hardlink":
                e.link_name = clean_name(e.link_name, where=where + "hardlink target: ")
            if etype == "reg" and e.size > 0:
                chunk_size = _int(raw, "chunkSize", where)
                if not chunk_size or chunk_size > e.size:
                    chunk_size = e.size
                self._add_chunk(e, raw, 0, chunk_size, offset, inner, data, where)
            if name == PREFETCH_LANDMARK and etype == "reg":
                self.prefetch_end_offset = offset
            elif name == NO_PREFETCH_LANDMARK and etype == "reg":
                self.has_no_prefetch_landmark = True
            last = e
            order.append(e)

        self._set_compressed_ends(data, toc_offset)
        for e in order:
            self._insert(e)
        self._check_chunk_coverage()

    def _add_chunk(
        self,
        owner: Entry,
        raw: dict[str, Any],
        chunk_offset: int,
        chunk_size: int,
        offset: int,
        inner: int,
        data: list[tuple[Chunk, int]],
        where: str,
    ) -> None:
        prev_end = owner.chunks[-1].chunk_offset + owner.chunks[-1].size if owner.chunks else 0
        if chunk_offset != prev_end or chunk_size <= 0 or chunk_offset + chunk_size > owner.size:
            raise InvalidToc(
                f"{where}{owner.name!r}: chunk [{chunk_offset}, {chunk_offset + chunk_size}) "
                f"does not continue the file (expected offset {prev_end}, size {owner.size})"
            )
        if owner.chunks is _NO_CHUNKS:
            owner.chunks = []
        digest = _str(raw, "chunkDigest", where)
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
        data.append((c, inner))
        self.chunk_count += 1

    @staticmethod
    def _set_compressed_ends(data: list[tuple[Chunk, int]], toc_offset: int) -> None:
        starts = sorted({c.offset for c, inner in data if inner == 0} | {toc_offset})
        for c, _ in data:
            j = bisect.bisect_right(starts, c.offset)
            c.compressed_end = starts[j] if j < len(starts) else toc_offset

    def _check_chunk_coverage(self) -> None:
        for e in self._by_name.values():
            if e.type == "reg" and e.size > 0:
                covered = e.chunks[-1].chunk_offset + e.chunks[-1].size if e.chunks else 0
                if covered != e.size:
                    raise InvalidToc(f"{e.name!r}: chunks cover {covered} of its {e.size} bytes")

    def _get_or_create_dir(self, name: str) -> Entry:
        e = self._by_name.get(name)
        if e is None:
            e = Entry(name=name, type="dir", mode=0o755, nlink=2, implicit=True)
            self._by_name[name] = e
            parent = self._get_or_create_dir(parent_dir(name))
            self._attach(parent, base_name(name), e)
        elif e.type != "dir":
            raise InvalidToc(f"{name!r} is a {e.type} but holds entries")
        return e

    def _attach(self, parent: Entry, base: str, e: Entry) -> None:
        old = parent.children.get(base)
        if old is not None:
            if old.type == "dir":
                parent.nlink -= 1
            old.nlink -= 1
        parent.children[base] = e  # type: ignore[index]  # parents are directories
        if e.type == "dir":
            parent.nlink += 1
            e.parent = parent

    def _insert(self, e: Entry) -> None:
        name = e.name
        if name == "":
            # The tar named the root itself: take its metadata, keep the children.
            _copy_meta(self.root, e)
            return
        parent = self._get_or_create_dir(parent_dir(name))
        old = self._by_name.get(name)
        if old is not None and old.children and e.type != "dir":
            raise InvalidToc(f"{name!r}: a {e.type} entry replaces a directory holding entries")
        if e.type == "hardlink":
            target = self._resolve_hardlink(e)
            self._hardlinks[name] = target.name
            target.nlink += 1
            self._attach(parent, base_name(name), target)
            self._by_name[name] = target
            return
        if old is not None and old.type == "dir" and e.type == "dir":
            # A repeated directory entry updates metadata; its children stay.
            _copy_meta(old, e)
            return
        self._hardlinks.pop(name, None)
        e.parent = parent
        e.nlink += 2 if e.type == "dir" else 1
        self._by_name[name] = e
        self._attach(parent, base_name(name), e)

    def _resolve_hardlink(self, e: Entry) -> Entry:
        target = self._by_name.get(e.link_name)
        if target is None:
            raise InvalidToc(f"hardlink {e.name!r} -> {e.link_name!r}: target not found")
        if target.type == "dir":
            raise InvalidToc(f"hardlink {e.name!r} -> {e.link_name!r}: target is a directory")
        return target


def _chunk_start(c: Chunk) -> int:
    return c.chunk_offset


def _copy_meta(dst: Entry, src: Entry) -> None:
    for attr in ("mode", "uid", "gid", "uname", "gname", "modtime", "xattrs"):
        setattr(dst, attr, getattr(src, attr))
    dst.implicit = False


def _int(raw: dict[str, Any], key: str, where: str) -> int:
    v = raw.get(key, 0)
    if v is None:
        return 0
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise InvalidToc(f"{where}{key} is {v!r}, not a non-negative integer")
    return v


def _str(raw: dict[str, Any], key: str, where: str) -> str:
    v = raw.get(key, "")
    if v is None:
        return ""
    if not isinstance(v, str):
        raise InvalidToc(f"{where}{key} is {v!r}, not a string")
    return v


def _xattrs(raw: dict[str, Any], where: str) -> Mapping[str, bytes]:
    v = raw.get("xattrs")
    if not v:
        return _NO_XATTRS
    if not isinstance(v, dict):
        raise InvalidToc(f"{where}xattrs is not an object")
    out = {}
    for k, b64 in v.items():
        try:
            out[k] = base64.b64decode(b64, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise InvalidToc(f"{where}xattr {k!r} is not base64") from None
    return out
