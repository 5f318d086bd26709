"""The limit model: a trace's bytes mapped onto eStargz TOCs, the arithmetic, the report."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import pytest

from harness.cli import UserError
from harness.images.push import layout_name
from harness.limit import (
    LIMITS,
    PULL_ROUND_TRIPS,
    STORE_ROUND_TRIPS,
    UNAVOIDABLE_ROUND_TRIPS,
    Floor,
    Limit,
    bytes_read,
    layout_indexes,
    limits_of,
    link_of,
    pull_floor,
    read_limits,
    runtime_floor,
    workload_entry,
    write_limits,
)
from harness.records import RECORDS, read_records
from harness.report import write_report
from harness.stats import records_frame
from harness.trace import TracedFile, read_cached_trace, write_cached_trace
from store.estargz import TOC_DIGEST_ANNOTATION, BytesBlobSource, EstargzReader, convert
from tests.harness.test_results import make_run

CHUNK = 4096
WAN = {
    "profile": {"name": "wan", "rate_mbit": 100.0, "rtt_ms": 40.0},
    "measured": {"rate_mbit": 100.0, "rtt_ms": 40.0},
}


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _estargz(files: dict[str, bytes]) -> tuple[bytes, str]:
    out = io.BytesIO()
    result = convert(io.BytesIO(_tar(files)), out, chunk_size=CHUNK)
    return out.getvalue(), result.toc_digest


def _noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)  # incompressible: chunk sizes differ visibly


LOWER = {"usr/lib/libc.so": _noise(5 * CHUNK, 1), "etc/shadowed": b"lower" * 2000}
UPPER = {"usr/bin/app": _noise(3 * CHUNK + 10, 2), "etc/shadowed": b"upper"}


def _indexes() -> list:
    return [EstargzReader(BytesBlobSource(_estargz(f)[0])).index for f in (LOWER, UPPER)]


def _members(index, path: str) -> list[int]:
    return [c.compressed_size for c in index.lookup(path).chunks]


def test_ranges_cost_the_chunks_covering_them_each_once() -> None:
    lower, upper = _indexes()
    libc = _members(lower, "usr/lib/libc.so")
    assert len(libc) == 5
    got = bytes_read(
        [lower, upper],
        [TracedFile("usr/lib/libc.so", ((0, 10), (5, 100), (2 * CHUNK + 1, 2 * CHUNK + 2)))],
    )
    assert got.compressed_bytes == libc[0] + libc[2]
    assert got.read_bytes == 100 + 1
    assert (got.files, got.files_found, got.files_with_ranges) == (1, 1, 1)
    # A range spanning a chunk boundary takes both; past the end of the file is clipped.
    got = bytes_read([lower], [TracedFile("usr/lib/libc.so", ((CHUNK - 1, CHUNK + 1),))])
    assert got.compressed_bytes == libc[0] + libc[1]
    got = bytes_read([lower], [TracedFile("usr/lib/libc.so", ((5 * CHUNK - 1, 10**9),))])
    assert got.compressed_bytes == libc[4] and got.read_bytes == 1


def test_files_without_ranges_count_whole_and_the_top_layer_wins() -> None:
    lower, upper = _indexes()
    traced = [
        TracedFile("usr/lib/libc.so"),  # only in the lower layer
        TracedFile("etc/shadowed"),  # both: the upper one's bytes
        TracedFile("/usr/bin/app", ((0, 1),)),
        TracedFile("usr/lib/libc.so"),  # read again: its chunks are counted once
        TracedFile("not/there"),
        TracedFile("usr"),  # a directory costs nothing
    ]
    got = bytes_read([lower, upper], traced)
    want = (
        sum(_members(lower, "usr/lib/libc.so"))
        + sum(_members(upper, "etc/shadowed"))
        + _members(upper, "usr/bin/app")[0]
    )
    assert got.compressed_bytes == want
    assert got.read_bytes == 2 * 5 * CHUNK + 5 + 1
    assert (got.files, got.files_found, got.files_with_ranges) == (6, 4, 1)


def _layout(image_dir: Path, layers: list[dict[str, bytes]]) -> Path:
    layout = image_dir / "oci" / layout_name("estargz-noopt")
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    descriptors = []
    for files in layers:
        blob, toc = _estargz(files)
        descriptors.append(
            {"digest": put(blob), "size": len(blob), "annotations": {TOC_DIGEST_ANNOTATION: toc}}
        )
    manifest = put(json.dumps({"layers": descriptors}).encode())
    (layout / "index.json").write_text(json.dumps({"manifests": [{"digest": manifest}]}))
    return layout


def test_workload_entry_maps_a_cached_trace_onto_the_noopt_layout(tmp_path: Path) -> None:
    image_dir = tmp_path / "images" / "abc"
    layout = _layout(image_dir, [LOWER, UPPER])
    indexes, toc_bytes = layout_indexes(layout)
    assert len(indexes) == 2 and toc_bytes > 0
    trace = tmp_path / "traces" / "w-1.json"
    assert "unavailable" in workload_entry(image_dir, trace)
    # A trace from before byte ranges: a plain list, the files count whole.
    write_cached_trace(trace, ["usr/bin/app", "etc/shadowed"], None)
    assert read_cached_trace(trace) == [TracedFile("usr/bin/app"), TracedFile("etc/shadowed")]
    whole = workload_entry(image_dir, trace)
    assert (
        whole["compressed_bytes"] == bytes_read(indexes, read_cached_trace(trace)).compressed_bytes
    )
    assert whole["files_with_ranges"] == 0 and whole["toc_bytes"] == toc_bytes
    assert json.loads(trace.read_text()) == ["usr/bin/app", "etc/shadowed"]
    # With its ranges file: only the chunks read.
    write_cached_trace(trace, ["usr/bin/app", "etc/shadowed"], {"usr/bin/app": [[0, 1]]})
    assert json.loads(trace.read_text()) == ["usr/bin/app", "etc/shadowed"]  # still a plain list
    part = workload_entry(image_dir, trace)
    assert part["files_with_ranges"] == 1 and part["compressed_bytes"] < whole["compressed_bytes"]
    assert workload_entry(tmp_path / "images" / "other", trace)["unavailable"]
    # Traced again without ranges: the old ranges do not stay beside the new list.
    write_cached_trace(trace, ["usr/bin/app"], {})
    assert read_cached_trace(trace) == [TracedFile("usr/bin/app")]
    trace.write_text('{"not": "a list"}')
    with pytest.raises(UserError, match=r"w-1\.json"):
        read_cached_trace(trace)


def test_limits_from_the_cache_take_the_image_directory_holding_the_trace(tmp_path: Path) -> None:
    """One image can sit in two cache directories (a recipe's, and the same image imported
    from a file it was exported to: the same manifests). ``lazybench report`` of a run without
    ``limits.json`` took the first directory a glob found, whose trace key is not the run's,
    and the run got no limit although the cache held its trace."""
    from harness.limit import compute_run_limits
    from harness.prepare import resolve
    from harness.scenario import parse_scenario
    from harness.trace import trace_cache_path

    run = make_run(tmp_path / "run")
    cache = tmp_path / "cache"
    layouts = [_layout(cache / "images" / name, [LOWER, UPPER]) for name in ("one", "two")]
    [manifest] = json.loads((layouts[0] / "index.json").read_text())["manifests"]
    env = json.loads((run / "environment.json").read_text())
    workload = parse_scenario(env["scenario"], "run").workloads[0]
    env["images"] = {workload.name: {"estargz-noopt": {"manifest_digest": manifest["digest"]}}}
    (run / "environment.json").write_text(json.dumps(env))
    # Whichever directory a glob lists first, the run traced in the other one.
    first = next((cache / "images").glob(f"*/oci/*/blobs/{manifest['digest'].replace(':', '/')}"))
    traced_in = next(d for d in (cache / "images").iterdir() if d != first.parents[4])
    trace = trace_cache_path(traced_in.name, resolve(workload), cache)
    write_cached_trace(trace, ["usr/bin/app"], None)
    entry = compute_run_limits(run, cache)[workload.name]
    assert entry.get("trace") == trace.name and entry["compressed_bytes"] > 0, entry


def test_limit_arithmetic_and_when_there_is_none() -> None:
    limit = Limit(compressed_bytes=12_500_000, rate_mbit=100.0, rtt_ms=40.0, floor_s=0.5)
    assert limit.transfer_s == pytest.approx(1.0)
    assert limit.rtt_s == pytest.approx(UNAVOIDABLE_ROUND_TRIPS * 0.04)
    assert limit.total_s == pytest.approx(1.5 + UNAVOIDABLE_ROUND_TRIPS * 0.04)
    assert (limit.round_trips, limit.floor_parts) == (UNAVOIDABLE_ROUND_TRIPS, "create + run")
    # With podman's re-pull in the floor, only the store's round trips are added.
    repull = Limit(12_500_000, 100.0, 40.0, 0.9, floor_repull=True)
    assert (repull.round_trips, STORE_ROUND_TRIPS) == (3, 3)
    assert repull.total_s == pytest.approx(1.0 + 3 * 0.04 + 0.9)
    assert repull.floor_parts == "re-pull + create + run"
    assert link_of({"link": WAN}) == (100.0, 40.0)
    assert "loopback" in str(link_of({"link": {"profile": {"name": "loopback"}}}))
    assert isinstance(link_of({}), str)


def test_pull_floor_is_the_runtimes_share_plus_the_tocs_on_the_link() -> None:
    summary = {"pull_s": 1.0, "runtime_s": 0.45, "toc_bytes": 1_250_000}
    floor = pull_floor(summary, {"link": WAN})
    assert floor is not None and PULL_ROUND_TRIPS == 3
    # 1.25 MB at 12.5 MB/s is 0.1 s; 3 round trips of 40 ms.
    assert floor.network_s == pytest.approx(0.1 + 3 * 0.04)
    assert floor.total_s == pytest.approx(0.45 + 0.22)
    # No floor without a measured link, or from a summary without the runtime's share or
    # the TOC bytes (timelines written before they were recorded).
    assert pull_floor(summary, {"link": {"profile": {"name": "loopback"}}}) is None
    assert pull_floor(summary, {}) is None
    assert pull_floor({"pull_s": 1.0, "runtime_s": 0.45}, {"link": WAN}) is None
    assert pull_floor({"pull_s": 1.0, "toc_bytes": 10}, {"link": WAN}) is None


def _with_link(run: Path) -> None:
    env_path = run / "environment.json"
    env = json.loads(env_path.read_text())
    env["link"] = WAN
    env_path.write_text(json.dumps(env))


def test_report_gives_every_mode_its_distance_to_the_limit(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    _with_link(run)
    entry = {"compressed_bytes": 12_500_000, "files": 3, "files_with_ranges": 3}
    write_limits(run, {"python": entry, "gcc": {"unavailable": "no trace"}})
    write_limits(run, {"db": entry})  # a later shard or resume adds to it
    assert set(read_limits(run) or {}) == {"python", "gcc", "db"}
    write_report(run, cache_dir=tmp_path / "cache")
    table = (run / "table.md").read_text()
    floor = 0.5 + 0.2  # legacy create + run in make_run
    total = 1.0 + UNAVOIDABLE_ROUND_TRIPS * 0.04 + floor
    assert f"limit **{total:.2f} s** = 1.00 s transfer" in table
    # Records from before the re-pull: the model as it was.
    assert "(7 × 40.0 ms) + 0.70 s runtime floor (legacy create + run, median)" in table
    assert "limit: unavailable (no trace)" in table
    assert "| ÷ limit |" in table
    text = (run / "report.md").read_text()
    assert "## Distance to the limit" in text and "- gcc: no trace" in text
    assert "+ 7 round trips no lazy pull can avoid × the measured RTT + the runtime's own " in text
    section = text.split("## Distance to the limit")[1]
    python = next(line for line in section.splitlines() if line.startswith("| python |"))
    assert f"**{total:.2f}**" in python and python.endswith("| no |")
    header = (run / "summary.csv").read_text().splitlines()[0]
    assert header.endswith(",limit_s,total_p_over_limit")


def test_a_distance_just_over_the_target_does_not_print_as_the_target() -> None:
    """vs-go's python estargz·ours was 1.503× its limit: the table printed "1.50×" while the
    limit section's verdict beside 1.503 said it was not within 1.5×."""
    from harness.limit import Limit
    from harness.report import _over_limit

    limit = Limit(compressed_bytes=0, rate_mbit=100.0, rtt_ms=0.0, floor_s=1.0)
    assert limit.total_s == 1.0
    assert _over_limit(1.503, limit) == "1.503×"
    assert _over_limit(1.5, limit) == "1.50×"
    assert _over_limit(2.2345, limit) == "2.23×"


def test_report_without_limits_keeps_its_shape(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    _with_link(run)
    write_report(run, cache_dir=tmp_path / "cache")
    assert not (run / LIMITS).exists()
    assert "limit" not in (run / "table.md").read_text()
    assert "Distance to the limit" not in (run / "report.md").read_text()
    assert "limit_s" not in (run / "summary.csv").read_text()


def test_limits_need_a_legacy_floor_and_a_measured_link(tmp_path: Path) -> None:
    from harness.records import read_records

    run = make_run(tmp_path / "run", samples=1)
    df = records_frame(read_records(run))
    entries = {"python": {"compressed_bytes": 1}}
    env = {"link": WAN}
    assert isinstance(limits_of(entries, env, df, ["python"])["python"], Limit)
    no_legacy = df[df["mode"] != "legacy"]
    assert "legacy" in str(limits_of(entries, env, no_legacy, ["python"])["python"])
    assert runtime_floor(df.iloc[0:0]) == {}
    loop = {"link": {"profile": {"name": "loopback", "namespace": False}}}
    assert "loopback" in str(limits_of(entries, loop, df, ["python"])["python"])
    assert "limits.json" in str(limits_of(None, env, df, ["python"])["python"])


def _with_repulls(run: Path, repulls: dict[str, list[float | None]]) -> None:
    """Give the legacy records of each workload in ``repulls`` these ``repull_s``, by sample."""
    lines = []
    for line in (run / RECORDS).read_text().splitlines():
        rec = json.loads(line)
        if rec["mode"] == "legacy" and rec["workload"] in repulls:
            rec["repull_s"] = repulls[rec["workload"]][rec["sample"]]
        lines.append(json.dumps(rec))
    (run / RECORDS).write_text("\n".join(lines) + "\n")


def test_a_floor_with_the_repull_counts_only_the_stores_round_trips(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")  # legacy create 0.5 + run 0.2
    _with_repulls(run, {"python": [0.3, 0.5, 0.4], "gcc": [None, 0.6, None]})
    floors = runtime_floor(records_frame(read_records(run)))
    assert floors["python"] == Floor(pytest.approx(0.4 + 0.7), True)
    assert floors["gcc"] == Floor(pytest.approx(0.6 + 0.7), True)  # samples with one only
    assert floors["db"] == Floor(pytest.approx(0.7), False)  # none: create + run
    _with_link(run)
    entry = {"compressed_bytes": 12_500_000, "files": 3, "files_with_ranges": 3}
    write_limits(run, {"python": entry, "db": entry})
    write_report(run, cache_dir=tmp_path / "cache")
    table = (run / "table.md").read_text()
    total = 1.0 + STORE_ROUND_TRIPS * 0.04 + 1.1
    assert (
        f"limit **{total:.2f} s** = 1.00 s transfer (12.5 MB compressed read ÷ 100.0 Mbit/s) "
        "+ 0.12 s round trips (3 × 40.0 ms) "
        "+ 1.10 s runtime floor (legacy re-pull + create + run, median)"
    ) in table
    assert "(7 × 40.0 ms) + 0.70 s runtime floor (legacy create + run, median)" in table
    text = (run / "report.md").read_text()
    assert "the store's 3 where the floor is legacy's re-pull + create + run" in text
    header = (run / "summary.csv").read_text().splitlines()[0]
    assert "repull" not in header  # summary.csv keeps its columns

    write_limits(run, {"db": {"unavailable": "no trace"}})
    write_report(run, cache_dir=tmp_path / "cache")
    text = (run / "report.md").read_text()
    assert "+ the store's 3 round trips no lazy pull can avoid" in text


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"compressed_bytes": None}, r"workloads.gcc.compressed_bytes is None, not a count"),
        ({"compressed_bytes": "5300000"}, r"workloads.gcc.compressed_bytes is '5300000', not"),
        ({"compressed_bytes": -1}, r"workloads.gcc.compressed_bytes is -1, not a count"),
        ({"compressed_bytes": 5, "files": 1.5}, r"workloads.gcc.files is 1.5, not a count"),
    ],
)
def test_a_limits_json_count_that_is_no_count_is_named_not_a_traceback(
    tmp_path: Path, entry: dict[str, object], message: str
) -> None:
    """A limits.json whose entry held a null or a string byte count (a hand edit, another
    tool) ended `lazybench report` in a TypeError traceback from the model's int()."""
    run = make_run(tmp_path / "run")
    _with_link(run)
    (run / LIMITS).write_text(json.dumps({"schema": 1, "workloads": {"gcc": entry}}))
    with pytest.raises(UserError, match=message + r".*lazybench report --limits"):
        read_limits(run)
    with pytest.raises(UserError, match=message):
        write_report(run, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    "measured",
    [
        {"rate_mbit": "95.6", "rtt_ms": 40.0},
        {"rate_mbit": 95.6, "rtt_ms": "40"},
        {"rate_mbit": float("nan"), "rtt_ms": 40.0},
        {"rate_mbit": 95.6, "rtt_ms": float("nan")},
        {"rate_mbit": True, "rtt_ms": 40.0},
    ],
)
def test_a_link_measured_as_no_number_gives_no_limit(measured: dict[str, object]) -> None:
    """A measured rate that was a string ended the report in a TypeError traceback (``'95.6'
    <= 0``); a nan one carried nan into every limit."""
    assert link_of({"link": {**WAN, "measured": measured}}) == (
        "the run's link has no measured bandwidth and RTT"
    )
