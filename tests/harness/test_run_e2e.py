"""`lazybench run` end to end on the tiny image: real registry, real store, real podman.

Two modes (legacy and estargz-noopt), two samples, loopback. Checked: every record is there
and good, the lazy mode fetched fewer bytes than legacy before the workload's first output,
the workload printed what it should, nothing is left mounted or running — and an interrupted
run, resumed, ends with the same set of records as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.images import TINY_OUTPUT
from harness.podman import mounts_below
from harness.records import RECORDS, read_records
from tests.harness.test_runner_unit import as_from_a_terminal

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("podman", "docker-registry", "skopeo", "fusermount3"))
        or not Path("/dev/fuse").exists()
        or os.geteuid() != 0,
        reason="needs root, podman, docker-registry, skopeo and FUSE",
    ),
]

SCENARIO = """
name = "e2e"
samples = 2
modes = ["legacy", "estargz-noopt"]
[network]
profile = "loopback"
[[workloads]]
name = "tiny"
recipe = "tiny"
timeout = 60
"""
KEYS = {
    (s, "tiny", m, "default" if m != "legacy" else "")
    for s in range(2)
    for m in ("legacy", "estargz-noopt")
}


def lazybench(tmp: Path, *args: str) -> subprocess.Popen[str]:
    """`lazybench ARGS` as a user runs it, with its temporary files under ``tmp``."""
    (tmp / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp / "tmp"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "harness", *args, "--no-progress"]
        if args[0] == "run"
        else [sys.executable, "-m", "harness", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=as_from_a_terminal,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 420) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def assert_nothing_left(tmp: Path) -> None:
    assert mounts_below(tmp) == [], "mounts left behind"
    left = subprocess.run(["pgrep", "-af", str(tmp)], capture_output=True, text=True).stdout
    assert left.strip() == "", f"processes left behind: {left}"
    assert list((tmp / "tmp").glob("lzb-run-*")) == [], "work directory left behind"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "smoke.toml").write_text(SCENARIO)
    return tmp


def run_args(base: Path, run_id: str) -> list[str]:
    return [
        "run",
        str(base / "smoke.toml"),
        "--results-dir",
        str(base / "runs"),
        "--run-id",
        run_id,
        "--cache-dir",
        str(base / "cache"),
    ]


@pytest.fixture(scope="module")
def full_run(base: Path) -> Path:
    rc, out = finish(lazybench(base, *run_args(base, "full")))
    assert rc == 0, out
    assert "chart:" in out and "table:" in out
    return base / "runs" / "full"


def test_small_scenario_end_to_end(full_run: Path, base: Path) -> None:
    records = read_records(full_run)
    assert {r.key for r in records} == KEYS
    assert all(r.status == "ok" for r in records), [r.error for r in records]
    for r in records:
        assert TINY_OUTPUT in r.stdout_head and r.ready
        assert r.pull_s > 0 and r.create_s > 0 and r.run_s > 0
        assert r.total_s == pytest.approx(r.pull_s + r.create_s + r.run_s)
        assert r.requests_before_first_output and r.bytes_fetched
    for s in range(2):
        by_mode = {r.mode: r for r in records if r.sample == s}
        legacy, lazy = by_mode["legacy"], by_mode["estargz-noopt"]
        # The lazy pull skips the 4 MiB file the workload never reads.
        assert lazy.bytes_before_first_output < legacy.bytes_before_first_output
        assert legacy.bytes_before_first_output > 4 << 20
        assert lazy.store_metrics, "store metrics were not collected"
        assert lazy.store == "default" and lazy.layers_total
        assert lazy.layers_from_store == lazy.layers_total, "the lazy pull fell back"
    env = json.loads((full_run / "environment.json").read_text())
    assert env["podman"] and env["kernel"] and env["link"]["profile"]["name"] == "loopback"
    table = (full_run / "table.md").read_text()
    assert "| legacy |" in table and "| estargz-noopt |" in table
    assert (full_run / "chart.png").stat().st_size > 0 and (full_run / "chart.svg").exists()
    assert_nothing_left(base)


def _signalled_after_first_record(
    base: Path, run_dir: Path, run_id: str, signum: signal.Signals
) -> tuple[int, str]:
    """Start the small run ``run_id``, send ``signum`` in the middle of the measurement after
    its first record, and return its exit status and output."""
    proc = lazybench(base, *run_args(base, run_id))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        path = run_dir / RECORDS
        if path.exists() and path.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, finish(proc)[1]
    time.sleep(0.3)  # land in the middle of the next measurement
    proc.send_signal(signum)
    return finish(proc, timeout=120)


def test_interrupted_run_resumes_to_the_same_records(full_run: Path, base: Path) -> None:
    run_dir = base / "runs" / "interrupted"
    rc, out = _signalled_after_first_record(base, run_dir, "interrupted", signal.SIGINT)
    assert rc == 130, out
    assert "resume with" in out
    assert_nothing_left(base)
    kept = read_records(run_dir)
    assert 1 <= len(kept) < len(KEYS)

    rc, out = finish(lazybench(base, "run", "--resume", str(run_dir)))
    assert rc == 0, out
    assert_nothing_left(base)
    resumed = read_records(run_dir)
    assert {r.key for r in resumed} == {r.key for r in read_records(full_run)} == KEYS
    assert all(r.status == "ok" for r in resumed)
    lines = (run_dir / RECORDS).read_text().splitlines()
    assert len(lines) == len(KEYS), "a measurement was recorded twice"
    # The records kept from before the interruption are untouched by the resume.
    assert {r.key: r.finished for r in kept}.items() <= {r.key: r.finished for r in resumed}.items()


def test_a_hangup_mid_run_cleans_up_as_ctrl_c_does(base: Path) -> None:
    """SIGHUP (the terminal or ssh session that ran lazybench closed) ended it where it
    stood, as SIGKILL would: no word, exit -1, and the measurement's store and podman
    working directories (with a container and mounts when it came during the run) left for
    the next run's sweep. It is handled as Ctrl-C is now."""
    run_dir = base / "runs" / "hangup"
    rc, out = _signalled_after_first_record(base, run_dir, "hangup", signal.SIGHUP)
    assert rc == 130, out
    assert "interrupted (SIGHUP)" in out and "resume with" in out
    assert_nothing_left(base)
    assert 1 <= len(read_records(run_dir)) < len(KEYS)


@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="needs mmdebstrap")
def test_a_node_list_runs_once_per_runtime_node_and_flags_lost_images(tmp_path: Path) -> None:
    """podman 5.4 (trixie) keeps a lazily pulled image; podman 5.8 (sid) loses it, and the
    record and report say so while the measurement still completes."""
    scenario = tmp_path / "nodes.toml"
    scenario.write_text(
        SCENARIO.replace("samples = 2", "samples = 1")
        .replace('["legacy", "estargz-noopt"]', '["estargz-noopt"]')
        .replace('name = "e2e"', 'name = "e2e"\nnode = ["trixie", "sid"]')
    )
    proc = lazybench(tmp_path, "run", str(scenario), "--results-dir", str(tmp_path / "runs"))
    code, out = finish(proc)
    assert code == 0, out[-3000:]
    runs = {p.name.rsplit("-", 1)[1]: p for p in (tmp_path / "runs").iterdir() if p.is_dir()}
    summary = next((tmp_path / "runs").glob("*-runtimes.md")).read_text()
    assert "| sid | 5.8" in summary and "| trixie | 5.4" in summary
    assert "lost by the runtime" in summary
    assert set(runs) == {"trixie", "sid"}
    records = {node: read_records(d)[0] for node, d in runs.items()}
    assert records["trixie"].podman_version.startswith("5.4")
    assert records["trixie"].persisted is True and records["trixie"].status == "ok"
    sid = records["sid"]
    assert sid.podman_version.startswith("5.8") and sid.storage_version.startswith("1.64")
    assert sid.status == "ok" and sid.persisted is False
    assert "PutAdditionalLayer" in (sid.persistence or "")
    assert "lost by the runtime" in (runs["sid"] / "report.md").read_text()
    env = json.loads((runs["sid"] / "environment.json").read_text())
    assert env["runtime_versions"]["containers_storage"] == sid.storage_version
    assert_nothing_left(tmp_path)


def test_two_shards_merged_are_one_run(full_run: Path, base: Path) -> None:
    shards = []
    for k in (1, 2):
        run_id = f"shard{k}"
        rc, out = finish(lazybench(base, *run_args(base, run_id), "--shard", f"{k}/2"))
        assert rc == 0, out
        shards.append(base / "runs" / run_id)
    parts = [{r.key for r in read_records(s)} for s in shards]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    merged = base / "runs" / "merged"
    rc, out = finish(lazybench(base, "merge", str(merged), *map(str, shards)))
    assert rc == 0, out
    assert {r.key for r in read_records(merged)} == {r.key for r in read_records(full_run)}
    header = (merged / "summary.csv").read_text().splitlines()[0]
    assert header == (full_run / "summary.csv").read_text().splitlines()[0]
    full_rows = (full_run / "summary.csv").read_text().splitlines()[1:]
    merged_rows = (merged / "summary.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:4] for r in merged_rows] == [r.split(",")[:4] for r in full_rows]
    env = json.loads((merged / "environment.json").read_text())
    assert env["machines_differ"] is False and [s["shard"] for s in env["shards"]] == ["1/2", "2/2"]
    assert "Incomplete" not in (merged / "report.md").read_text()
    assert_nothing_left(base)


# A layer store that is slow to stop: SIGTERM (which the harness sends its process group) stops
# the real store, and the wrapper says so in FLAG and goes on until it is killed, as a store
# finishing its work would.
SLOW_STOPPING_STORE = """#!/bin/sh
trap 'touch "{flag}"' TERM
"{python}" -m store "$@" &
while :; do sleep 0.1; done
"""


def test_a_signal_while_a_measurement_is_torn_down_lets_the_teardown_finish(
    tmp_path: Path, base: Path
) -> None:
    """Ctrl-C raised in the middle of a teardown skipped the rest of it: here the SIGKILL of
    a store that outlives its SIGTERM, which then ran on after lazybench exited (at the end
    of a run, the link's namespace and the work directory were left the same way)."""
    flag = tmp_path / "store-stopping"
    wrapper = tmp_path / "slow-stopping-store"
    wrapper.write_text(SLOW_STOPPING_STORE.format(flag=flag, python=sys.executable))
    wrapper.chmod(0o755)
    scenario = tmp_path / "slow.toml"
    scenario.write_text(
        SCENARIO.replace("samples = 2", "samples = 1")
        .replace('["legacy", "estargz-noopt"]', '["estargz-noopt"]')
        .replace(
            "[network]",
            f'[store]\ncommand = ["{wrapper}", "--config", "{{config}}", "--root", "{{root}}", '
            '"{mountpoint}"]\n[network]',
        )
    )
    proc = lazybench(
        tmp_path,
        "run",
        str(scenario),
        "--results-dir",
        str(tmp_path / "runs"),
        "--cache-dir",
        str(base / "cache"),
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not flag.exists():
        time.sleep(0.02)
    assert flag.exists(), finish(proc)[1]
    proc.send_signal(signal.SIGINT)  # while the harness waits for the store to stop
    rc, out = finish(proc, timeout=120)
    assert rc == 130, out
    assert_nothing_left(tmp_path)


def test_a_store_that_cannot_start_is_refused_before_anything_is_measured(tmp_path: Path) -> None:
    """A ``[[stores]]`` command that exits at once failed each lazy measurement in turn, after
    the images were built and every legacy pull measured; it is now started once first."""
    dead = json.dumps(["sh", "-c", "echo 'no such option' >&2; exit 7", "sh", "{mountpoint}"])
    scenario = SCENARIO.replace(
        "[network]", f'[[stores]]\nname = "dead"\ncommand = {dead}\n[network]'
    )
    (tmp_path / "dead.toml").write_text(scenario)
    args = ["run", str(tmp_path / "dead.toml"), "--results-dir", str(tmp_path / "runs")]
    start = time.monotonic()
    rc, out = finish(lazybench(tmp_path, *args, "--run-id", "d"), timeout=120)
    assert rc == 1, out
    assert "store 'dead' does not start" in out and "exited with status 7" in out, out
    assert "no such option" in out, out
    assert time.monotonic() - start < 60
    assert not (tmp_path / "runs" / "d" / "records.jsonl").exists()
    assert_nothing_left(tmp_path)
