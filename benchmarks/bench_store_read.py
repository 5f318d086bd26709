"""Store data-path benchmark, each figure beside a baseline run in the same invocation.

* cold sequential read of a 256 MiB file through the mount (a fresh store, empty cache; the
  time runs from the first touch of the layer, lookup and TOC fetch included, to the file's
  last byte) vs ``curl URL | gzip -d`` of the same blob, over plain HTTP and over TLS — two
  ``docker-registry`` processes on one storage, the TLS one with a certificate signed by a
  throwaway CA that curl trusts through ``--cacert`` and the store through ``SSL_CERT_FILE``
  (the registry named ``https://`` in a ``[resolver]`` mirror entry, as an operator would).
  ``LAZYBENCH_BENCH_SAMPLES`` samples of each (default 5), interleaved; the ratio is the
  baseline's median time ÷ the store's — target ≥ 0.9 on each transport (each sample's CPU
  seconds are printed too: curl and gzip together, the store process);
* warm re-read through the mount vs reading a local copy (both from the page cache) —
  target ≥ 0.8×;
* store RSS after mounting a layer with 100,000 entries (its TOC, ~28 MB of JSON, takes the
  streaming decoder), and one with 29,000 entries (TOC just under ``WHOLE_DECODE_MAX``, 8 MiB,
  decoded whole by msgspec), retained and at peak (VmHWM: the TOC's decoding included) —
  target ≤ 150 MB each.

Run with ``LAZYBENCH_BENCH=1 pytest benchmarks/bench_store_read.py -s`` (``nox -s microbench``).
"""

from __future__ import annotations

import io
import os
import resource
import shutil
import statistics
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("LAZYBENCH_BENCH") != "1", reason="benchmarks run only with LAZYBENCH_BENCH=1"
)

BIG = 256 << 20
SAMPLES = int(os.environ.get("LAZYBENCH_BENCH_SAMPLES", "5"))
COLD_TARGET = 0.9
WARM_TARGET = 0.8
RSS_TARGET_MB = 150
# name -> entries: past WHOLE_DECODE_MAX (streamed), and just under it (decoded whole).
MANY = {"100k-entry": 100_000, "29k-entry": 29_000}


def corpus(size: int) -> bytes:
    """Real binaries (compress like image content does), repeated up to ``size`` bytes."""
    out = bytearray()
    for root in ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib"):
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                p = os.path.join(dirpath, name)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                try:
                    out += Path(p).read_bytes()[: 8 << 20]
                except OSError:
                    continue
                if len(out) >= size:
                    return bytes(out[:size])
    while len(out) < size:
        out += out[: size - len(out)]
    return bytes(out)


def timed(cmd: str) -> float:
    start = time.monotonic()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, timeout=900)
    return time.monotonic() - start


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's waited-for children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def report(name: str, value: float, baseline: float, target: str) -> None:
    print(f"BENCH {name}: {value:.3f} vs baseline {baseline:.3f} -> {target}", flush=True)


def many_entries(entries: int):  # type: ignore[no-untyped-def]
    """A tar writer: ``entries`` entries, directories of 99 one-line files each."""

    def add(tar: tarfile.TarFile) -> None:
        for d in range(entries // 100):
            info = tarfile.TarInfo(f"d{d:04d}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
            for f in range(99):
                body = f"{d}/{f}\n".encode()
                fi = tarfile.TarInfo(f"d{d:04d}/f{f:03d}")
                fi.size = len(body)
                tar.addfile(fi, io.BytesIO(body))

    return add


def toc_json_size(data: bytes) -> int:
    from store.estargz import parse_footer
    from store.estargz.footer import toc_range
    from store.estargz.toc import scan_toc

    footer = parse_footer(data[-512:], len(data))
    start, end = toc_range(footer, len(data))
    return scan_toc(data[start:end], footer).json_size


@dataclass
class Transport:
    """One way to the blob: the registry, curl's extra options, the store's config and env."""

    name: str
    reg: object  # harness.registry_server.RegistryServer
    curl_opts: str = ""
    store_config: str = ""
    store_env: dict[str, str] = field(default_factory=dict)
    curl: list[float] = field(default_factory=list)
    store: list[float] = field(default_factory=list)
    # CPU seconds: curl and gzip together; the store process (the machine is shared, so
    # these say more than wall time about which side does more work)
    curl_cpu: list[float] = field(default_factory=list)
    store_cpu: list[float] = field(default_factory=list)

    def ratio(self) -> float:
        return statistics.median(self.curl) / statistics.median(self.store)


def test_store_read(tmp_path: Path) -> None:
    from harness.registry_server import RegistryServer
    from store.estargz.toc import WHOLE_DECODE_MAX
    from tests.store.conftest import StoreProcess
    from tests.store.images import make_tar, push, to_estargz
    from tests.tls import make_tls_files

    if shutil.which("docker-registry") is None or shutil.which("curl") is None:
        pytest.skip("docker-registry and curl are needed")
    data = corpus(BIG)

    def one_file(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("big")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))

    blob = to_estargz(make_tar(one_file), chunk_size=4 << 20)
    local = tmp_path / "local-copy"
    local.write_bytes(data)
    many_blobs = {name: to_estargz(make_tar(many_entries(n))) for name, n in MANY.items()}
    toc_sizes = {name: toc_json_size(b.data) for name, b in many_blobs.items()}
    print(f"BENCH TOC JSON bytes: {toc_sizes} (whole-decode limit {WHOLE_DECODE_MAX})")
    assert toc_sizes["100k-entry"] > WHOLE_DECODE_MAX >= toc_sizes["29k-entry"]
    tls = make_tls_files(tmp_path / "tls")
    storage = tmp_path / "registry"

    with (
        RegistryServer(storage_dir=storage) as plain,
        RegistryServer(storage_dir=storage, tls_cert=tls.cert, tls_key=tls.key) as secure,
    ):
        push(plain.host, "bench/big", "1", [blob])
        for name, b in many_blobs.items():
            push(plain.host, f"bench/{name}", "1", [b])
        mirror = f'[[resolver.host."{secure.host}".mirrors]]\nhost = "https://{secure.host}"\n'
        transports = [
            Transport("http", plain),
            Transport(
                "https", secure, f"--cacert {tls.ca}", mirror, {"SSL_CERT_FILE": str(tls.ca)}
            ),
        ]
        warm = base_warm = float("nan")
        for i in range(SAMPLES):
            for t in transports:
                url = f"{t.reg.url}/v2/bench/big/blobs/{blob.digest}"  # type: ignore[attr-defined]
                cpu = children_cpu()
                t.curl.append(timed(f"curl -sf {t.curl_opts} {url} | gzip -d > /dev/null"))
                t.curl_cpu.append(children_cpu() - cpu)
                mark = t.reg.log_mark()  # type: ignore[attr-defined]
                work = tmp_path / f"store-{t.name}-{i}"
                store = StoreProcess(work, t.store_config, env=t.store_env).start()
                try:
                    ref = f"{t.reg.host}/bench/big:1"  # type: ignore[attr-defined]
                    diff = store.layer_dir(ref, blob.digest) / "diff"
                    assert store.proc is not None
                    cpu = process_cpu(store.proc.pid)
                    t.store.append(timed(f"cat {diff}/big > /dev/null"))
                    t.store_cpu.append(process_cpu(store.proc.pid) - cpu)
                    if i == 0 and t.name == "http":
                        warm, base_warm = warm_reads(store, diff, local)
                finally:
                    store.stop()
                    shutil.rmtree(work, ignore_errors=True)
                # the store's range reads went to this registry (over TLS for "https")
                served = t.reg.access_log_since(mark)  # type: ignore[attr-defined]
                assert any(r.is_blob_get and r.status == 206 for r in served), t.name
                print(
                    f"BENCH sample {i} {t.name}: curl|gzip -d {t.curl[-1]:.3f} s "
                    f"(CPU {t.curl_cpu[-1]:.2f} s), store {t.store[-1]:.3f} s "
                    f"(CPU {t.store_cpu[-1]:.2f} s)",
                    flush=True,
                )
        mb = BIG / (1 << 20)
        for t in transports:
            print(
                f"BENCH cold read {t.name} samples (s): curl|gzip -d "
                f"{[round(x, 3) for x in t.curl]}, store {[round(x, 3) for x in t.store]}; "
                f"median CPU s: curl+gzip {statistics.median(t.curl_cpu):.2f}, "
                f"store {statistics.median(t.store_cpu):.2f}"
            )
            report(
                f"cold read {t.name} MB/s (median of {SAMPLES})",
                mb / statistics.median(t.store),
                mb / statistics.median(t.curl),
                f"ratio {t.ratio():.2f}, best-of ratio {min(t.curl) / min(t.store):.2f} "
                f"(target >= {COLD_TARGET})",
            )
        report(
            "warm read MB/s",
            mb / warm,
            mb / base_warm,
            f"ratio {base_warm / warm:.2f} (target >= {WARM_TARGET})",
        )

        rss: dict[str, tuple[float, float]] = {}
        for name, n in MANY.items():
            work = tmp_path / f"store-{name}"
            store = StoreProcess(work, "no_background_fetch = true\nnoprefetch = true\n").start()
            try:
                assert store.proc is not None
                idle = rss_mb(store.proc.pid)
                diff = store.layer_dir(f"{plain.host}/bench/{name}:1", many_blobs[name].digest)
                assert len(os.listdir(diff / "diff")) == n // 100
                time.sleep(1)
                rss[name] = (rss_mb(store.proc.pid), rss_mb(store.proc.pid, "VmHWM"))
            finally:
                store.stop()
                shutil.rmtree(work, ignore_errors=True)
            report(f"RSS MB with a {name} layer", rss[name][0], idle, f"target <= {RSS_TARGET_MB}")
            report(f"peak RSS MB with a {name} layer", rss[name][1], idle, "target <= 150 MB")

    for t in transports:
        assert t.ratio() >= COLD_TARGET, f"cold read over {t.name}: {t.ratio():.2f}x curl|gzip -d"
    assert base_warm / warm >= WARM_TARGET
    for name, (retained, peak) in rss.items():
        assert retained <= RSS_TARGET_MB and peak <= RSS_TARGET_MB, (name, retained, peak)


def warm_reads(store, diff: Path, local: Path) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Best of three re-reads of the (now cached) file through the mount, and of a local copy
    from the page cache; prints how many re-reads still reached the store."""
    before = sum(v["on_demand_reads"] for v in store.status()["layers"].values())
    warm = min(timed(f"cat {diff}/big > /dev/null") for _ in range(3))
    after = sum(v["on_demand_reads"] for v in store.status()["layers"].values())
    timed(f"cat {local} > /dev/null")  # into the page cache, as the mount's copy is
    base_warm = min(timed(f"cat {local} > /dev/null") for _ in range(3))
    print(f"BENCH warm re-reads that reached the store: {after - before}", flush=True)
    return warm, base_warm
