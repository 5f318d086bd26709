"""eStargz conversion throughput on a realistic layer, beside ``gzip -9`` of the same tar.

Why ``gzip -9``: the Go library's default level is gzip.BestCompression, so a converter that
is slower than plain ``gzip -9`` of the same bytes is the bottleneck of every image build.
Members are independent, so our writer compresses them on all cores; target: ≥ 1.0× gzip -9.

The layer is a Debian bookworm minbase rootfs with python3 (~210 MB tar), built once with
``mmdebstrap`` and cached under ``$LAZYBENCH_CACHE/bench`` (default ``~/.cache/lazybench``).
Both tools read the same cached tar and write a file in the same temporary directory, in
alternating rounds (``LAZYBENCH_BENCH_ROUNDS``, default 1) within one invocation; medians.

Run: ``LAZYBENCH_BENCH=1 pytest benchmarks/bench_estargz_convert.py -s`` (or
``nox -s microbench``), or ``python benchmarks/bench_estargz_convert.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from store.estargz import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, EstargzReader, FileBlobSource, convert

TARGET_RATIO = 1.0
SUITE = "bookworm"
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")


@dataclass
class Result:
    tar_bytes: int
    ours_s: float
    gzip9_s: float
    ours_bytes: int
    gzip9_bytes: int
    rounds: int
    workers: int

    @property
    def ours_mb_s(self) -> float:
        return self.tar_bytes / self.ours_s / 1e6

    @property
    def gzip9_mb_s(self) -> float:
        return self.tar_bytes / self.gzip9_s / 1e6

    @property
    def ratio(self) -> float:
        return self.ours_mb_s / self.gzip9_mb_s


def cache_dir() -> Path:
    return Path(os.environ.get("LAZYBENCH_CACHE", Path.home() / ".cache" / "lazybench")) / "bench"


def layer_tar() -> Path:
    """The cached rootfs tar, built with mmdebstrap on first use (needs root and a mirror)."""
    path = cache_dir() / f"debian-{SUITE}-python3.tar"
    if path.is_file():
        return path
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap not installed (ci/install-system-deps) and no cached layer tar")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    cmd = ["mmdebstrap", "--variant=minbase", "--include=python3", "--mode=root", "--quiet"]
    cmd += [SUITE, str(tmp)]
    if APT_SOURCES.is_file():
        cmd.append(str(APT_SOURCES))
    try:
        subprocess.run(cmd, check=True, timeout=1800)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _time_gzip9(tar: Path, out: Path) -> float:
    t0 = time.perf_counter()
    with tar.open("rb") as src, out.open("wb") as dst:
        subprocess.run(["gzip", "-9", "-c"], stdin=src, stdout=dst, check=True, timeout=1800)
    return time.perf_counter() - t0


def _time_ours(tar: Path, out: Path) -> float:
    t0 = time.perf_counter()
    with tar.open("rb") as src, out.open("wb") as dst:
        convert(src, dst, chunk_size=DEFAULT_CHUNK_SIZE, level=DEFAULT_LEVEL)
    return time.perf_counter() - t0


def run_benchmark(rounds: int | None = None) -> Result:
    rounds = rounds or int(os.environ.get("LAZYBENCH_BENCH_ROUNDS", "1"))
    tar = layer_tar()
    ours_t: list[float] = []
    gz_t: list[float] = []
    with tempfile.TemporaryDirectory(prefix="lazybench-bench-estargz-") as d:
        g_out, o_out = Path(d) / "layer.tar.gz", Path(d) / "layer.estargz"
        for _ in range(rounds):
            gz_t.append(_time_gzip9(tar, g_out))
            ours_t.append(_time_ours(tar, o_out))
        with FileBlobSource(o_out) as src:  # what we timed is a valid layer
            EstargzReader(src)
        return Result(
            tar_bytes=tar.stat().st_size,
            ours_s=statistics.median(ours_t),
            gzip9_s=statistics.median(gz_t),
            ours_bytes=o_out.stat().st_size,
            gzip9_bytes=g_out.stat().st_size,
            rounds=rounds,
            workers=os.cpu_count() or 1,
        )


def report(r: Result) -> str:
    def row(label: str, secs: float, mb_s: float, size: int) -> str:
        return f"  {label:<16} {secs:7.2f} s  {mb_s:6.2f} MB/s  -> {size / 1e6:.1f} MB\n"

    return (
        f"layer tar {r.tar_bytes / 1e6:.1f} MB, {r.rounds} round(s), {r.workers} cores\n"
        + row("gzip -9", r.gzip9_s, r.gzip9_mb_s, r.gzip9_bytes)
        + row("estargz convert", r.ours_s, r.ours_mb_s, r.ours_bytes)
        + f"  ratio (ours / gzip -9 throughput): {r.ratio:.2f}x (target >= {TARGET_RATIO}x)"
    )


@pytest.mark.skipif(os.environ.get("LAZYBENCH_BENCH") != "1", reason="set LAZYBENCH_BENCH=1")
def test_estargz_convert_vs_gzip9() -> None:
    r = run_benchmark()
    print("\neStargz convert vs gzip -9 (same tar, same invocation)\n" + report(r))
    print(json.dumps(asdict(r) | {"ratio": round(r.ratio, 3)}))
    assert r.ratio >= TARGET_RATIO, report(r)


if __name__ == "__main__":
    res = run_benchmark()
    print(report(res))
    sys.exit(0 if res.ratio >= TARGET_RATIO else 1)
