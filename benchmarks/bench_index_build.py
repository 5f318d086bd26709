"""TOC → index build with the garbage collector paused, beside the same builds without.

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

Run: ``LAZYBENCH_BENCH=1 pytest benchmarks/bench_index_build.py -s`` (``nox -s microbench``).
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import random
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from store import estargz
from store.estargz import LayerIndex, convert

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
    spent = [0.0, 0.0]  # GC CPU seconds, the current collection's start

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            spent[1] = time.process_time()
        else:
            spent[0] += time.process_time() - spent[1]

    held: list[LayerIndex] = []
    gc.collect()
    gc.callbacks.append(on_gc)
    try:
        with contextlib.nullcontext() if paused else _pause_off():
            cpu = _builds(pieces, toc_offset, compression, held)
    finally:
        gc.callbacks.remove(on_gc)
    return Run(cpu, spent[0])


def _builds(pieces: list[bytes], toc_offset: int, compression: str, held: list) -> float:
    """CPU seconds of :data:`BUILDS` builds, the last :data:`HELD` indexes kept in ``held``."""
    start = time.process_time()
    for _ in range(BUILDS):
        held.append(
            LayerIndex.from_toc_json(pieces, toc_offset=toc_offset, compression=compression)
        )
        del held[:-HELD]
        _ = [bytearray(16) for _ in range(20_000)]  # what reads allocate between builds
    return time.process_time() - start


def test_index_build_with_the_collector_paused() -> None:
    pieces, toc_offset, compression = _toc_pieces(ENTRIES)
    runs: dict[bool, list[Run]] = {True: [], False: []}
    for paused in (False, True, True, False):  # ABBA
        runs[paused].append(_run(pieces, toc_offset, compression, paused=paused))
    base = sum(r.cpu_s for r in runs[False]) / 2
    ours = sum(r.cpu_s for r in runs[True]) / 2
    per = BUILDS * ENTRIES
    for paused, label in ((False, "collector running"), (True, "collector paused")):
        rs = runs[paused]
        cpu = sum(r.cpu_s for r in rs) / 2
        gc_s = sum(r.gc_s for r in rs) / 2
        print(
            f"\n{label}: {cpu:.2f} CPU s for {BUILDS} builds of {ENTRIES} entries "
            f"({cpu / per * 1e6:.1f} µs an entry), of which the collector {gc_s:.2f} s"
        )
    ratio = base / ours
    print(f"baseline ÷ paused: {ratio:.2f} (target ≥ {TARGET_RATIO})")
    assert ratio >= TARGET_RATIO
