"""``lazybench compare BASE NEW [--gate]``: per workload × mode deltas between two runs, and
the thresholds a new run must keep against a base run (a gate file; the default one ships in
the package as ``harness/data/gate.toml``)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd

from harness.cli import UserError
from harness.records import RECORDS, read_environment, read_records
from harness.report import fmt
from harness.stats import aggregate, records_frame

DEFAULT_GATE = resources.files("harness") / "data" / "gate.toml"


@dataclass(frozen=True)
class Gate:
    """Thresholds a new run must keep against a base run (a gate file, see :func:`load_gate`)."""

    statistic: str = "median"  # "median" or "percentile"
    max_total_increase_pct: float = 25.0
    min_total_increase_s: float = 0.5
    max_fetched_increase_pct: float = 10.0
    min_fetched_increase_mb: float = 1.0
    max_ratio: dict[str, float] = field(default_factory=dict)  # mode -> lazy/legacy ceiling
    fail_on_missing: bool = True


def load_gate(path: Path | None = None) -> Gate:
    """The gate in TOML file ``path`` (None: the packaged default, ``harness/data/gate.toml``,
    which documents every key). Raises :class:`UserError` naming the file and key on bad
    input."""
    source = DEFAULT_GATE if path is None else Path(path)
    if path is None:
        path = Path("harness/data/gate.toml")  # how errors name the packaged file
    try:
        data = tomllib.loads(source.read_text())
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
            f"| {r['workload']} | {r['mode']} | {fmt(r['total_base'])} | {fmt(r['total_new'])} "
            f"| {fmt(r['total_delta_s'])} | {fmt(r['total_delta_pct'], 0)} "
            f"| {fmt(r['mb_base'], 1)} | {fmt(r['mb_new'], 1)} | {fmt(r['mb_delta_pct'], 0)} |"
        )
    return "\n".join(lines) + "\n"
