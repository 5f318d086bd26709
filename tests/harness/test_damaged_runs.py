"""Damaged and unusual run directories (a hand edit, a disk error, an older or other lazybench):
each is refused with one line naming the file, line and field, or read honestly."""

from __future__ import annotations

import errno
import http.server
import json
import os
import re
import stat
import threading
from pathlib import Path

import pytest

from harness.cli import UserError
from harness.gate import compare_runs, condition_differences, gate_failures, load_gate
from harness.measure import load_run_scenario
from harness.merge import merge_runs
from harness.podman import write_atomic
from harness.records import (
    ENVIRONMENT,
    RECORDS,
    SCENARIO_COPY,
    Record,
    append_record,
    check_fields,
    read_environment,
    read_records,
)
from harness.report import write_report
from harness.store_proc import StoreProcess
from tests.harness.test_results import make_run


def _write_records(run_dir: Path, *records: dict[str, object] | str) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (run_dir / RECORDS).write_text("".join(line + "\n" for line in lines))
    return run_dir


def _record(**fields: object) -> dict[str, object]:
    return json.loads(Record(0, "w", "legacy", total_s=1.0).to_json()) | fields


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"total_s": "fast"}, r"records.jsonl:2: total_s: must be a number, got 'fast'"),
        ({"sample": "0"}, r"records.jsonl:2: sample: must be an integer, got '0'"),
        ({"bytes_fetched": 1.5}, r"records.jsonl:2: bytes_fetched: must be an integer"),
        ({"ready": "yes"}, r"records.jsonl:2: ready: must be true or false"),
        ({"workload": 3}, r"records.jsonl:2: workload: must be a string"),
        ({"total_s": float("nan")}, r"records.jsonl:2: total_s: must be finite"),
        ({"pull_s": float("inf")}, r"records.jsonl:2: pull_s: must be finite"),
        ({"total_s": -5.0}, r"records.jsonl:2: total_s: must not be negative"),
        ({"bytes_fetched": -1}, r"records.jsonl:2: bytes_fetched: must not be negative"),
        ({"status": "great"}, r"records.jsonl:2: status: must be one of ok, error, fell-back"),
        ({"store_metrics": []}, r"records.jsonl:2: store_metrics: must be an object"),
        (
            {"store_metrics": {"hits": "3"}},
            r"records.jsonl:2: store_metrics.hits: must be a number",
        ),
        (
            {"store_metrics": {"q": float("nan")}},
            r"records.jsonl:2: store_metrics.q: must be finite",
        ),
        ({"total_s": None}, r"records.jsonl:2: total_s: missing from a record with status ok"),
        # A zero total divided the ratios: the gate let a lazy ÷ legacy ceiling pass unchecked.
        ({"total_s": 0}, r"records.jsonl:2: total_s: must be more than 0 in a record with"),
        ({"total_s": 0.0}, r"records.jsonl:2: total_s: must be more than 0 in a record with"),
        ({"workload": None}, r"records.jsonl:2: workload: must be given, got null"),
    ],
)
def test_a_record_with_a_wrong_field_is_refused_by_file_line_and_field(
    tmp_path: Path, fields: dict[str, object], message: str
) -> None:
    _write_records(tmp_path, _record(sample=1), _record(**fields))
    with pytest.raises(UserError, match=message):
        read_records(tmp_path)


def test_a_record_without_a_key_field_is_refused_by_name(tmp_path: Path) -> None:
    record = _record()
    del record["sample"]
    _write_records(tmp_path, record)
    with pytest.raises(UserError, match=r"records.jsonl:1: sample: missing"):
        read_records(tmp_path)


def test_a_limits_entry_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    (run / "limits.json").write_text('{"workloads": {"python": 5}}')
    with pytest.raises(UserError, match=r"limits.json: workloads.python is not an object"):
        write_report(run)


def test_a_record_that_is_not_an_object_or_repeats_a_key_is_refused(tmp_path: Path) -> None:
    _write_records(tmp_path, _record(), "[1, 2]")
    with pytest.raises(UserError, match=r"records.jsonl:2: not a JSON object"):
        read_records(tmp_path)
    line = json.dumps(_record(sample=1))[:-1] + ', "total_s": 0.001}'
    _write_records(tmp_path, _record(), line)
    with pytest.raises(UserError, match=r"records.jsonl:2: total_s: given twice"):
        read_records(tmp_path)


def test_records_that_are_not_utf8_or_not_readable_are_refused(tmp_path: Path) -> None:
    _write_records(tmp_path, _record(), _record(sample=1))
    data = (tmp_path / RECORDS).read_bytes()
    (tmp_path / RECORDS).write_bytes(data + b'{"sample": 2, "\xff": 1}\n' + data)
    with pytest.raises(UserError, match=r"records.jsonl:3: not UTF-8 text"):
        read_records(tmp_path)
    # A torn last line may end inside a multi-byte character: it is skipped as torn.
    (tmp_path / RECORDS).write_bytes(data + '{"workload": "é'.encode()[:-1])
    assert len(read_records(tmp_path)) == 2
    (tmp_path / RECORDS).unlink()
    (tmp_path / RECORDS).mkdir()
    with pytest.raises(UserError, match=r"records.jsonl: cannot read"):
        read_records(tmp_path)


@pytest.mark.parametrize(
    ("foreign", "named"),
    [
        ({"workload": "other"}, "sample 0 of other/legacy"),
        ({"mode": "zstd-chunked"}, "sample 0 of python/zstd-chunked"),
        ({"sample": 7}, "sample 7 of python/legacy"),
        ({"mode": "estargz", "store": "go"}, "sample 0 of python/estargz [go]"),
    ],
)
def test_records_of_measurements_the_scenario_does_not_plan_are_refused(
    tmp_path: Path, foreign: dict[str, object], named: str
) -> None:
    """A record of another run in this one's records.jsonl (a copy, an append by hand) was
    reported and gated on as one of this run's measurements, a workload it never measured
    becoming a row of its table."""
    run_dir = make_run(tmp_path / "run")
    base = make_run(tmp_path / "base")
    record = Record(0, "python", "legacy", total_s=1.0)
    append_record(run_dir, Record(**{**vars(record), **foreign}))  # type: ignore[arg-type]
    message = rf"run/records.jsonl: holds 1 records .* does not plan, such as {re.escape(named)}"
    with pytest.raises(UserError, match=message):
        write_report(run_dir)
    with pytest.raises(UserError, match=message):
        compare_runs(base, run_dir, "median")
    write_report(base)  # the run's own records only: reported as before


def test_a_resume_refuses_records_the_scenario_does_not_plan_before_measuring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report refuses them at the end: a resume found out only after its measurements."""
    import harness.measure
    from harness.scenario import parse_scenario

    def preparing(*args: object) -> None:
        raise AssertionError("the run went on to prepare its measurements")

    monkeypatch.setattr(harness.measure, "preflight_link", preparing)
    run_dir = make_run(tmp_path / "run")
    append_record(run_dir, Record(0, "other", "legacy", total_s=1.0))
    scenario = parse_scenario(read_environment(run_dir)["scenario"], "s")
    with pytest.raises(UserError, match="does not plan, such as sample 0 of other/legacy"):
        harness.measure.Runner(scenario, run_dir).run()


@pytest.mark.parametrize("schema", ["2", "x", 0, -1, True, 1.5, None])
def test_a_schema_that_is_no_version_is_refused_as_such(tmp_path: Path, schema: object) -> None:
    """It was called "newer than this lazybench reads: upgrade lazybench" (a string, a float),
    or read as an old record (0, -1, true)."""
    run_dir = _write_records(tmp_path, _record(), _record(sample=1, schema=schema))
    with pytest.raises(UserError, match=r"records.jsonl:2: schema: must be a record schema"):
        read_records(run_dir)


@pytest.mark.parametrize("kept", [0, 1, 3])
def test_a_record_appended_after_a_torn_last_line_is_read(tmp_path: Path, kept: int) -> None:
    """A run that died mid-write leaves a torn last line, which reading skips; the resume's
    first record was appended to it, making one line no reader takes: the run could be
    neither reported nor resumed again ("records.jsonl:2: not a JSON record")."""
    whole = [_record(sample=s) for s in range(kept)]
    run_dir = _write_records(tmp_path / "run", *whole) if whole else tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    torn = json.dumps(_record(sample=kept))[:-40].encode()
    with (run_dir / RECORDS).open("ab") as f:
        f.write(torn)
    assert [r.sample for r in read_records(run_dir)] == list(range(kept))
    append_record(run_dir, Record(kept, "w", "legacy", total_s=2.0))
    append_record(run_dir, Record(kept + 1, "w", "legacy", total_s=3.0))
    records = read_records(run_dir)
    assert [r.sample for r in records] == list(range(kept + 2))
    assert records[kept].total_s == 2.0
    assert (run_dir / RECORDS).read_bytes().count(b"\n") == kept + 2


def test_a_lazy_record_marked_ok_whose_layers_did_not_all_come_from_the_store_fell_back(
    tmp_path: Path,
) -> None:
    lazy = {"mode": "estargz", "store": "default", "layers_total": 3}
    _write_records(
        tmp_path,
        _record(**lazy, layers_from_store=3, layers_served_whole=0),
        _record(**lazy, sample=1, layers_from_store=2, layers_served_whole=0),
        _record(**lazy, sample=2, layers_from_store=3, layers_served_whole=1),
    )
    ok, partial, whole = read_records(tmp_path)
    assert ok.status == "ok"
    assert (partial.status, whole.status) == ("fell-back", "fell-back")
    assert "2 of 3 layers came from the store" in (partial.error or "")
    assert "1 served whole" in (whole.error or "")


def test_a_lazy_record_marked_ok_without_its_verdict_or_store_fell_back(tmp_path: Path) -> None:
    # A fell-back record edited to ok with its layer counts deleted, or its store name too:
    # no lazybench since the verdict writes either, so nothing shows the layers came from
    # the store. Only a record from before the verdict (schema 1) stays ok, "not checked".
    verdict = ("layers_total", "layers_from_store", "layers_served_whole")
    bare = {k: v for k, v in _record(mode="estargz").items() if k not in verdict}
    old = {k: v for k, v in bare.items() if k not in ("schema", "store")}
    _write_records(
        tmp_path,
        bare | {"store": "default"},
        bare | {"sample": 1, "store": ""},
        old | {"sample": 2},
    )
    unchecked, storeless, before = read_records(tmp_path)
    assert (unchecked.status, storeless.status) == ("fell-back", "fell-back")
    assert "no laziness verdict" in (unchecked.error or "")
    assert "names no store" in (storeless.error or "")
    assert (before.status, before.store, before.layers_total) == ("ok", "default", None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"environment.json:1: not valid JSON"),
        ("[]", r"environment.json: not a JSON object"),
        ('{"scenario": []}', r"environment.json: scenario: must be an object"),
        (
            '{"scenario": {"percentile": "ninety"}}',
            r"environment.json: scenario.percentile: must be a number",
        ),
    ],
)
def test_a_damaged_environment_is_refused_by_name(tmp_path: Path, text: str, message: str) -> None:
    run = make_run(tmp_path / "run")
    (run / ENVIRONMENT).write_text(text)
    with pytest.raises(UserError, match=message):
        read_environment(run)
    with pytest.raises(UserError, match=message):
        write_report(run)


def test_environment_in_other_bytes_is_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    (run / ENVIRONMENT).write_bytes(b'{"kernel": "\xff"}')
    with pytest.raises(UserError, match=r"environment.json: not UTF-8 text"):
        read_environment(run)


def test_a_damaged_scenario_copy_is_refused_on_resume_and_merge(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    (run / SCENARIO_COPY).write_text("{oops")
    with pytest.raises(UserError, match=r"scenario.json:1: not valid JSON"):
        load_run_scenario(run)
    with pytest.raises(UserError, match=r"scenario.json:1: not valid JSON"):
        merge_runs(tmp_path / "out", [run])
    (run / SCENARIO_COPY).write_bytes(b"\xff\xfe{}")
    with pytest.raises(UserError, match=r"scenario.json: not UTF-8 text"):
        load_run_scenario(run)
    assert not (tmp_path / "out").exists()


def test_a_null_in_a_scenario_copy_is_refused_by_key(tmp_path: Path) -> None:
    """TOML has no null, a run's scenario.json may (a hand edit): an image workload's
    ``"name": null`` ended the resume with a TypeError traceback."""
    scenario = {"workloads": [{"name": None, "image": "docker://localhost:5000/app:1"}]}
    (tmp_path / SCENARIO_COPY).write_text(json.dumps(scenario))
    with pytest.raises(UserError, match=r"workloads\[0\]\.name: must be a non-empty string"):
        load_run_scenario(tmp_path)


def test_a_nan_threshold_in_a_gate_file_is_refused(tmp_path: Path) -> None:
    gate = tmp_path / "gate.toml"
    gate.write_text("[total]\nmax_increase_pct = nan\n")
    with pytest.raises(UserError, match=r"gate.toml: total.max_increase_pct: must be a number"):
        load_gate(gate)
    gate.write_text("[ratio]\nestargz = nan\n")
    with pytest.raises(UserError, match=r"gate.toml: ratio.estargz: must be a number > 0"):
        load_gate(gate)


def test_gate_still_fails_where_a_lazy_record_was_marked_ok_by_hand(tmp_path: Path) -> None:
    base = make_run(tmp_path / "a")
    new = make_run(tmp_path / "b", seed=2)
    lines = (new / RECORDS).read_text().splitlines()
    edited = []
    for line in lines:
        r = json.loads(line)
        if r["mode"] == "estargz":
            r |= {"layers_total": 2, "layers_from_store": 1, "layers_served_whole": 0}
        edited.append(json.dumps(r))
    (new / RECORDS).write_text("\n".join(edited) + "\n")
    problems = gate_failures(compare_runs(base, new), load_gate())
    assert any("estargz" in p and "fell back" in p for p in problems)


def test_write_atomic_leaves_no_temporary_file_when_it_cannot_replace(tmp_path: Path) -> None:
    (tmp_path / "report.md").mkdir()  # os.replace of a file onto a directory fails
    with pytest.raises(OSError):
        write_atomic(tmp_path / "report.md", "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_report_into_a_read_only_run_dir_is_a_user_error(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    run.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(UserError, match=r"Permission denied"):
            write_report(run)
    finally:
        run.chmod(stat.S_IRWXU)


def test_report_where_an_output_cannot_be_written_is_a_user_error(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    (run / "table.md").mkdir()  # in the way of the table, as a read-only file would be
    with pytest.raises(UserError, match=rf"^{run}/table.md: Is a directory"):
        write_report(run)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert not (run / "report.md").exists()  # nothing of the set was replaced


def test_a_report_that_fails_part_way_leaves_the_last_one_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path / "run")
    write_report(run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    (run / RECORDS).write_text((run / RECORDS).read_text().splitlines()[0] + "\n")

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "chart.png")

    monkeypatch.setattr("harness.report.draw_chart", no_space)
    with pytest.raises(UserError, match=r"No space left on device"):
        write_report(run)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after.keys() == before.keys()
    assert {k: v for k, v in after.items() if k != RECORDS} == {
        k: v for k, v in before.items() if k != RECORDS
    }
    assert not [p for p in run.iterdir() if p.name.startswith(".report-")]


@pytest.mark.parametrize("text", ["[]", '"x"', "3"])
def test_a_scenario_copy_that_is_not_an_object_is_refused(tmp_path: Path, text: str) -> None:
    run = make_run(tmp_path / "run")
    (run / SCENARIO_COPY).write_text(text)
    with pytest.raises(UserError, match=r"scenario.json: must be a table"):
        load_run_scenario(run)


def test_merge_into_a_place_it_cannot_write_is_a_user_error(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    (run / SCENARIO_COPY).write_text(json.dumps(read_environment(run)["scenario"]))
    (tmp_path / "file").write_text("")  # a file where the output's parent should be
    with pytest.raises(UserError, match=r"merge: .*file: not a writable directory \(Not a dir"):
        merge_runs(tmp_path / "file" / "out", [run])
    with pytest.raises(UserError, match=r"file: exists and is not a directory"):
        merge_runs(tmp_path / "file", [run])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "run"]


def test_compare_names_what_two_runs_were_measured_under_differently(tmp_path: Path) -> None:
    base = make_run(tmp_path / "a")
    new = make_run(tmp_path / "b", seed=2)
    assert condition_differences(base, new) == []
    env = read_environment(new)
    env["scenario"] |= {"network": {"profile": "loopback"}, "percentile": 50}
    env["node"] = "sid"
    (new / ENVIRONMENT).write_text(json.dumps(env))
    assert condition_differences(base, new) == [
        "network profile: 'wan' in the base run, 'loopback' in the new one",
        "node: 'host' in the base run, 'sid' in the new one",
        "percentile: 95 in the base run, 50 in the new one",
    ]


def test_compare_names_another_podman_generation_or_store_under_the_same_name(
    tmp_path: Path,
) -> None:
    """The host's podman upgraded from 4.3 to 5.4 (node "host" in both runs), or the store
    named "default" started as the Go store or with background fetching: compared and gated
    with nothing said, as if the code alone had changed."""
    base = make_run(tmp_path / "a")
    new = make_run(tmp_path / "b", seed=2)
    stores = [{"name": "default", "command": ["stargz-store", "{mountpoint}"]}]
    for run, podman, storage in ((base, "4.3.1", "1.43.0"), (new, "5.4.2", "1.57.1")):
        env = read_environment(run)
        env["node"] = "host"
        env["runtime_versions"] = {"node": "host", "podman": podman}
        env["runtime_versions"] |= {"containers_storage": storage}
        env["scenario"]["stores"] = stores
        (run / ENVIRONMENT).write_text(json.dumps(env))
    assert condition_differences(base, new) == [
        "podman: '4.3.1' in the base run, '5.4.2' in the new one",
        "containers/storage: '1.43.0' in the base run, '1.57.1' in the new one",
    ]
    env = read_environment(new)
    env["runtime_versions"] = {"node": "host", "podman": "4.3.1", "containers_storage": ""}
    go = ["{go-stargz-store}", "{mountpoint}"]
    env["scenario"]["stores"] = [{"name": "default", "command": go, "background_fetch": True}]
    (new / ENVIRONMENT).write_text(json.dumps(env))
    assert condition_differences(base, new) == [
        "store default: command ['stargz-store', '{mountpoint}'] in the base run, "
        "['{go-stargz-store}', '{mountpoint}'] in the new one",
        "store default: background_fetch False in the base run, True in the new one",
    ]
    # Another node is said once, not again as its podman version.
    env["node"] = "sid"
    env["runtime_versions"] = {"node": "sid", "podman": "5.8.6"}
    env["scenario"]["stores"] = stores
    (new / ENVIRONMENT).write_text(json.dumps(env))
    node = "node: 'host' in the base run, 'sid' in the new one"
    assert condition_differences(base, new) == [node]


def test_compare_says_when_store_names_leave_no_lazy_cell_to_pair(tmp_path: Path) -> None:
    """The default benchmark's store is 'default', the side-by-side run's 'ours' and 'go':
    compared, no lazy cell paired and nothing said why."""
    base = make_run(tmp_path / "a")
    new = make_run(tmp_path / "b", seed=2)
    for run, names in ((base, ["default"]), (new, ["ours", "go"])):
        env = read_environment(run)
        env["scenario"]["stores"] = [{"name": n, "command": ["x"]} for n in names]
        (run / ENVIRONMENT).write_text(json.dumps(env))
    assert condition_differences(base, new) == [
        "stores: ['default'] in the base run, ['go', 'ours'] in the new one, so no lazy cell "
        "pairs (a scenario without [[stores]] names its store 'default')"
    ]
    env = read_environment(new)
    env["scenario"]["stores"].append({"name": "default", "command": ["x"]})
    (new / ENVIRONMENT).write_text(json.dumps(env))
    assert condition_differences(base, new) == []


def test_compare_says_when_two_runs_share_no_workload(tmp_path: Path) -> None:
    """Runs of two scenarios with no workload in common: an empty table and every cell
    "missing", with nothing said why."""
    base = make_run(tmp_path / "a")
    new = tmp_path / "b"
    _write_records(new, _record(workload="app"))
    scenario = {"name": "mine", "network": {"profile": "wan"}, "workloads": [{"name": "app"}]}
    (new / ENVIRONMENT).write_text(json.dumps({"scenario": scenario}))
    assert condition_differences(base, new) == [
        "workloads: ['db', 'gcc', 'python'] in the base run, ['app'] in the new one, so no "
        "cell pairs (runs of different scenarios?)"
    ]
    assert condition_differences(base, make_run(tmp_path / "c", seed=2)) == []


def test_resume_refuses_a_scenario_copy_of_another_scenario(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    scenario = read_environment(run)["scenario"]
    (run / SCENARIO_COPY).write_text(json.dumps(scenario))
    assert load_run_scenario(run).name == "synthetic"
    (run / SCENARIO_COPY).write_text(json.dumps(scenario | {"name": "other", "samples": 9}))
    with pytest.raises(UserError, match=r"scenario.json: .*environment.json.*name, samples"):
        load_run_scenario(run)


def test_merge_of_one_run_named_twice_is_refused_as_such(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    with pytest.raises(UserError, match=r"are the same run directory"):
        merge_runs(tmp_path / "out", [run, tmp_path / "." / "run"])
    assert not (tmp_path / "out").exists()


def test_a_stores_metric_that_is_not_finite_is_left_out_of_its_record(tmp_path: Path) -> None:
    """A Prometheus summary with no observations reports NaN quantiles; a record keeps numbers
    it can be read back with."""
    text = (
        b"# TYPE lookup_seconds summary\n"
        b'lookup_seconds{quantile="0.5"} NaN\n'
        b"lookup_seconds_sum 0.0\n"
        b"lookup_seconds_count 0.0\n"
        b"# TYPE hits counter\n"
        b'hits_total{layer="a"} 2.0\n'
        b'hits_total{layer="b"} 3.0\n'
    )

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            store = StoreProcess(workdir=tmp_path)
            store._metrics_address = f"127.0.0.1:{server.server_address[1]}"
            metrics = store.scrape_metrics()
        finally:
            server.shutdown()
    assert metrics == {"lookup_seconds_sum": 0.0, "lookup_seconds_count": 0.0, "hits_total": 5.0}
    check_fields(
        {"sample": 0, "workload": "w", "mode": "legacy", "total_s": 1.0, "store_metrics": metrics}
    )


def test_a_resume_measures_the_images_and_the_code_the_run_started_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C, `git pull`, `--resume`: one cell then held samples of two store versions (or,
    with a recipe changed, two images) under one label."""
    from harness import measure
    from harness.scenario import parse_scenario

    image = {"manifest_digest": "sha256:" + "a" * 64, "layers": 3}
    recorded = {"python": {"estargz": image}}
    measure._check_resumed_images(recorded, {"python": {"estargz": dict(image)}}, tmp_path)
    measure._check_resumed_images(recorded, {"gcc": {"estargz": image}}, tmp_path)  # new ones
    changed = {"python": {"estargz": {**image, "manifest_digest": "sha256:" + "b" * 64}}}
    with pytest.raises(UserError, match=r"the image of python/estargz is not the one this run"):
        measure._check_resumed_images(recorded, changed, tmp_path)

    runner = measure.Runner(parse_scenario({"workloads": [{"recipe": "tiny"}]}, "s"), tmp_path)
    monkeypatch.setattr(measure, "git_commit", lambda: "b8df9b0")
    runner._check_resumed_code({"git_commit": "b8df9b0"})
    runner._check_resumed_code({"git_commit": ""})  # started outside a checkout: not compared
    with pytest.raises(UserError, match=r"started at commit ef5a781, the checkout is at b8df9b0"):
        runner._check_resumed_code({"git_commit": "ef5a781"})


def test_merge_of_two_runs_recording_one_measurement_names_it_and_what_to_merge(
    tmp_path: Path,
) -> None:
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    for run in (a, b):
        (run / SCENARIO_COPY).write_text(json.dumps(read_environment(run)["scenario"]))
    with pytest.raises(UserError) as exc:
        merge_runs(tmp_path / "out", [a, b])
    message = str(exc.value)
    assert re.search(r"merge: sample \d+ of \w+/[\w-]+( \[\w+\])? is recorded in both", message)
    assert "each once" in message and "(0," not in message


def test_the_gate_refuses_runs_of_another_link_or_runtime_and_counts_other_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A loopback run gated against a wan baseline passed green (the difference was a warning
    on stderr, which a CI job's summary does not show): every figure changed with the link.
    Such runs are now not gated (exit 2); differences a gate can live with are counted on the
    ``passed`` line, on stdout."""
    from harness.cli import main

    base = make_run(tmp_path / "a")
    new = make_run(tmp_path / "b")
    passed = re.compile(r"gate .*: passed \((\d+) warnings, above\)\n\Z")
    assert main(["compare", str(base), str(new), "--gate"]) == 0
    out = capsys.readouterr()
    warned = out.err.count("warning: ")
    assert (m := passed.search(out.out)) and int(m[1]) == warned > 0  # noisy cells
    env = read_environment(new)
    env["node"] = "sid"
    (new / ENVIRONMENT).write_text(json.dumps(env))
    assert main(["compare", str(base), str(new), "--gate"]) == 0
    assert (m := passed.search(capsys.readouterr().out)) and int(m[1]) == warned + 1
    for key, value in (("network", {"profile": "loopback"}), ("runtime", "crio")):
        env = read_environment(base)
        env["scenario"][key] = value
        (new / ENVIRONMENT).write_text(json.dumps(env))
        assert main(["compare", str(base), str(new), "--gate"]) == 2
        err = capsys.readouterr().err
        assert "the runs cannot be compared" in err and f"\n  {key}" in err.replace(
            "network profile", "network"
        )
        assert main(["compare", str(base), str(new)]) == 0  # a look without a gate: warned
        capsys.readouterr()
