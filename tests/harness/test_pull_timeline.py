"""The pull timeline, harness side: store events → per-layer offsets, table and report section."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import ClassVar

import pytest

from harness.container import RunOutcome
from harness.laziness import LayerEvidence, Verdict
from harness.podman import Persistence, PodmanResult
from harness.prepare import resolve
from harness.records import Record, append_record
from harness.report import timeline_lines, write_report
from harness.scenario import parse_scenario
from harness.store_proc import is_our_store, store_config_text
from harness.timeline import layer_table, pull_timeline, read_timelines, write_timeline
from tests.harness.test_results import make_run

L1, T1 = "sha256:" + "1" * 64, "sha256:" + "a" * 64
L2, T2 = "sha256:" + "2" * 64, "sha256:" + "b" * 64
REF = "10.0.0.1:5000/lazybench/gcc:estargz"
START = 100.0  # time.monotonic() when `podman pull` started; it took PULL_S
PULL_S = 1.2


def _ev(event: str, t: float, dur: float | None = None, **fields) -> dict:
    e = {"t": START + t, "wall": 1.7e9 + t, "event": event, **fields}
    if dur is not None:
        e["dur"] = dur
    return e


def example_events() -> list[dict]:
    """A two-layer pull: layer 1 looked up by compressed digest with its TOC in the footer's
    read, layer 2 by TOC digest with a TOC of its own request; a lookup after the pull."""
    one = {"layer": L1, "toc_digest": T1, "ref": REF}
    two = {"layer": L2, "toc_digest": T2, "ref": REF}
    return [
        _ev("request", 0.370, 0.0001, what="ref"),
        _ev("request", 0.371, 0.100, what="manifest", ref=REF),
        _ev("manifest", 0.372, 0.090, ref=REF),
        _ev("footer", 0.462, 0.040, bytes=65536, requests=1, **one),
        _ev("footer", 0.462, 0.041, bytes=65536, requests=1, **two),
        _ev("toc_fetch", 0.502, bytes=30000, requests=0, in_tail=True, **one),
        _ev("verify", 0.503, 0.010, **one),
        _ev("toc_fetch", 0.503, 0.080, bytes=400000, requests=1, **two),
        _ev("parse", 0.514, 0.050, entries=900, **one),
        _ev("lookup", 0.480, ref=REF, name=L1),
        _ev("request", 0.480, 0.0001, what="layerdir", ref=REF, name=L1),
        _ev("request", 0.500, 0.0002, what="info", ref=REF, name=L1),
        _ev("request", 0.520, 0.077, what="diff", ref=REF, name=L1),
        _ev("tree", 0.565, 0.030, **one),
        _ev("verify", 0.584, 0.030, **two),
        _ev("loaded", 0.596, nodes=900, **one),
        _ev("ready", 0.597, layer=L1, ref=REF, nodes=900),
        _ev("parse", 0.615, 0.200, entries=25000, **two),
        _ev("lookup", 0.700, ref=REF, name=T2),
        _ev("request", 0.700, 0.0001, what="layerdir", ref=REF, name=T2),
        _ev("request", 0.710, 0.0001, what="info", ref=REF, name=T2),
        _ev("request", 0.720, 0.198, what="diff", ref=REF, name=T2),
        _ev("tree", 0.816, 0.100, **two),
        _ev("loaded", 0.917, nodes=25000, **two),
        _ev("ready", 0.918, layer=L2, ref=REF, nodes=25000),
        _ev("request", 1.500, 0.001, what="layerdir", ref=REF, name=L1),  # in `create`
        _ev("first_read", 1.900, layer=L1),
    ]


def test_events_become_per_layer_offsets_from_the_pull_start():
    doc = pull_timeline(sorted(example_events(), key=lambda e: e["t"]), START, PULL_S)
    one, two = doc["layers"]
    assert (one["layer"], one["by"], two["layer"], two["by"]) == (L1, "digest", L2, "toc")
    assert one["lookup"] == pytest.approx(0.48) and two["lookup"] == pytest.approx(0.70)
    assert one["manifest"] == pytest.approx([0.372, 0.462])
    assert one["toc_in_tail"] and one["toc_bytes"] == 30000 and one["fetch_requests"] == 1
    assert two["toc_fetch"] == pytest.approx([0.503, 0.583]) and two["fetch_requests"] == 2
    assert two["parse"] == pytest.approx([0.615, 0.815]) and two["ready"] == pytest.approx(0.918)
    assert one["first_read"] == pytest.approx(1.9) and two["first_read"] is None
    # Runtime's own work: layer 2's first request comes 0.103 s after layer 1's diff answer;
    # between its own requests it waits 0.0099 + 0.0099 s; the request in `create` is not
    # part of the pull.
    assert two["runtime_before_s"] == pytest.approx(0.103)
    assert two["runtime_gaps_s"] == pytest.approx(0.0198)
    assert one["runtime_gaps_s"] == pytest.approx(0.0199 + 0.0198)
    s = doc["summary"]
    assert s["store_s"] == pytest.approx(0.0001 + 0.1 + 0.0001 + 0.0002 + 0.077 + 0.0002 + 0.198)
    assert s["runtime_s"] == pytest.approx(PULL_S - s["store_s"])
    assert s["store_work_s"] == pytest.approx(0.09 + 0.081 + 0.08 + 0.04 + 0.25 + 0.13)
    assert s["first_request_at"] == pytest.approx(0.37) and s["layers"] == 2
    assert doc["events"][0]["at"] == pytest.approx(0.37)


def test_table_and_files_in_the_run_directory(tmp_path):
    events = tmp_path / "timeline.jsonl"
    lines = [json.dumps(e) for e in example_events()]
    events.write_text("\n".join(lines) + '\n{"t": 1, "torn')
    out = write_timeline(
        events, tmp_path / "run", workload="gcc", mode="estargz", store="ours", sample=0,
        pull_start=START, pull_s=PULL_S,
    )  # fmt: skip
    assert out == tmp_path / "run" / "timeline" / "gcc-estargz-ours.json"
    doc = json.loads(out.read_text())
    assert doc["workload"] == "gcc" and len(doc["events"]) == len(lines)
    table = out.with_suffix(".md").read_text()
    assert table == layer_table(doc)
    assert "| `111111111111` | digest | 0.480 | 0.372–0.462 | 0.462–0.502 |" in table
    assert "0.502–0.502 (tail)" in table and "| 0.103 | 0.020 |" in table
    assert write_timeline(
        tmp_path / "none.jsonl", tmp_path / "run2", workload="gcc", mode="estargz",
        store="go", sample=0, pull_start=START, pull_s=PULL_S,
    ) is None  # fmt: skip
    assert not (tmp_path / "run2").exists()


def test_report_section_with_and_without_timelines(tmp_path):
    run = make_run(tmp_path / "run", samples=1)
    assert timeline_lines(run) == []  # an older run, or foreign stores only
    (run / "timeline").mkdir()
    (run / "timeline" / "broken.json").write_text("{not json")
    assert timeline_lines(run) == []
    events = tmp_path / "t.jsonl"
    events.write_text("\n".join(json.dumps(e) for e in example_events()) + "\n")
    write_timeline(
        events, run, workload="gcc", mode="estargz", store="default", sample=0,
        pull_start=START, pull_s=PULL_S,
    )  # fmt: skip
    assert [d["file"] for d in read_timelines(run)] == ["timeline/gcc-estargz-default.json"]
    text = write_report(run).report.read_text()
    assert "## Pull phase (timeline of sample 0)" in text
    links = (
        "| [table](timeline/gcc-estargz-default.md) · [events](timeline/gcc-estargz-default.json) |"
    )
    # No measured link in this run: the TOC bytes, no floor.
    row = "| gcc | estargz | default | 1.200 | 0.376 | 0.824 | 0.671 | 0.370 | 2 | 0.43"
    assert f"{row} | – | – {links}" in text
    # On a measured link, 100 Mbit/s and 40 ms: the floor is the runtime's 0.8244 s + 3 round
    # trips (0.12 s) + 430,000 TOC bytes at 12.5 MB/s (0.0344 s) = 0.9788 s; 0.2212 s over it.
    env_path = run / "environment.json"
    env = json.loads(env_path.read_text())
    env["link"] = {"profile": {"name": "wan"}, "measured": {"rate_mbit": 100.0, "rtt_ms": 40.0}}
    env_path.write_text(json.dumps(env))
    text = write_report(run).report.read_text()
    assert f"| 0.370 | 2 | 0.43 | 0.979 | 0.221 {links}" in text


def test_only_our_store_is_given_the_timeline_key(tmp_path):
    assert is_our_store(["stargz-store", "--config", "{config}"])
    assert not is_our_store(["{go-stargz-store}", "--config", "{config}"])
    other = tmp_path / "stargz-store"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    assert not is_our_store([str(other)])
    text = store_config_text(["h:5000"], timeline_path="/x/timeline.jsonl")
    assert 'timeline_path = "/x/timeline.jsonl"' in text
    assert "timeline_path" not in store_config_text(["h:5000"])


class _FakeStore:
    """Stands in for harness.store_proc.StoreProcess: writes its timeline as the store would."""

    made: ClassVar[list[_FakeStore]] = []

    def __init__(self, workdir: Path, *, timeline: bool = False, **kw) -> None:
        self.workdir, self.timeline = workdir, timeline
        self.mountpoint = workdir / "mnt"
        self.log_path = workdir / "store.log"
        self.pid = os.getpid()  # its CPU time is read beside the timeline (harness.usage)
        _FakeStore.made.append(self)

    def __enter__(self) -> _FakeStore:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:  # the store writes its last events when it stops
        if self.timeline:
            # As if the store had recorded the example pull on the shared monotonic clock.
            shift = _FakeEnv.pulled_at - START
            events = [e | {"t": e["t"] + shift} for e in example_events()]
            (self.workdir / "timeline.jsonl").write_text(
                "".join(json.dumps(e) + "\n" for e in events)
            )

    def abort(self) -> None:
        pass

    def scrape_metrics(self) -> dict:
        return {}

    def log_text(self) -> str:
        return '{"level": "warning", "msg": "layer sha256:ab not served: TOC refused"}\n'


class _FakeEnv:
    pulled_at = 0.0

    def __init__(self, workdir: Path, **kw) -> None:
        self.graphroot, self.storage_options = workdir / "g", {}

    def __enter__(self) -> _FakeEnv:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def pull(self, ref: str, timeout: float | None = None):
        _FakeEnv.pulled_at = time.monotonic()
        return PodmanResult([], 0, "", "", PULL_S)

    def check_persistence(self, ref: str) -> Persistence:
        return Persistence(True, True)


@pytest.mark.parametrize("when", ["run", "teardown"])
def test_an_interrupted_measurement_keeps_no_timeline(tmp_path, monkeypatch, when):
    """Ctrl-C after the pull: the measurement has no record, yet its timeline was written and
    reported as sample 0's ("Pull phase") by a report of the interrupted run. ``teardown``:
    the signal comes while the teardown runs on after the timeline was written (the store's
    log kept, its directory removed), and is raised once the teardown is over."""
    import harness.measure as measure

    verdict = Verdict([LayerEvidence("id", L1, True)])
    monkeypatch.setattr(_FakeStore, "made", [])
    monkeypatch.setattr(measure, "StoreProcess", _FakeStore)
    monkeypatch.setattr(measure, "PodmanEnv", _FakeEnv)
    monkeypatch.setattr(measure, "storage_verdict", lambda *a: verdict)
    monkeypatch.setattr(measure, "create_container", lambda *a: "cid")
    scenario = parse_scenario({"workloads": [{"recipe": "tiny"}]}, "s.toml")
    run = tmp_path / "run"
    runner = measure.Runner(scenario, run, show_progress=False)
    outcome = RunOutcome(0.5, 0.4, True, 0, "hello from lazybench\n", "")
    keep_log = measure._keep_log

    def interrupted(*args: object, **kwargs: object) -> RunOutcome:
        runner._interrupt.signal = "SIGINT"  # as the handler does
        if runner._interrupt.shielded:  # in a teardown: noted, raised once it is over
            keep_log(*args)
            return outcome
        raise measure.Interrupted("SIGINT")

    if when == "run":
        monkeypatch.setattr(measure, "start_until_ready", interrupted)
    else:
        monkeypatch.setattr(measure, "start_until_ready", lambda *a, **kw: outcome)
        monkeypatch.setattr(measure, "_keep_log", interrupted)
    runner.images = {("tiny", "estargz"): "lazybench/tiny:estargz"}
    w = resolve(scenario.workloads[0])
    with pytest.raises(measure.Interrupted):
        runner.measure(0, w, "estargz", _Registry([]), tmp_path / "work", "default")
    assert not list((run / "timeline").glob("*"))  # (none, or no directory)


def test_a_measurement_keeps_the_timeline_of_sample_0_through_our_store(tmp_path, monkeypatch):
    import harness.measure as measure

    verdict = Verdict([LayerEvidence("id", L1, True)])
    monkeypatch.setattr(measure, "StoreProcess", _FakeStore)
    monkeypatch.setattr(measure, "PodmanEnv", _FakeEnv)
    monkeypatch.setattr(measure, "storage_verdict", lambda *a: verdict)
    monkeypatch.setattr(measure, "create_container", lambda *a: "cid")
    outcome = RunOutcome(0.5, 0.4, True, 0, "hello from lazybench\n", "")
    monkeypatch.setattr(measure, "start_until_ready", lambda *a, **kw: outcome)
    scenario = parse_scenario(
        {
            "samples": 2,
            "workloads": [{"recipe": "tiny", "command": ["true"]}],
            "stores": [
                {"name": "ours", "command": ["stargz-store", "{config}", "{mountpoint}"]},
                {"name": "go", "command": ["{go-stargz-store}", "{config}", "{mountpoint}"]},
            ],
        },
        "s.toml",
    )
    run = tmp_path / "run"
    runner = measure.Runner(scenario, run, show_progress=False)
    runner.images = {("tiny", "estargz"): "lazybench/tiny:estargz"}
    registry = _Registry([])
    w = resolve(scenario.workloads[0])
    for sample, store in ((0, "ours"), (1, "ours"), (0, "go")):
        rec = runner.measure(sample, w, "estargz", registry, tmp_path / "work", store)
        assert rec.status == "ok", rec.error
    assert [s.timeline for s in _FakeStore.made] == [True, False, False]
    assert sorted(p.name for p in (run / "timeline").iterdir()) == [
        "tiny-estargz-ours.json",
        "tiny-estargz-ours.md",
    ]
    doc = json.loads((run / "timeline" / "tiny-estargz-ours.json").read_text())
    assert doc["sample"] == 0 and doc["summary"]["layers"] == 2
    # The offsets are from the harness's pull start, on the store's clock.
    assert doc["summary"]["pull_s"] == PULL_S
    assert doc["summary"]["first_request_at"] == pytest.approx(0.37, abs=0.01)
    # Beside it, the link's and CPUs' load from the pull's start to the run's end (a few
    # milliseconds here: a bin at most), tabled after the layers.
    usage = doc["usage"]
    assert usage["width_s"] == 0.1 and usage["iface"] is None  # no link: run() set none
    assert [b["at"] for b in usage["bins"]] in ([], [0.0])
    assert all(b["mbit"] is None for b in usage["bins"])
    page = (run / "timeline" / "tiny-estargz-ours.md").read_text()
    assert "## Link, CPU and I/O" in page and "| at s | link Mbit/s |" in page


class _Registry:
    """The registry's access log as the measurement reads it: records appended to ``log``;
    an offset is a record count."""

    host = "h:5000"

    def __init__(self, log: list) -> None:
        self.log = log

    def log_mark(self) -> int:
        return len(self.log)

    def log_offset(self) -> int:
        return len(self.log)

    def access_log(self, upto: int | None = None) -> list:
        return list(self.log[:upto])


def _measure_once(tmp_path, monkeypatch, env, mode, registry, calls, verdict):
    """One measurement of a one-command workload in ``mode`` through the fake ``env`` class
    (and the fake store), ``create`` and ``run`` appended to ``calls`` as they happen."""
    import harness.measure as measure

    def run(*a, **kw) -> RunOutcome:
        calls.append("run")
        return RunOutcome(0.5, 0.4, True, 0, "hello from lazybench\n", "")

    monkeypatch.setattr(measure, "StoreProcess", _FakeStore)
    monkeypatch.setattr(measure, "PodmanEnv", env)
    monkeypatch.setattr(measure, "storage_verdict", lambda *a: verdict)
    monkeypatch.setattr(measure, "create_container", lambda *a: calls.append("create") or "c")
    monkeypatch.setattr(measure, "start_until_ready", run)
    scenario = parse_scenario(
        {"samples": 1, "workloads": [{"recipe": "tiny", "command": ["true"]}]}, "s.toml"
    )
    runner = measure.Runner(scenario, tmp_path / "run", show_progress=False)
    runner.images = {("tiny", mode): f"lazybench/tiny:{mode}"}
    return runner.measure(0, resolve(scenario.workloads[0]), mode, registry, tmp_path / "w")


def test_no_podman_process_runs_between_pull_and_create(tmp_path, monkeypatch):
    """The store fetches on in the background after the pull: the checks that start podman
    processes (persistence) come after the run, never in the untimed gap before create."""
    calls: list[str] = []

    class Env(_FakeEnv):
        def pull(self, ref: str, timeout: float | None = None):
            calls.append("pull")
            return super().pull(ref, timeout)

        def check_persistence(self, ref: str) -> Persistence:
            calls.append("check_persistence")
            return super().check_persistence(ref)

    registry = _Registry([])
    verdict = Verdict([LayerEvidence("id", L1, True)])
    rec = _measure_once(tmp_path, monkeypatch, Env, "estargz", registry, calls, verdict)
    assert rec.status == "ok", rec.error
    assert calls == ["pull", "create", "run", "check_persistence"]  # no re-pull: legacy only
    assert rec.persisted is True


def _legacy_measurement(tmp_path, monkeypatch, repull):
    """A legacy measurement whose first pull the registry serves two blobs (1 MB) and whose
    second, re-pull, is ``repull()``; returns (record, podman calls)."""
    from harness.registry_server import AccessRecord

    calls: list[str] = []
    log: list[AccessRecord] = []

    def served(n: int, size: int) -> list[AccessRecord]:
        return [AccessRecord("r", None, "t", "GET", "/v2/", 200, size, "podman")] * n

    class Env(_FakeEnv):
        def pull(self, ref: str, timeout: float | None = None):
            calls.append("pull")
            if calls.count("pull") == 1:
                log.extend(served(2, 500_000))
                return super().pull(ref, timeout)
            return repull(log, served)

    registry = _Registry(log)
    rec = _measure_once(tmp_path, monkeypatch, Env, "legacy", registry, calls, Verdict([]))
    return rec, calls


def test_legacy_pulls_again_after_the_run_untimed_in_the_sample(tmp_path, monkeypatch):
    def repull(log, served):
        log.extend(served(3, 1000))  # ping, manifest, config: no layer
        return PodmanResult([], 0, "", "", 0.37)

    rec, calls = _legacy_measurement(tmp_path, monkeypatch, repull)
    assert rec.status == "ok", rec.error
    assert calls == ["pull", "create", "run", "pull"]
    assert (rec.repull_s, rec.repull_requests) == (0.37, 3)
    # The sample's own numbers are the first pull's, create and run only.
    assert (rec.pull_s, rec.run_s) == (PULL_S, 0.5)
    assert rec.total_s == pytest.approx(rec.pull_s + rec.create_s + rec.run_s)
    assert (rec.bytes_fetched, rec.requests) == (1_000_000, 2)
    assert rec.requests_before_first_output == 2


def test_a_failed_repull_leaves_the_legacy_record_standing(tmp_path, monkeypatch):
    from harness.measure import Interrupted
    from harness.podman import PodmanError

    def fails(log, served):
        raise PodmanError("`podman pull` exited 125: no such host")

    rec, calls = _legacy_measurement(tmp_path, monkeypatch, fails)
    assert rec.status == "ok" and rec.error is None
    assert calls == ["pull", "create", "run", "pull"]
    assert (rec.repull_s, rec.repull_requests) == (None, None)
    assert (rec.pull_s, rec.bytes_fetched) == (PULL_S, 1_000_000)

    def interrupted(log, served):
        raise Interrupted("SIGINT")

    with pytest.raises(Interrupted):
        _legacy_measurement(tmp_path, monkeypatch, interrupted)


@pytest.mark.parametrize("from_store", [False, True])
def test_a_run_that_failed_after_a_pull_that_fell_back_is_the_fallback(
    tmp_path, monkeypatch, from_store
):
    """It was recorded as an error: the report and the gate saw a failure, not that the
    pull had fallen back (which may be why the run failed). A lazy pull's failed run stays
    an error."""
    import harness.measure as measure

    registry = _Registry([])
    monkeypatch.setattr(measure, "StoreProcess", _FakeStore)
    monkeypatch.setattr(measure, "PodmanEnv", _FakeEnv)
    verdict = Verdict([LayerEvidence("id", L1, from_store)])
    monkeypatch.setattr(measure, "storage_verdict", lambda *a: verdict)
    monkeypatch.setattr(measure, "create_container", lambda *a: "cid")
    failed = RunOutcome(60.0, None, False, None, "", "Error: timed out")
    monkeypatch.setattr(measure, "start_until_ready", lambda *a, **kw: failed)
    scenario = parse_scenario({"samples": 1, "workloads": [{"recipe": "tiny"}]}, "s.toml")
    runner = measure.Runner(scenario, tmp_path / "run", show_progress=False)
    runner.images = {("tiny", "estargz"): "lazybench/tiny:estargz"}
    rec = runner.measure(0, resolve(scenario.workloads[0]), "estargz", registry, tmp_path / "w")
    if from_store:
        assert rec.status == "error" and rec.error.startswith("run: "), rec.error
    else:
        assert rec.status == "fell-back", rec.error
        assert "1 of 1 layers not from the store" in rec.error and "; and run: " in rec.error


def test_mb_fetched_is_the_timed_window_the_store_fetching_on_after_the_ready_line_is_not(
    tmp_path, monkeypatch
):
    """The pull's 1 MB counts; the 3 MB the store fetches on after the ready line (served
    while the untimed persistence check runs) do not: legacy has no such tail, and the
    check's length is the runtime's, not the mode's."""
    from harness.registry_server import AccessRecord

    log: list[AccessRecord] = []
    get = AccessRecord("r", None, "t", "GET", "/v2/x/blobs/sha256:1", 206, 500_000, "store")

    class Env(_FakeEnv):
        def pull(self, ref: str, timeout: float | None = None):
            log.extend([get, get])
            return super().pull(ref, timeout)

        def check_persistence(self, ref: str) -> Persistence:
            log.extend([get] * 6)  # the prefetch goes on meanwhile
            return super().check_persistence(ref)

    verdict = Verdict([LayerEvidence("id", L1, True)])
    rec = _measure_once(tmp_path, monkeypatch, Env, "estargz", _Registry(log), [], verdict)
    assert rec.status == "ok", rec.error
    assert (rec.bytes_fetched, rec.requests) == (1_000_000, 2)
    assert rec.bytes_before_first_output == 1_000_000


@pytest.mark.parametrize(
    ("status", "said"), [("fell-back", "fell back to a full pull"), ("error", "failed")]
)
def test_a_timeline_of_a_measurement_out_of_the_figures_is_no_lazy_pull(tmp_path, status, said):
    """Sample 0 fell back (or failed) after its pull: its timeline was tabled as the store's
    pull, with a floor and the store's time over it, beside figures that leave it out."""
    run = make_run(tmp_path / "run", samples=1)
    events = tmp_path / "t.jsonl"
    events.write_text("\n".join(json.dumps(e) for e in example_events()) + "\n")
    for mode in ("estargz", "estargz-noopt"):
        write_timeline(
            events, run, workload="gcc", mode=mode, store="default", sample=0,
            pull_start=START, pull_s=PULL_S,
        )  # fmt: skip
    append_record(
        run,
        Record(0, "gcc", "estargz", status=status, error="2 of 2 layers not from the store",
               store="default", total_s=5.0, layers_total=2, layers_from_store=0),
    )  # fmt: skip
    text = write_report(run).report.read_text()
    section = text.split("## Pull phase", 1)[1]
    assert "| gcc | estargz-noopt | default | 1.200 |" in section  # still ok: tabled
    assert "| gcc | estargz | default |" not in section
    assert (
        f"- gcc/estargz · default: sample 0 {said}, so its timeline "
        "([table](timeline/gcc-estargz-default.md) · [events](timeline/gcc-estargz-default.json))"
        " is no lazy pull's"
    ) in section
