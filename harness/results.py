"""Measurement records, their statistics, and what a reader looks at: table, chart, report.

A run directory (``results/runs/<id>/``) holds ``records.jsonl`` — one JSON object per
finished measurement, appended and fsynced as it completes, so an interrupted run keeps every
finished sample — and ``environment.json``. Everything else here is derived from those two
files and can be regenerated at any time (``lazybench report RUN_DIR``):

* ``summary.csv`` — one row per workload × mode: median, chosen percentile, min/max/std;
* ``table.md`` — ``mode | pull | create | run | total | MB fetched`` per workload;
* ``chart.png`` / ``chart.svg`` — stacked pull/create/run bars per workload and mode, the shape
  of the upstream stargz-snapshotter figure, with every sample's total drawn as a dot;
* ``report.md`` — one page: environment, link, tables, chart, and the estargz ÷ legacy ratio
  per workload beside the published ratio.
"""

from __future__ import annotations

import csv
import json
import os
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness.cli import UserError
from harness.podman import write_atomic

RECORDS = "records.jsonl"
ENVIRONMENT = "environment.json"
PHASES = ("pull", "create", "run")
MODE_ORDER = ("legacy", "estargz-noopt", "estargz", "zstd-chunked", "zstd-chunked-lazy")
PUBLISHED_CSV = Path(__file__).resolve().parent.parent / "results" / "reference" / "published.csv"
MB = 1e6


@dataclass
class Record:
    """One measurement: a workload started once in one mode, from an empty cache."""

    sample: int
    workload: str
    mode: str
    status: str = "ok"  # "ok" or "error"
    error: str | None = None
    pull_s: float | None = None
    create_s: float | None = None
    run_s: float | None = None
    total_s: float | None = None
    bytes_fetched: int | None = None  # bytes the registry served during the measurement
    requests: int | None = None
    bytes_before_first_output: int | None = None  # ...by requests done before first output
    requests_before_first_output: int | None = None
    first_output_s: float | None = None  # seconds from `run` start to the first stdout line
    ready: bool | None = None  # the ready line was seen (or the workload exited 0)
    exit_code: int | None = None
    stdout_head: str = ""
    image: str = ""
    runtime: str = "podman"
    store_metrics: dict[str, float] = field(default_factory=dict)
    started: str = ""
    finished: str = ""

    @property
    def key(self) -> tuple[int, str, str]:
        return (self.sample, self.workload, self.mode)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# -- records file -----------------------------------------------------------------------------


def append_record(run_dir: Path, record: Record) -> None:
    """Append one record and fsync it: once this returns, the measurement survives a crash."""
    path = run_dir / RECORDS
    line = (record.to_json() + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(run_dir: Path) -> list[Record]:
    """All records, oldest first. A torn last line (the process died mid-write) is skipped;
    for a key recorded twice (a failed measurement retried on resume) the last record wins."""
    path = run_dir / RECORDS
    if not path.exists():
        return []
    by_key: dict[tuple[int, str, str], Record] = {}
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise UserError(f"{path}:{n}: not a JSON record") from None
                continue  # torn final line
            rec = Record.from_dict(data)
            by_key.pop(rec.key, None)
            by_key[rec.key] = rec
    return list(by_key.values())


def finished_keys(run_dir: Path) -> set[tuple[int, str, str]]:
    """Keys of successful measurements: what a resumed run skips."""
    return {r.key for r in read_records(run_dir) if r.status == "ok"}


def read_environment(run_dir: Path) -> dict[str, Any]:
    path = run_dir / ENVIRONMENT
    if not path.exists():
        return {}
    return json.loads(path.read_text())


# -- statistics ---------------------------------------------------------------------------------


def records_frame(records: Iterable[Record]) -> pd.DataFrame:
    """Successful records as a DataFrame (one row per measurement)."""
    rows = [asdict(r) for r in records if r.status == "ok"]
    columns = list(Record.__dataclass_fields__)
    df = pd.DataFrame(rows, columns=columns)
    for col in ("bytes_fetched", "bytes_before_first_output"):
        df[col.replace("bytes", "mb")] = pd.to_numeric(df[col]) / MB
    return df


def _mode_rank(mode: str) -> int:
    return MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER)


def aggregate(df: pd.DataFrame, percentile: float) -> pd.DataFrame:
    """Per workload × mode: median, the chosen percentile (``p``), min, max, std and the
    sample count for each phase, the total and the bytes fetched.

    Columns are ``<metric>_<stat>``, e.g. ``total_p``, ``pull_median``, ``mb_fetched_max``.
    Rows keep the workloads' first-appearance order and the usual mode order.
    """
    metrics = [f"{p}_s" for p in PHASES] + [
        "total_s",
        "mb_fetched",
        "mb_before_first_output",
        "requests",
        "first_output_s",
    ]
    rows = []
    workloads = list(dict.fromkeys(df["workload"]))
    for (workload, mode), group in df.groupby(["workload", "mode"], sort=False):
        row: dict[str, Any] = {"workload": workload, "mode": mode, "n": len(group)}
        for metric in metrics:
            values = pd.to_numeric(group[metric], errors="coerce").dropna()
            name = metric.removesuffix("_s")
            if values.empty:
                for stat in ("median", "p", "min", "max", "std"):
                    row[f"{name}_{stat}"] = float("nan")
                continue
            row[f"{name}_median"] = float(values.median())
            row[f"{name}_p"] = float(values.quantile(percentile / 100.0))
            row[f"{name}_min"] = float(values.min())
            row[f"{name}_max"] = float(values.max())
            row[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["_w"] = out["workload"].map(workloads.index)
    out["_m"] = out["mode"].map(_mode_rank)
    return out.sort_values(["_w", "_m"]).drop(columns=["_w", "_m"]).reset_index(drop=True)


def _pct_label(percentile: float) -> str:
    return f"p{percentile:g}"


def _fmt(value: float, digits: int = 2) -> str:
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
                f"| {r['mode']} | {_fmt(r['pull_p'])} | {_fmt(r['create_p'])} "
                f"| {_fmt(r['run_p'])} | **{_fmt(r['total_p'])}** "
                f"| {_fmt(r['mb_fetched_median'], 1)} "
                f"| {_fmt(r['total_median'])} | {_fmt(r['total_min'])}–{_fmt(r['total_max'])} "
                f"| {_fmt(r['mb_before_first_output_median'], 1)} | {int(r['n'])} |"
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


def read_published(path: Path = PUBLISHED_CSV) -> list[Published]:
    if not path.exists():
        return []
    by_image: dict[str, Published] = {}
    with path.open() as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
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
        "(results/reference/published.csv); ours: the stand-in images on this machine.",
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


# -- compare and gate -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """Thresholds a new run must keep against a base run (``ci/gate.toml``)."""

    statistic: str = "median"  # "median" or "percentile"
    max_total_increase_pct: float = 25.0
    min_total_increase_s: float = 0.5
    max_fetched_increase_pct: float = 10.0
    min_fetched_increase_mb: float = 1.0
    max_ratio: dict[str, float] = field(default_factory=dict)  # mode -> lazy/legacy ceiling
    fail_on_missing: bool = True


def load_gate(path: Path) -> Gate:
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    allowed = {"statistic", "total", "fetched", "ratio", "fail_on_missing"}
    for key in data:
        if key not in allowed:
            raise UserError(f"{path}: {key}: unknown key (allowed: {', '.join(sorted(allowed))})")
    statistic = data.get("statistic", "median")
    if statistic not in ("median", "percentile"):
        raise UserError(f"{path}: statistic: must be 'median' or 'percentile', got {statistic!r}")

    def num(table: str, key: str, default: float) -> float:
        section = data.get(table, {})
        if not isinstance(section, dict):
            raise UserError(f"{path}: {table}: must be a table")
        value = section.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise UserError(f"{path}: {table}.{key}: must be a number ≥ 0, got {value!r}")
        return float(value)

    ratio = data.get("ratio", {})
    if not isinstance(ratio, dict):
        raise UserError(f"{path}: ratio: must be a table of mode = ceiling")
    for mode, value in ratio.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise UserError(f"{path}: ratio.{mode}: must be a number > 0, got {value!r}")
    fail_on_missing = data.get("fail_on_missing", True)
    if not isinstance(fail_on_missing, bool):
        raise UserError(f"{path}: fail_on_missing: must be true or false")
    return Gate(
        statistic=statistic,
        max_total_increase_pct=num("total", "max_increase_pct", 25.0),
        min_total_increase_s=num("total", "min_increase_s", 0.5),
        max_fetched_increase_pct=num("fetched", "max_increase_pct", 10.0),
        min_fetched_increase_mb=num("fetched", "min_increase_mb", 1.0),
        max_ratio={k: float(v) for k, v in ratio.items()},
        fail_on_missing=fail_on_missing,
    )


def _run_aggregate(run_dir: Path) -> tuple[pd.DataFrame, float]:
    run_dir = Path(run_dir)
    if not (run_dir / RECORDS).exists():
        raise UserError(f"{run_dir}: no {RECORDS} here (not a run directory?)")
    env = read_environment(run_dir)
    percentile = float(env.get("scenario", {}).get("percentile", 95))
    df = records_frame(read_records(run_dir))
    if df.empty:
        raise UserError(f"{run_dir}: no successful measurements")
    return aggregate(df, percentile), percentile


def compare_runs(base: Path, new: Path, statistic: str = "median") -> pd.DataFrame:
    """Per workload × mode: base and new total and MB fetched, and their deltas."""
    a, _ = _run_aggregate(base)
    b, _ = _run_aggregate(new)
    stat = "median" if statistic == "median" else "p"
    cols = {f"total_{stat}": "total", f"mb_fetched_{stat}": "mb"}
    a = a[["workload", "mode", *cols]].rename(columns={k: f"{v}_base" for k, v in cols.items()})
    b = b[["workload", "mode", *cols]].rename(columns={k: f"{v}_new" for k, v in cols.items()})
    out = a.merge(b, on=["workload", "mode"], how="outer", sort=False)
    order = {
        k: i
        for i, k in enumerate(
            [
                *zip(a["workload"], a["mode"], strict=True),
                *zip(b["workload"], b["mode"], strict=True),
            ]
        )
    }
    out["_o"] = [order[k] for k in zip(out["workload"], out["mode"], strict=True)]
    out = out.sort_values("_o").drop(columns="_o").reset_index(drop=True)
    out["total_delta_s"] = out["total_new"] - out["total_base"]
    out["total_delta_pct"] = 100.0 * out["total_delta_s"] / out["total_base"]
    out["mb_delta"] = out["mb_new"] - out["mb_base"]
    out["mb_delta_pct"] = 100.0 * out["mb_delta"] / out["mb_base"]
    return out


def gate_failures(cmp: pd.DataFrame, gate: Gate) -> list[str]:
    """Why the new run fails the gate (empty: it passes)."""
    problems = []
    for _, r in cmp.iterrows():
        where = f"{r['workload']}/{r['mode']}"
        if pd.isna(r["total_new"]):
            if gate.fail_on_missing:
                problems.append(f"{where}: missing from the new run")
            continue
        if pd.isna(r["total_base"]):
            continue
        if (
            r["total_delta_s"] > gate.min_total_increase_s
            and r["total_delta_pct"] > gate.max_total_increase_pct
        ):
            problems.append(
                f"{where}: total {r['total_base']:.2f}s → {r['total_new']:.2f}s "
                f"(+{r['total_delta_pct']:.0f}% > {gate.max_total_increase_pct:g}%)"
            )
        if (
            not pd.isna(r["mb_delta"])
            and r["mb_delta"] > gate.min_fetched_increase_mb
            and r["mb_delta_pct"] > gate.max_fetched_increase_pct
        ):
            problems.append(
                f"{where}: fetched {r['mb_base']:.1f} MB → {r['mb_new']:.1f} MB "
                f"(+{r['mb_delta_pct']:.0f}% > {gate.max_fetched_increase_pct:g}%)"
            )
    for mode, ceiling in gate.max_ratio.items():
        for workload in dict.fromkeys(cmp["workload"]):
            rows = cmp[cmp["workload"] == workload].set_index("mode")["total_new"]
            if mode in rows and "legacy" in rows and rows["legacy"] > 0:
                ratio = rows[mode] / rows["legacy"]
                if ratio > ceiling:
                    problems.append(
                        f"{workload}/{mode}: {mode} ÷ legacy = {ratio:.2f} > {ceiling:g}"
                    )
    return problems


def compare_table(cmp: pd.DataFrame) -> str:
    lines = [
        "| workload | mode | total base (s) | total new (s) | Δ s | Δ % "
        "| MB base | MB new | Δ MB % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for _, r in cmp.iterrows():
        lines.append(
            f"| {r['workload']} | {r['mode']} | {_fmt(r['total_base'])} | {_fmt(r['total_new'])} "
            f"| {_fmt(r['total_delta_s'])} | {_fmt(r['total_delta_pct'], 0)} "
            f"| {_fmt(r['mb_base'], 1)} | {_fmt(r['mb_new'], 1)} | {_fmt(r['mb_delta_pct'], 0)} |"
        )
    return "\n".join(lines) + "\n"
