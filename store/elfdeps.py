"""What the dynamic loader will open next: an ELF file's interpreter and needed libraries.

A program started from a lazily pulled image has its shared libraries loaded one after
another by the dynamic loader (``ld.so``): each is opened, read and mapped before the next is
looked for, so each one missing from the store costs a round trip to the registry in turn
(16 for the redis workload's server). Knowing the list as soon as the program's first bytes
are read lets the store fetch them side by side (:mod:`store.libprefetch`).

The ELF structures are read with pyelftools over a sparse view of the file
(:class:`SparseFile`): the bytes it asks for that are not there yet are fetched and the parse
starts over, so only the headers, the ``PT_DYNAMIC`` segment and the dynamic string table
are ever read. The search order is ``ld.so``'s (ld.so(8)): ``DT_RPATH`` when there is no
``DT_RUNPATH``, then ``DT_RUNPATH``, then the system directories (the ``ld.so.cache`` is not
read: its directories are the usual multiarch ones, listed in :data:`SYSTEM_DIRS`).
``LD_LIBRARY_PATH`` is the container's environment, which the store does not see.
"""

from __future__ import annotations

import io
import logging
import posixpath
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile

log = logging.getLogger(__name__)

ELF_MAGIC = b"\x7fELF"
FETCH_MIN = 64 << 10  # bytes fetched at least per missing piece the parse asks for
FETCH_MAX = 256 << 10  # and at most (a hostile header may name a huge segment)
MAX_ROUNDS = 8  # fetch-and-reparse rounds per file before giving up
MAX_SEARCH = 64  # runpath directories kept of a file's (a hostile one may list more)
MAX_NEEDED = 256  # DT_NEEDED names kept of a file's
# Bytes one parse may read through the sparse view. The parse reads each dynamic tag and
# resolves its name at once, so a hostile file naming one long string from thousands of tags
# made it read (and keep) their product: 1,000 DT_RPATH tags naming a 27 KB string of
# directories cost 750 MB and 4 s. A real program's parse reads a few KB: at most 3.6 KB
# (gdb's) of the ELF files among 1,164 in /usr/bin, /usr/lib/x86_64-linux-gnu and gcc's here.
READ_BUDGET = 64 << 10

# Where ld.so looks when the runpath does not name the library, by ELF machine (Debian's
# ld.so.conf.d multiarch directories first, then the built-in /lib and /usr/lib; musl's
# loader uses /lib:/usr/local/lib:/usr/lib, which these cover).
_MULTIARCH = {
    "EM_X86_64": "x86_64-linux-gnu",
    "EM_AARCH64": "aarch64-linux-gnu",
    "EM_386": "i386-linux-gnu",
    "EM_ARM": "arm-linux-gnueabihf",
    "EM_PPC64": "powerpc64le-linux-gnu",
    "EM_S390": "s390x-linux-gnu",
    "EM_RISCV": "riscv64-linux-gnu",
}
_LIB64 = {"EM_X86_64", "EM_AARCH64", "EM_PPC64", "EM_S390", "EM_RISCV"}


def system_dirs(machine: str) -> list[str]:
    """``ld.so``'s default directories for an ELF ``e_machine`` name (``"EM_X86_64"``)."""
    dirs = []
    triplet = _MULTIARCH.get(machine)
    if triplet is not None:
        dirs += [f"/lib/{triplet}", f"/usr/lib/{triplet}"]
    if machine in _LIB64:
        dirs += ["/lib64", "/usr/lib64"]
    return [*dirs, "/lib", "/usr/lib", "/usr/local/lib"]


SYSTEM_DIRS = system_dirs("EM_X86_64")


class _OverBudget(Exception):
    """The parse read more than :data:`READ_BUDGET` bytes of the sparse view."""


class NeedBytes(Exception):
    """The parse asked for ``[offset, offset + size)``, which the sparse view lacks."""

    def __init__(self, offset: int, size: int) -> None:
        super().__init__(offset, size)
        self.offset = offset
        self.size = size


class SparseFile(io.RawIOBase):
    """A read-only file of ``size`` bytes of which only some ranges are known.

    Reading known bytes works as for any file; reading past the end gives what is left (as a
    file does); reading an unknown byte raises :class:`NeedBytes` naming the range asked for
    and keeps it in :attr:`need` (a parser may wrap the exception in its own). Reads take
    from :attr:`left` (bytes): past it they raise and set :attr:`over`.

    The ELF header is seen without its section header table (``e_shoff``, ``e_shnum`` and
    ``e_shstrndx`` read 0): ``ld.so`` finds everything through the program headers and the
    dynamic segment, and so does pyelftools then, instead of reading the table at the end
    of the file.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.need: NeedBytes | None = None
        self.left = READ_BUDGET
        self.over = False
        self._pos = 0
        self._pieces: dict[int, bytes] = {}  # offset -> bytes

    def add(self, offset: int, data: bytes) -> None:
        if offset == 0:
            data = _without_sections(data)
        self._pieces[offset] = data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        lo = self._pos
        hi = self.size if size is None or size < 0 else min(self.size, lo + size)
        if hi <= lo:
            return b""
        if hi - lo > self.left:
            self.over = True
            raise _OverBudget(self.left)
        self.left -= hi - lo
        out = bytearray()
        at = lo
        while at < hi:
            for start, data in self._pieces.items():
                if start <= at < start + len(data):
                    take = data[at - start : hi - start]
                    out += take
                    at += len(take)
                    break
            else:
                self.need = NeedBytes(at, hi - at)
                raise self.need
        self._pos = hi
        return bytes(out)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@dataclass(frozen=True)
class ElfDeps:
    """What ``ld.so`` needs to start a dynamically linked ELF file.

    ``interpreter``: ``PT_INTERP`` (absolute path) or None for a shared library or a static
    program; ``needed``: ``DT_NEEDED`` names in order; ``search``: the directories ``ld.so``
    looks in for a name without a slash, in order, ``$ORIGIN`` expanded against
    ``directory`` (the file's own directory in the image).
    """

    machine: str
    interpreter: str | None
    needed: tuple[str, ...]
    search: tuple[str, ...] = field(default=())

    def candidates(self, name: str) -> list[str]:
        """Absolute paths ``ld.so`` would try for ``name``, in order."""
        if "/" in name:
            return [name] if name.startswith("/") else []
        return [posixpath.join(d, name) for d in self.search]


def parse_elf_deps(f: SparseFile, directory: str) -> ElfDeps | None:
    """The dependencies of the ELF file viewed by ``f`` (None: not a dynamically linked
    ELF file, malformed, or one whose parse reads more than :data:`READ_BUDGET` bytes).
    Raises :class:`NeedBytes` when ``f`` lacks bytes it needs. Keeps the first
    :data:`MAX_NEEDED` names and the first ``4 * MAX_SEARCH`` directories of ``DT_RPATH``
    and of ``DT_RUNPATH``."""
    f.need, f.left, f.over = None, READ_BUDGET, False
    try:
        elf = ELFFile(f)
        machine = str(elf["e_machine"])
        interpreter = None
        dynamic = None
        for seg in elf.iter_segments():
            kind = seg["p_type"]
            if kind == "PT_INTERP":
                interpreter = seg.get_interp_name()
            elif kind == "PT_DYNAMIC" and isinstance(seg, DynamicSegment):
                dynamic = seg
        if dynamic is None:
            return None
        needed: list[str] = []
        rpath: list[str] = []
        runpath: list[str] = []
        for tag in dynamic.iter_tags():
            t = tag.entry.d_tag
            if t == "DT_NEEDED":
                if len(needed) < MAX_NEEDED:
                    needed.append(tag.needed)
            elif t == "DT_RPATH":
                _extend(rpath, tag.rpath)
            elif t == "DT_RUNPATH":
                _extend(runpath, tag.runpath)
    except Exception as exc:
        if f.over:  # as raised, or wrapped in the parser's own error
            log.debug("ELF look-ahead gave up: the parse read over %d bytes", READ_BUDGET)
            return None
        if f.need is not None:
            raise f.need from None
        # Malformed: no hint. pyelftools raises ELFError, but also what its checks and
        # structures trip over (AssertionError, IndexError, TypeError…) on a hostile file.
        log.debug("not read as an ELF program: %s: %s", type(exc).__name__, exc)
        return None
    search = [*(rpath if not runpath else []), *runpath]
    expanded = [_origin(d, directory) for d in search if d]
    return ElfDeps(
        machine=machine,
        interpreter=interpreter if interpreter and interpreter.startswith("/") else None,
        needed=tuple(n for n in needed if n),
        # A hostile runpath is cut, never the system directories ld.so falls back on.
        search=tuple(
            dict.fromkeys(
                [
                    *[d for d in expanded if d.startswith("/")][:MAX_SEARCH],
                    *system_dirs(machine),
                ]
            )
        ),
    )


def _extend(dirs: list[str], path: str) -> None:
    """Add ``path``'s ``:``-separated directories to ``dirs``, up to ``4 * MAX_SEARCH``."""
    room = 4 * MAX_SEARCH - len(dirs)
    if room > 0:
        dirs += path.split(":", room)[:room]


def _without_sections(head: bytes) -> bytes:
    """``head`` (a file's first bytes) with the ELF header's section table fields zeroed."""
    if len(head) < 64 or not head.startswith(ELF_MAGIC) or head[5] not in (1, 2):
        return head
    out = bytearray(head)
    if head[4] == 2:  # ELFCLASS64: e_shoff at 0x28 (8 bytes), e_shnum 0x3c, e_shstrndx 0x3e
        out[0x28:0x30] = bytes(8)
        out[0x3C:0x40] = bytes(4)
    elif head[4] == 1:  # ELFCLASS32: e_shoff at 0x20 (4 bytes), e_shnum 0x30, e_shstrndx 0x32
        out[0x20:0x24] = bytes(4)
        out[0x30:0x34] = bytes(4)
    return bytes(out)


def _origin(path: str, directory: str) -> str:
    for token in ("${ORIGIN}", "$ORIGIN"):
        path = path.replace(token, directory)
    return posixpath.normpath(path) if path.startswith("/") else ""


async def read_elf_deps(
    read: Callable[[int, int], Awaitable[bytes]], size: int, path: str, head: bytes = b""
) -> ElfDeps | None:
    """:func:`parse_elf_deps` of the ``size``-byte file at image path ``path``, fetching
    what the parse asks for through ``read(offset, size)`` (``head``: its first bytes,
    already read). None when it is not a dynamically linked ELF file, or needs more than
    :data:`MAX_ROUNDS` fetches (each of at most :data:`FETCH_MAX` bytes). ``read``'s errors
    propagate."""
    if size < 64 or (head and not head.startswith(ELF_MAGIC)):
        return None
    f = SparseFile(size)
    if head:
        f.add(0, head)
    directory = posixpath.dirname("/" + path.lstrip("/"))
    for _ in range(MAX_ROUNDS):
        try:
            # pyelftools is pure Python (~1 ms a round): off the caller's (FUSE) thread.
            return await trio.to_thread.run_sync(parse_elf_deps, f, directory)
        except NeedBytes as need:
            lo = need.offset
            hi = min(size, lo + FETCH_MAX, max(lo + need.size, lo + FETCH_MIN))
            f.add(lo, await read(lo, hi - lo))
    return None
