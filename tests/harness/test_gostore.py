"""The Go stargz-store as a built-in store: its cached build, its placeholder in store commands,
and the CLI that builds and lists it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import gostore, store_proc
from harness.cli import main as cli_main
from harness.scenario import parse_scenario
from harness.store_proc import StoreError, StoreProcess, resolve_store_command

GO_COMMAND = ("{go-stargz-store}", "--config", "{config}", "--root", "{root}", "{mountpoint}")


@pytest.fixture
def fake_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Replace the compiler run by a stub binary; returns the progress lines seen."""
    calls: list[str] = []
    binary = tmp_path / "go-stargz-store"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)

    def build(cache_dir=None, *, progress=None, timeout=0.0) -> Path:
        calls.append("build")
        return binary

    monkeypatch.setattr(gostore, "build", build)
    monkeypatch.setattr(store_proc, "_built", {})
    return calls


def test_the_go_placeholder_becomes_the_built_binary(fake_build: list[str], tmp_path) -> None:
    resolved = resolve_store_command(GO_COMMAND)
    assert resolved == (str(tmp_path / "go-stargz-store"), *GO_COMMAND[1:])
    assert resolve_store_command(resolved) == resolved  # idempotent
    resolve_store_command(GO_COMMAND)
    assert fake_build == ["build"]  # once per process


def test_other_commands_need_no_build(fake_build: list[str]) -> None:
    cmd = ("stargz-store", "--config", "{config}", "{mountpoint}")
    assert resolve_store_command(cmd) == cmd
    assert fake_build == []


def test_store_process_argv_fills_both_kinds_of_placeholder(fake_build, tmp_path) -> None:
    sp = StoreProcess(tmp_path / "w", command=GO_COMMAND)
    argv = sp.argv()
    assert argv[0] == str(tmp_path / "go-stargz-store")
    assert argv[-1] == str(tmp_path / "w" / "mnt")


def test_a_failed_build_is_a_store_error_naming_the_placeholder(monkeypatch) -> None:
    def fail(*a, **k):
        raise gostore.GoStoreBuildError("go not found on PATH; run ci/install-system-deps")

    monkeypatch.setattr(gostore, "build", fail)
    monkeypatch.setattr(store_proc, "_built", {})
    with pytest.raises(StoreError, match=r"\{go-stargz-store\}: go not found"):
        resolve_store_command(GO_COMMAND)


def test_scenarios_accept_the_go_placeholder() -> None:
    data = {
        "name": "t",
        "samples": 1,
        "modes": ["estargz-noopt"],
        "store": {"command": list(GO_COMMAND)},
        "workloads": [{"recipe": "tiny"}],
    }
    assert parse_scenario(data, "t.toml").store.command == GO_COMMAND


def test_build_key_follows_every_input(monkeypatch) -> None:
    base = gostore.GoStoreBuild("a" * 64, "go1.19.8", "0.12.0-2")
    assert base.key != gostore.GoStoreBuild("b" * 64, "go1.19.8", "0.12.0-2").key
    assert base.key != gostore.GoStoreBuild("a" * 64, "go1.21", "0.12.0-2").key
    assert base.key != gostore.GoStoreBuild("a" * 64, "go1.19.8", "0.12.0-3").key


def test_ls_says_what_to_run_when_the_go_store_is_not_built(tmp_path, capsys) -> None:
    import json

    assert cli_main(["stores", "ls", "--json", "--cache-dir", str(tmp_path)]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["ours"]["path"].endswith("stargz-store")
    assert rows["go"]["command"] == "{go-stargz-store}" and rows["go"]["path"] == ""
    assert (
        "lazybench stores build go" in rows["go"]["status"]
        or "cannot build" in (rows["go"]["status"])
    )


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_builds_into_the_cache_and_reuses_it(capsys) -> None:
    """The real compiler, offline (cached under the default cache after its first build)."""
    assert cli_main(["stores", "build", "go"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.is_file() and os.access(path, os.X_OK)
    assert path == gostore.binary_path()
    assert (path.parent / "build.json").is_file()
    mtime = path.stat().st_mtime_ns
    assert cli_main(["stores", "build", "go"]) == 0
    assert Path(capsys.readouterr().out.strip()) == path and path.stat().st_mtime_ns == mtime
    out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30)
    assert "-config" in out.stderr and "-log-level" in out.stderr
    assert cli_main(["stores", "ls"]) == 0
    assert str(path) in capsys.readouterr().out


def test_the_vs_go_scenario_measures_each_lazy_mode_through_both_stores() -> None:
    from harness.scenario import load_scenario

    path = Path(__file__).parents[2] / "scenarios" / "vs-go.toml"
    scenario = load_scenario(path)
    assert [(s.name, s.command[0]) for s in scenario.stores] == [
        ("ours", "stargz-store"),
        ("go", "{go-stargz-store}"),
    ]
    keys = scenario.keys()
    workloads = {w.name for w in scenario.workloads}
    assert workloads == {"python", "gcc", "tomcat", "redis", "postgres"}
    per_sample = {(w, m, st) for s, w, m, st in keys if s == 0}
    for w in workloads:
        assert {(m, st) for ww, m, st in per_sample if ww == w} == {
            ("legacy", ""),
            ("estargz-noopt", "ours"),
            ("estargz-noopt", "go"),
            ("estargz", "ours"),
            ("estargz", "go"),
        }


GO_SCENARIO = """
name = "go-e2e"
samples = 1
modes = ["estargz-noopt"]
[network]
profile = "loopback"
[[stores]]
name = "ours"
[[stores]]
name = "go"
command = ["{go-stargz-store}", "--config", "{config}", "--root", "{root}", "{mountpoint}"]
[[workloads]]
name = "tiny"
recipe = "tiny"
timeout = 60
"""


@pytest.mark.e2e
@pytest.mark.skipif(
    not all(shutil.which(t) for t in ("podman", "docker-registry", "skopeo", "fusermount3"))
    or os.geteuid() != 0,
    reason="needs root, podman, docker-registry, skopeo and FUSE",
)
def test_a_run_measures_through_both_stores(tmp_path: Path) -> None:
    from harness.podman import mounts_below
    from harness.records import read_records

    (tmp_path / "go.toml").write_text(GO_SCENARIO)
    (tmp_path / "tmp").mkdir()
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "harness", "run", str(tmp_path / "go.toml"), "--no-progress"),
            *("--results-dir", str(tmp_path / "runs"), "--run-id", "go"),
            *("--cache-dir", str(tmp_path / "cache")),
        ],
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {r.store: r for r in read_records(tmp_path / "runs" / "go")}
    assert set(records) == {"ours", "go"}
    for rec in records.values():  # lazy through both stores: every layer from the store
        assert rec.status == "ok" and rec.stdout_head.startswith("hello from lazybench")
        assert rec.layers_total > 0 and rec.layers_from_store == rec.layers_total
    log = next((tmp_path / "runs" / "go" / "logs").glob("*-go-store.log")).read_text()
    assert '"msg":"mounted"' in log and '"msg":"unmounted"' in log  # the Go store's own lines
    assert mounts_below(tmp_path) == []
