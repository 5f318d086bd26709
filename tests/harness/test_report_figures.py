"""The figures a report prints, checked against the records they come from: table, chart and
report say the same numbers, and each says which statistic it is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from harness.records import ENVIRONMENT, Record, append_record
from harness.report import write_report


def phase_run(run_dir: Path, phases: list[tuple[float, float, float]]) -> Path:
    """A run of one workload, legacy only, whose samples have the given (pull, create, run)."""
    run_dir.mkdir(parents=True)
    scenario = {
        "name": "figures",
        "samples": len(phases),
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
