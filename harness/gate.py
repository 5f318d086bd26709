"""``lazybench compare BASE NEW [--gate]``: per cell (workload × mode × store) changes between
two runs, and the thresholds a new run must keep against a base run (a gate file; the default
one ships in the package as ``harness/data/gate.toml``).

Each change comes with a 95 % bootstrap interval and a one-sided Mann–Whitney U test that the
new samples are larger (:func:`harness.stats.compare_samples`). The gate fails a slow-down or
a growth in bytes only when it is both past the gate's thresholds and significant
(p ≤ ``alpha``); it always fails on a lazy measurement of the new run that fell back to a full
pull, on a failed measurement of the new run, on a lazy one that carries no laziness verdict
(nothing shows its layers came from the store), and on a cell of the base run missing from
the new one or measurements the new run planned but has no record of (``fail_on_missing``).
Cells with too few samples or too wide a spread are named as warnings: no change there can be
told from noise; so are cells whose base measurements fell back (not in the base figure, they
leave it fewer samples, or none to test a change against).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.cli import UserError
from harness.records import (
    RECORDS,
    Record,
    read_environment,
    read_records,
    require_run_files,
    sort_records,
)
from harness.report import fmt, planned_keys, refuse_unplanned
from harness.scenario import MODES, not_utf8
from harness.stats import compare_samples, median_interval, mode_rank, spread_too_wide

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
    alpha: float = 0.05  # a change is significant when its Mann–Whitney p-value is ≤ alpha


def load_gate(path: Path | None = None) -> Gate:
    """The gate in TOML file ``path`` (None: the packaged default, ``harness/data/gate.toml``,
    which documents every key). Raises :class:`UserError` naming the file and key on bad
    input."""
    source = DEFAULT_GATE if path is None else Path(path)
    if path is None:
        path = Path("harness/data/gate.toml")  # how errors name the packaged file
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: {not_utf8(exc)}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    allowed = {"statistic", "total", "fetched", "ratio", "fail_on_missing", "alpha"}
    for key in data:
        if key not in allowed:
            raise UserError(f"{path}: {key}: unknown key (allowed: {', '.join(sorted(allowed))})")
    statistic = data.get("statistic", "median")
    if statistic not in ("median", "percentile"):
        raise UserError(f"{path}: statistic: must be 'median' or 'percentile', got {statistic!r}")

    tables = {
        "total": ("max_increase_pct", "min_increase_s"),
        "fetched": ("max_increase_pct", "min_increase_mb"),
    }
    for table, keys in tables.items():
        section = data.get(table, {})
        for key in section if isinstance(section, dict) else ():
            if key not in keys:
                raise UserError(
                    f"{path}: {table}.{key}: unknown key (allowed: {', '.join(sorted(keys))})"
                )

    def num(table: str, key: str, default: float) -> float:
        section = data.get(table, {})
        if not isinstance(section, dict):
            raise UserError(f"{path}: {table}: must be a table")
        value = section.get(key, default)
        # `not value >= 0` also refuses nan (TOML's `nan`), which no change would ever exceed.
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise UserError(f"{path}: {table}.{key}: must be a number ≥ 0, got {value!r}")
        return float(value)

    ratio = data.get("ratio", {})
    if not isinstance(ratio, dict):
        raise UserError(f"{path}: ratio: must be a table of mode = ceiling")
    for mode, value in ratio.items():
        if mode not in MODES or mode == "legacy":
            known = ", ".join(m for m in MODES if m != "legacy")
            raise UserError(f"{path}: ratio.{mode}: unknown key (allowed: {known})")
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise UserError(f"{path}: ratio.{mode}: must be a number > 0, got {value!r}")
    fail_on_missing = data.get("fail_on_missing", True)
    if not isinstance(fail_on_missing, bool):
        raise UserError(f"{path}: fail_on_missing: must be true or false")
    alpha = data.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise UserError(f"{path}: alpha: must be a number between 0 and 1, got {alpha!r}")
    return Gate(
        statistic=statistic,
        max_total_increase_pct=num("total", "max_increase_pct", 25.0),
        min_total_increase_s=num("total", "min_increase_s", 0.5),
        max_fetched_increase_pct=num("fetched", "max_increase_pct", 10.0),
        min_fetched_increase_mb=num("fetched", "min_increase_mb", 1.0),
        max_ratio={k: float(v) for k, v in ratio.items()},
        fail_on_missing=fail_on_missing,
        alpha=float(alpha),
    )


def _run_records(run_dir: Path) -> tuple[list[Record], float]:
    run_dir = Path(run_dir)
    require_run_files(run_dir, RECORDS)
    env = read_environment(run_dir)
    percentile = float(env.get("scenario", {}).get("percentile", 95))
    records = sort_records(read_records(run_dir), env)
    refuse_unplanned(run_dir, records, env)
    if not any(r.status in ("ok", "fell-back") for r in records):
        raise UserError(f"{run_dir}: no successful measurements")
    return records, percentile


def _cells(records: list[Record]) -> dict[tuple[str, str, str], dict[str, Any]]:
    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in records:
        cell = cells.setdefault((r.workload, r.mode, r.store), _empty_cell())
        if r.status == "ok" and r.total_s is not None:
            cell["total"].append(r.total_s)
            if r.bytes_fetched is not None:
                cell["mb"].append(r.bytes_fetched / 1e6)
            if r.store and r.layers_total is None:
                cell["unchecked"] += 1
        elif r.status == "fell-back":
            cell["fell_back"].append(r)
        elif r.status == "error":
            cell["failed"].append(r)
    return cells


def _empty_cell() -> dict[str, Any]:
    return {"total": [], "mb": [], "fell_back": [], "failed": [], "unchecked": 0}


def compare_runs(base: Path, new: Path, statistic: str = "median") -> pd.DataFrame:
    """Per cell (workload × mode × store) of either run: the base and new statistic of the
    total (s) and of the MB fetched, their change with its 95 % bootstrap interval
    (``total_lo``/``total_hi``, ``mb_lo``/``mb_hi``), the change in percent, the one-sided
    Mann–Whitney p-value that new is larger (``total_p_value``, ``mb_p_value``), sample
    counts (``n_base``, ``n_new``), the new run's fallbacks (``fell_back_new`` and the last
    ``fallback_reason``), failed measurements (``failed_new``, the last ``failure``), ok lazy
    measurements without a laziness verdict (``unchecked_new``), the base run's fallbacks
    (``fell_back_base``: left out of its figure, as the new run's are) and ``noisy`` (too
    few samples or too wide a spread to tell)."""
    base_records, percentile = _run_records(base)
    new_records, _ = _run_records(new)
    a, b = _cells(base_records), _cells(new_records)
    # The new run's planned measurements without a record (a run or shard that was killed or
    # interrupted part way: its report says "Incomplete"), per cell.
    recorded = {r.key for r in new_records}
    planned: dict[tuple[str, str, str], int] = {}
    unrecorded: dict[tuple[str, str, str], int] = {}
    for k in planned_keys(read_environment(Path(new))):
        cell_key = (k.workload, k.mode, k.store)
        planned[cell_key] = planned.get(cell_key, 0) + 1
        if k not in recorded:
            unrecorded[cell_key] = unrecorded.get(cell_key, 0) + 1
    # Cells the new run planned but recorded nothing of are rows too: the gate fails them
    # (gate_failures), where no base figure makes the missing-cell check pass them.
    keys = list(dict.fromkeys([*a, *b, *planned]))
    workloads = list(dict.fromkeys(k[0] for k in keys))
    # Stable: stores keep the scenario's order (sort_records), the first store first.
    keys.sort(key=lambda k: (workloads.index(k[0]), mode_rank(k[1]), k[2] != ""))
    rows = []
    nan = float("nan")
    for key in keys:
        ca = a.get(key, _empty_cell())
        cb = b.get(key, _empty_cell())
        row: dict[str, Any] = dict(zip(("workload", "mode", "store"), key, strict=True))
        row["n_base"], row["n_new"] = len(ca["total"]), len(cb["total"])
        for metric in ("total", "mb"):
            if ca[metric] and cb[metric]:
                ch = compare_samples(ca[metric], cb[metric], statistic, percentile)
                values = (ch.base, ch.new, ch.delta, ch.lo, ch.hi, ch.p_value)
            else:
                one = _stat(ca[metric] or cb[metric], statistic, percentile)
                values = (
                    one if ca[metric] else nan,
                    one if cb[metric] else nan,
                    nan,
                    nan,
                    nan,
                    nan,
                )
            delta_name = "total_delta_s" if metric == "total" else "mb_delta"
            names = [f"{metric}_{x}" for x in ("base", "new", "lo", "hi", "p_value")]
            names.insert(2, delta_name)
            row.update(zip(names, values, strict=True))
        row["fell_back_new"] = len(cb["fell_back"])
        row["fallback_reason"] = cb["fell_back"][-1].error if cb["fell_back"] else ""
        row["failed_new"] = len(cb["failed"])
        row["failure"] = cb["failed"][-1].error or "" if cb["failed"] else ""
        row["unchecked_new"] = cb["unchecked"]
        row["unrecorded_new"] = unrecorded.get(key, 0)
        row["planned_new"] = planned.get(key, 0)
        row["fell_back_base"] = len(ca["fell_back"])
        row["noisy"] = _noisy(ca["total"]) or _noisy(cb["total"])
        rows.append(row)
    out = pd.DataFrame(rows)
    out["total_delta_pct"] = 100.0 * out["total_delta_s"] / out["total_base"]
    out["mb_delta_pct"] = 100.0 * out["mb_delta"] / out["mb_base"]
    return out


# What a run was measured under, from its environment.json: (name, where in it, default).
CONDITIONS = (
    ("network profile", ("scenario", "network", "profile"), None),
    ("runtime", ("scenario", "runtime"), "podman"),
    ("node", ("node",), "host"),
    ("percentile", ("scenario", "percentile"), 95),
)
# The podman generation measured (``runtime_versions``, harness.runtimes): the host's podman
# upgraded under one node name ("host") changes the layer-store protocol and its costs as a
# change of node does. Compared where both runs recorded it (runs before it did are not).
VERSIONS = (("podman", "podman"), ("containers/storage", "containers_storage"))
# A store's settings that change what is measured through it (harness.scenario.StoreSpec),
# with their defaults: another store binary or background fetching under the same name.
STORE_SETTINGS = (("command", None), ("background_fetch", False))


def condition_differences(base: Path, new: Path) -> list[str]:
    """What the two runs were measured under differently (network profile, runtime, podman
    node and its podman and containers/storage versions, the percentile reported, a store of
    one name started by another command or with other settings, workload or store names no
    cell can pair across): a change between them is not the code's alone, so ``compare``
    warns. Runs without ``environment.json`` are not compared here."""
    envs = [read_environment(Path(d)) for d in (base, new)]
    if not all(envs):
        return []

    def get(env: dict[str, Any], keys: tuple[str, ...], default: Any) -> Any:
        for key in keys:
            env = env.get(key, {}) if isinstance(env, dict) else {}
        return env if env != {} else default

    out = []
    for name, keys, default in CONDITIONS:
        a, b = (get(e, keys, default) for e in envs)
        if a != b:
            out.append(f"{name}: {a!r} in the base run, {b!r} in the new one")
    same_node = get(envs[0], ("node",), "host") == get(envs[1], ("node",), "host")
    for name, key in VERSIONS if same_node else ():  # another node: said above
        a, b = (str((e.get("runtime_versions") or {}).get(key) or "") for e in envs)
        if a and b and a != b:
            out.append(f"{name}: {a!r} in the base run, {b!r} in the new one")
    stores = [
        {s.get("name"): s for s in get(e, ("scenario", "stores"), []) if isinstance(s, dict)}
        for e in envs
    ]
    for store in (n for n in stores[0] if n in stores[1]):
        for key, default in STORE_SETTINGS:
            a, b = (s[store].get(key, default) for s in stores)
            if a is not None and b is not None and a != b:
                out.append(f"store {store}: {key} {a!r} in the base run, {b!r} in the new one")
    # Cells pair by workload name: runs of scenarios with no workload in common share none.
    workloads = [
        sorted(str(w.get("name") or w.get("recipe")) for w in get(e, ("scenario", "workloads"), []))
        for e in envs
    ]
    if workloads[0] and workloads[1] and not set(workloads[0]) & set(workloads[1]):
        out.append(
            f"workloads: {workloads[0]!r} in the base run, {workloads[1]!r} in the new one, so "
            "no cell pairs (runs of different scenarios?)"
        )
    # Lazy cells pair by store name: runs whose stores are named apart share none of them.
    names = [sorted(s.get("name", "") for s in get(e, ("scenario", "stores"), [])) for e in envs]
    if names[0] and names[1] and not set(names[0]) & set(names[1]):
        out.append(
            f"stores: {names[0]!r} in the base run, {names[1]!r} in the new one, so no lazy "
            "cell pairs (a scenario without [[stores]] names its store 'default')"
        )
    return out


def _stat(values: list[float], statistic: str, percentile: float) -> float:
    s = pd.Series(values, dtype=float)
    return float(s.median() if statistic == "median" else s.quantile(percentile / 100.0))


def _noisy(values: list[float]) -> bool:
    """Too few samples for the median's interval, or a median whose interval is wider than
    :data:`harness.stats.WIDE_SPREAD` of it (:func:`harness.stats.spread_too_wide`)."""
    if not values:
        return False
    median = float(np.median(values))
    lo, hi = median_interval(values)
    return spread_too_wide(median, lo, hi)


def _where(r: Any) -> str:
    return f"{r['workload']}/{r['mode']}" + (f" [{r['store']}]" if r["store"] else "")


def gate_failures(cmp: pd.DataFrame, gate: Gate) -> list[str]:
    """Why the new run fails the gate (empty: it passes): fallbacks, failed measurements,
    lazy measurements without a laziness verdict, missing cells, cells of the new run with fewer
    records than it planned (an interrupted run), changes both significant
    and past the thresholds, lazy ÷ legacy ratios over their ceilings."""
    problems = []
    for _, r in cmp.iterrows():
        where = _where(r)
        if r["fell_back_new"]:
            problems.append(
                f"{where}: {r['fell_back_new']} of {r['fell_back_new'] + r['n_new']} "
                f"measurements fell back to a full pull: {r['fallback_reason']}"
            )
        if r["failed_new"]:
            problems.append(
                f"{where}: {r['failed_new']} of {r['failed_new'] + r['fell_back_new'] + r['n_new']}"
                f" measurements failed: {r['failure']}"
            )
        if r["unchecked_new"]:
            problems.append(
                f"{where}: {r['unchecked_new']} lazy measurements carry no laziness verdict "
                "(nothing shows their layers came from the store), so they count as no lazy "
                "figure"
            )
        recorded_new = r["n_new"] + r["fell_back_new"] + r["failed_new"]
        # A cell with no record at all is the missing-cell check's below when the base run
        # has a figure for it; without one (its base measurements fell back, or the base run
        # never planned it) only this check sees it: the run was cut short all the same.
        if (
            gate.fail_on_missing
            and r["unrecorded_new"]
            and (recorded_new or pd.isna(r["total_base"]))
        ):
            problems.append(
                f"{where}: {r['unrecorded_new']} of {r['planned_new']} "
                "planned measurements have no record (the run or a shard of it was interrupted "
                "or killed part way: finish it with `lazybench run --resume RUN_DIR`)"
            )
        if pd.isna(r["total_new"]):
            missing = not (r["fell_back_new"] or r["failed_new"])
            if gate.fail_on_missing and not pd.isna(r["total_base"]) and missing:
                problems.append(f"{where}: missing from the new run")
            continue
        if pd.isna(r["total_base"]):
            continue
        significant = not pd.isna(r["total_p_value"]) and r["total_p_value"] <= gate.alpha
        past = (
            r["total_delta_s"] > gate.min_total_increase_s
            and r["total_delta_pct"] > gate.max_total_increase_pct
        )
        if past and _untestable(r, gate.alpha):
            problems.append(
                f"{where}: total {r['total_base']:.2f}s → {r['total_new']:.2f}s "
                f"(+{r['total_delta_pct']:.0f}% > {gate.max_total_increase_pct:g}%) with too few "
                f"samples to test ({r['n_base']} base, {r['n_new']} new: no Mann–Whitney "
                f"p-value can reach alpha = {gate.alpha:g}); measure more samples"
            )
        elif significant and past:
            interval = (
                f"Δ 95% CI [{r['total_lo']:+.2f}, {r['total_hi']:+.2f}] s, "
                if not pd.isna(r["total_lo"]) and not pd.isna(r["total_hi"])
                else ""  # too few samples for one (harness.stats.compare_samples)
            )
            problems.append(
                f"{where}: total {r['total_base']:.2f}s → {r['total_new']:.2f}s "
                f"(+{r['total_delta_pct']:.0f}% > {gate.max_total_increase_pct:g}%, "
                f"{interval}p = {r['total_p_value']:.3f})"
            )
        significant = not pd.isna(r["mb_p_value"]) and r["mb_p_value"] <= gate.alpha
        past = (
            not pd.isna(r["mb_delta"])
            and r["mb_delta"] > gate.min_fetched_increase_mb
            and r["mb_delta_pct"] > gate.max_fetched_increase_pct
        )
        if past and _untestable(r, gate.alpha):
            problems.append(
                f"{where}: fetched {r['mb_base']:.1f} MB → {r['mb_new']:.1f} MB "
                f"(+{r['mb_delta_pct']:.0f}% > {gate.max_fetched_increase_pct:g}%) with too "
                f"few samples to test ({r['n_base']} base, {r['n_new']} new); measure more "
                "samples"
            )
        elif significant and past:
            problems.append(
                f"{where}: fetched {r['mb_base']:.1f} MB → {r['mb_new']:.1f} MB "
                f"(+{r['mb_delta_pct']:.0f}% > {gate.max_fetched_increase_pct:g}%, "
                f"p = {r['mb_p_value']:.3f})"
            )
    for mode, ceiling in gate.max_ratio.items():
        for workload in dict.fromkeys(cmp["workload"]):
            rows = cmp[cmp["workload"] == workload]
            legacy = rows[rows["mode"] == "legacy"]["total_new"]
            lazy = rows[rows["mode"] == mode]
            if legacy.empty or lazy.empty or not legacy.iloc[0] > 0:
                continue
            first = lazy.iloc[0]  # the first store's (stores keep their scenario order)
            ratio = first["total_new"] / legacy.iloc[0]
            if ratio > ceiling:
                problems.append(f"{workload}/{mode}: {mode} ÷ legacy = {ratio:.2f} > {ceiling:g}")
    return problems


def _untestable(r: Any, alpha: float) -> bool:
    """No one-sided Mann–Whitney p-value of these sample counts can reach ``alpha``: the
    smallest, all new samples above all base ones, is 1 / C(n_base + n_new, n_base) (and
    :func:`harness.stats.compare_samples` gives none below 2 samples a side). A change past
    the thresholds there fails the gate: passing it would pass any regression."""
    n, m = int(r["n_base"]), int(r["n_new"])
    return min(n, m) < 2 or 1 / math.comb(n + m, n) > alpha


def gate_warnings(cmp: pd.DataFrame) -> list[str]:
    """Cells where no change can be told from noise (too few samples or too wide a spread),
    and cells whose base measurements fell back to a full pull: left out of the base figure,
    they leave it fewer samples, or none, and then no change of the cell is tested."""
    out = []
    for _, r in cmp.iterrows():
        if r["fell_back_base"]:
            n = r["fell_back_base"] + r["n_base"]
            out.append(
                f"{_where(r)}: {r['fell_back_base']} of {n} base measurements fell back to a "
                "full pull and are not in the base figure"
                + (
                    "; with no base figure, no change of this cell is tested"
                    if not r["n_base"]
                    else ""
                )
            )
        if r["noisy"]:
            out.append(
                f"{_where(r)}: too few samples or too wide a spread to tell a change from "
                f"noise ({r['n_base']} base, {r['n_new']} new samples)"
            )
    return out


def compare_table(cmp: pd.DataFrame) -> str:
    """One row per cell: totals, Δ with its 95 % interval, Δ %, the Mann–Whitney p-value,
    MB fetched and its Δ %, and a note (fell back, in the new run or the base, noisy)."""
    lines = [
        "| workload | mode | store | total base (s) | total new (s) | Δ s [95% CI] | Δ % "
        "| p (new > base) | MB base | MB new | Δ MB % | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for _, r in cmp.iterrows():
        delta = fmt(r["total_delta_s"])
        if not pd.isna(r["total_lo"]):
            delta += f" [{r['total_lo']:+.2f}, {r['total_hi']:+.2f}]"
        notes = []
        if r["fell_back_new"]:
            notes.append(f"**fell back {r['fell_back_new']}**")
        if r["failed_new"]:
            notes.append(f"**failed {r['failed_new']}**")
        if r["unchecked_new"]:
            notes.append(f"**laziness not checked {r['unchecked_new']}**")
        if r["fell_back_base"]:
            notes.append(f"base fell back {r['fell_back_base']}")
        if r["noisy"]:
            notes.append("⚠ noisy")
        lines.append(
            f"| {r['workload']} | {r['mode']} | {r['store'] or ''} | {fmt(r['total_base'])} "
            f"| {fmt(r['total_new'])} | {delta} | {fmt(r['total_delta_pct'], 0)} "
            f"| {fmt(r['total_p_value'], 3)} | {fmt(r['mb_base'], 1)} | {fmt(r['mb_new'], 1)} "
            f"| {fmt(r['mb_delta_pct'], 0)} | {' '.join(notes)} |"
        )
    return "\n".join(lines) + "\n"
