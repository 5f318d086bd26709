"""TOC → index build with the garbage collector paused, beside the same builds without; and
with entries and chunks the collector does not track, beside the same builds with tracked ones.

What it measures: the CPU seconds of :meth:`LayerIndex.from_toc_json
<store.estargz.index.LayerIndex.from_toc_json>` (decode and build) over a synthetic layer's
TOC (``LAZYBENCH_BENCH_ENTRIES`` files, default 25,000: the python image's layers together),
built again and again while the last ``HELD`` indexes stay alive, as an image's layers do in
the store. The baseline is the same builds with the pause turned into a no-op (``gc.disable``
made to do nothing: :data:`store.estargz.index.gc_paused` is bound into ``from_toc_json``'s
decorator), in the same invocation, in ABBA order so a drifting machine favours neither. The
collector's own CPU time (``gc.callbacks``) is printed beside each figure, the deferred
collections after each paused build included. Target: the paused builds cost no more CPU
than the baseline (ratio baseline ÷ paused ≥ 1.0).

The second keeps the pause and compares the index's entries and chunks as they are
(:class:`~store.estargz.index.Entry` and :class:`~store.estargz.index.Chunk`: ``msgspec``
structs the collector never tracks) with slotted dataclasses of the same fields (tracked, as
both were before; the entry with its link up), swapped into the builder for the baseline, over
the same builds with more allocation between them (a pull's reads and requests): the whole
loop's CPU time and the collector's, baseline ÷ untracked, ABBA. Target ≥ 1.0.

Run: ``LAZYBENCH_BENCH=1 pytest benchmarks/bench_index_build.py -s`` (``nox -s microbench``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import os
import random
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import msgspec
import pytest

from store import estargz
from store.estargz import LayerIndex, convert
from store.estargz import index as index_module

pytestmark = pytest.mark.skipif(
    os.environ.get("LAZYBENCH_BENCH") != "1", reason="benchmarks run only with LAZYBENCH_BENCH=1"
)

ENTRIES = int(os.environ.get("LAZYBENCH_BENCH_ENTRIES", "25000"))
HELD = 6  # indexes kept alive: an image's layers
BUILDS = 12  # per run
TARGET_RATIO = 1.0


@dataclass
class Run:
    cpu_s: float
    gc_s: float


def _toc_pieces(files: int) -> tuple[list[bytes], int, str]:
    """A synthetic eStargz layer's TOC JSON pieces, TOC offset and compression: ``files``
    small files in directories of 100, as a distribution's tree has them."""
    rng = random.Random(1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in range(-(-files // 100)):
            info = tarfile.TarInfo(f"usr/lib/pkg{d:04d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
            for i in range(min(100, files - 100 * d)):
                data = rng.randbytes(rng.randrange(50, 400))
                info = tarfile.TarInfo(f"usr/lib/pkg{d:04d}/file{i:03d}.py")
                info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    convert(io.BytesIO(buf.getvalue()), out, level=1)
    blob = out.getvalue()
    footer = estargz.parse_footer(blob[-estargz.tail_fetch_size(len(blob)) :], len(blob))
    lo, hi = estargz.toc_range(footer, len(blob))
    pieces = list(estargz.toc_json_pieces(blob[lo:hi], footer, estargz.DEFAULT_LIMITS))
    return pieces, footer.toc_offset, footer.compression


@contextlib.contextmanager
def _pause_off() -> Iterator[None]:
    """``gc_paused`` does nothing meanwhile: ``gc.disable`` is made a no-op."""
    disable = gc.disable
    gc.disable = lambda: None  # type: ignore[assignment]
    try:
        yield
    finally:
        gc.disable = disable  # type: ignore[assignment]


def _run(pieces: list[bytes], toc_offset: int, compression: str, *, paused: bool) -> Run:
    held: list[LayerIndex] = []

    def work() -> float:
        with contextlib.nullcontext() if paused else _pause_off():
            return _builds(pieces, toc_offset, compression, held)

    return _timed(work)


def _builds(
    pieces: list[bytes], toc_offset: int, compression: str, held: list, churn: int = 20_000
) -> float:
    """CPU seconds of :data:`BUILDS` builds, the last :data:`HELD` indexes kept in ``held``,
    ``churn`` short-lived tracked objects made after each."""
    start = time.process_time()
    for _ in range(BUILDS):
        held.append(
            LayerIndex.from_toc_json(pieces, toc_offset=toc_offset, compression=compression)
        )
        del held[:-HELD]
        _ = [bytearray(16) for _ in range(churn)]  # what reads allocate between builds
        _ = [{} for _ in range(churn)]  # and the requests' headers, timeline events, …
    return time.process_time() - start


def _mean(runs: list[Run]) -> Run:
    """The mean of an ABBA pair's runs."""
    return Run(sum(r.cpu_s for r in runs) / len(runs), sum(r.gc_s for r in runs) / len(runs))


def _show(label: str, run: Run) -> None:
    print(
        f"\n{label}: {run.cpu_s:.2f} CPU s for {BUILDS} builds of {ENTRIES} entries "
        f"({run.cpu_s / (BUILDS * ENTRIES) * 1e6:.1f} µs an entry), "
        f"of which the collector {run.gc_s:.2f} s"
    )


def test_index_build_with_the_collector_paused() -> None:
    pieces, toc_offset, compression = _toc_pieces(ENTRIES)
    runs: dict[bool, list[Run]] = {True: [], False: []}
    for paused in (False, True, True, False):  # ABBA
        runs[paused].append(_run(pieces, toc_offset, compression, paused=paused))
    base, ours = _mean(runs[False]), _mean(runs[True])
    _show("collector running", base)
    _show("collector paused", ours)
    ratio = base.cpu_s / ours.cpu_s
    print(f"baseline ÷ paused: {ratio:.2f} (target ≥ {TARGET_RATIO})")
    assert ratio >= TARGET_RATIO


def _tracked(struct: type, extra: tuple[tuple[str, Any, Any], ...] = (), **namespace: Any) -> type:
    """A slotted dataclass with ``struct``'s fields and defaults (and ``extra`` ones): tracked
    by the collector, as every instance of a class with slots is."""
    fields: list[Any] = []
    for f in msgspec.structs.fields(struct):
        if f.default is msgspec.NODEFAULT:
            fields.append((f.name, Any))
        else:
            fields.append((f.name, Any, dataclasses.field(default=f.default)))
    fields += [(name, kind, dataclasses.field(default=default)) for name, kind, default in extra]
    return dataclasses.make_dataclass(
        f"Tracked{struct.__name__}", fields, slots=True, eq=False, namespace=namespace
    )


def _dir_children(self: Any) -> None:
    if self.type == "dir" and self.children is index_module._NO_CHILDREN:
        self.children = {}


# Entry and Chunk as they were: slotted dataclasses, the entry with its link up (``parent``).
_TrackedChunk = _tracked(index_module.Chunk)
_TrackedEntry = _tracked(index_module.Entry, (("parent", Any, None),), __post_init__=_dir_children)


def _timed(work: Callable[[], float]) -> Run:
    """``work()``'s CPU seconds (it returns them) and the collector's meanwhile."""
    spent = [0.0, 0.0]  # GC CPU seconds, the current collection's start

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            spent[1] = time.process_time()
        else:
            spent[0] += time.process_time() - spent[1]

    gc.collect()
    gc.callbacks.append(on_gc)
    try:
        cpu = work()
    finally:
        gc.callbacks.remove(on_gc)
    return Run(cpu, spent[0])


_number = index_module._Builder._number


def _number_with_parents(builder: Any) -> None:
    """The builder's last step, after linking each directory to its parent first, as the
    builder did while it applied entries (a pass over the directories: ~1 ms a build here)."""
    stack = [builder.idx.root]
    while stack:
        d = stack.pop()
        for child in d.children.values():
            if child.type == "dir":
                child.parent = d
                stack.append(child)
    _number(builder)


def _collected(pieces: list[bytes], toc_offset: int, compression: str, *, tracked: bool) -> Run:
    held: list[LayerIndex] = []

    def work() -> float:
        with contextlib.ExitStack() as stack:
            if tracked:
                stack.enter_context(mock.patch.object(index_module, "Chunk", _TrackedChunk))
                stack.enter_context(mock.patch.object(index_module, "Entry", _TrackedEntry))
                stack.enter_context(
                    mock.patch.object(index_module._Builder, "_number", _number_with_parents)
                )
            return _builds(pieces, toc_offset, compression, held, churn=60_000)

    return _timed(work)


def test_untracked_entries_and_chunks_cost_the_collector_less() -> None:
    pieces, toc_offset, compression = _toc_pieces(ENTRIES)
    probe = LayerIndex.from_toc_json(pieces, toc_offset=toc_offset, compression=compression)
    assert not any(gc.is_tracked(o) for o in (next(probe.chunks()), *probe.entries[:100]))
    runs: dict[bool, list[Run]] = {True: [], False: []}
    for tracked in (True, False, False, True):  # ABBA
        runs[tracked].append(_collected(pieces, toc_offset, compression, tracked=tracked))
    base, ours = _mean(runs[True]), _mean(runs[False])
    _show("tracked", base)
    _show("untracked", ours)
    gc_ratio = base.gc_s / max(1e-9, ours.gc_s)
    print(
        f"tracked ÷ untracked: CPU {base.cpu_s / ours.cpu_s:.2f}, collector {gc_ratio:.2f}", end=""
    )
    print(f" (target ≥ {TARGET_RATIO})")
    assert base.cpu_s / ours.cpu_s >= TARGET_RATIO
