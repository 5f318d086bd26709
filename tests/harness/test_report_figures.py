"""The figures a report prints, checked against the records they come from: table, chart and
report say the same numbers, and each says which statistic it is."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness.limit import Limit
from harness.records import ENVIRONMENT, Record, append_record
from harness.report import limit_section, ratio_table, write_report, zstd_lazy_lines
from harness.stats import aggregate, compare_samples, quantile_interval, ratio_of

CELL = {"workload": "w", "mode": "legacy", "store": ""}
METRICS = ["pull_s", "create_s", "run_s", "total_s", "mb_fetched", "mb_before_first_output"]
METRICS += ["requests", "first_output_s"]


def phase_run(
    run_dir: Path, phases: list[tuple[float, float, float]], samples: int | None = None
) -> Path:
    """A run of one workload, legacy only, whose samples have the given (pull, create, run);
    its scenario plans ``samples`` (default: one for each)."""
    run_dir.mkdir(parents=True)
    scenario = {
        "name": "figures",
        "samples": samples or len(phases),
        "percentile": 95,
        "modes": ["legacy"],
        "network": {"profile": "wan"},
        "workloads": [{"name": "python", "recipe": "python"}],
    }
    (run_dir / ENVIRONMENT).write_text(json.dumps({"scenario": scenario}))
    for i, (pull, create, run) in enumerate(phases):
        append_record(
            run_dir,
            Record(
                i,
                "python",
                "legacy",
                pull_s=pull,
                create_s=create,
                run_s=run,
                total_s=pull + create + run,
                bytes_fetched=10_000_000,
                bytes_before_first_output=10_000_000,
            ),
        )
    return run_dir


def svg_texts(svg: Path) -> list[str]:
    """The texts of a matplotlib SVG (each glyph run follows a ``<!-- text -->`` comment)."""
    return re.findall(r"<!-- (.*?) -->", svg.read_text())


def test_the_chart_labels_each_bar_with_the_tables_total(tmp_path: Path) -> None:
    """The label over a bar was the sum of the phases' percentiles, not the total's percentile
    the table gives: pull and run peak in different samples, so the sum (8.4 s) is no sample's
    total and the table says 6.00 s."""
    run = phase_run(tmp_path / "run", [(1, 0, 5), (1, 0, 1), (1, 0, 1), (1, 0, 1), (5, 0, 1)])
    write_report(run)
    totals = [6.0, 2.0, 2.0, 2.0, 6.0]
    p95 = float(np.percentile(totals, 95))
    assert f"**{p95:.2f}" in (run / "table.md").read_text()
    texts = svg_texts(run / "chart.svg")
    assert f"{p95:.1f}" in texts
    assert "8.4" not in texts


def table_rows(table: str) -> list[dict[str, str]]:
    """table.md's rows as {column header: cell}."""
    rows, header = [], None
    for line in table.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            header = None if not line.startswith("|") else header
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
        else:
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def test_the_table_marks_its_byte_columns_as_the_median(tmp_path: Path) -> None:
    """The byte columns give the samples' median while the report says every figure is the
    percentile "unless marked median": their headers did not say so."""
    run = phase_run(tmp_path / "run", [(1, 0, 1)] * 5)
    lines = (run / "records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    fetched = [10e6, 10e6, 10e6, 10e6, 50e6]
    for r, b in zip(records, fetched, strict=True):
        r["bytes_fetched"] = r["bytes_before_first_output"] = int(b)
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_report(run)
    (row,) = table_rows((run / "table.md").read_text())
    median, p95 = np.median(fetched) / 1e6, np.percentile(fetched, 95) / 1e6
    assert f"{median:.1f}" != f"{p95:.1f}"
    columns = {name: cell for name, cell in row.items() if name.startswith("MB")}
    assert columns == {
        "MB fetched (median)": f"{median:.1f}",
        "MB before first output (median)": f"{median:.1f}",
    }


def covered(interval: Any, draw: Any, truth: float, n: int, trials: int = 200) -> float:
    """How often ``interval(sample)`` holds ``truth`` over samples of ``n`` from ``draw``."""
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(trials):
        lo, hi = interval(draw(rng, n))
        hits += lo <= truth <= hi
    return hits / trials


@pytest.mark.parametrize("n", [3, 5, 20])
def test_the_percentiles_95_percent_interval_holds_it_95_percent_of_the_time(n: int) -> None:
    """The p95's interval was a percentile bootstrap, which never reaches past the largest
    sample: from 5 normal samples it held the true p95 about a fifth of the time."""
    truth = float(stats.norm.ppf(0.95, 10, 1))

    def interval(x: np.ndarray) -> Any:
        frame = pd.DataFrame({**CELL, "total_s": x}).reindex(columns=[*CELL, *METRICS])
        row = aggregate(frame, 95).iloc[0]
        return row["total_p_lo"], row["total_p_hi"]

    assert covered(interval, lambda rng, n: rng.normal(10, 1, n), truth, n) >= 0.93


def test_the_percentile_interval_is_between_order_statistics() -> None:
    x = [5.0, 1.0, 4.0, 3.0, 2.0]
    assert quantile_interval(x, 0.95) == (4.0, math.inf)  # P(Bin(5, .95) >= 4) = 0.977
    assert quantile_interval(x, 0.5) == (-math.inf, math.inf)  # 1 - 2 / 32 < 95 %
    assert quantile_interval(np.arange(1.0, 11.0), 0.5) == (2.0, 9.0)
    assert all(math.isnan(v) for v in quantile_interval([1.0, 2.0], 0.95))


def test_a_ratio_or_change_of_percentiles_gets_no_interval_from_too_few_samples() -> None:
    """Bootstrapped, the ratio of two p95s of 5 samples each was given an interval that could
    not hold it; the medians' keep theirs."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(10, 1, 5), rng.normal(12, 1, 5)
    assert all(math.isnan(v) for v in ratio_of(a, b, "percentile", 95)[1:])
    assert all(math.isnan(v) for v in (compare_samples(a, b, "percentile", 95).lo,))
    assert not any(math.isnan(v) for v in ratio_of(a, b, "median")[1:])
    a, b = rng.normal(10, 1, 100), rng.normal(12, 1, 100)
    lo, hi = ratio_of(a, b, "percentile", 95)[1:]
    assert lo < hi


def test_the_report_says_how_its_percentile_and_intervals_are_taken(tmp_path: Path) -> None:
    run = phase_run(tmp_path / "run", [(1, 0, 1), (2, 0, 1), (3, 0, 1), (4, 0, 1), (5, 0, 1)])
    write_report(run)
    (row,) = table_rows((run / "table.md").read_text())
    assert row["total (p95, s) [95% CI]"].startswith("**5.80 [5.00–∞]**")
    text = (run / "report.md").read_text()
    assert "interpolated linearly" in text and "bootstrap" in text and "∞" in text


def test_a_figure_beside_a_verdict_is_not_rounded_onto_its_bound() -> None:
    """The committed default baseline printed python's zstd ÷ noopt bytes as "1.20" beside
    "no" (against a 1.2× target: the figure was 1.201)."""
    agg = pd.DataFrame(
        [
            {**CELL, "mode": m, "store": "default", "total_median": t, "total_p": t}
            | {"mb_before_first_output_median": mb}
            for m, t, mb in (("estargz-noopt", 2.0, 6.161), ("zstd-chunked-lazy", 2.1, 7.4))
        ]
    )
    (row,) = [line for line in zstd_lazy_lines(agg, 95) if line.startswith("| w |")]
    assert row == "| w | 1.05 | 1.05 | 1.201 | no |"
    rows = [{"workload": "w", "published_image": "x", "estargz": 0.1106}]
    rows[0] |= {"published_estargz": 0.1105, "estargz-noopt": None, "zstd-chunked": None}
    rows[0] |= {"published_estargz-noopt": None}
    assert "| **0.1106** | 0.1105 |" in ratio_table(rows) and "| no |" in ratio_table(rows)
    cells = pd.DataFrame([{**CELL, "mode": "estargz", "store": "default", "total_p": 1.503}])
    limits = {"w": Limit(0, 100.0, 0.0, 1.0)}
    (row,) = [line for line in limit_section(cells, limits, 95) if line.startswith("| w |")]
    assert row.endswith("| 1.503× | no |")


def test_the_report_counts_the_measurements_its_figures_leave_out(tmp_path: Path) -> None:
    """The header's measurement count was the ok ones alone: a run of 7 measurements, 2 of
    them failed, said "5 measurements"."""
    run = phase_run(tmp_path / "run", [(1, 0, 1)] * 5, samples=7)
    for i in (5, 6):
        append_record(run, Record(i, "python", "legacy", status="error", error="boom"))
    write_report(run)
    text = (run / "report.md").read_text()
    assert "7 measurements (5 in the figures, 2 failed)" in text


def test_the_median_gets_an_interval_only_from_samples_that_can_give_one() -> None:
    """From 3 samples the median's bootstrap "95 %" interval was [min, max], which holds the
    median 75 % of the time (87.5 % from 4): those cells now have none, and are flagged."""
    truth = 10.0

    def interval(x: np.ndarray) -> Any:
        frame = pd.DataFrame({**CELL, "total_s": x}).reindex(columns=[*CELL, *METRICS])
        row = aggregate(frame, 95).iloc[0]
        return row["total_median_lo"], row["total_median_hi"], row["wide"]

    rng = np.random.default_rng(1)
    for n in (3, 4):
        lo, hi, wide = interval(rng.normal(10, 1, n))
        assert math.isnan(lo) and math.isnan(hi) and wide
    assert covered(lambda x: interval(x)[:2], lambda rng, n: rng.normal(10, 1, n), truth, 5) > 0.9


def test_a_chart_rebuilt_from_the_same_records_is_the_same_file(tmp_path: Path) -> None:
    """The SVG carried its date and random element ids: every `lazybench report` of a committed
    baseline changed its chart.svg although no figure had."""
    run = phase_run(tmp_path / "run", [(1, 0, 5), (1, 0, 1), (1, 0, 1), (1, 0, 1), (5, 0, 1)])
    charts = []
    for _ in range(2):
        write_report(run)
        charts.append({ext: (run / f"chart.{ext}").read_bytes() for ext in ("svg", "png")})
    assert charts[0] == charts[1]


def test_the_zstd_lazy_verdict_names_fallbacks_and_is_not_from_the_ok_starts_alone() -> None:
    """Three of four zstd-chunked-lazy starts fell back to a full pull, the one left as fast
    as estargz-noopt: the section said "yes" (within targets) with no word of the others; a
    mode whose every start fell back had no row at all."""
    cells = pd.DataFrame(
        [
            {**CELL, "mode": m, "store": "default", "total_median": t, "total_p": t}
            | {"mb_before_first_output_median": 6.0, "ok": ok, "fell_back": fell}
            for m, t, ok, fell in (("estargz-noopt", 2.0, 4, 0), ("zstd-chunked-lazy", 2.0, 1, 3))
        ]
    )
    (row,) = [line for line in zstd_lazy_lines(cells, 95) if line.startswith("| w ")]
    assert row == "| w (zstd-chunked-lazy: 3 of 4 fell back) | 1.00 | 1.00 | 1.00 | no |"
    figures = ["total_median", "total_p", "mb_before_first_output_median"]
    cells.loc[1, [*figures, "ok", "fell_back"]] = [float("nan")] * 3 + [0, 4]  # no ok figure
    (row,) = [line for line in zstd_lazy_lines(cells, 95) if line.startswith("| w ")]
    assert row == "| w (zstd-chunked-lazy: 4 of 4 fell back) | – | – | – | no |"
    cells.loc[1, [*figures, "ok", "fell_back"]] = [2.0, 2.0, 6.0, 4, 0]
    cells.loc[0, ["ok", "fell_back"]] = [3, 1]
    (row,) = [line for line in zstd_lazy_lines(cells, 95) if line.startswith("| w ")]
    assert row == "| w (estargz-noopt: 1 of 4 fell back) | 1.00 | 1.00 | 1.00 | – |"
