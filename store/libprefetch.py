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
"""

from __future__ import annotations

import logging
import stat
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import trio

from store.elfdeps import ELF_MAGIC, ElfDeps, read_elf_deps
from store.imageview import MergedView
from store.layer import Layer
from store.tree import Node

log = logging.getLogger(__name__)

MAX_FILES = 64  # libraries fetched ahead for one program, its dependencies' included
DEADLINE = 30.0  # seconds one program's look-ahead may take
HEAD = 64 << 10  # first bytes of each library fetched (the rest of its block rides along)
SEEN_MAX = 4096  # programs remembered (image, layer, file), so each is looked at once
LD_SO_CACHE = "etc/ld.so.cache"  # read by ld.so before it searches the directories


@dataclass
class LibraryPrefetcher:
    """Watches first reads; starts each ELF program's look-ahead in ``nursery``.

    ``layers_of(ref)`` gives the loaded layers of image ``ref``, topmost first (empty if
    unknown). ``prefetching``: the store prefetches prioritized regions; a program or
    library lying in one is left to that prefetch (an optimized image has it in the order
    the workload reads it). What a look-ahead fetched counts in the layer's fetch
    statistics like any fetch.
    """

    layers_of: Callable[[str], Sequence[Layer]]
    nursery: trio.Nursery
    prefetching: bool = True
    _seen: OrderedDict[tuple[str, str, int], None] = field(default_factory=OrderedDict)

    def on_read(self, ref: str, layer: Layer, node: Node, offset: int, data: bytes) -> None:
        """A read of ``node`` returned ``data`` from ``offset``. O(1) unless it is the first
        read of an ELF file's head, which starts a look-ahead task."""
        if offset != 0 or not data.startswith(ELF_MAGIC):
            return
        key = (ref, layer.digest, node.index)
        if key in self._seen:
            return
        self._seen[key] = None
        if len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)
        self.nursery.start_soon(self._look_ahead, ref, layer, node, data)

    async def _look_ahead(self, ref: str, layer: Layer, node: Node, head: bytes) -> None:
        layers = list(self.layers_of(ref))
        if not any(x is layer for x in layers):
            return
        run = _Run(MergedView([x.tree for x in layers]), layers, self.prefetching)
        with trio.move_on_after(DEADLINE):
            try:
                async with trio.open_nursery() as nursery:
                    run.nursery = nursery
                    nursery.start_soon(run.program, layer, node, head)
            except Exception as exc:  # a hint only: the reads themselves report errors
                log.debug("library look-ahead for %s stopped: %s", node.entry.name, exc)
        if len(run.taken) > 1:
            log.debug("library look-ahead for %s: %d files", node.entry.name, len(run.taken) - 1)


@dataclass
class _Run:
    """One program's look-ahead: every file it took up (the program, the libraries it
    fetched or left to the prefetch), by (layer position, inode)."""

    view: MergedView
    layers: list[Layer]
    prefetching: bool = True
    nursery: trio.Nursery | None = None
    taken: set[tuple[int, int]] = field(default_factory=set)
    _cache_done: bool = False

    async def program(self, layer: Layer, node: Node, head: bytes) -> None:
        if self.prefetching and layer.in_prefetch_region(node):
            return  # an optimized layout: what it loads follows it in the recorded order
        position = next(i for i, x in enumerate(self.layers) if x is layer)
        self.taken.add((position, node.index))
        await self._needs(layer, node, head)

    async def _needs(self, layer: Layer, node: Node, head: bytes) -> None:
        deps = await read_elf_deps(
            partial(layer.fetch_file, node), node.size, node.entry.name, head
        )
        if deps is None:
            return
        if deps.interpreter is not None:
            self._fetch_first(deps, [deps.interpreter], parse=False)
            if not self._cache_done:
                self._cache_done = True
                self._fetch_first(deps, ["/" + LD_SO_CACHE], parse=False)
        for name in deps.needed:
            self._fetch_first(deps, deps.candidates(name), parse=True)

    def _fetch_first(self, deps: ElfDeps, candidates: list[str], *, parse: bool) -> None:
        """Fetch the first of ``candidates`` that names a regular file in the image."""
        for path in candidates:
            found = self.view.resolve(path)
            if found is None or not stat.S_ISREG(found.node.mode):
                continue
            key = (found.layer, found.node.index)
            if key in self.taken or len(self.taken) > MAX_FILES:
                return
            self.taken.add(key)
            assert self.nursery is not None
            self.nursery.start_soon(self._fetch, self.layers[found.layer], found.node, parse)
            return

    async def _fetch(self, layer: Layer, node: Node, parse: bool) -> None:
        try:
            if self.prefetching and layer.in_prefetch_region(node):
                return  # on its way in the order the workload reads it (its own needs too)
            head = await layer.fetch_file(node, 0, HEAD)
            if parse:
                await self._needs(layer, node, head)
        except Exception as exc:  # the loader's own read will report it
            log.debug("look-ahead of %s failed: %s", node.entry.name, exc)
