"""Fetch a starting program's shared libraries side by side, before ``ld.so`` opens them.

Why: started from a lazily pulled image, a dynamically linked program has ``ld.so`` open its
libraries one after another (each read and mapped before the next is looked for), so every
library the store does not hold yet costs one more round trip in turn: 4 for the python
workload, 16 for redis's server. The optimized eStargz layout avoids that by prefetching
what a recorded run read; an image nobody optimized has no such list — but an ELF program
names its own: ``PT_INTERP`` and ``DT_NEEDED`` (:mod:`store.elfdeps`).

When a regular file's first bytes are read and it is an ELF file with a dynamic segment,
:class:`LibraryPrefetcher` resolves its interpreter and needed libraries through the image's
layers as the container sees them (:class:`store.imageview.MergedView`, ``ld.so``'s search
order), fetches what a first read of each would fetch (:meth:`store.layer.Layer.fetch_file`:
verified like every read, not counted as one), and does the same for their own needs, all at
once. A library ``ld.so`` then opens is a cache hit, or joins the fetch in flight.

What it costs: the bytes of libraries the program would have loaded anyway, plus the
candidates a wrong guess names (a library found in a directory ``ld.so`` would not have used
first, e.g. one ``LD_LIBRARY_PATH`` redirects). At most :data:`MAX_FILES` files per program,
within :data:`DEADLINE` seconds; a failure only ends the look-ahead, never a read.

A container's start (:meth:`LibraryPrefetcher.before_read`, ``prefetch_entrypoint``): the
start reads files in turn too, and the image says which. The runtime reads ``/etc/passwd``
and ``/etc/group`` (:data:`START_FILES`) before the process runs (libpod looks the
container's user up in them); the process is the image's default one (config ``Entrypoint`` +
``Cmd``, found through its ``PATH``: :class:`store.imageview.DefaultProcess`) unless the user
names another, and a script's ``#!`` interpreter runs in turn. So the first read of a start
file is taken as the start: beside it the other start file and the program are fetched — its
first block waited for, its other blocks up to :data:`PROGRAM_MAX` requested side by side
(exec maps it; its ``PT_DYNAMIC`` lies in its data segment, near its end) — then its
libraries as above. Like the library look-ahead it is started by a read, never by a pull
(``noprefetch`` leaves it on). On a 40 ms link the python workload's start had waited for
passwd, group, the program's two blocks and its libraries one round trip after another.

What it costs, per container start of an image (once per resolution of its reference): the
start files, the program and the interpreters a script names (at most :data:`MAX_SCRIPTS` + 1
programs, each up to :data:`PROGRAM_MAX` bytes), and their libraries, whatever command the
container runs (a wrong guess costs bytes, never a read). Any first read of a start file
counts as a start (a build step, ``podman exec``, a scanner); an image without them, or with
a layer the store does not serve (pulled whole, or dropped after ``early_ttl``), gets no start
look-ahead. Path lookups are bounded per look-ahead (:data:`MAX_RESOLVES`) and per lookup
(:data:`store.imageview.MAX_STEPS`), and run in a worker thread, off the FUSE loop.

Not done: fetching every program's other blocks at its first read, as the start's program's
are (a first read of an ELF file naming an interpreter, or ``ET_EXEC``, is an ``execve``;
gcc's ``cc1``, 33 MB, faulted all eight of its 4 MiB blocks in one after another). Measured
in ``estargz-noopt`` and ``zstd-chunked-lazy``, 5 samples per store in one invocation, totals'
medians: with the blocks up to :data:`PROGRAM_MAX` requested side by side, gcc went from 4.66
to 4.95 s and 4.87 to 5.10 s (the block the first fault waits for now shares the link with
three others; one after another, cc1 computed while the next came), postgres from 4.51 to
4.30 s and 4.81 to 4.69 s (Mann-Whitney p = 0.10, 0.06), python, redis and tomcat unchanged;
with them requested in order, one ahead of the reads, nothing changed (gcc 4.48 → 4.48 s and
4.70 → 4.82 s, postgres 4.40 → 4.33 s and 4.62 → 4.62 s, python 1.88 → 1.91 s). Neither
fetched a byte more: every block was touched anyway.
"""

from __future__ import annotations

import logging
import stat
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from store.elfdeps import ELF_MAGIC, read_elf_deps
from store.imageview import DefaultProcess, Found, MergedView
from store.layer import READ_BLOCK, Layer
from store.tree import Node

log = logging.getLogger(__name__)

MAX_FILES = 64  # libraries fetched ahead for one program, its dependencies' included
DEADLINE = 30.0  # seconds one look-ahead may take
HEAD = 64 << 10  # first bytes of each library fetched (the rest of its block rides along)
SEEN_MAX = 4096  # files (image, layer, inode) and images remembered, so each is looked at once
LD_SO_CACHE = "etc/ld.so.cache"  # read by ld.so before it searches the directories
# Read by the runtime at every container start, before the process runs: podman (libpod)
# and CRI-O look the container's user and groups up in the image's own files.
START_FILES = ("/etc/passwd", "/etc/group")
START_NAMES = frozenset(p.lstrip("/") for p in START_FILES)  # as a layer's TOC names them
PROGRAM_MAX = 16 << 20  # bytes of each program of the image's start fetched ahead
MAX_SCRIPTS = 4  # #! interpreters followed from the image's program (binfmt allows 4)
MAX_RESOLVES = 256  # path resolutions one look-ahead may make (each yields to the FUSE loop)


@dataclass
class LibraryPrefetcher:
    """Starts look-aheads in ``nursery``: each ELF program's at its first read
    (:meth:`on_read`, when ``libraries``), each container start's at the first read of one
    of its image's start files (:meth:`before_read`, when ``entrypoint``).

    ``layers_of(ref)`` gives the loaded layers of image ``ref``, topmost first (empty if
    unknown); ``whole_of(ref)`` its resolution's serial number, config JSON bytes and
    layers once all are loaded (None before). ``prefetching``: the store
    prefetches prioritized regions; a program or library lying in one is left to that
    prefetch (an optimized image has it in the order the workload reads it). What a
    look-ahead fetched counts in the layer's fetch statistics like any fetch.
    """

    layers_of: Callable[[str], Sequence[Layer]]
    whole_of: Callable[[str], tuple[int, bytes, list[Layer]] | None]
    nursery: trio.Nursery
    prefetching: bool = True
    libraries: bool = True  # prefetch_libraries
    entrypoint: bool = True  # prefetch_entrypoint
    # Files whose look-ahead ran or runs, by (image, layer, inode): each is looked at once.
    _seen: OrderedDict[tuple[str, str, int], None] = field(default_factory=OrderedDict)
    # Images whose start was looked ahead, by the serial number of their resolution.
    _images: OrderedDict[int, None] = field(default_factory=OrderedDict)
    # One worker thread for the look-aheads' path resolutions, store-wide.
    _resolver: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1))

    def claim(self, ref: str, layer: Layer, node: Node) -> bool:
        """Whether ``node`` of ``layer`` in image ``ref`` was not looked at yet; it is now."""
        return _remember(self._seen, (ref, layer.digest, node.index))

    def unclaim(self, ref: str, layer: Layer, node: Node) -> None:
        """Forget a :meth:`claim` whose look-ahead failed: a first read looks again."""
        self._seen.pop((ref, layer.digest, node.index), None)

    def on_read(self, ref: str, layer: Layer, node: Node, offset: int, data: bytes) -> None:
        """A read of ``node`` returned ``data`` from ``offset``. O(1) unless it is the first
        read of an ELF file's head, which starts a look-ahead task."""
        if not self.libraries or offset != 0 or not data.startswith(ELF_MAGIC):
            return
        if self.claim(ref, layer, node):
            self.nursery.start_soon(self._look_ahead, ref, layer, node, data)

    def before_read(self, ref: str, node: Node, offset: int) -> None:
        """A read of ``node`` of image ``ref`` from ``offset`` is about to be served. O(1)
        unless it is the first read of one of the image's :data:`START_FILES`: a
        container of the image is starting, and its start's look-ahead begins (once per
        resolution of the reference, when ``entrypoint``)."""
        if not self.entrypoint or offset != 0 or node.entry.name not in START_NAMES:
            return
        whole = self.whole_of(ref)
        if whole is None:
            return  # not every layer is the store's (yet): no view of the image to go by
        serial, config, layers = whole
        if _remember(self._images, serial):
            self.nursery.start_soon(self._image_look_ahead, ref, config, layers)

    def _new_run(self, ref: str, layers: list[Layer]) -> _Run:
        return _Run(
            MergedView([x.tree for x in layers]),
            layers,
            self.prefetching,
            self.libraries,
            partial(self.claim, ref),
            partial(self.unclaim, ref),
            self._resolver,
        )

    async def _look_ahead(self, ref: str, layer: Layer, node: Node, head: bytes) -> None:
        run = self._new_run(ref, list(self.layers_of(ref)))
        if not any(x is layer for x in run.layers):
            self.unclaim(ref, layer, node)  # its image is not resolved now: a later read looks
            return
        await run.within_deadline(node.entry.name, run.program, layer, node, head)

    async def _image_look_ahead(self, ref: str, config: bytes, layers: list[Layer]) -> None:
        run = self._new_run(ref, layers)
        await run.within_deadline(ref, run.image_start, config)


def _remember(table: OrderedDict[Any, None], key: Any) -> bool:
    """Whether ``key`` is new to ``table``, which now holds it (and at most the
    :data:`SEEN_MAX` newest keys)."""
    if key in table:
        return False
    table[key] = None
    if len(table) > SEEN_MAX:
        table.popitem(last=False)
    return True


@dataclass
class _Run:
    """One look-ahead: every file it took up (the program, the libraries it fetched or left
    to the prefetch), by (layer position, inode). ``claim``/``unclaim`` mark a program or
    library as looked at for the whole store (:meth:`LibraryPrefetcher.claim`), so its own
    first read starts no second look-ahead."""

    view: MergedView
    layers: list[Layer]
    prefetching: bool = True
    libraries: bool = True  # look ahead at the libraries of the programs taken up
    claim: Callable[[Layer, Node], bool] | None = None
    unclaim: Callable[[Layer, Node], None] | None = None
    resolver: trio.CapacityLimiter | None = None  # the thread(s) path resolutions run in
    nursery: trio.Nursery | None = None
    taken: set[tuple[int, int]] = field(default_factory=set)
    resolves: int = 0  # path resolutions made, at most MAX_RESOLVES
    _cache_done: bool = False

    async def within_deadline(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` and what it starts in :attr:`nursery`, for at most :data:`DEADLINE`
        seconds; an error ends the look-ahead (a hint only: the reads report errors)."""
        with trio.move_on_after(DEADLINE):
            try:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(fn, *args)
            except Exception as exc:
                log.debug("look-ahead for %s stopped: %s", what, exc)
        if len(self.taken) > 1:
            log.debug("look-ahead for %s: %d files", what, len(self.taken))

    async def image_start(self, config: bytes) -> None:
        """What a start of the image (config JSON bytes ``config``) reads first:
        :data:`START_FILES`, and beside them its default process's program, then the
        interpreters a script names in turn (``#!/usr/bin/env NAME``: ``env``, then
        ``NAME``), each with its libraries."""
        for path in START_FILES:
            await self._fetch_first([path], parse=False)
        # The config is the registry's, of any size: decoded off the FUSE thread.
        process = await trio.to_thread.run_sync(DefaultProcess.from_config, config)
        if process is None:
            return
        todo = [process.candidates(process.program)]
        for _ in range(MAX_SCRIPTS + 1):
            if not todo:
                return
            found = await self._first_file(todo.pop(0), executable=True)
            if found is None:
                return
            layer, node = self.layers[found.layer], found.node
            head = await self._program(layer, node)
            if head is not None:  # else left to others: go on with what runs after it
                todo = process.interpreter(head) + todo

    async def _program(self, layer: Layer, node: Node) -> bytes | None:
        """Fetch a program the image's start runs: its first block, waited for, and its
        other blocks up to :data:`PROGRAM_MAX` beside it (exec maps it; its ``PT_DYNAMIC``
        lies in its data segment, near the end: python's 6.6 MB program took two requests
        in turn); its libraries' look-ahead starts. Its first bytes, or None when it is left
        to the prefetch, was claimed already or could not be fetched."""
        if layer.released or (self.prefetching and layer.in_prefetch_region(node)):
            return None  # an optimized layout brings it in the order the workload reads it
        if self.claim is not None and not self.claim(layer, node):
            return None  # its first read came first and looks ahead itself
        assert self.nursery is not None
        for lo in range(READ_BLOCK, min(node.size, PROGRAM_MAX), READ_BLOCK):
            # In the layer's own nursery: the look-ahead's deadline never cancels a fetch
            # a read may be waiting for, and releasing the layer does.
            layer.fetch_file_soon(node, lo, READ_BLOCK)
        done = False
        try:
            head = await layer.fetch_file(node, 0, HEAD)
            done = True
        except Exception as exc:  # its own read will report it
            log.debug("look-ahead of %s failed: %s", node.entry.name, exc)
            return None
        finally:
            if not done and self.unclaim is not None:
                self.unclaim(layer, node)  # failed or cancelled: its first read looks ahead
        if self.libraries and head.startswith(ELF_MAGIC):
            self.nursery.start_soon(self._guarded_needs, layer, node, head)
        return head

    async def _guarded_needs(self, layer: Layer, node: Node, head: bytes) -> None:
        """:meth:`_needs`, a failure ending only this file's part of the look-ahead; unless
        it ran to its end the file is given back (its own first read looks ahead then)."""
        done = False
        try:
            done = await self._needs(layer, node, head)
        except Exception as exc:
            log.debug("look-ahead of %s's libraries failed: %s", node.entry.name, exc)
        finally:
            if not done and self.unclaim is not None:
                self.unclaim(layer, node)

    async def program(self, layer: Layer, node: Node, head: bytes) -> None:
        if self.prefetching and layer.in_prefetch_region(node):
            return  # an optimized layout: what it loads follows it in the recorded order
        position = next(i for i, x in enumerate(self.layers) if x is layer)
        self.taken.add((position, node.index))
        await self._needs(layer, node, head)

    async def _needs(self, layer: Layer, node: Node, head: bytes) -> bool:
        """Start fetching what ``ld.so`` loads for ``node``: False when the run's budget
        (:data:`MAX_RESOLVES`, :data:`MAX_FILES`) cut the list short."""
        deps = await read_elf_deps(
            partial(layer.fetch_file, node), node.size, node.entry.name, head
        )
        if deps is None:
            return True
        if deps.interpreter is not None:
            await self._fetch_first([deps.interpreter], parse=False)
            if not self._cache_done:
                self._cache_done = True
                await self._fetch_first(["/" + LD_SO_CACHE], parse=False)
        for name in deps.needed:
            if self._spent():
                return False  # the budget is spent: a hostile list costs no more
            await self._fetch_first(deps.candidates(name), parse=True)
        return not self._spent()  # the last name may have spent it too

    def _spent(self) -> bool:
        return self.resolves >= MAX_RESOLVES or len(self.taken) > MAX_FILES

    async def _first_file(self, candidates: list[str], *, executable: bool = False) -> Found | None:
        """The first of ``candidates`` that names a regular file in the image (with an
        execute bit when ``executable``, as ``execvp(3)`` skips others), now taken; None when
        none does, when that file was taken already, or when the run made
        :data:`MAX_RESOLVES` resolutions or took :data:`MAX_FILES` files."""
        for path in candidates:
            if self.resolves >= MAX_RESOLVES:
                return None
            self.resolves += 1
            # In a worker thread, one at a time for the whole store: a hostile tree's deep
            # paths never hold the FUSE loop, nor take the threads reads inflate chunks in.
            found = await trio.to_thread.run_sync(self.view.resolve, path, limiter=self.resolver)
            if found is None or not stat.S_ISREG(found.node.mode):
                continue
            if executable and not found.node.mode & 0o111:
                continue
            key = (found.layer, found.node.index)
            if key in self.taken or len(self.taken) > MAX_FILES:
                return None
            self.taken.add(key)
            return found
        return None

    async def _fetch_first(self, candidates: list[str], *, parse: bool) -> None:
        """Start fetching the first of ``candidates`` that names a regular file in the image."""
        found = await self._first_file(candidates)
        if found is not None:
            assert self.nursery is not None
            self.nursery.start_soon(self._fetch, self.layers[found.layer], found.node, parse)

    async def _fetch(self, layer: Layer, node: Node, parse: bool) -> None:
        if layer.released or (self.prefetching and layer.in_prefetch_region(node)):
            return  # on its way in the order the workload reads it (its own needs too)
        if parse and self.claim is not None and not self.claim(layer, node):
            return  # looked at already: by its own first read, or another look-ahead
        done = False
        try:
            head = await layer.fetch_file(node, 0, HEAD)
            done = await self._needs(layer, node, head) if parse else True
        except Exception as exc:  # the loader's own read will report it
            log.debug("look-ahead of %s failed: %s", node.entry.name, exc)
        finally:
            if parse and not done and self.unclaim is not None:
                self.unclaim(layer, node)  # failed or cancelled: its first read looks ahead
