"""The link's and CPUs' load over a measurement (harness.usage): counters, bins, sampler."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import pytest

from harness.usage import (
    INTERVAL,
    Counters,
    UsageSampler,
    read_counters,
    usage_doc,
    usage_series,
    usage_table,
)

TICKS = os.sysconf("SC_CLK_TCK")


def _readings(
    n: int, step: float, rx_per_step: int, busy_per_step: int, own_per_step: int, io_per_step=0
):
    """``n`` readings ``step`` seconds apart, each counter growing at a steady rate; the
    machine's total CPU grows by 2 cores' worth of jiffies per step."""
    total_per_step = round(2 * TICKS * step)
    return [
        Counters(
            t=10.0 + i * step,
            rx_bytes=1000 + i * rx_per_step,
            cpu_busy=i * busy_per_step,
            cpu_total=i * total_per_step,
            proc_cpu=i * own_per_step,
            io_some_us=i * io_per_step,
        )
        for i in range(n)
    ]


def test_steady_counters_give_steady_bins_in_their_units():
    # 0.04 s apart: 50,000 bytes (10 Mbit/s), half the machine busy, the store a quarter core,
    # some task stalled on I/O 10 ms of every 40 (a quarter of the time).
    step = 0.04
    total = round(2 * TICKS * step)
    readings = _readings(51, step, 50_000, total // 2, round(TICKS * step / 4), 10_000)
    bins = usage_series(readings, 10.0, 12.0, cores=2)
    assert [b["at"] for b in bins] == pytest.approx([i * 0.1 for i in range(20)])
    for b in bins:
        assert b["mbit"] == pytest.approx(10.0, rel=0.01)
        assert b["cpu_pct"] == pytest.approx(100.0, rel=0.05)  # 2 cores, half busy
        assert b["store_cpu_pct"] == pytest.approx(25.0, rel=0.01)
        assert b["io_pct"] == pytest.approx(25.0, rel=0.01)


def test_a_burst_lands_in_its_own_bin():
    readings = [Counters(10.0 + i * 0.02, 0, 0, 100 * i, 0) for i in range(51)]
    # 1 MB arrives between 10.40 and 10.42 s: all of it in the bin [0.4, 0.5).
    readings = [
        Counters(c.t, 1_000_000 if c.t > 10.41 else 0, c.cpu_busy, c.cpu_total, c.proc_cpu)
        for c in readings
    ]
    mbit = [b["mbit"] for b in usage_series(readings, 10.0, 11.0, cores=1)]
    assert mbit[4] == pytest.approx(80.0, rel=0.01) and sum(mbit) == pytest.approx(80.0)


def test_missing_counters_and_gaps_give_none_never_an_error():
    readings = [Counters(10.0 + i * 0.02, None, None, None, None) for i in range(11)]
    bins = usage_series(readings, 10.0, 10.2)
    assert bins == [
        {"at": 0.0, "mbit": None, "cpu_pct": None, "store_cpu_pct": None, "io_pct": None},
        {"at": 0.1, "mbit": None, "cpu_pct": None, "store_cpu_pct": None, "io_pct": None},
    ]
    # No readings inside the later bins (the sampler stopped early): no values there.
    later = usage_series(_readings(6, 0.02, 1, 1, 1), 10.0, 10.4)
    assert later[0]["mbit"] is not None and later[-1]["mbit"] is None
    assert usage_series([], 10.0, 10.3)[0]["mbit"] is None
    assert usage_series(readings, 10.0, 10.0) == []
    # A counter that went backwards (the interface was recreated) is no rate.
    back = [Counters(10.0, 5000, 5, 10, 7, 900), Counters(10.1, 10, 3, 20, 2, 100)]
    assert usage_series(back, 10.0, 10.1) == [
        {"at": 0.0, "mbit": None, "cpu_pct": None, "store_cpu_pct": None, "io_pct": None}
    ]
    # A last bin narrower than a quarter of the width is left out, not shown empty.
    assert [b["at"] for b in usage_series(readings, 10.0, 10.21)] == [0.0, 0.1]
    assert [b["at"] for b in usage_series(readings, 10.0, 10.23)] == [0.0, 0.1, 0.2]


def test_io_pressure_is_read_from_the_some_line(tmp_path):
    (tmp_path / "pressure").mkdir()
    (tmp_path / "stat").write_text("cpu  1 0 1 8 0 0 0 0 0 0\n")
    (tmp_path / "pressure" / "io").write_text(
        "some avg10=0.31 avg60=3.80 avg300=3.44 total=32663953\n"
        "full avg10=0.18 avg60=2.22 avg300=2.48 total=27775911\n"
    )
    assert read_counters(None, None, tmp_path).io_some_us == 32663953
    (tmp_path / "pressure" / "io").write_text("garbage\n")
    assert read_counters(None, None, tmp_path).io_some_us is None
    # Past 100% (a coarse reading interval) is clamped: the share of a bin's wall time.
    fast = [Counters(10.0, 0, 0, 10, 0, 0), Counters(10.1, 0, 0, 20, 0, 150_000)]
    assert usage_series(fast, 10.0, 10.1)[0]["io_pct"] == 100.0


def test_counters_of_this_machine_and_process():
    now = read_counters("lo", os.getpid())
    assert now.rx_bytes is not None and now.rx_bytes >= 0
    assert now.cpu_total is not None and now.cpu_busy is not None
    assert 0 <= now.cpu_busy <= now.cpu_total
    assert now.proc_cpu is not None and now.proc_cpu >= 0
    if os.path.exists("/proc/pressure/io"):  # a kernel with pressure stall information
        assert now.io_some_us is not None and now.io_some_us >= 0
    gone = read_counters("lzb-no-such-iface", 2**22 + 12345)
    assert gone.rx_bytes is None and gone.proc_cpu is None and gone.cpu_total is not None
    assert read_counters(None, None).rx_bytes is None


def test_the_sampler_reads_while_entered_and_its_thread_ends_with_it():
    # The busy process is a child, as the store is: a spin in this process would hold the
    # GIL and starve the sampler's thread (readings 120 ms apart, seen on a 2-core machine).
    spin = "import time\nend = time.monotonic() + 0.4\nwhile time.monotonic() < end: pass\n"
    start = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", spin])
    with UsageSampler("lo", child.pid) as sampler:
        thread = sampler._thread
        assert thread is not None and thread.is_alive()
        child.wait(timeout=30)  # the child busy: the store's column reads its CPU
    # All children's CPU time so far: at least this one's.
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu.ru_utime + cpu.ru_stime
    end = time.monotonic()
    assert not thread.is_alive()
    sampler.stop()  # a second stop takes no reading
    n = len(sampler.samples)
    assert 0.4 / INTERVAL / 3 <= n <= (end - start) / INTERVAL + 3
    assert [c.t for c in sampler.samples] == sorted(c.t for c in sampler.samples)
    doc = usage_doc(sampler, start, end, cores=2)
    assert doc["iface"] == "lo" and doc["width_s"] == 0.1 and doc["cores"] == 2
    own = [b["store_cpu_pct"] for b in doc["bins"] if b["store_cpu_pct"] is not None]
    # What the bins add up to is at most the child's CPU time, give or take the jiffies'
    # and the bin edges' coarseness (a loaded machine may leave some bins without readings).
    assert own and 0 < sum(own) * 0.1 / 100 <= cpu + 0.1
    lines = list(usage_table(doc))
    assert lines[2] == "| at s | link Mbit/s | CPU % machine | CPU % store | I/O stall % |"
    assert len(lines) == 4 + len(doc["bins"]) and lines[4].startswith("| 0.0 | ")
