"""The laziness verdict end to end: real registry, real podman, real FUSE stores.

One small run measures the tiny image in ``legacy`` and lazily through three stores side by
side: ours (honest), one that mounts but serves no layer, and one that answers EIO for every
layer (``tests/harness/stores/broken_store.py``). podman silently falls back to a full pull
through the broken ones; the verdict, read from podman's own storage and the registry's access
log, must say so — and ``compare --gate`` must fail on it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.records import read_records
from tests.harness.test_run_e2e import assert_nothing_left, finish, lazybench

BROKEN = Path(__file__).with_name("stores") / "broken_store.py"
PREFETCH = Path(__file__).with_name("stores") / "prefetch_store.py"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("podman", "docker-registry", "skopeo", "fusermount3"))
        or not Path("/dev/fuse").exists()
        or os.geteuid() != 0,
        reason="needs root, podman, docker-registry, skopeo and FUSE",
    ),
]


def broken(kind: str) -> str:
    argv = [sys.executable, str(BROKEN), kind, "--config", "{config}", "--root", "{root}"]
    return json.dumps([*argv, "{mountpoint}"])


SCENARIO = f"""
name = "verdict"
samples = 1
modes = ["legacy", "estargz-noopt"]
[network]
profile = "loopback"
[[stores]]
name = "ours"
[[stores]]
name = "empty"
command = {broken("empty")}
[[stores]]
name = "eio"
command = {broken("eio")}
[[workloads]]
name = "tiny"
recipe = "tiny"
timeout = 90
"""


@pytest.fixture(scope="module")
def verdict_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("verdict")
    (base / "verdict.toml").write_text(SCENARIO)
    args = ["run", str(base / "verdict.toml"), "--results-dir", str(base / "runs")]
    args += ["--run-id", "v", "--cache-dir", str(base / "cache")]
    rc, out = finish(lazybench(base, *args))
    # Fallbacks make the run exit 1 (and say so), but every measurement is recorded.
    assert rc == 1, out
    assert "2 fell back to a full pull" in out, out
    assert_nothing_left(base)
    return base, base / "runs" / "v"


def test_honest_lazy_pull_is_ok_with_every_layer_from_the_store(
    verdict_run: tuple[Path, Path],
) -> None:
    _, run = verdict_run
    by = {(r.mode, r.store): r for r in read_records(run)}
    ours = by[("estargz-noopt", "ours")]
    assert ours.status == "ok", ours.error
    assert ours.layers_total and ours.layers_from_store == ours.layers_total
    assert ours.layers_served_whole == 0
    legacy = by[("legacy", "")]
    assert legacy.status == "ok" and legacy.layers_from_store == 0
    assert legacy.layers_served_whole == legacy.layers_total


@pytest.mark.parametrize(("store", "errno"), [("empty", "ENOENT"), ("eio", "EIO")])
def test_store_that_serves_no_layer_is_recorded_fell_back(
    verdict_run: tuple[Path, Path], store: str, errno: str
) -> None:
    _, run = verdict_run
    (rec,) = [r for r in read_records(run) if r.store == store]
    assert rec.status == "fell-back"
    assert rec.layers_from_store == 0 and rec.layers_total and rec.layers_total > 0
    assert rec.layers_served_whole == rec.layers_total
    assert f"{rec.layers_total} of {rec.layers_total} layers not from the store" in rec.error
    assert errno in rec.error  # the reason, from the store's log
    assert rec.total_s and rec.ready  # the container still ran: only the verdict tells


def test_report_shows_fallbacks_and_stores_side_by_side(verdict_run: tuple[Path, Path]) -> None:
    _, run = verdict_run
    table = (run / "table.md").read_text()
    assert "| estargz-noopt · empty |" in table and "**fell back 1/1**" in table
    assert "| estargz-noopt · ours |" in table
    report = (run / "report.md").read_text()
    assert "## Laziness" in report and "2 fell back to a full pull" in report
    assert "## Stores side by side" in report
    assert (run / "chart.svg").read_text().count("fell back") == 2


def test_compare_gate_fails_on_fallbacks(verdict_run: tuple[Path, Path]) -> None:
    _, run = verdict_run
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "compare", str(run), str(run), "--gate"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "tiny/estargz-noopt [empty]: 1 of 1 measurements fell back" in proc.stderr
    assert "tiny/estargz-noopt [eio]: 1 of 1 measurements fell back" in proc.stderr
    failures = proc.stderr.split("FAILED", 1)[1]
    assert "[ours]" not in failures


def test_a_store_that_downloads_before_the_pull_is_not_counted(
    verdict_run: tuple[Path, Path],
) -> None:
    """A store that fetched every blob whole before it mounted had all its layers taken from
    it and none served whole to the runtime — and was counted lazy, its download untimed and
    its bytes uncounted. Blobs served between the store's start and the pull's now fail it."""
    base, _ = verdict_run
    argv = [sys.executable, str(PREFETCH), "--config", "{config}", "--root", "{root}"]
    scenario = SCENARIO.split("[[stores]]")[0] + (
        f'[[stores]]\nname = "prefetch"\ncommand = {json.dumps([*argv, "{mountpoint}"])}\n'
        '[[workloads]]\nname = "tiny"\nrecipe = "tiny"\ntimeout = 90\n'
    )
    scenario = scenario.replace('modes = ["legacy", "estargz-noopt"]', 'modes = ["estargz-noopt"]')
    (base / "prefetch.toml").write_text(scenario)
    args = ["run", str(base / "prefetch.toml"), "--results-dir", str(base / "runs")]
    rc, out = finish(lazybench(base, *args, "--run-id", "p", "--cache-dir", str(base / "cache")))
    assert rc == 1, out
    assert_nothing_left(base)
    (rec,) = read_records(base / "runs" / "p")
    assert rec.status == "fell-back", rec
    assert rec.layers_total and rec.layers_from_store == rec.layers_total  # it did serve them
    assert "after the store started and before the pull did" in (rec.error or "")
    assert "prefetch-store/1" in (rec.error or "")
