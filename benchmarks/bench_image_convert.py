"""`lazybench convert` of a whole multi-layer image, beside `gzip -9` of the same layers.

What a user waits for: ``convert_image`` from an OCI layout of uncompressed layers to an
eStargz OCI layout — skopeo's copies in and out, every layer converted (in parallel, one worker
per core), config and manifest written. The baseline is what a plain single-threaded tool
would do with the same bytes: ``gzip -9`` of each layer tar, one after the other. Both run in
the same invocation in ABBA order (gzip, ours, ours, gzip; ``LAZYBENCH_BENCH_ROUNDS`` pairs,
default 1); the figures are means. Target: ours ≥ 2× faster than ``gzip -9`` (wall time) on
2 cores.

The image: ``LAZYBENCH_CONVERT_MB`` (default 1000) MB of real files — the host's ``/usr``
(binaries, libraries, text, compressed archives), read in sorted order and split into five
layers of 40/25/15/12/8 % — cached under ``$LAZYBENCH_CACHE/bench/`` (default
``~/.cache/lazybench``). Or set ``LAZYBENCH_CONVERT_IMAGE`` to any image reference
(``docker-archive:…``, ``oci:…``) to time that instead.

Run: ``LAZYBENCH_BENCH=1 pytest benchmarks/bench_image_convert.py -s`` (or ``nox -s
microbench``), or ``python benchmarks/bench_image_convert.py``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from harness.images.build import BuiltImage, BuiltLayer
from harness.images.convert import ConvertOptions, convert_image
from harness.images.layertar import file_digest
from harness.images.push import oci_layout
from harness.images.source import Layout

TARGET_SPEEDUP = 2.0
SPLIT = (0.40, 0.25, 0.15, 0.12, 0.08)
SOURCE_TREE = Path("/usr")


@dataclass
class Result:
    image_bytes: int
    layers: int
    ours_s: float
    gzip9_s: float
    gzip9_cpu_s: float
    ours_bytes: int
    gzip9_bytes: int
    rounds: int
    cores: int

    @property
    def speedup(self) -> float:
        return self.gzip9_s / self.ours_s


def cache_dir() -> Path:
    return Path(os.environ.get("LAZYBENCH_CACHE", Path.home() / ".cache" / "lazybench")) / "bench"


def _layer_tars(directory: Path, total: int) -> list[Path]:
    """Tars of ``/usr``'s files in sorted order, cut into :data:`SPLIT` shares of ``total``."""
    budgets = [int(total * share) for share in SPLIT]
    paths: list[Path] = []
    walker = _files(SOURCE_TREE)
    for i, budget in enumerate(budgets):
        path = directory / f"{i}.tar"
        used = 0
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for f in walker:
                try:
                    info = tar.gettarinfo(str(f), arcname=str(f.relative_to("/")))
                except OSError:
                    continue
                if info.isreg() and used and used + info.size > budget * 1.05:
                    continue  # keeps each layer near its share: big files wait for a bigger one
                if info.isreg():
                    try:
                        with open(f, "rb") as fh:
                            tar.addfile(info, fh)
                    except OSError:
                        continue
                else:
                    tar.addfile(info)
                used += info.size + 512
                if used >= budget:
                    break
        paths.append(path)
    return paths


def _files(root: Path):  # type: ignore[no-untyped-def]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        yield Path(dirpath)
        for name in sorted(filenames):
            yield Path(dirpath, name)


def source_image(total_mb: int) -> tuple[str, list[Path]]:
    """(image reference, layer tars) of the cached benchmark image, made on first use."""
    final = cache_dir() / f"convert-image-v2-{total_mb}mb"
    meta = final / "image.json"
    if not meta.is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".convert-image-", dir=final.parent))
        try:
            (work / "layers").mkdir()
            tars = _layer_tars(work / "layers", total_mb * 1_000_000)
            layers = [
                {"file": f"layers/{t.name}", "diff_id": file_digest(t), "size": t.stat().st_size}
                for t in tars
            ]
            config = {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Cmd": ["/bin/sh"]},
                "rootfs": {"type": "layers", "diff_ids": [x["diff_id"] for x in layers]},
            }
            meta_data = {"config": config, "layers": layers}
            (work / "image.json").write_text(json.dumps(meta_data))
            os.rename(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    data = json.loads(meta.read_text())
    layers = tuple(
        BuiltLayer(final / x["file"], x["diff_id"], x["size"], "") for x in data["layers"]
    )
    built = BuiltImage("bench", final.name, final, layers, data["config"], None)
    return f"oci:{oci_layout(built, 'uncompressed')}:latest", [x.path for x in layers]


def _image_layers(ref: str, work: Path) -> list[Path]:
    """The layer tars of any image reference (for ``gzip -9``), decompressed."""
    from harness.images.source import import_image

    built = import_image(ref, work / "cache")
    return [layer.path for layer in built.layers]


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _time_gzip9(tars: list[Path], out: Path) -> tuple[float, float, int]:
    c0, t0 = _children_cpu(), time.perf_counter()
    size = 0
    for tar in tars:
        with tar.open("rb") as src, out.open("wb") as dst:
            subprocess.run(["gzip", "-9", "-c"], stdin=src, stdout=dst, check=True, timeout=3600)
        size += out.stat().st_size
    return time.perf_counter() - t0, _children_cpu() - c0, size


def _time_ours(ref: str, out: Path) -> tuple[float, float, int]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    convert_image(ref, f"oci:{out}:latest", ConvertOptions(), show_progress=False)
    wall = time.perf_counter() - t0
    layout = Layout(out)
    top = layout.top()
    manifest = layout.read_json(top["digest"])
    return wall, 0.0, sum(d["size"] for d in manifest["layers"])


def run_benchmark(rounds: int | None = None, total_mb: int | None = None) -> Result:
    rounds = rounds or int(os.environ.get("LAZYBENCH_BENCH_ROUNDS", "1"))
    total_mb = total_mb or int(os.environ.get("LAZYBENCH_CONVERT_MB", "1000"))
    with tempfile.TemporaryDirectory(prefix="lazybench-bench-convert-") as d:
        work = Path(d)
        given = os.environ.get("LAZYBENCH_CONVERT_IMAGE")
        if given:
            ref, tars = given, _image_layers(given, work)
        else:
            ref, tars = source_image(total_mb)
        ours: list[tuple[float, float, int]] = []
        gz: list[tuple[float, float, int]] = []
        for _ in range(rounds):  # ABBA
            gz.append(_time_gzip9(tars, work / "layer.gz"))
            ours.append(_time_ours(ref, work / "out"))
            ours.append(_time_ours(ref, work / "out"))
            gz.append(_time_gzip9(tars, work / "layer.gz"))
        return Result(
            image_bytes=sum(t.stat().st_size for t in tars),
            layers=len(tars),
            ours_s=statistics.mean(x[0] for x in ours),
            gzip9_s=statistics.mean(x[0] for x in gz),
            gzip9_cpu_s=statistics.mean(x[1] for x in gz),
            ours_bytes=ours[-1][2],
            gzip9_bytes=gz[-1][2],
            rounds=rounds,
            cores=os.cpu_count() or 1,
        )


def report(r: Result) -> str:
    def row(label: str, secs: float, cpu: str, size: int) -> str:
        mb_s = r.image_bytes / secs / 1e6
        return f"  {label:<24} {secs:7.2f} s  {mb_s:6.1f} MB/s  cpu {cpu}  -> {size / 1e6:.1f} MB\n"

    return (
        f"image {r.image_bytes / 1e6:.0f} MB in {r.layers} layers, {2 * r.rounds} runs each "
        f"(ABBA), {r.cores} cores, load average {os.getloadavg()[0]:.1f}\n"
        + row("gzip -9, layer by layer", r.gzip9_s, f"{r.gzip9_cpu_s:6.2f} s", r.gzip9_bytes)
        # The conversion's workers are children of multiprocessing's forkserver, not of this
        # process: their CPU time is not visible here.
        + row("lazybench convert", r.ours_s, "   n/a  ", r.ours_bytes)
        + f"  speed-up (gzip -9 time / ours): {r.speedup:.2f}x (target >= {TARGET_SPEEDUP}x)"
    )


@pytest.mark.skipif(os.environ.get("LAZYBENCH_BENCH") != "1", reason="set LAZYBENCH_BENCH=1")
def test_image_convert_vs_gzip9() -> None:
    r = run_benchmark()
    print("\nlazybench convert vs gzip -9 (same layers, same invocation)\n" + report(r))
    print(json.dumps(asdict(r) | {"speedup": round(r.speedup, 3)}))
    assert r.speedup >= TARGET_SPEEDUP, report(r)


if __name__ == "__main__":
    res = run_benchmark()
    print(report(res))
    sys.exit(0 if res.speedup >= TARGET_SPEEDUP else 1)
