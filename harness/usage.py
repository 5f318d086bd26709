"""Link throughput, CPU and disk stalls over one measurement, every 100 ms: what a lazy start
waits on.

A lazy start waits on the link (bytes still on their way), on CPU (chunks inflated and
verified, the runtime's and the workload's own work), on round trips (the link idle while a
read waits for its answer) or on the machine's disk (the registry reads its blobs from it, the
runtime writes its storage and the store its cache files to it). The pull timeline
(:mod:`harness.timeline`) says what the store did per layer; this says, for the same
measurement from the start of ``podman pull`` to the end of the run, how busy the link and
the CPUs were meanwhile, and how long tasks waited on I/O.

:class:`UsageSampler` reads, every :data:`INTERVAL` seconds in a thread of its own, four
kernel counters: the bytes the host received on the link's interface (``/sys/class/net/<iface>
/statistics/rx_bytes``: the host end of the shaped link's veth, everything the registry
sent; ``lo`` on the loopback profile, which also counts the requests), the CPU time of the
whole machine (``/proc/stat``, proc(5)) and of one process (the store: ``utime + stime`` of
``/proc/<pid>/stat``, all its threads), and the time at least one task of the machine was
stalled on I/O (the ``some`` line's ``total`` of ``/proc/pressure/io``, microseconds: Linux's
pressure stall information, ``Documentation/accounting/psi.rst``; absent on kernels without
PSI). :func:`usage_series` turns them into bins.

What it costs: one thread of the harness waking 50 times a second to read four small
files (well under 1% of a core), only during the measurement that records the timeline
(sample 0 through our own store), and stopped as soon as the run ends.

Units: ``mbit`` is megabits per second received (10⁶ bits); ``cpu_pct`` and
``store_cpu_pct`` are percent of one core, as ``top`` shows them (200 is two cores busy),
``cpu_pct`` at most 100 × ``cores``; ``io_pct`` is percent of the bin's wall time in which
some task waited on I/O (100: always). A counter that cannot be read (an interface gone, a
process exited) gives None for its bins, never an error.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INTERVAL = 0.02  # seconds between two readings of the counters
WIDTH = 0.1  # seconds per bin of the series
MAX_SAMPLES = 30_000  # readings kept per measurement (10 minutes); later ones are dropped
_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of /proc's CPU times (jiffies per second)


@dataclass(frozen=True, slots=True)
class Counters:
    """One reading: ``t`` (``time.monotonic()`` seconds), then the cumulative counters —
    bytes received on the interface, the machine's busy and total CPU jiffies, the process's
    CPU jiffies, microseconds some task was stalled on I/O — None for those that could not be
    read."""

    t: float
    rx_bytes: int | None
    cpu_busy: int | None
    cpu_total: int | None
    proc_cpu: int | None
    io_some_us: int | None = None


def read_counters(iface: str | None, pid: int | None, proc: Path = Path("/proc")) -> Counters:
    """The counters now (see :class:`Counters`); never raises."""
    t = time.monotonic()
    rx = None
    if iface:
        with contextlib.suppress(OSError, ValueError):
            rx = int(Path(f"/sys/class/net/{iface}/statistics/rx_bytes").read_text())
    busy = total = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        # cpu  user nice system idle iowait irq softirq steal … (proc(5)); idle + iowait idle
        fields = [int(x) for x in (proc / "stat").read_text().split("\n", 1)[0].split()[1:9]]
        total = sum(fields)
        busy = total - fields[3] - fields[4]
    own = None
    if pid is not None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            # After the command name (in parentheses, which may hold anything): utime and
            # stime are fields 14 and 15 of the line, 12 and 13 after the ')'.
            rest = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
            own = int(rest[11]) + int(rest[12])
    io = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        # "some avg10=0.31 avg60=3.80 avg300=3.44 total=32663953" (psi.rst): the first line.
        first = (proc / "pressure" / "io").read_text().split("\n", 1)[0].split()
        if first[0] == "some" and first[-1].startswith("total="):
            io = int(first[-1].removeprefix("total="))
    return Counters(t, rx, busy, total, own, io)


@dataclass
class UsageSampler:
    """Reads the counters of interface ``iface`` and process ``pid`` every ``interval``
    seconds while entered (a daemon thread, stopped and joined on exit); ``samples`` holds
    the readings, at most :data:`MAX_SAMPLES`."""

    iface: str | None
    pid: int | None
    interval: float = INTERVAL
    samples: list[Counters] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> UsageSampler:
        self.samples.append(read_counters(self.iface, self.pid))
        thread = threading.Thread(target=self._run, name="usage sampler", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: the two readings at the ends only
            return self
        self._thread = thread
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Take the last reading and stop the thread (joined); later calls do nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(read_counters(self.iface, self.pid))

    def _run(self) -> None:
        while not self._stop.wait(self.interval) and len(self.samples) < MAX_SAMPLES:
            self.samples.append(read_counters(self.iface, self.pid))


def _rate(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else b - a


def usage_series(
    samples: Sequence[Counters],
    start: float,
    end: float,
    *,
    width: float = WIDTH,
    cores: int | None = None,
) -> list[dict[str, Any]]:
    """Bins of ``width`` seconds from ``start`` to ``end`` (``time.monotonic()`` seconds), one
    dict each: ``at`` (the bin's start, seconds from ``start``), ``mbit``, ``cpu_pct``,
    ``store_cpu_pct`` and ``io_pct`` (units in the module docstring). A bin's values are the
    counters' changes between the readings nearest its two edges, so each reading interval
    counts in the bin it mostly falls in; they are None when those two readings are less than a
    quarter of ``width`` apart (no readings there: before the first, after the last, or a
    stalled sampler) or a counter is missing or went backwards. A last bin narrower than a
    quarter of ``width`` is left out."""
    if cores is None:
        cores = os.cpu_count() or 1
    ordered = sorted(samples, key=lambda c: c.t)
    bins: list[dict[str, Any]] = []
    n = max(0, int((end - start) / width + 0.999999))
    if n and end - (start + (n - 1) * width) < width / 4:
        n -= 1
    for i in range(n):
        lo, hi = start + i * width, min(end, start + (i + 1) * width)
        a, b = _nearest(ordered, lo), _nearest(ordered, hi)
        entry: dict[str, Any] = {"at": round(i * width, 3)}
        if a is None or b is None or b.t - a.t < width / 4:
            entry.update(mbit=None, cpu_pct=None, store_cpu_pct=None, io_pct=None)
            bins.append(entry)
            continue
        dt = b.t - a.t
        rx = _rate(a.rx_bytes, b.rx_bytes)
        busy, total = _rate(a.cpu_busy, b.cpu_busy), _rate(a.cpu_total, b.cpu_total)
        own = _rate(a.proc_cpu, b.proc_cpu)
        entry["mbit"] = None if rx is None or rx < 0 else round(rx * 8 / dt / 1e6, 1)
        entry["cpu_pct"] = (
            None
            if busy is None or total is None or busy < 0 or total <= 0
            else round(min(100.0 * cores, 100.0 * cores * busy / total), 1)
        )
        entry["store_cpu_pct"] = (
            None if own is None or own < 0 else round(100.0 * own / _TICKS / dt, 1)
        )
        io = _rate(a.io_some_us, b.io_some_us)
        entry["io_pct"] = None if io is None or io < 0 else round(min(100.0, io / 1e4 / dt), 1)
        bins.append(entry)
    return bins


def _nearest(ordered: Sequence[Counters], t: float) -> Counters | None:
    """The reading closest in time to ``t`` (None without readings)."""
    if not ordered:
        return None
    lo, hi = 0, len(ordered)
    while lo < hi:
        mid = (lo + hi) // 2
        if ordered[mid].t < t:
            lo = mid + 1
        else:
            hi = mid
    near = [ordered[j] for j in (lo - 1, lo) if 0 <= j < len(ordered)]
    return min(near, key=lambda c: abs(c.t - t))


def usage_doc(
    sampler: UsageSampler, start: float, end: float, *, cores: int | None = None
) -> dict[str, Any]:
    """What the timeline keeps of a sampler's readings: ``{"iface", "width_s", "cores",
    "bins"}`` (:func:`usage_series` from ``start`` to ``end``)."""
    cores = cores or os.cpu_count() or 1
    return {
        "iface": sampler.iface,
        "width_s": WIDTH,
        "cores": cores,
        "bins": usage_series(sampler.samples, start, end, cores=cores),
    }


def usage_table(usage: dict[str, Any]) -> Iterator[str]:
    """Markdown lines: one row per bin, after a line saying what the columns are."""
    iface = usage.get("iface")
    source = (
        "all of the machine's loopback traffic, the registry's among it"
        if iface == "lo"
        else "what the registry sent over the link"
    )
    yield (
        f"Every {usage['width_s']:g} s from the start of `podman pull` to the end of the run: "
        f"*link*, megabits per second the host received on `{iface or '–'}` ({source}); "
        f"*CPU*, percent of one core, the machine's ({usage['cores']} cores) and the store's "
        "(all its threads); *I/O stall*, percent of the time some task of the machine waited "
        "on I/O (`/proc/pressure/io`, machine-wide: the registry's blob reads, the runtime's "
        "storage, the store's cache files)."
    )
    yield ""
    yield "| at s | link Mbit/s | CPU % machine | CPU % store | I/O stall % |"
    yield "|---:|---:|---:|---:|---:|"

    def num(value: Any) -> str:
        return "–" if value is None else f"{value:.0f}"

    for b in usage["bins"]:
        yield (
            f"| {b['at']:.1f} | {num(b['mbit'])} | {num(b['cpu_pct'])} | "
            f"{num(b['store_cpu_pct'])} | {num(b.get('io_pct'))} |"
        )


__all__ = [
    "Counters",
    "UsageSampler",
    "read_counters",
    "usage_doc",
    "usage_series",
    "usage_table",
]
