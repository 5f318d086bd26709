"""What reports say of their own figures, checked against the records that made them: a limit
called a lower bound that measured starts beat, a median interval called 95 % that is the
samples' range, a p-value whose side was not said, a published total taken another way."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from harness.limit import Limit
from harness.report import limit_section, store_rows, store_table, write_report
from harness.stats import aggregate
from tests.harness.test_report_figures import CELL, METRICS, phase_run


def test_a_lazy_start_faster_than_the_limit_is_named() -> None:
    """results/baselines/default: tomcat's limit is 5.74 s, called "the lower bound of a lazy
    start", and two estargz starts took 5.73 s and 5.64 s (p95 6.13 s, 1.07×); nothing said
    the bound did not hold."""
    cells = pd.DataFrame(
        [
            {**CELL, "workload": "tomcat", "mode": m, "store": st, "total_p": p, "total_min": lo}
            for m, st, p, lo in (
                ("legacy", "", 34.42, 32.20),
                ("estargz-noopt", "default", 12.87, 12.20),
                ("estargz", "default", 6.13, 5.64),
            )
        ]
    )
    limits = {"tomcat": Limit(33_174_520, 95.64, 40.632, 2.8445, floor_repull=True)}
    text = "\n".join(limit_section(cells, limits, 95))
    assert "Faster than the limit: tomcat estargz (fastest start 5.64 s, limit 5.74 s)" in text
    assert "no lower bound" in text
    assert "estargz-noopt (fastest" not in text and "legacy (fastest" not in text
    # A start a hair under its limit is not printed equal to it (vs-go: 5.831 s, 5.834 s).
    cells.loc[cells["mode"] == "estargz", "total_min"] = 5.7400
    text = "\n".join(limit_section(cells, limits, 95))
    assert "(fastest start 5.740 s, limit 5.741 s)" in text
    # Every start at or above its limit: no such line.
    cells.loc[cells["mode"] == "estargz", "total_min"] = 5.80
    assert "Faster than the limit" not in "\n".join(limit_section(cells, limits, 95))


def test_the_median_interval_of_5_samples_is_their_range_and_not_called_95_percent(
    tmp_path: Path,
) -> None:
    """Every median "[95% CI]" of the default and vs-go baselines (5 samples a cell) equals the
    cell's min–max: the bootstrap of 5 always gives it, and it holds the median 93.75 % of the
    time, whatever the distribution."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = rng.normal(10, 1, 5)
        frame = pd.DataFrame({**CELL, "total_s": x}).reindex(columns=[*CELL, *METRICS])
        row = aggregate(frame, 95).iloc[0]
        assert (row["total_median_lo"], row["total_median_hi"]) == (x.min(), x.max())
    assert 1 - 2 * 0.5**5 == 0.9375  # P(the median is outside [min, max]) = 2 × 0.5⁵
    run = phase_run(tmp_path / "run", [(1, 0, 1), (2, 0, 1), (3, 0, 1), (4, 0, 1), (5, 0, 1)])
    write_report(run)
    table = (run / "table.md").read_text()
    assert "total median (s) [95% CI]" not in table
    assert "total median (s) [bootstrap CI]" in table
    header = (run / "report.md").read_text().split("\n\n")[1]
    assert "intervals are 95 %: the median" not in header
    assert "93.75 %" in header and "less often than 95 %" in header


def test_the_store_tables_p_value_says_it_is_two_sided() -> None:
    """results/baselines/vs-go printed 0.008 under "Mann–Whitney p" for Go's 5 starts all
    slower than ours: the two-sided p (2/252); the one-sided one, as `compare` and the gate
    take it, is 0.004."""
    rows = []
    for store, base in (("ours", 1.0), ("go", 2.0)):
        for i in range(5):
            rows.append({**CELL, "mode": "estargz", "store": store, "total_s": base + i / 100})
    df = pd.DataFrame(rows)
    counts = pd.DataFrame(
        [
            {**CELL, "mode": "estargz", "store": st, "ok": 5, "fell_back": 0, "error": 0}
            | {"checked": 5, "reason": ""}
            for st in ("ours", "go")
        ]
    )
    out = store_rows(df, 95, counts)
    go = next(r for r in out if r["store"] == "go")
    assert math.isclose(go["p_value"], 2 / 252, rel_tol=1e-6)
    assert "| Mann–Whitney p (two-sided) |" in store_table(out, 95)


def test_the_ratio_section_says_how_the_published_total_was_taken(tmp_path: Path) -> None:
    """The published totals (harness/data/published.csv: gcc legacy 35.7 + 7.9 + 0.2 = 43.8)
    are each phase's p95 added up, as upstream's chart stacks them; ours are the p95 of each
    sample's total. The report set them side by side without saying so."""
    run = phase_run(tmp_path / "run", [(1, 0, 1), (2, 0, 1), (3, 0, 1), (4, 0, 1), (5, 0, 1)])
    write_report(run)
    text = (run / "report.md").read_text()
    assert "Ours is the p95 of each sample's total" in text
    assert "pull, create and run added up" in text


def test_a_link_delayed_at_normal_priority_says_so() -> None:
    """A link whose NFQUEUE delayer could not run at real-time priority is slower than its
    profile whenever the CPU is busy: the report's link line says so; a run recorded before
    the link said either way (no ``delay_realtime``) reads as it did."""
    from harness.report import describe_link

    link = {
        "profile": {"name": "wan", "rate_mbit": 100.0, "rtt_ms": 40.0},
        "delay_method": "nfqueue",
        "measured": {"rate_mbit": 95.6, "rtt_ms": 40.2},
    }
    assert "(delay: nfqueue);" in describe_link(link)
    assert "(delay: nfqueue);" in describe_link({**link, "delay_realtime": True})
    slow = describe_link({**link, "delay_realtime": False})
    assert "(delay: nfqueue, at normal priority: slower when the CPU is busy);" in slow
