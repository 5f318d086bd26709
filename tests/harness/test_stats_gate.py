"""Statistics fit for gating, record schema migration, shards and merge — on synthetic records
and on the records committed under results/baselines/ (schema 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.cli import UserError, main
from harness.gate import Gate, compare_runs, compare_table, gate_failures, gate_warnings
from harness.limit import Limit
from harness.merge import merge_runs
from harness.plan import Shard, plan
from harness.records import (
    ENVIRONMENT,
    RECORDS,
    SCENARIO_COPY,
    SCHEMA_VERSION,
    Record,
    append_record,
    migrate,
    read_records,
)
from harness.report import cells_frame, limit_section, ratio_table, write_report
from harness.scenario import parse_scenario
from harness.stats import (
    aggregate,
    bootstrap_interval,
    compare_samples,
    records_frame,
    status_counts,
)

BASELINE = Path(__file__).resolve().parents[2] / "results" / "baselines" / "default"
# A run recorded before records had a schema (the default baseline of an earlier release).
SCHEMA1_RUN = Path(__file__).resolve().parent / "data" / "schema1-run"
SCENARIO = {
    "name": "s",
    "samples": 1,  # write_run plans as many samples as its longest list: a complete run
    "modes": ["legacy", "estargz-noopt"],
    "stores": [{"name": "ours"}, {"name": "go", "command": ["go", "{mountpoint}"]}],
    "workloads": [{"recipe": "python"}, {"recipe": "gcc"}],
}


def recorded(totals: dict[str, list[float]], **changes: object) -> dict[str, object]:
    """:data:`SCENARIO` planning only the cells ``totals`` records (workload python, legacy
    for "", estargz-noopt through the stores named), with ``changes``: a run that records
    every cell it plans, which the gate can pass (a planned cell without a record fails it)."""
    stores = [s for s in SCENARIO["stores"] if s["name"] in totals]
    modes = (["legacy"] if "" in totals else []) + (["estargz-noopt"] if stores else [])
    narrowed = {"workloads": [{"recipe": "python"}], "modes": modes, "stores": stores}
    return SCENARIO | {k: v for k, v in narrowed.items() if v} | changes


def write_run(
    run_dir: Path, totals: dict[str, list[float]], *, scenario=None, **env: object
) -> Path:
    """A run directory whose legacy/lazy cells have the given totals (per store name, "" for
    legacy) for workload python; its scenario (by default the cells it records:
    :func:`recorded`) plans as many samples as the longest list."""
    if scenario is None:
        scenario = recorded(totals)
    run_dir.mkdir(parents=True)
    samples = max([scenario.get("samples", 1), *map(len, totals.values())])
    s = parse_scenario({**scenario, "samples": samples}, "s.toml")
    (run_dir / SCENARIO_COPY).write_text(json.dumps(s.to_dict()))
    (run_dir / ENVIRONMENT).write_text(json.dumps({"scenario": s.to_dict(), **env}))
    for store, values in totals.items():
        for i, v in enumerate(values):
            append_record(
                run_dir,
                Record(
                    i,
                    "python",
                    "legacy" if not store else "estargz-noopt",
                    store=store,
                    pull_s=v - 1,
                    create_s=0.5,
                    run_s=0.5,
                    total_s=v,
                    bytes_fetched=10_000_000,
                    layers_total=3,
                    layers_from_store=3 if store else 0,
                ),
            )
    return run_dir


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.1, 100), min_size=3, max_size=12))
def test_bootstrap_interval_holds_the_median(values: list[float]) -> None:
    lo, hi = bootstrap_interval(values, lambda x, axis=-1: np.median(x, axis=axis))
    assert lo - 1e-9 <= float(np.median(values)) <= hi + 1e-9


def test_bootstrap_needs_three_samples() -> None:
    assert all(np.isnan(bootstrap_interval([1.0, 2.0], np.median)))


def test_compare_samples_tells_a_shift_from_noise() -> None:
    base = [10.0, 10.2, 9.9, 10.1, 10.0]
    slow = [13.0, 13.1, 12.9, 13.2, 13.0]
    ch = compare_samples(base, slow)
    assert ch.delta == pytest.approx(3.0) and ch.lo > 0 and ch.p_value < 0.01
    noisy = [5.0, 20.0, 9.0, 16.0, 11.0]
    assert compare_samples(base, noisy).p_value > 0.05


@pytest.mark.parametrize(
    ("base", "new", "p_one", "p_two"),
    [
        # Bytes fetched tie (a deterministic count): scipy's "auto" took the normal
        # approximation, 0.033 and 0.067, where counting the 252 arrangements gives 21 / 252.
        ([1, 1, 1, 2, 2], [2] * 5, 21 / 252, 42 / 252),
        # 3 a side set apart: 1 / C(6, 3) = 0.05 is the least any arrangement gives (0.023).
        ([1, 1, 1], [2, 2, 2], 1 / 20, 2 / 20),
        ([1, 1], [2, 2, 2], 1 / 10, 2 / 10),
        # Without ties the exact test as before.
        ([1.0, 1.1, 1.2, 1.3, 1.4], [1.5, 1.6, 1.7, 1.8, 1.9], 1 / 252, 2 / 252),
    ],
)
def test_mann_whitney_p_values_are_exact_for_few_samples_with_ties(
    base: list[float], new: list[float], p_one: float, p_two: float
) -> None:
    """The p-values compare_samples gives (and the gate tests against alpha) are the exact
    permutation p-values of the Mann–Whitney U statistic, ties included."""
    from scipy import stats as sps

    exact = sps.permutation_test(
        (np.asarray(new, float), np.asarray(base, float)),
        lambda x, y, axis=-1: sps.mannwhitneyu(x, y, axis=axis).statistic,
        permutation_type="independent",
        alternative="greater",
        n_resamples=np.inf,
        vectorized=True,
    ).pvalue
    ch = compare_samples(base, new)
    assert ch.p_value == pytest.approx(p_one) == pytest.approx(exact)
    assert ch.p_value_two_sided == pytest.approx(p_two)


def test_a_tied_byte_count_past_the_threshold_but_not_significant_passes(tmp_path: Path) -> None:
    """A cell whose base fetched 22.2 MB three times and 27.2 MB twice, and whose new run
    fetched 27.2 MB every time: the gate failed it, "p = 0.033", from the normal
    approximation; exactly, p = 0.083 > alpha."""
    base = write_run(tmp_path / "a", {"": [30] * 5, "ours": [5] * 5})
    new = write_run(tmp_path / "b", {"": [30] * 5, "ours": [5] * 5})
    for run, fetched in ((base, [22.2, 22.2, 22.2, 27.2, 27.2]), (new, [27.2] * 5)):
        lines = []
        for line in (run / RECORDS).read_text().splitlines():
            rec = json.loads(line)
            if rec["store"] == "ours":
                rec["bytes_fetched"] = int(fetched[rec["sample"]] * 1e6)
            lines.append(json.dumps(rec))
        (run / RECORDS).write_text("\n".join(lines) + "\n")
    cmp = compare_runs(base, new)
    ours = cmp.set_index("store").loc["ours"]
    assert ours["mb_delta"] == pytest.approx(5.0) and ours["mb_p_value"] == pytest.approx(21 / 252)
    assert gate_failures(cmp, Gate()) == []
    assert gate_failures(cmp, Gate(alpha=0.09))[0].startswith(
        "python/estargz-noopt [ours]: fetched 22.2 MB → 27.2 MB (+23% > 10%, p = 0.083)"
    )


def test_gate_fails_only_on_significant_changes_past_the_threshold(tmp_path: Path) -> None:
    legacy = [30, 30.5, 29.8, 30.2, 30.1]
    base = write_run(tmp_path / "a", {"": legacy, "ours": [5, 5.1, 4.9, 5.0, 5.05]})
    slow = write_run(tmp_path / "b", {"": legacy, "ours": [9, 9.2, 9.1, 8.9, 9.05]})
    # As slow in the median, but two samples are fast: not significant, so the gate passes.
    noisy = write_run(tmp_path / "c", {"": legacy, "ours": [9, 4.9, 9.2, 9.1, 4.95]})
    gate = Gate()
    problems = gate_failures(compare_runs(base, slow), gate)
    assert len(problems) == 1 and "python/estargz-noopt [ours]: total" in problems[0]
    assert "p = 0.00" in problems[0] and "95% CI" in problems[0]
    cmp = compare_runs(base, noisy)
    assert cmp.set_index("store").loc["ours", "total_delta_s"] > 3
    assert gate_failures(cmp, gate) == []
    wild = write_run(tmp_path / "d", {"": legacy, "ours": [2, 9, 15, 30, 22]})
    warnings = gate_warnings(compare_runs(base, wild))
    assert warnings == [
        "python/estargz-noopt [ours]: too few samples or too wide a spread to tell a change "
        "from noise (5 base, 5 new samples)"
    ]


def test_gate_fails_on_a_fallback(tmp_path: Path) -> None:
    base = write_run(tmp_path / "a", {"": [30, 30, 30], "ours": [5, 5, 5]})
    new = write_run(tmp_path / "b", {"": [30, 30, 30], "ours": [5, 5]})
    append_record(
        new,
        Record(2, "python", "estargz-noopt", store="ours", status="fell-back", total_s=31,
               error="3 of 3 layers not from the store", layers_total=3, layers_from_store=0),
    )  # fmt: skip
    problems = gate_failures(compare_runs(base, new), Gate())
    assert problems == [
        "python/estargz-noopt [ours]: 1 of 3 measurements fell back to a full pull: "
        "3 of 3 layers not from the store"
    ]


def test_fallbacks_of_the_base_run_are_named_not_dropped(tmp_path: Path) -> None:
    """A base run whose lazy measurements fell back has no figure (or a thinner one) for the
    cell: the compare showed "–" with no note and the gate passed a new run twice as slow
    there, saying nothing."""
    legacy = [30, 30.5, 29.8, 30.2, 30.1]
    base = write_run(tmp_path / "a", {"": legacy, "ours": [5, 5.1, 5, 4.9, 5]})
    new = write_run(tmp_path / "b", {"": legacy, "ours": [10, 10.1, 9.9, 10.2, 10]})
    _append_fell_back(base, 3)
    cmp = compare_runs(base, new)
    assert "base fell back 3" in compare_table(cmp)
    assert gate_warnings(cmp)[0] == (
        "python/estargz-noopt [ours]: 3 of 5 base measurements fell back to a full pull and "
        "are not in the base figure"
    )
    _append_fell_back(base, 5)  # now every base measurement of the cell fell back
    cmp = compare_runs(base, new)
    assert gate_failures(cmp, Gate()) == []  # the new run's own measurements are fine...
    assert gate_warnings(cmp) == [  # ...but nothing of it was compared, and that is said
        "python/estargz-noopt [ours]: 5 of 5 base measurements fell back to a full pull and "
        "are not in the base figure; with no base figure, no change of this cell is tested"
    ]


def test_old_records_migrate_and_the_committed_baseline_still_reads(tmp_path: Path) -> None:
    old = {"sample": 0, "workload": "w", "mode": "estargz", "status": "ok", "total_s": 1.0}
    assert migrate(old)["store"] == "default" and migrate(old)["schema"] == SCHEMA_VERSION
    assert migrate({**old, "mode": "legacy"})["store"] == ""
    with pytest.raises(ValueError, match="newer than this lazybench reads"):
        migrate({**old, "schema": SCHEMA_VERSION + 1})
    for source in (SCHEMA1_RUN, BASELINE):
        run = tmp_path / source.name
        shutil.copytree(source, run)
        if source is SCHEMA1_RUN:
            assert "schema" not in (run / RECORDS).read_text().splitlines()[0]
        records = read_records(run)
        assert {r.store for r in records if r.mode.startswith("estargz")} == {"default"}
        report = write_report(run)
        assert report.missing == []
        problems = gate_failures(compare_runs(source, run), Gate())
        if source is SCHEMA1_RUN:  # recorded before the laziness verdict: no lazy figure
            assert problems and all("carry no laziness verdict" in p for p in problems)
        else:
            assert problems == []
    assert "not checked" in (tmp_path / SCHEMA1_RUN.name / "table.md").read_text()


def test_gate_fails_on_failed_and_on_unchecked_lazy_measurements(tmp_path: Path) -> None:
    """Four of five samples that failed left one ok sample, and no test can call one sample
    a slow-down: the gate passed. A lazy record without a verdict passed as a lazy figure."""
    six = recorded({"": [], "ours": []}, samples=6)  # samples 0 to 5 are recorded
    base = write_run(tmp_path / "a", {"": [30] * 6, "ours": [5] * 5}, scenario=six)
    new = write_run(tmp_path / "b", {"": [30] * 6, "ours": [5]}, scenario=six)
    for sample in range(1, 5):
        append_record(
            new,
            Record(sample, "python", "estargz-noopt", store="ours", status="error",
                   error="run: no ready line within 60s"),
        )  # fmt: skip
    append_record(new, Record(5, "python", "estargz-noopt", store="ours", total_s=5.0))
    # Written at the current schema, a lazy record marked ok without a verdict is read as
    # fell back (only schema-1 records, from before the verdict, are "not checked").
    assert gate_failures(compare_runs(base, new), Gate()) == [
        "python/estargz-noopt [ours]: 1 of 2 measurements fell back to a full pull: "
        "recorded as ok, but carries no laziness verdict (layers_total)",
        "python/estargz-noopt [ours]: 4 of 6 measurements failed: run: no ready line within 60s",
    ]


def test_gate_fails_on_a_run_with_planned_measurements_unrecorded(tmp_path: Path) -> None:
    """A run (or a shard merged with the others) killed after 2 of its 5 samples had a cell of
    every kind, fewer samples each: its report said "Incomplete", yet the gate passed it."""
    five = recorded({"": [], "ours": []}, samples=5)
    base = write_run(tmp_path / "a", {"": [30] * 5, "ours": [5] * 5}, scenario=five)
    new = write_run(tmp_path / "b", {"": [30] * 2, "ours": [5] * 2}, scenario=five)
    assert gate_failures(compare_runs(base, new), Gate()) == [
        f"python/{mode}: 3 of 5 planned measurements have no record (the run or a shard of "
        "it was interrupted or killed part way: finish it with `lazybench run --resume "
        "RUN_DIR`)"
        for mode in ("legacy", "estargz-noopt [ours]")
    ]
    # fail_on_missing = false lets an incomplete run through, as it does a missing cell.
    assert gate_failures(compare_runs(base, new), Gate(fail_on_missing=False)) == []
    # Cells the new run planned but recorded nothing of are the missing-cell check's.
    complete = write_run(tmp_path / "c", {"": [30] * 5, "ours": [5] * 5}, scenario=five)
    assert gate_failures(compare_runs(base, complete), Gate()) == []


def test_gate_fails_on_a_planned_cell_with_no_record_and_no_base_figure(tmp_path: Path) -> None:
    """A cell of the new run's plan with no record at all passed the gate when the base run
    had no figure for it to be "missing" from: every base measurement of it fell back, or the
    base run never planned it (a workload the new scenario adds). The report said
    "Incomplete"."""
    plan5 = recorded({"": [], "ours": []}, samples=5)
    base = write_run(tmp_path / "a", {"": [30] * 5}, scenario=plan5)
    _append_fell_back(base, 5)
    new = write_run(tmp_path / "b", {"": [30] * 5}, scenario=plan5)  # no ours record
    cmp = compare_runs(base, new)
    assert gate_failures(cmp, Gate()) == [
        "python/estargz-noopt [ours]: 5 of 5 planned measurements have no record (the run or "
        "a shard of it was interrupted or killed part way: finish it with `lazybench run "
        "--resume RUN_DIR`)"
    ]
    assert gate_failures(cmp, Gate(fail_on_missing=False)) == []
    complete = write_run(tmp_path / "c", {"": [30] * 5, "ours": [5] * 5}, scenario=plan5)
    assert gate_failures(compare_runs(base, complete), Gate()) == []

    both = recorded({"": [], "ours": []}, samples=5)
    both["workloads"] = [{"recipe": "python"}, {"recipe": "gcc"}]
    base = write_run(tmp_path / "d", {"": [30] * 5, "ours": [5] * 5}, scenario=plan5)
    new = write_run(tmp_path / "e", {"": [30] * 5, "ours": [5] * 5}, scenario=both)
    problems = gate_failures(compare_runs(base, new), Gate())
    assert [p.split(":")[0] for p in problems] == ["gcc/legacy", "gcc/estargz-noopt [ours]"]
    assert all("5 of 5 planned measurements have no record" in p for p in problems)


def test_merge_refuses_shards_measured_at_different_commits(tmp_path: Path) -> None:
    """Shard 1 at one commit and shard 2 at another merged in silence: the merged run's report
    named the first commit only, and the gate judged two versions of the code as one run (a
    resume at another commit is refused for the same reason)."""
    a = write_run(tmp_path / "a", {"": [30]}, scenario=SCENARIO, shard="1/2", git_commit="aaa1")
    b = write_run(tmp_path / "b", {"ours": [5]}, scenario=SCENARIO, shard="2/2", git_commit="bbb2")
    with pytest.raises(UserError, match=r"measured at commit aaa1 and .*b at bbb2; only shards"):
        merge_runs(tmp_path / "out", [a, b])
    assert not (tmp_path / "out").exists()
    # A run outside a git checkout records no commit: nothing to compare it with.
    c = write_run(tmp_path / "c", {"ours": [5]}, scenario=SCENARIO, shard="2/2", git_commit="")
    merge_runs(tmp_path / "out", [a, c])
    assert len(read_records(tmp_path / "out")) == 2


def test_shards_are_disjoint_and_together_the_plan() -> None:
    s = parse_scenario(SCENARIO, "s.toml")
    parts = [plan(s, Shard(k, 3)) for k in (1, 2, 3)]
    assert sorted(k for part in parts for k in part) == sorted(plan(s))
    assert len(set(parts[0]) & set(parts[1])) == 0
    assert plan(s, Shard(2, 3)) == parts[1]  # deterministic
    for bad in ("0/2", "3/2", "x", "1-2"):
        with pytest.raises(UserError, match="--shard: expected K/N"):
            Shard.parse(bad)


def test_merge_refuses_shards_of_different_scenarios(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", {"": [30]}, scenario=SCENARIO, shard="1/2")
    other = {**SCENARIO, "samples": 5}
    b = write_run(tmp_path / "b", {"ours": [5]}, scenario=other, shard="2/2")
    with pytest.raises(UserError, match=r"are runs of different scenarios .*differ in: samples"):
        merge_runs(tmp_path / "out", [a, b])
    assert not (tmp_path / "out").exists()
    again = write_run(tmp_path / "c", {"go": [6]}, scenario=SCENARIO, shard="1/2")
    with pytest.raises(UserError, match="are both shard 1/2"):
        merge_runs(tmp_path / "out", [a, again])


def test_merge_marks_different_machines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = write_run(
        tmp_path / "a", {"": [30, 31, 30]}, scenario=SCENARIO, shard="1/2", host="m1", cpu="x"
    )
    b = write_run(
        tmp_path / "b", {"ours": [5, 5, 6]}, scenario=SCENARIO, shard="2/2", host="m2", cpu="x"
    )
    (b / "timeline").mkdir()
    summary = {"pull_s": 1.0, "store_s": 0.4, "runtime_s": 0.6, "layers": 1}
    doc = {"workload": "w", "mode": "estargz", "store": "ours", "summary": summary}
    (b / "timeline" / "w-estargz-ours.json").write_text(json.dumps(doc))
    assert main(["merge", str(tmp_path / "out"), str(a), str(b)]) == 0
    assert (tmp_path / "out" / "timeline" / "w-estargz-ours.json").exists()
    assert (
        "| w | estargz | ours | 1.000 | 0.400 | 0.600 | – |"
        in (tmp_path / "out" / "report.md").read_text()
    )
    env = json.loads((tmp_path / "out" / ENVIRONMENT).read_text())
    assert env["machines_differ"] is True and [s["host"] for s in env["shards"]] == ["m1", "m2"]
    assert "shard" not in env
    assert "different machines" in capsys.readouterr().err
    assert "different machines" in (tmp_path / "out" / "report.md").read_text()
    assert len(read_records(tmp_path / "out")) == 6


def test_stores_keep_the_scenario_order_whatever_the_record_order(tmp_path: Path) -> None:
    # "ours" is the scenario's first store; the records list "go" first.
    run = write_run(tmp_path / "a", {"": [30, 31, 30], "go": [6, 6, 6.2], "ours": [5, 5, 5.1]})
    report = write_report(run)
    assert [r["store"] for r in report.stores] == ["ours", "go"]
    assert report.stores[1]["ratio_median"] == pytest.approx(1.2)
    assert report.table_text.index("· ours") < report.table_text.index("· go")
    cmp = compare_runs(run, run)
    assert list(cmp["store"]) == ["", "ours", "go"]


def test_an_old_run_directory_resumes_with_nothing_left_to_measure(tmp_path: Path) -> None:
    from harness.measure import Runner, load_run_scenario

    run = tmp_path / "base"
    shutil.copytree(SCHEMA1_RUN, run)
    assert '"store"' in (run / SCENARIO_COPY).read_text()  # the old single-store form
    assert Runner(load_run_scenario(run), run, show_progress=False).run() == []


def _append_fell_back(run: Path, samples: int) -> None:
    """``samples`` python/estargz-noopt measurements through `ours` that fell back."""
    for sample in range(samples):
        append_record(
            run,
            Record(sample, "python", "estargz-noopt", store="ours", status="fell-back",
                   total_s=31, error="3 of 3 layers not from the store", layers_total=3,
                   layers_from_store=0),
        )  # fmt: skip


def _first_store_fell_back(tmp_path: Path) -> Path:
    """python: legacy 30 s, every `ours` measurement fell back, `go` 6 s lazily."""
    run = write_run(tmp_path / "run", {"": [30] * 4, "go": [6] * 4}, scenario=SCENARIO)
    _append_fell_back(run, 4)
    return run


def test_the_ratio_is_the_named_first_stores_even_when_it_only_fell_back(tmp_path: Path) -> None:
    """The ratio table says "through the first store (ours)"; it took the first store with an
    ok figure, go's 0.20, when every one of ours fell back."""
    report = write_report(_first_store_fell_back(tmp_path))
    assert report.stores[0]["store"] == "ours"
    assert [r["estargz-noopt"] for r in report.ratios] == [None]


def test_the_limit_verdict_counts_a_lazy_cell_that_only_fell_back(tmp_path: Path) -> None:
    run = _first_store_fell_back(tmp_path)
    records = read_records(run)
    df = records_frame(records)
    counts = status_counts(records)
    cells = cells_frame(aggregate(df, 95), counts[counts["ok"] + counts["fell_back"] > 0])
    limit = Limit(3_000_000, 100.0, 40.0, 6.0, floor_repull=True)  # go is within 1.5×
    row = next(line for line in limit_section(cells, {"python": limit}, 95) if "| python" in line)
    assert row.rstrip().endswith("| no |"), row


def test_a_lazy_cell_with_some_fallbacks_is_not_within_the_limit_nor_at_published(
    tmp_path: Path,
) -> None:
    """One of ours' four starts fell back to a full pull, the other three were fast: the limit
    section said "yes" (within 1.5×) and the ratio table "at or below published: yes", from
    the three alone, nothing in either saying a start was a full pull."""
    run = write_run(tmp_path / "run", {"": [30] * 4, "ours": [3] * 4})
    _append_fell_back(run, 1)
    records = read_records(run)
    counts = status_counts(records)
    cells = cells_frame(aggregate(records_frame(records), 95), counts)
    limit = Limit(3_000_000, 100.0, 40.0, 3.0, floor_repull=True)  # ours' 3 s within 1.5×
    row = next(line for line in limit_section(cells, {"python": limit}, 95) if "| python" in line)
    assert "× (1 of 4 fell back) | no |" in row, row
    report = write_report(run)
    (ratio,) = report.ratios
    assert ratio["estargz-noopt"] == pytest.approx(0.1)
    assert ratio["estargz-noopt_fell_back"] == " (1 of 4 fell back)"
    text = report.report.read_text()
    assert "| 0.10 (1 of 4 fell back) |" in text
    row = {"workload": "python", "published_image": "python:3.7", "estargz": 0.1}
    row |= {"published_estargz": 0.11, "estargz_fell_back": " (1 of 4 fell back)"}
    row |= {"estargz-noopt": None, "published_estargz-noopt": None, "zstd-chunked": None}
    assert "| **0.10** (1 of 4 fell back) | 0.11 |" in ratio_table([row])
    assert ratio_table([row]).rstrip().endswith("| no |")  # not "yes": 0.10 ≤ 0.11 of three


def test_a_run_whose_every_measurement_fell_back_is_reported(tmp_path: Path) -> None:
    """No ok measurement, so no aggregate columns: the chart once failed on ``total_p``."""
    run = write_run(tmp_path / "run", {}, scenario={**SCENARIO, "samples": 2})
    _append_fell_back(run, 2)
    write_report(run)
    assert (run / "chart.svg").exists()
    assert "fell back" in (run / "report.md").read_text()


def test_a_run_whose_every_measurement_failed_still_gets_a_report_listing_them(
    tmp_path: Path,
) -> None:
    """The README promises report.md lists failures; with nothing ok there was none."""
    run = write_run(tmp_path / "run", {})
    append_record(
        run, Record(0, "python", "legacy", status="error", error="run: no ready line 'x'")
    )
    with pytest.raises(UserError, match=r"no successful measurements.*lists the 1 failures"):
        write_report(run)
    report = (run / "report.md").read_text()
    assert "## Failed measurements" in report
    assert "- sample 0 python/legacy: run: no ready line 'x'" in report
    assert not list(run.glob(".report-*"))  # the staging directory is gone


def test_compare_takes_gate_before_the_run_directories(tmp_path: Path, capsys) -> None:
    """``compare --gate BASE NEW``, flags first as podman users write them: BASE is a run
    directory, not the gate's file; the other orders keep working as before."""
    from harness.cli import main

    base = write_run(tmp_path / "a", {"": [30, 30.5, 29.8, 30.2], "ours": [5, 5.1, 4.9, 5.0]})
    slow = write_run(tmp_path / "b", {"": [30, 30.5, 29.8, 30.2], "ours": [9, 9.2, 9.1, 8.9]})
    assert main(["compare", "--gate", str(base), str(slow)]) == 1
    assert "FAILED" in capsys.readouterr().err
    assert main(["compare", str(base), str(slow), "--gate"]) == 1
    assert main(["compare", "--gate", str(base), str(base)]) == 0
    assert main(["compare", str(base), "--statistic", "median", str(slow)]) == 0
    assert "(median)" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # one run directory: argparse's usage error, as before
        main(["compare", str(base)])


def test_compare_tells_runs_it_cannot_compare_from_a_failed_gate(tmp_path: Path, capsys) -> None:
    """A failed gate exits 1; runs that cannot be compared (a missing run directory, a bad
    gate file) exit 2, each naming what was wrong. Both were 1, so a CI job gating on the
    status took a typo in its baseline path for a performance regression."""
    from harness.cli import main

    base = write_run(tmp_path / "a", {"": [30, 30.5, 29.8, 30.2], "ours": [5, 5.1, 4.9, 5.0]})
    missing = tmp_path / "no-such-run"
    assert main(["compare", str(base), str(missing), "--gate"]) == 2
    assert str(missing) in capsys.readouterr().err
    bad_gate = tmp_path / "gate.toml"
    bad_gate.write_text("alpha = 7\n")
    assert main(["compare", str(base), str(base), f"--gate={bad_gate}"]) == 2
    assert f"{bad_gate}: alpha" in capsys.readouterr().err
    assert main(["compare", str(base), str(missing)]) == 2  # without a gate as well


@pytest.mark.parametrize(
    ("new", "statistic"), [([9.0, 9.1], "median"), ([9.0, 9.1, 9.2, 9.0, 9.1], "percentile")]
)
def test_a_gate_failure_names_no_interval_it_does_not_have(
    tmp_path: Path, new: list[float], statistic: str
) -> None:
    """With 2 new samples (or a percentile of 5), the change has no interval: the failure
    read "Δ 95% CI [+nan, +nan] s"."""
    legacy = [30, 30.5, 29.8, 30.2, 30.1]
    base = write_run(tmp_path / "a", {"": legacy, "ours": [4.0, 4.1, 4.2, 4.0, 4.0]})
    slow = write_run(tmp_path / "b", {"": legacy[: len(new)], "ours": new})
    (problem,) = gate_failures(compare_runs(base, slow, statistic), Gate())
    assert "python/estargz-noopt [ours]: total 4." in problem and "p = 0.0" in problem
    assert "nan" not in problem and "CI" not in problem


def test_a_cell_whose_every_measurement_failed_keeps_its_row(tmp_path: Path) -> None:
    """table.md left out a cell where every measurement failed (a fell-back one kept its
    row), so a mode that never started read as one the run did not plan; a partly failed
    cell showed a smaller sample count only. The limit verdict counts the failed lazy cell."""
    run = write_run(
        tmp_path / "run", {"": [30] * 2, "ours": [5]}, scenario={**SCENARIO, "samples": 2}
    )
    append_record(run, Record(1, "python", "estargz-noopt", store="ours", status="error",
                              error="the workload exited 1"))  # fmt: skip
    for sample in range(2):
        append_record(run, Record(sample, "python", "estargz-noopt", store="go", status="error",
                                  error="no ready line"))  # fmt: skip
    write_report(run)
    table = (run / "table.md").read_text()
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert "| 0 | **2 failed** |" in rows["| estargz-noopt · go"], table
    assert "| 1 | yes · **1 failed** |" in rows["| estargz-noopt · ours"], table
    assert "| 2 |  |" in rows["| legacy"], table
