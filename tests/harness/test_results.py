"""Records, statistics, table, chart, report and compare/gate on synthetic records."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from harness.cli import UserError
from harness.gate import Gate, compare_runs, gate_failures, load_gate
from harness.records import ENVIRONMENT, RECORDS, Record, append_record, finished_keys, read_records
from harness.report import write_report
from harness.stats import aggregate, records_frame

WORKLOADS = [
    {"name": "python", "recipe": "python"},
    {"name": "gcc", "recipe": "gcc"},
    {"name": "db", "recipe": "postgres", "reference": "rethinkdb:2.3.6"},
]
MODES = ["legacy", "estargz-noopt", "estargz"]


def make_run(run_dir: Path, samples: int = 3, slow: float = 1.0, seed: int = 1) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    scenario = {
        "name": "synthetic",
        "samples": samples,
        "percentile": 95,
        "modes": MODES,
        "network": {"profile": "wan"},
        "workloads": WORKLOADS,
    }
    (run_dir / ENVIRONMENT).write_text(json.dumps({"scenario": scenario, "kernel": "6.1"}))
    for s in range(samples):
        for w in WORKLOADS:
            for m in MODES:
                pull = {"legacy": 10.0, "estargz-noopt": 1.0, "estargz": 0.8}[m] * slow
                run = {"legacy": 0.2, "estargz-noopt": 2.0, "estargz": 0.6}[m] * slow
                jitter = rnd.uniform(0.9, 1.1)
                append_record(
                    run_dir,
                    Record(
                        sample=s,
                        workload=w["name"],
                        mode=m,
                        store="" if m == "legacy" else "default",
                        pull_s=pull * jitter,
                        create_s=0.5,
                        run_s=run,
                        total_s=pull * jitter + 0.5 + run,
                        bytes_fetched=int(
                            {"legacy": 100e6, "estargz-noopt": 20e6, "estargz": 25e6}[m]
                        ),
                        bytes_before_first_output=int(5e6),
                        requests=3,
                        # the laziness verdict: every layer from the store
                        **({} if m == "legacy" else {"layers_total": 2, "layers_from_store": 2}),
                    ),
                )
    return run_dir


def test_records_survive_a_torn_last_line_and_last_record_wins(tmp_path: Path) -> None:
    append_record(tmp_path, Record(0, "w", "legacy", status="error", error="boom"))
    append_record(tmp_path, Record(0, "w", "legacy", total_s=1.0))
    append_record(tmp_path, Record(1, "w", "legacy", status="error", error="boom"))
    with (tmp_path / RECORDS).open("a") as f:
        f.write('{"sample": 2, "workl')  # the process died mid-write
    records = read_records(tmp_path)
    assert [(r.key, r.status) for r in records] == [
        ((0, "w", "legacy", ""), "ok"),
        ((1, "w", "legacy", ""), "error"),
    ]
    assert finished_keys(tmp_path) == {(0, "w", "legacy", "")}


def test_aggregate_medians_percentiles_and_order(tmp_path: Path) -> None:
    make_run(tmp_path)
    agg = aggregate(records_frame(read_records(tmp_path)), 95)
    assert list(agg["workload"].unique()) == ["python", "gcc", "db"]
    assert list(agg["mode"][:3]) == MODES
    assert (agg["n"] == 3).all()
    legacy = agg[(agg["workload"] == "gcc") & (agg["mode"] == "legacy")].iloc[0]
    assert legacy["total_min"] <= legacy["total_median"] <= legacy["total_p"] <= legacy["total_max"]
    assert legacy["mb_fetched_median"] == pytest.approx(100.0)


def test_report_writes_table_chart_and_ratios(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    report = write_report(run)
    table = (run / "table.md").read_text()
    for w in WORKLOADS:
        assert f"### {w['name']}" in table
    assert table.count("| legacy |") == 3 and table.count("| estargz |") == 3
    assert "| mode | pull" in table and "MB fetched" in table
    for chart in report.charts:
        assert chart.stat().st_size > 1000
    assert {c.suffix for c in report.charts} == {".png", ".svg"}
    text = (run / "report.md").read_text()
    assert "estargz ÷ legacy" in text and "python:3.7" in text and "rethinkdb:2.3.6" in text
    by_name = {r["workload"]: r for r in report.ratios}
    assert by_name["python"]["published_estargz"] == pytest.approx(4.1 / 37.1)
    assert by_name["db"]["published_image"] == "rethinkdb:2.3.6"
    assert 0.1 < by_name["gcc"]["estargz"] < 0.2
    assert report.missing == []
    assert (run / "summary.csv").read_text().startswith("workload,mode,store,n,")


def test_report_sets_zstd_chunked_lazy_against_estargz_noopt(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    assert "zstd:chunked through the store" not in write_report(run).report.read_text()
    # A run that measures zstd-chunked-lazy too, for python and gcc.
    env = json.loads((run / ENVIRONMENT).read_text())
    env["scenario"]["modes"] = [*MODES, "zstd-chunked-lazy"]
    env["scenario"]["workloads"][2]["modes"] = MODES
    (run / ENVIRONMENT).write_text(json.dumps(env))
    for s in range(3):
        for w, slow in (("python", 1.0), ("gcc", 2.0)):
            append_record(
                run,
                Record(
                    sample=s,
                    workload=w,
                    mode="zstd-chunked-lazy",
                    store="default",
                    pull_s=1.0,
                    create_s=0.5,
                    run_s=2.0 * slow,
                    total_s=1.0 + 0.5 + 2.0 * slow,
                    bytes_fetched=int(20e6),
                    bytes_before_first_output=int(5.5e6),
                    requests=3,
                    layers_total=2,
                    layers_from_store=2,
                ),
            )
    text = write_report(run).report.read_text()
    section = text.split("## zstd:chunked through the store")[1]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines()}
    # estargz-noopt's totals are 3.4-3.6 s (jitter on the pull), python's zstd ones 3.5 s.
    assert rows["python"].endswith("| 1.10 | yes |")
    assert rows["gcc"].endswith("| 1.10 | no |")  # 5.5 s against ~3.5 s
    assert "| db |" not in section  # no zstd-chunked-lazy measured there


def test_report_names_missing_measurements(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    lines = (run / RECORDS).read_text().splitlines()
    (run / RECORDS).write_text("\n".join(lines[:-2]) + "\n")
    report = write_report(run)
    assert len(report.missing) == 2
    text = (run / "report.md").read_text()
    # Under the header's measurement count it qualifies, not after every section.
    header, _, rest = text.partition("## Time to first exec")
    assert "**Incomplete**: 2 planned measurements have no record" in header, header
    assert "Incomplete" not in rest


def test_compare_and_gate(tmp_path: Path) -> None:
    base = make_run(tmp_path / "a")
    same = make_run(tmp_path / "b", seed=2)
    slow = make_run(tmp_path / "c", slow=2.0)
    gate = Gate()
    assert gate_failures(compare_runs(base, same), gate) == []
    problems = gate_failures(compare_runs(base, slow), gate)
    assert any("python/legacy: total" in p for p in problems)
    ratio_gate = Gate(max_ratio={"estargz": 0.05})
    assert any("estargz ÷ legacy" in p for p in gate_failures(compare_runs(base, same), ratio_gate))


def test_gate_file_is_checked(tmp_path: Path) -> None:
    assert load_gate().statistic in ("median", "percentile")
    bad = tmp_path / "gate.toml"
    bad.write_text("[total]\nmax_increase_pct = 'lots'\n")
    with pytest.raises(UserError, match=r"gate.toml: total.max_increase_pct: must be a number"):
        load_gate(bad)


def test_report_on_a_non_run_dir_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a run directory"):
        write_report(tmp_path)


def test_repull_fields_round_trip_and_records_without_them_still_read(tmp_path: Path) -> None:
    append_record(tmp_path, Record(0, "w", "legacy", total_s=1.0, repull_s=0.37, repull_requests=3))
    old = json.loads(Record(1, "w", "legacy", total_s=1.0).to_json())
    for key in ("repull_s", "repull_requests"):
        del old[key]  # a record written before the re-pull
    with (tmp_path / RECORDS).open("a") as f:
        f.write(json.dumps(old) + "\n")
    new, before = read_records(tmp_path)
    assert (new.repull_s, new.repull_requests) == (0.37, 3)
    assert (before.repull_s, before.repull_requests) == (None, None)
    assert records_frame([new, before])["repull_s"].isna().tolist() == [False, True]


def test_table_md_says_what_its_warning_sign_means_and_an_empty_range_is_one_dash(
    tmp_path: Path,
) -> None:
    """table.md used ⚠ without the legend report.md has; a cell with no successful sample
    (every pull fell back) showed its min–max as `–––`."""
    from harness.report import WIDE_LEGEND

    run = make_run(tmp_path / "run", samples=2)
    for s in range(2):  # gcc/estargz: both samples fell back, no figures
        append_record(
            run,
            Record(
                s,
                "gcc",
                "estargz",
                store="default",
                status="fell-back",
                error="x",
                pull_s=1.0,
                create_s=0.1,
                run_s=0.1,
                total_s=1.2,
            ),
        )
    append_record(  # its last record wins: one cell spread too wide to tell anything
        run,
        Record(1, "python", "legacy", pull_s=90.0, create_s=0.5, run_s=0.2, total_s=90.7),
    )
    report = write_report(run)
    table = (run / "table.md").read_text()
    assert "⚠" in table and table.rstrip().endswith(WIDE_LEGEND)
    assert WIDE_LEGEND in report.table_text
    (row,) = [
        line
        for line in table.splitlines()
        if line.startswith("| estargz") and "fell back 2/2" in line
    ]
    assert "–––" not in row and "| – |" in row
    text = (run / "report.md").read_text()
    assert WIDE_LEGEND not in text and "⚠ Too few samples" in text


def test_report_of_a_run_cut_short_says_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lazybench report` of an interrupted run printed its partial table and exited 0: that
    the figures were of part of the run stood only in report.md."""
    from harness.cli import main

    run_dir = make_run(tmp_path / "run", samples=3)
    lines = (run_dir / RECORDS).read_text().splitlines(keepends=True)
    (run_dir / RECORDS).write_text("".join(lines[:-2]))  # the last two never finished
    assert main(["report", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "lazybench: 2 planned measurements have no record" in err
    assert f"lazybench run --resume {run_dir}" in err
    whole = make_run(tmp_path / "whole", samples=3)
    assert main(["report", str(whole)]) == 0
    assert capsys.readouterr().err == ""


def test_report_of_a_run_stopped_before_its_first_record_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run interrupted before its first measurement finished keeps its scenario.json only:
    "no records.jsonl here (not a run directory?)" sent its owner looking for another."""
    from harness.cli import main
    from harness.records import SCENARIO_COPY

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / SCENARIO_COPY).write_text("{}")
    assert main(["report", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "no measurement of this run finished" in err and "not a run directory" not in err
    assert f"lazybench run --resume {run_dir}" in err
