"""Ranged-read throughput of `store.registry` against a local docker-registry, beside curl.

Why curl is the baseline: it is what a C HTTP client gets from the same registry over the same
loopback. Both fetch exactly the same ranges in the same order over one kept-alive connection
(curl: one invocation, a config file with `next` between ranges, body to /dev/null; ours:
sequential `read_range` calls that keep the bytes). Rounds alternate curl/ours, so load from
other processes hits both alike; the ratio is the median of the per-round ratios, throughput
figures are medians too. Target: ours ≥ 0.8× curl's throughput for 4 MiB ranges.

Run twice: over plain HTTP and over TLS (the registry serving a self-signed certificate made
with `openssl` for this run; curl and ours both verify it), since every real registry is TLS.

Run: `LAZYBENCH_BENCH=1 pytest benchmarks/bench_registry_ranges.py -s` (or `nox -s
microbench`), or `python benchmarks/bench_registry_ranges.py`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import trio

from harness.registry_server import RegistryServer
from store.registry import RegistryClient, parse_resolver_config

MiB = 1024 * 1024
BLOB_SIZE = 96 * MiB
# (range size, how many ranges per round)
CASES = [(4 * MiB, 48), (1 * MiB, 96), (64 * 1024, 300)]
ROUNDS = 5
TARGET_RATIO_4MIB = 0.8


@dataclass
class Result:
    scheme: str  # "http" or "https"
    range_size: int
    ranges: int
    ours_mb_s: float
    curl_mb_s: float
    ours_req_s: float
    curl_req_s: float
    ratio: float  # median over rounds of (curl time / our time)
    httpx_only_mb_s: float  # the same client without RangeTransport (for reference)


def _self_signed(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and its key), valid for a day, made with `openssl`."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
            *("-addext", "basicConstraints=critical,CA:TRUE"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def _curl_round(
    url: str, ranges: list[tuple[int, int]], workdir: Path, cacert: Path | None = None
) -> float:
    cfg = workdir / "curl.cfg"
    lines = []
    for i, (off, size) in enumerate(ranges):
        if i:
            lines.append("next")
        lines += [f'url = "{url}"', f'range = "{off}-{off + size - 1}"', 'output = "/dev/null"']
        if cacert is not None:  # `next` resets per-transfer options: once per range
            lines.append(f'cacert = "{cacert}"')
    cfg.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    subprocess.run(
        ["curl", "-sS", "--fail", "--max-time", "120", "-K", str(cfg)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


async def _ours_round(
    client: RegistryClient, ref: str, digest: str, ranges: list[tuple[int, int]]
) -> float:
    start = time.perf_counter()
    for off, size in ranges:
        data = await client.read_range(ref, digest, off, size)
        if len(data) != size:
            raise AssertionError(f"short read at {off}: {len(data)} != {size}")
    return time.perf_counter() - start


def run_benchmark(schemes: tuple[str, ...] = ("http", "https")) -> list[Result]:
    if shutil.which("curl") is None:
        raise RuntimeError("curl is not installed")
    blob = random.Random(5).randbytes(BLOB_SIZE)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in schemes:
            results += _run_scheme(scheme, blob, Path(tmp))
    return results


def _run_scheme(scheme: str, blob: bytes, tmp: Path) -> list[Result]:
    results: list[Result] = []
    cert = key = None
    if scheme == "https":
        if shutil.which("openssl") is None:
            raise RuntimeError("openssl is not installed (needed for the TLS registry)")
        cert, key = _self_signed(tmp)
    with RegistryServer(tls_cert=cert, tls_key=key) as reg:
        ref = f"{reg.host}/bench/ranges:v1"
        resolver = None
        if cert is not None:
            resolver = parse_resolver_config(
                {"resolver": {"host": {reg.host: {"mirrors": [{"host": f"https://{reg.host}"}]}}}}
            )
        verify = str(cert) if cert is not None else True

        async def main() -> None:
            async with (
                RegistryClient(resolver=resolver, timeout=60, verify=verify) as client,
                RegistryClient(
                    resolver=resolver, timeout=60, fast_ranges=False, verify=verify
                ) as plain,
            ):
                digest = (await client.push_blob(ref, blob)).digest
                url = f"{reg.url}/v2/bench/ranges/blobs/{digest}"
                await client.read_range(ref, digest, 0, 1)  # warm the connection
                for size, count in CASES:
                    rnd = random.Random(size)
                    ranges = [(rnd.randrange(0, BLOB_SIZE - size), size) for _ in range(count)]
                    t_curl, t_ours, t_plain = [], [], []
                    for _ in range(ROUNDS):
                        t_curl.append(
                            await trio.to_thread.run_sync(_curl_round, url, ranges, tmp, cert)
                        )
                        t_ours.append(await _ours_round(client, ref, digest, ranges))
                        t_plain.append(await _ours_round(plain, ref, digest, ranges))
                    total_mb = size * count / MiB
                    tc, to = statistics.median(t_curl), statistics.median(t_ours)
                    ratio = statistics.median(c / o for c, o in zip(t_curl, t_ours, strict=True))
                    tp = statistics.median(t_plain)
                    results.append(
                        Result(
                            scheme,
                            size,
                            count,
                            total_mb / to,
                            total_mb / tc,
                            count / to,
                            count / tc,
                            ratio,
                            total_mb / tp,
                        )
                    )

        trio.run(main)
    return results


def report(results: list[Result]) -> str:
    lines = [
        f"{'scheme':>6} {'range':>8} {'n':>4} {'ours MB/s':>10} {'curl MB/s':>10} {'ratio':>6} "
        f"{'ours req/s':>11} {'curl req/s':>11} {'httpx-only MB/s':>16}"
    ]
    for r in results:
        size = f"{r.range_size // MiB}MiB" if r.range_size >= MiB else f"{r.range_size // 1024}KiB"
        lines.append(
            f"{r.scheme:>6} {size:>8} {r.ranges:>4} {r.ours_mb_s:>10.0f} {r.curl_mb_s:>10.0f} "
            f"{r.ratio:>6.2f} "
            f"{r.ours_req_s:>11.0f} {r.curl_req_s:>11.0f} {r.httpx_only_mb_s:>16.0f}"
        )
    return "\n".join(lines)


@pytest.mark.skipif(os.environ.get("LAZYBENCH_BENCH") != "1", reason="set LAZYBENCH_BENCH=1")
def test_registry_ranges_vs_curl() -> None:
    results = run_benchmark()
    print("\nregistry ranged reads vs curl (same ranges, same invocation)\n" + report(results))
    print(json.dumps([asdict(r) for r in results]))
    for four in (r for r in results if r.range_size == 4 * MiB):
        assert four.ratio >= TARGET_RATIO_4MIB, (
            f"4 MiB ranges over {four.scheme}: {four.ours_mb_s:.0f} MB/s is {four.ratio:.2f}x "
            f"curl's {four.curl_mb_s:.0f} MB/s (target {TARGET_RATIO_4MIB}x)"
        )


if __name__ == "__main__":
    res = run_benchmark()
    print(report(res))
    fours = [r for r in res if r.range_size == 4 * MiB]
    sys.exit(0 if all(r.ratio >= TARGET_RATIO_4MIB for r in fours) else 1)
