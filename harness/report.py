"""What a reader looks at, derived from a run's records: table, chart, summary and report.

Everything here is regenerated from ``records.jsonl`` and ``environment.json`` at any time
(``lazybench report RUN_DIR``):

* ``summary.csv`` — one row per workload × mode: median, chosen percentile, min/max/std;
* ``table.md`` — ``mode | pull | create | run | total | MB fetched`` per workload;
* ``chart.png`` / ``chart.svg`` — stacked pull/create/run bars per workload and mode, the shape
  of the upstream stargz-snapshotter figure, with every sample's total drawn as a dot;
* ``report.md`` — one page: environment, link, tables, chart, and the estargz ÷ legacy ratio
  per workload beside the published ratio.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import pandas as pd

from harness.cli import UserError
from harness.podman import write_atomic
from harness.records import RECORDS, read_environment, read_records
from harness.stats import PHASES, aggregate, records_frame

# The upstream chart's numbers, shipped inside the package (harness/data/published.csv) so an
# installed lazybench reports them wherever it runs.
PUBLISHED_CSV = resources.files("harness") / "data" / "published.csv"


def _pct_label(percentile: float) -> str:
    return f"p{percentile:g}"


def fmt(value: float, digits: int = 2) -> str:
    return "–" if pd.isna(value) else f"{value:.{digits}f}"


def markdown_tables(agg: pd.DataFrame, percentile: float) -> str:
    """``mode | pull | create | run | total | MB fetched`` per workload, in seconds at the
    chosen percentile, with the median total, its range and the sample count beside it."""
    p = _pct_label(percentile)
    out: list[str] = []
    for workload, group in agg.groupby("workload", sort=False):
        out.append(f"### {workload}\n")
        out.append(
            f"| mode | pull ({p}, s) | create ({p}, s) | run ({p}, s) | total ({p}, s) "
            "| MB fetched | total median (s) | total min–max (s) "
            "| MB before first output | samples |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for _, r in group.iterrows():
            out.append(
                f"| {r['mode']} | {fmt(r['pull_p'])} | {fmt(r['create_p'])} "
                f"| {fmt(r['run_p'])} | **{fmt(r['total_p'])}** "
                f"| {fmt(r['mb_fetched_median'], 1)} "
                f"| {fmt(r['total_median'])} | {fmt(r['total_min'])}–{fmt(r['total_max'])} "
                f"| {fmt(r['mb_before_first_output_median'], 1)} | {int(r['n'])} |"
            )
        out.append("")
    return "\n".join(out)


def write_summary_csv(agg: pd.DataFrame, path: Path) -> None:
    write_atomic(path, agg.to_csv(index=False, float_format="%.4f"))


# -- chart --------------------------------------------------------------------------------------

PHASE_COLORS = {"pull": "#4472c4", "create": "#ed7d31", "run": "#70ad47"}


def draw_chart(
    df: pd.DataFrame, agg: pd.DataFrame, percentile: float, stem: Path, title: str = ""
) -> list[Path]:
    """Stacked pull/create/run bars (chosen percentile) per mode, one panel per workload,
    each sample's total as a black dot; written as ``stem.png`` and ``stem.svg``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(agg["workload"]))
    fig, axes = plt.subplots(
        1, len(workloads), figsize=(max(4.0, 3.2 * len(workloads)), 4.2), squeeze=False
    )
    for ax, workload in zip(axes[0], workloads, strict=True):
        group = agg[agg["workload"] == workload]
        modes = list(group["mode"])
        xs = range(len(modes))
        bottom = [0.0] * len(modes)
        for phase in PHASES:
            heights = [0.0 if pd.isna(v) else float(v) for v in group[f"{phase}_p"]]
            ax.bar(xs, heights, 0.65, bottom=bottom, color=PHASE_COLORS[phase], label=phase)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        for x, mode in zip(xs, modes, strict=True):
            totals = df[(df["workload"] == workload) & (df["mode"] == mode)]["total_s"]
            ax.scatter([x] * len(totals), totals, s=9, color="black", zorder=3)
            ax.text(x, bottom[x], f"{bottom[x]:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), modes, rotation=30, ha="right", fontsize=8)
        ax.set_title(workload)
        ax.set_ylabel("seconds")
        ax.set_ylim(0, max([*bottom, float(df["total_s"].max() or 0)]) * 1.15 or 1)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=3, fontsize=8)
    fig.suptitle(title or f"time to first exec ({_pct_label(percentile)}; dots: samples)")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    paths = []
    for ext in ("png", "svg"):
        path = stem.with_suffix(f".{ext}")
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{ext}")
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
        paths.append(path)
    plt.close(fig)
    return paths


# -- published reference and the report -----------------------------------------------------------


@dataclass(frozen=True)
class Published:
    image: str
    stand_in: str
    totals: dict[str, float]  # mode -> total seconds

    def ratio(self, mode: str) -> float | None:
        if mode in self.totals and "legacy" in self.totals:
            return self.totals[mode] / self.totals["legacy"]
        return None


def read_published(source: Path | Traversable | None = None) -> list[Published]:
    """The published totals per image (``image,stand_in,mode,pull,create,run,total`` rows,
    ``#`` comments), from ``source`` or the packaged ``harness/data/published.csv``."""
    path = PUBLISHED_CSV if source is None else source
    if not path.is_file():
        return []
    by_image: dict[str, Published] = {}
    text = path.read_text()
    rows = csv.DictReader(line for line in io.StringIO(text) if not line.startswith("#"))
    for row in rows:
        pub = by_image.setdefault(row["image"], Published(row["image"], row["stand_in"], {}))
        if row.get("total"):
            pub.totals[row["mode"]] = float(row["total"])
    return list(by_image.values())


def match_published(
    workload: str, recipe: str | None, reference: str | None, published: Sequence[Published]
) -> Published | None:
    """The published image a workload stands in for: named by ``reference``, else the one
    whose stand_in equals the workload or recipe name."""
    for pub in published:
        if reference and reference in (pub.image, pub.image.split(":")[0]):
            return pub
    for pub in published:
        if pub.stand_in in (workload, recipe):
            return pub
    return None


def ratio_rows(
    agg: pd.DataFrame, workloads: Sequence[dict[str, Any]], published: Sequence[Published]
) -> list[dict[str, Any]]:
    """Per workload: lazy-mode total ÷ legacy total (chosen percentile), beside published."""
    info = {w["name"]: w for w in workloads}
    rows = []
    for workload, group in agg.groupby("workload", sort=False):
        totals = dict(zip(group["mode"], group["total_p"], strict=True))
        w = info.get(workload, {})
        pub = match_published(workload, w.get("recipe"), w.get("reference"), published)
        row: dict[str, Any] = {"workload": workload, "published_image": pub.image if pub else None}
        for mode in ("estargz-noopt", "estargz", "zstd-chunked"):
            legacy = totals.get("legacy")
            ours = totals.get(mode)
            row[mode] = ours / legacy if legacy and ours is not None and legacy > 0 else None
            row[f"published_{mode}"] = pub.ratio(mode) if pub else None
        rows.append(row)
    return rows


def _ratio(value: float | None) -> str:
    return "–" if value is None or pd.isna(value) else f"{value:.2f}"


def ratio_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| workload | stands in for | estargz ÷ legacy | published | estargz-noopt ÷ legacy "
        "| published | zstd-chunked ÷ legacy | at or below published |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ours, pub = r["estargz"], r["published_estargz"]
        verdict = "–" if ours is None or pub is None else ("yes" if ours <= pub else "no")
        lines.append(
            f"| {r['workload']} | {r['published_image'] or '–'} | **{_ratio(ours)}** "
            f"| {_ratio(pub)} | {_ratio(r['estargz-noopt'])} "
            f"| {_ratio(r['published_estargz-noopt'])} | {_ratio(r['zstd-chunked'])} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def _environment_lines(env: dict[str, Any]) -> list[str]:
    lines = []
    for key in (
        "started",
        "host",
        "kernel",
        "cpu",
        "cpus",
        "python",
        "podman",
        "runtime",
        "store_command",
        "git_commit",
    ):
        if env.get(key) not in (None, ""):
            value = env[key]
            if isinstance(value, list):
                value = " ".join(value)
            lines.append(f"- **{key}**: `{value}`")
    link = env.get("link") or {}
    if link:
        lines.append(f"- **link**: {describe_link(link)}")
    return lines


def describe_link(link: dict[str, Any]) -> str:
    """``wan: 100 Mbit/s, 40 ms RTT (delay: nfqueue); measured 93.1 Mbit/s, 41.0 ms``."""
    profile = link.get("profile") or {}
    if not isinstance(profile, dict):
        return str(profile)
    rate = profile.get("rate_mbit")
    text = f"{profile.get('name', '?')}: " + (
        f"{rate:g} Mbit/s, {profile.get('rtt_ms', 0):g} ms RTT" if rate else "unshaped"
    )
    if link.get("delay_method"):
        text += f" (delay: {link['delay_method']})"
    measured = link.get("measured") or {}
    if measured:
        text += (
            f"; measured {measured.get('rate_mbit', 0):.1f} Mbit/s, "
            f"{measured.get('rtt_ms', 0):.1f} ms RTT"
        )
    return text


@dataclass
class Report:
    """What :func:`write_report` produced."""

    run_dir: Path
    table: Path
    csv: Path
    charts: list[Path]
    report: Path
    ratios: list[dict[str, Any]]
    missing: list[tuple[int, str, str]]
    table_text: str


def write_report(run_dir: Path) -> Report:
    """(Re)build summary.csv, table.md, chart.png/svg and report.md from the run's records."""
    run_dir = Path(run_dir)
    if not (run_dir / RECORDS).exists():
        raise UserError(f"{run_dir}: no {RECORDS} here (not a run directory?)")
    env = read_environment(run_dir)
    scenario = env.get("scenario", {})
    percentile = float(scenario.get("percentile", 95))
    records = read_records(run_dir)
    df = records_frame(records)
    if df.empty:
        raise UserError(f"{run_dir}: no successful measurements to report on")
    agg = aggregate(df, percentile)
    table_text = markdown_tables(agg, percentile)
    write_atomic(run_dir / "table.md", table_text)
    write_summary_csv(agg, run_dir / "summary.csv")
    charts = draw_chart(df, agg, percentile, run_dir / "chart", title=_chart_title(env))
    ratios = ratio_rows(agg, scenario.get("workloads", []), read_published())
    recorded = {r.key for r in records}
    missing = [k for k in _planned_keys(scenario) if k not in recorded]
    errors = [r for r in records if r.status != "ok"]

    p = _pct_label(percentile)
    lines = [
        f"# lazybench run `{run_dir.name}`",
        "",
        f"Scenario **{scenario.get('name', '?')}**: {len(df)} measurements, "
        f"{scenario.get('samples', '?')} samples per workload × mode, "
        f"network profile `{scenario.get('network', {}).get('profile', '?')}`, "
        f"figures are the {p} of the samples unless marked median.",
        "",
        *_environment_lines(env),
        "",
        "## Time to first exec",
        "",
        "![chart](chart.svg)",
        "",
        table_text,
        f"## Lazy ÷ legacy total ({p}), beside the published chart",
        "",
        "Published: containerd + stargz snapshotter on GitHub Actions pulling from ghcr.io "
        "(harness/data/published.csv); ours: the stand-in images on this machine.",
        "",
        ratio_table(ratios),
    ]
    if missing:
        lines += [
            "",
            f"**Incomplete**: {len(missing)} planned measurements have no record "
            "(resume with `lazybench run --resume RUN_DIR`).",
        ]
    if errors:
        lines += ["", "## Failed measurements", ""]
        lines += [f"- sample {r.sample} {r.workload}/{r.mode}: {r.error}" for r in errors]
    write_atomic(run_dir / "report.md", "\n".join(lines) + "\n")
    return Report(
        run_dir,
        run_dir / "table.md",
        run_dir / "summary.csv",
        charts,
        run_dir / "report.md",
        ratios,
        missing,
        table_text,
    )


def _chart_title(env: dict[str, Any]) -> str:
    scenario = env.get("scenario", {})
    p = _pct_label(float(scenario.get("percentile", 95)))
    profile = scenario.get("network", {}).get("profile", "")
    return f"time to first exec, {p} of {scenario.get('samples', '?')} samples, {profile} link"


def _planned_keys(scenario: dict[str, Any]) -> list[tuple[int, str, str]]:
    samples = int(scenario.get("samples", 0))
    return [
        (s, w["name"], m)
        for s in range(samples)
        for w in scenario.get("workloads", [])
        for m in scenario.get("modes", [])
        if "modes" not in w or m in w["modes"]
    ]
