"""What a reader looks at, derived from a run's records: table, chart, summary and report.

Everything here is regenerated from ``records.jsonl`` and ``environment.json`` at any time
(``lazybench report RUN_DIR``):

* ``summary.csv`` — one row per workload × mode: median, chosen percentile, min/max/std;
* ``table.md`` — ``mode | pull | create | run | total | MB fetched (median)`` per workload;
* ``chart.png`` / ``chart.svg`` — stacked pull/create/run bars per workload and mode, the shape
  of the upstream stargz-snapshotter figure, with every sample's total drawn as a dot;
* ``report.md`` — one page: environment, link, tables, chart, the estargz ÷ legacy ratio
  per workload beside the published ratio, and each mode's distance to the limit model
  (:mod:`harness.limit`; from ``limits.json``, filled in from the image cache when missing).
  With limits, ``table.md`` gives each workload's limit and every mode's total ÷ limit, and
  ``summary.csv`` gains ``limit_s`` and ``total_p_over_limit``.
"""

from __future__ import annotations

import csv
import errno
import io
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import pandas as pd

from harness.cli import UserError
from harness.limit import STORE_ROUND_TRIPS, UNAVOIDABLE_ROUND_TRIPS, Limit
from harness.podman import write_atomic
from harness.records import (
    RECORDS,
    Key,
    read_environment,
    read_records,
    read_superseded,
    require_run_files,
    sort_records,
)
from harness.stats import (
    CELL,
    MEDIAN_MIN_SAMPLES,
    PHASES,
    aggregate,
    compare_samples,
    median_range_coverage,
    mode_rank,
    ratio_of,
    records_frame,
    status_counts,
)

# The lazy modes' goal: a total (chosen percentile) within this factor of the limit model
# (harness.limit).
LIMIT_TARGET = 1.5

# The upstream chart's numbers, shipped inside the package (harness/data/published.csv) so an
# installed lazybench reports them wherever it runs.
PUBLISHED_CSV = resources.files("harness") / "data" / "published.csv"


def _pct_label(percentile: float) -> str:
    return f"p{percentile:g}"


def fmt(value: float, digits: int = 2) -> str:
    """``value`` to ``digits`` places; "–" for none (nan), "∞" for an interval's open end."""
    if pd.isna(value):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}f}"


def cell_label(mode: str, store: str, stores: Sequence[str]) -> str:
    """``estargz · go`` when a run has several stores, else the mode alone."""
    return f"{mode} · {store}" if store and len(stores) > 1 else mode


def cells_frame(agg: pd.DataFrame, counts: pd.DataFrame) -> pd.DataFrame:
    """The aggregates beside each cell's status counts (``ok``, ``fell_back``, ``error``,
    ``reason``): every cell measured, even one where nothing was ok."""
    if agg.empty:
        agg = pd.DataFrame(columns=[*CELL, "n"])
    out = agg.merge(counts, on=CELL, how="outer", sort=False)
    # In the records' order (the scenario's): a store whose measurements all fell back has
    # no aggregate, and is still the first store if the scenario names it first.
    workloads = list(dict.fromkeys([*counts["workload"], *agg["workload"]]))
    stores = list(dict.fromkeys([*counts["store"], *agg["store"]]))
    out["_w"] = out["workload"].map(workloads.index)
    out["_m"] = out["mode"].map(mode_rank)
    out["_s"] = out["store"].map(stores.index)
    out = out.sort_values(["_w", "_m", "_s"]).drop(columns=["_w", "_m", "_s"])
    for col in ("n", "ok", "fell_back", "error", "checked"):
        out[col] = pd.to_numeric(out[col]).fillna(0).astype(int)
    out["reason"] = out["reason"].fillna("")
    if "wide" in out:
        out["wide"] = out["wide"].astype("boolean").fillna(True).astype(bool)
    return out.reset_index(drop=True)


def _with_ci(value: float, lo: float, hi: float, digits: int = 2) -> str:
    if pd.isna(value):
        return "–"
    if pd.isna(lo) or pd.isna(hi):
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(lo, digits)}–{fmt(hi, digits)}]"


def _get(r: Any, key: str) -> float:
    return r[key] if key in r else float("nan")


# What a ⚠ in a table means (under table.md's tables; report.md names the cells instead).
WIDE_LEGEND = (
    "⚠ too few samples or too wide a spread to tell anything (the median's interval is wider "
    "than half the median)"
)


def _range(lo: float | None, hi: float | None) -> str:
    """``min–max``, or one ``–`` when there is neither (a cell without samples)."""
    if (lo is None or pd.isna(lo)) and (hi is None or pd.isna(hi)):
        return "–"
    return f"{fmt(lo)}–{fmt(hi)}"


def markdown_tables(
    cells: pd.DataFrame,
    percentile: float,
    limits: dict[str, Limit | str] | None = None,
    *,
    legend: bool = True,
) -> str:
    """Per workload, one row per mode (and store, when there are several):
    ``pull | create | run | total`` in seconds at the chosen percentile, the total with its
    95 % interval (:func:`harness.stats.quantile_interval`), MB fetched (median; from the
    pull's start to the ready line), the median total with its interval, range, MB before
    first output (median), samples, and the laziness verdict
    (``fell back`` counts, ``not checked`` for records from before the verdict existed) and
    how many measurements failed (``N failed``: a cell where all did still has its row). A ⚠
    marks a cell whose spread is too wide to tell anything
    (:func:`harness.stats.spread_too_wide`). With several stores, ``÷ FIRST`` gives each
    store's total (chosen percentile) over the first store's. With ``limits``
    (:func:`harness.limit.limits_of`), each workload's limit model is stated above its table
    and ``÷ limit`` gives each row's total (chosen percentile) over it. With ``legend``, a
    line under the tables says what ⚠ means when one is shown."""
    p = _pct_label(percentile)
    stores = [st for st in dict.fromkeys(cells["store"]) if st]
    versus = f" ÷ {stores[0]} |" if len(stores) > 1 else ""
    out: list[str] = []
    warned = False
    for workload, group in cells.groupby("workload", sort=False):
        out.append(f"### {workload}\n")
        limit = (limits or {}).get(str(workload))
        if limits is not None:
            out.append(f"{limit_line(limit)}\n")
        over = " ÷ limit |" if limits is not None else ""
        out.append(
            f"| mode | pull ({p}, s) | create ({p}, s) | run ({p}, s) | total ({p}, s) [95% CI] "
            f"| MB fetched (median) | total median (s) [bootstrap CI] | total min–max (s) "
            f"| MB before first output (median) | samples | lazy |{versus}{over}"
        )
        out.append(
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
            + "---:|" * bool(versus)
            + "---:|" * bool(over)
        )
        firsts = {
            r["mode"]: _get(r, "total_p")
            for _, r in group.iterrows()
            if stores and r["store"] == stores[0]
        }
        for _, r in group.iterrows():
            total = _with_ci(_get(r, "total_p"), _get(r, "total_p_lo"), _get(r, "total_p_hi"))
            median = _with_ci(
                _get(r, "total_median"), _get(r, "total_median_lo"), _get(r, "total_median_hi")
            )
            warn = " ⚠" if r.get("wide", False) and r["ok"] else ""
            warned = warned or bool(warn)
            if r["fell_back"]:
                lazy = f"**fell back {r['fell_back']}/{r['ok'] + r['fell_back']}**"
            elif r["store"] and r["ok"]:
                lazy = {0: "not checked", r["ok"]: "yes"}.get(
                    r["checked"], f"yes ({r['checked']} of {r['ok']} checked)"
                )
            elif r["store"]:
                lazy = "–"
            else:
                lazy = ""
            if r["error"]:  # failed measurements are no sample: said here, listed in report.md
                lazy = f"{lazy} · " * (lazy not in ("", "–")) + f"**{r['error']} failed**"
            out.append(
                f"| {cell_label(r['mode'], r['store'], stores)} | {fmt(_get(r, 'pull_p'))} "
                f"| {fmt(_get(r, 'create_p'))} | {fmt(_get(r, 'run_p'))} | **{total}**{warn} "
                f"| {fmt(_get(r, 'mb_fetched_median'), 1)} | {median} "
                f"| {_range(_get(r, 'total_min'), _get(r, 'total_max'))} "
                f"| {fmt(_get(r, 'mb_before_first_output_median'), 1)} | {r['ok']} | {lazy} |"
                + (
                    f" {_ratio(_get(r, 'total_p') / firsts.get(r['mode'], float('nan')))} |"
                    if versus and r["store"]
                    else " |" * bool(versus)
                )
                + (f" {_over_limit(_get(r, 'total_p'), limit)} |" if over else "")
            )
        out.append("")
    if legend and warned:
        out += [WIDE_LEGEND, ""]
    return "\n".join(out)


def limit_line(limit: Limit | str | None) -> str:
    """``limit **1.23 s** = 0.45 s transfer (…) + 0.28 s round trips (…) + 0.50 s runtime
    floor (…)``, or why there is none."""
    if limit is None:
        return "limit: unavailable"
    if isinstance(limit, str):
        return f"limit: unavailable ({limit})"
    return (
        f"limit **{limit.total_s:.2f} s** = {limit.transfer_s:.2f} s transfer "
        f"({limit.compressed_bytes / 1e6:.1f} MB compressed read ÷ {limit.rate_mbit:.1f} Mbit/s) "
        f"+ {limit.rtt_s:.2f} s round trips ({limit.round_trips} × {limit.rtt_ms:.1f} ms) "
        f"+ {limit.floor_s:.2f} s runtime floor (legacy {limit.floor_parts}, median)"
    )


def _rtt_and_floor_prose(limits: dict[str, Limit | str]) -> str:
    """The round-trip and runtime-floor terms of the limit in words, as this run's limits
    count them (a run recorded before the re-pull keeps its old wording)."""
    repull = {v.floor_repull for v in limits.values() if isinstance(v, Limit)}
    if repull == {True}:
        return (
            f"the store's {STORE_ROUND_TRIPS} round trips no lazy pull can avoid × the "
            "measured RTT + the runtime's own floor (legacy's re-pull of the image already "
            "local + create + run, median: podman's own pull work and round trips are in "
            "its re-pull)"
        )
    if repull == {True, False}:
        return (
            "the round trips no lazy pull can avoid × the measured RTT (the store's "
            f"{STORE_ROUND_TRIPS} where the floor is legacy's re-pull + create + run, which "
            f"holds podman's; all {UNAVOIDABLE_ROUND_TRIPS} where it is create + run) + the "
            "runtime's own floor (with the image local, median)"
        )
    return (
        f"{UNAVOIDABLE_ROUND_TRIPS} round trips no lazy pull can avoid × the measured RTT + "
        "the runtime's own floor (legacy's create + run with the image local, median)"
    )


def _over_limit(total: float, limit: Limit | str | None) -> str:
    """``total ÷ limit`` to 2 places, more where it would print as :data:`LIMIT_TARGET`
    without being it (1.503 is not "1.50×", within the 1.5× target: :func:`_ratio`)."""
    if not isinstance(limit, Limit) or pd.isna(total) or limit.total_s <= 0:
        return "–"
    return f"{_ratio(total / limit.total_s, LIMIT_TARGET)}×"


def with_limits(cells: pd.DataFrame, limits: dict[str, Limit | str] | None) -> pd.DataFrame:
    """``cells`` with ``limit_s`` (the workload's limit, NaN without one) and
    ``total_p_over_limit`` columns, when any workload has a limit; else unchanged."""
    if not limits or not any(isinstance(v, Limit) for v in limits.values()):
        return cells
    secs = {w: v.total_s for w, v in limits.items() if isinstance(v, Limit)}
    limit_s = cells["workload"].map(lambda w: secs.get(str(w), float("nan"))).astype(float)
    total = pd.to_numeric(cells["total_p"]) if "total_p" in cells else float("nan")
    return cells.assign(limit_s=limit_s, total_p_over_limit=total / limit_s)


def limit_section(
    cells: pd.DataFrame, limits: dict[str, Limit | str], percentile: float
) -> list[str]:
    """The report's limit-model section: per workload the limit and its parts, every mode's
    total (chosen percentile) over it, and whether every lazy mode is within
    :data:`LIMIT_TARGET` of it."""
    p = _pct_label(percentile)
    stores = [st for st in dict.fromkeys(cells["store"]) if st]
    labels = list(
        dict.fromkeys(
            cell_label(m, st, stores) for m, st in zip(cells["mode"], cells["store"], strict=True)
        )
    )
    lines = [
        f"## Distance to the limit (total {p} ÷ limit)",
        "",
        "The limit is the lower bound of a lazy start on the measured link: the compressed "
        "bytes the workload reads (its access trace mapped onto the TOCs of its most finely "
        "chunked image — the chunk-level estargz image, files read in part in 64 KiB chunks, "
        "else estargz-noopt —: the chunks covering the byte ranges read, whole files where the "
        f"trace has no ranges) ÷ the measured bandwidth + {_rtt_and_floor_prose(limits)}. See "
        "harness/limit.py for each term. Target: every lazy mode within "
        f"{LIMIT_TARGET:g}× the limit.",
        "",
        "| workload | MB read (compressed) | files (with ranges) | transfer (s) "
        "| round trips (s) | runtime floor (s) | limit (s) | "
        + " | ".join(labels)
        + f" | lazy within {LIMIT_TARGET:g}× |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(labels) + "---|",
    ]
    reasons = []
    below: list[str] = []  # lazy cells with a start faster than their workload's limit
    for workload, group in cells.groupby("workload", sort=False):
        limit = limits.get(str(workload))
        if not isinstance(limit, Limit):
            reasons.append(f"- {workload}: {limit or 'unavailable'}")
            continue
        ratios: dict[str, float] = {}
        fell: dict[str, str] = {}
        lazy: list[float] = []
        for _, r in group.iterrows():
            ratio = _get(r, "total_p") / limit.total_s
            label = cell_label(r["mode"], r["store"], stores)
            ratios[label] = ratio
            fell[label] = _fell_back_note(r)
            fastest = _get(r, "total_min")
            if r["store"] and not pd.isna(fastest) and fastest < limit.total_s:
                fast = _ratio(fastest, limit.total_s)  # as many places as tell them apart
                places = len(fast.split(".")[1])
                below.append(
                    f"{workload} {label} (fastest start {fast} s, limit "
                    f"{limit.total_s:.{places}f} s)"
                )
            # A lazy cell with a start that fell back to a full pull (or no ok figure at
            # all) is not within, whatever its other starts' figure.
            if r["store"]:
                lazy.append(math.inf if pd.isna(ratio) or fell[label] else ratio)
        verdict = "–" if not lazy else ("yes" if max(lazy) <= LIMIT_TARGET else "no")
        lines.append(
            f"| {workload} | {limit.compressed_bytes / 1e6:.1f} "
            f"| {limit.files if limit.files is not None else '–'} "
            f"({limit.files_with_ranges if limit.files_with_ranges is not None else '–'}) "
            f"| {limit.transfer_s:.2f} | {limit.rtt_s:.2f} | {limit.floor_s:.2f} "
            f"| **{limit.total_s:.2f}** | "
            + " | ".join(
                _ratio(ratios.get(label), LIMIT_TARGET)
                + "×" * (label in ratios)
                + fell.get(label, "")
                for label in labels
            )
            + f" | {verdict} |"
        )
    whole = [
        w
        for w, v in limits.items()
        if isinstance(v, Limit) and v.files and (v.files_with_ranges or 0) < v.files
    ]
    if whole:
        lines += [
            "",
            f"Counted whole (their trace predates byte ranges): files of {', '.join(whole)}. "
            "A file read in part then costs more than was read and the limit is no lower "
            "bound; the ranges come with a new trace (delete the workload's trace under "
            "`<cache>/traces/`; the estargz image is then rebuilt from it).",
        ]
    if below:
        lines += [
            "",
            "Faster than the limit: " + "; ".join(below) + ". There the limit is no lower "
            "bound: it adds the transfer to the runtime floor, while a lazy start overlaps "
            "them (the store fetches during the pull and while the workload runs).",
        ]
    if reasons:
        lines += ["", "No limit for:", "", *reasons]
    return [*lines, ""]


def write_summary_csv(agg: pd.DataFrame, path: Path) -> None:
    write_atomic(path, agg.to_csv(index=False, float_format="%.4f"))


# -- chart --------------------------------------------------------------------------------------

PHASE_COLORS = {"pull": "#4472c4", "create": "#ed7d31", "run": "#70ad47"}


def draw_chart(
    df: pd.DataFrame, cells: pd.DataFrame, percentile: float, stem: Path, title: str = ""
) -> list[Path]:
    """Stacked pull/create/run bars (each phase's chosen percentile) per mode (and store), one
    panel per workload, the total's chosen percentile — the table's figure, which the phases'
    percentiles need not add up to — as a labelled line with its 95 % interval, each sample's
    total as a black dot, and with several stores each store's total over the first store's
    (``1.23×``);
    a cell with fallbacks has its label in red with "fell back N×" (and no bar when
    nothing was ok). Written as ``stem.png`` and ``stem.svg``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(cells["workload"]))
    stores = [st for st in dict.fromkeys(cells["store"]) if st]
    widest = max(len(cells[cells["workload"] == w]) for w in workloads)
    fig, axes = plt.subplots(
        1,
        len(workloads),
        figsize=(max(5.5, (1.4 + 0.55 * widest) * len(workloads)), 4.8),
        squeeze=False,
    )
    top = float(pd.to_numeric(df["total_s"]).max()) if not df.empty else 0.0
    for ax, workload in zip(axes[0], workloads, strict=True):
        group = cells[cells["workload"] == workload]
        labels = [
            cell_label(m, st, stores) for m, st in zip(group["mode"], group["store"], strict=True)
        ]
        xs = list(range(len(labels)))
        bottom = [0.0] * len(labels)
        for phase in PHASES:
            column = group[f"{phase}_p"] if f"{phase}_p" in group else [float("nan")] * len(xs)
            heights = [0.0 if pd.isna(v) else float(v) for v in column]
            ax.bar(xs, heights, 0.65, bottom=bottom, color=PHASE_COLORS[phase], label=phase)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        # The ratio to the first store, as the table gives it: of the totals' percentile
        # (none at all when every measurement fell back: no ok figure, no column).
        totals = group["total_p"] if "total_p" in group else [float("nan")] * len(xs)
        firsts = {
            m: t
            for m, st, t in zip(group["mode"], group["store"], totals, strict=True)
            if stores and st == stores[0]
        }
        for x, (_, r) in zip(xs, group.iterrows(), strict=True):
            mine = df[
                (df["workload"] == workload)
                & (df["mode"] == r["mode"])
                & (df["store"] == r["store"])
            ]["total_s"]
            ax.scatter([x] * len(mine), mine, s=9, color="black", zorder=3)
            # The total's percentile (the table's figure) is not the stacked phases'
            # percentiles added up when the phases peak in different samples: it is drawn,
            # labelled and given its interval on its own.
            total = _get(r, "total_p")
            if not pd.isna(total) and bottom[x] > 0:
                lo, hi = _get(r, "total_p_lo"), _get(r, "total_p_hi")
                bounds = [v for v in (lo, hi) if not pd.isna(v) and math.isfinite(v)]
                err = [[max(0.0, total - lo)], [max(0.0, hi - total)]] if len(bounds) == 2 else None
                ax.errorbar(
                    [x],
                    [total],
                    yerr=err,
                    fmt="_",
                    markersize=14,
                    mew=1.5,
                    color="#222",
                    capsize=3,
                    lw=0.8,
                    zorder=4,
                    label=f"total ({_pct_label(percentile)})" if x == 0 else None,
                )
                label = f"{total:.1f}"
                first = firsts.get(r["mode"], float("nan"))
                if len(stores) > 1 and r["store"] and r["store"] != stores[0] and first > 0:
                    label += f"\n{total / first:.2f}× {stores[0]}"
                ax.text(
                    x, max([bottom[x], total, *bounds]), label, ha="center", va="bottom", fontsize=8
                )
        fell, failed = list(group["fell_back"]), list(group["error"])
        labels = [
            lab + f"\nfell back {n}×" * bool(n) + f"\nfailed {e}×" * bool(e)
            for lab, n, e in zip(labels, fell, failed, strict=True)
        ]
        ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
        for tick, n, e in zip(ax.get_xticklabels(), fell, failed, strict=True):
            if n or e:
                tick.set_color("#c00000")
        ax.set_title(workload)
        ax.set_ylabel("seconds")
        ax.set_ylim(0, max([*bottom, top]) * 1.3 or 1)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(
        title or f"time to first exec ({_pct_label(percentile)}; dots: samples)", fontsize=10
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    paths = []
    for ext in ("png", "svg"):
        path = stem.with_suffix(f".{ext}")
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{ext}")
        try:
            # No date, fixed element ids: a chart rebuilt from the same records is the same
            # file (a committed baseline's chart.svg changes only with its figures).
            meta = {"Date": None} if ext == "svg" else {"Software": None}
            with plt.rc_context({"svg.hashsalt": "lazybench"}):
                fig.savefig(tmp, dpi=120, metadata=meta)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            plt.close(fig)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
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
    """The published image a workload stands in for: named by ``reference`` (None when it
    names none), else the one whose stand_in equals the workload or recipe name."""
    if reference:
        return next(
            (pub for pub in published if reference in (pub.image, pub.image.split(":")[0])), None
        )
    for pub in published:
        if pub.stand_in in (workload, recipe):
            return pub
    return None


def _through(agg: pd.DataFrame, first_store: str | None) -> pd.DataFrame:
    """The legacy cells and those of ``first_store`` (None: the first store ``agg`` has).
    Named by the caller from every cell, fallbacks included: a first store whose
    measurements all fell back has no ok cell, and its ratios are none, not another's."""
    if first_store is None:
        first_store = next((st for st in agg["store"] if st), "")
    return agg[(agg["store"] == "") | (agg["store"] == first_store)]


def _fell_back_note(cell: Any) -> str:
    """`` (N of M fell back)`` for a cell (a row of :func:`cells_frame` or
    :func:`harness.stats.status_counts`) with fallbacks, else ""."""
    n = int(cell.get("fell_back", 0) or 0)
    return f" ({n} of {int(cell.get('ok', 0) or 0) + n} fell back)" if n else ""


def ratio_rows(
    agg: pd.DataFrame,
    workloads: Sequence[dict[str, Any]],
    published: Sequence[Published],
    first_store: str | None = None,
    counts: pd.DataFrame | None = None,
) -> list[dict[str, Any]]:
    """Per workload: lazy-mode total ÷ legacy total (chosen percentile) through
    ``first_store`` (see :func:`_through`), beside published; with the run's status
    ``counts`` (:func:`harness.stats.status_counts`), ``<mode>_fell_back`` notes the
    first store's fallbacks in that mode (:func:`_fell_back_note`), left out of the ratio."""
    info = {w["name"]: w for w in workloads}
    rows = []
    if first_store is None:
        first_store = next((st for st in agg["store"] if st), "")
    fell = {
        (c["workload"], c["mode"]): _fell_back_note(c)
        for _, c in (counts if counts is not None else pd.DataFrame()).iterrows()
        if first_store and c["store"] == first_store
    }
    agg = _through(agg, first_store)
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
            row[f"{mode}_fell_back"] = fell.get((workload, mode), "")
        rows.append(row)
    return rows


def _ratio(value: float | None, against: float | None = None) -> str:
    """``value`` to 2 places, or as many more (up to 6) as it takes not to print it equal to
    ``against``, the bound a verdict beside it compares it with, when it is not: 1.201
    against 1.2 reads "1.201", not "1.20" beside "no"."""
    if value is None or pd.isna(value):
        return "–"
    digits = 2
    while (
        against is not None
        and not pd.isna(against)
        and value != against
        and digits < 6
        and f"{value:.{digits}f}" == f"{against:.{digits}f}"
    ):
        digits += 1
    return f"{value:.{digits}f}"


def ratio_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| workload | stands in for | estargz ÷ legacy | published | estargz-noopt ÷ legacy "
        "| published | zstd-chunked ÷ legacy | at or below published |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ours, pub = r["estargz"], r["published_estargz"]
        fell = {mode: r.get(f"{mode}_fell_back", "") for mode in ("estargz", "estargz-noopt")}
        verdict = "–" if ours is None or pub is None else ("yes" if ours <= pub else "no")
        if fell["estargz"] and pub is not None:  # a start that was a full pull is not at it
            verdict = "no"
        lines.append(
            f"| {r['workload']} | {r['published_image'] or '–'} "
            f"| **{_ratio(ours, pub)}**{fell['estargz']} "
            f"| {_ratio(pub, ours)} | {_ratio(r['estargz-noopt'])}{fell['estargz-noopt']} "
            f"| {_ratio(r['published_estargz-noopt'])} | {_ratio(r['zstd-chunked'])} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


# zstd:chunked through the store reads as eStargz without prioritized files does (both fetch
# on demand): its total and the bytes it fetches before the first output should match.
ZSTD_LAZY_TARGETS = {"total": 1.1, "mb_before_first_output": 1.2}


def zstd_lazy_lines(
    agg: pd.DataFrame, percentile: float, first_store: str | None = None
) -> list[str]:
    """A report section: per workload, ``zstd-chunked-lazy`` ÷ ``estargz-noopt`` through
    ``first_store`` (see :func:`_through`) — total (median and the chosen percentile) and MB
    fetched before the first output (median) — against :data:`ZSTD_LAZY_TARGETS`. Empty
    when the run lacks either mode. ``agg`` may be :func:`cells_frame`'s cells: a mode's
    fallbacks are then named beside the workload, a zstd-chunked-lazy start that fell back
    is not within the targets, and one of estargz-noopt leaves nothing to tell ("–")."""
    if agg.empty or not {"zstd-chunked-lazy", "estargz-noopt"} <= set(agg["mode"]):
        return []
    agg = _through(agg, first_store)
    lines = [
        "## zstd:chunked through the store ÷ eStargz without prioritized files",
        "",
        "Both read on demand; targets: total within "
        f"{ZSTD_LAZY_TARGETS['total']}×, bytes before the first output within "
        f"{ZSTD_LAZY_TARGETS['mb_before_first_output']}×.",
        "",
        f"| workload | total median ÷ | total {_pct_label(percentile)} ÷ "
        "| MB before first output (median) ÷ | within targets |",
        "|---|---:|---:|---:|---|",
    ]
    for workload, group in agg.groupby("workload", sort=False):
        by_mode = {r["mode"]: r for _, r in group.iterrows()}
        z, e = by_mode.get("zstd-chunked-lazy"), by_mode.get("estargz-noopt")
        if z is None or e is None:
            continue

        def ratio(key: str, z: Any = z, e: Any = e) -> float | None:
            num, den = _get(z, key), _get(e, key)
            return num / den if den and den > 0 and not pd.isna(num) else None

        median, p95 = ratio("total_median"), ratio("total_p")
        mb = ratio("mb_before_first_output_median")
        within = (
            "–"
            if median is None or mb is None
            else (
                "yes"
                if median <= ZSTD_LAZY_TARGETS["total"]
                and mb <= ZSTD_LAZY_TARGETS["mb_before_first_output"]
                else "no"
            )
        )
        fell = {m: _fell_back_note(r) for m, r in (("zstd-chunked-lazy", z), ("estargz-noopt", e))}
        if fell["zstd-chunked-lazy"]:
            within = "no"
        elif fell["estargz-noopt"]:
            within = "–"
        notes = "".join(f" ({m}: {note[2:]}" for m, note in fell.items() if note)
        lines.append(
            f"| {workload}{notes} | {_ratio(median, ZSTD_LAZY_TARGETS['total'])} | {_ratio(p95)} "
            f"| {_ratio(mb, ZSTD_LAZY_TARGETS['mb_before_first_output'])} | {within} |"
        )
    return [*lines, ""]


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
        if key == "store_command" and len(env.get("stores") or {}) > 1:
            for name, command in env["stores"].items():
                lines.append(f"- **store {name}**: `{' '.join(command)}`")
            continue
        if env.get(key) not in (None, ""):
            value = env[key]
            if isinstance(value, list):
                value = " ".join(value)
            lines.append(f"- **{key}**: `{value}`")
    versions = env.get("runtime_versions") or {}
    if versions:
        lines.append(
            f"- **runtime node**: `{versions.get('node', '?')}`: podman "
            f"`{versions.get('podman', '?')}`, containers/storage "
            f"`{versions.get('containers_storage', '?')}`"
        )
    link = env.get("link") or {}
    if link:
        lines.append(f"- **link**: {describe_link(link)}")
    return lines


def persistence_lines(records: Sequence[Any]) -> list[str]:
    """A report section when the runtime forgot lazily pulled images (records'
    ``persisted = false``): which measurements, and why."""
    lost = [r for r in records if getattr(r, "persisted", None) is False]
    if not lost:
        return []
    checked = sum(1 for r in records if getattr(r, "persisted", None) is not None)
    first = lost[0]
    return [
        "",
        "## Lazily pulled images lost by the runtime",
        "",
        f"{len(lost)} of {checked} lazy pulls were gone "
        f"once the pull exited (podman {first.podman_version}, containers/storage "
        f"{first.storage_version}): {first.persistence}. The times above are what a user of "
        "this runtime gets: `create` pulls the image again through the store.",
    ]


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
        # False only: runs recorded before the delayer ran real-time do not say (None).
        slow = link.get("delay_realtime") is False
        text += f" (delay: {link['delay_method']}"
        text += ", at normal priority: slower when the CPU is busy)" if slow else ")"
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
    missing: list[Key]
    table_text: str
    stores: list[dict[str, Any]] = field(default_factory=list)


def store_rows(df: pd.DataFrame, percentile: float, counts: pd.DataFrame) -> list[dict[str, Any]]:
    """Per workload × lazy mode measured through several stores: each store's total (median
    and chosen percentile) and its ratio to the first store's, with 95 % bootstrap intervals
    of the ratios (:func:`harness.stats.ratio_of`: none for the percentile's from too few
    samples) and the two-sided Mann–Whitney p-value of the totals; ``fell_back`` counts
    each store's fallbacks (``counts``: :func:`harness.stats.status_counts`)."""
    lazy = counts[(counts["store"] != "") & (counts["ok"] + counts["fell_back"] > 0)]
    stores = list(dict.fromkeys(lazy["store"]))
    if len(stores) < 2:
        return []
    if df.empty:
        df = pd.DataFrame(columns=["workload", "mode", "store", "total_s"])
    rows = []
    for (workload, mode), cells in lazy.groupby(["workload", "mode"], sort=False):
        group = df[(df["workload"] == workload) & (df["mode"] == mode)]
        first = pd.to_numeric(group[group["store"] == stores[0]]["total_s"]).dropna()
        fell_back = dict(zip(cells["store"], cells["fell_back"], strict=True))
        for store in stores:
            if store not in fell_back:
                continue
            mine = pd.to_numeric(group[group["store"] == store]["total_s"]).dropna()
            row: dict[str, Any] = {"workload": workload, "mode": mode, "store": store}
            row["n"] = len(mine)
            row["fell_back"] = int(fell_back[store])
            if mine.empty:
                row |= {"median": float("nan"), "p": float("nan"), "p_value": float("nan")}
                for key in ("median", "p"):
                    row[f"ratio_{key}"] = row[f"ratio_{key}_lo"] = row[f"ratio_{key}_hi"] = None
                rows.append(row)
                continue
            row["median"] = float(mine.median())
            row["p"] = float(mine.quantile(percentile / 100.0))
            for stat in ("median", "percentile"):
                key = "median" if stat == "median" else "p"
                if first.empty:
                    row[f"ratio_{key}"] = row[f"ratio_{key}_lo"] = row[f"ratio_{key}_hi"] = None
                    continue
                ratio = (
                    ratio_of(first, mine, stat, percentile)
                    if store != stores[0]
                    else (1.0, float("nan"), float("nan"))
                )
                row[f"ratio_{key}"], row[f"ratio_{key}_lo"], row[f"ratio_{key}_hi"] = ratio
            row["p_value"] = (
                compare_samples(first, mine).p_value_two_sided
                if store != stores[0] and not first.empty
                else float("nan")
            )
            rows.append(row)
    return rows


def store_table(rows: Sequence[dict[str, Any]], percentile: float) -> str:
    """``workload | mode | store | total median | total pN | ÷ first (median) | ÷ first (pN)
    | p-value`` with 95 % intervals of the ratios."""
    p = _pct_label(percentile)
    first = rows[0]["store"] if rows else ""
    lines = [
        f"| workload | mode | store | total median (s) | total {p} (s) "
        f"| ÷ {first} (median) [95% CI] | ÷ {first} ({p}) [95% CI] "
        "| Mann–Whitney p (two-sided) | samples | fell back |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:

        def ratio(key: str, r: dict[str, Any] = r) -> str:
            if r[f"ratio_{key}"] is None:
                return "–"
            return _with_ci(r[f"ratio_{key}"], r[f"ratio_{key}_lo"], r[f"ratio_{key}_hi"])

        lines.append(
            f"| {r['workload']} | {r['mode']} | {r['store']} | {fmt(r['median'])} "
            f"| {fmt(r['p'])} | {ratio('median')} | {ratio('p')} "
            f"| {fmt(r['p_value'], 3)} | {r['n']} "
            f"| {'**' + str(r['fell_back']) + '**' if r['fell_back'] else 0} |"
        )
    return "\n".join(lines) + "\n"


def laziness_lines(records: Sequence[Any]) -> list[str]:
    """The laziness verdict of the lazy-mode records: layers from the store, fallbacks and
    their reasons."""
    lazy = [r for r in records if r.store and r.status in ("ok", "fell-back")]
    if not lazy:
        return []
    known = [r for r in lazy if r.layers_total is not None]
    fell = [r for r in lazy if r.status == "fell-back"]
    lines = [
        "## Laziness",
        "",
        f"{len(lazy)} lazy measurements; {len(known)} with the runtime's storage read "
        "(records from before the verdict existed have none). A measurement is lazy when the "
        "runtime took every layer from the store (its overlay layer links into the store's "
        "mount) and the registry served no layer whole to the runtime.",
        "",
    ]
    if fell:
        lines += [f"**{len(fell)} fell back to a full pull** (not in the figures above):", ""]
        lines += [
            f"- sample {r.sample} {r.workload}/{r.mode} [{r.store}]: "
            f"{r.layers_from_store}/{r.layers_total} layers from the store — {r.error}"
            for r in fell
        ]
    unchecked = [r for r in lazy if r.status == "ok" and r.layers_total is None]
    if unchecked:
        lines += [""] * bool(fell) + [
            f"**{len(unchecked)} counted without a verdict** (records from before it existed: "
            "nothing shows their layers came from the store):",
            "",
        ]
        lines += [f"- sample {r.sample} {r.workload}/{r.mode} [{r.store}]" for r in unchecked]
    elif not fell:
        lines.append("Every lazy measurement took all its layers from the store.")
    return [*lines, ""]


def run_limits(
    run_dir: Path,
    env: dict[str, Any],
    df: pd.DataFrame,
    workloads: Sequence[str],
    *,
    cache_dir: Path | None = None,
    recompute: bool = False,
) -> dict[str, Limit | str] | None:
    """The limit of each workload of a run (:func:`harness.limit.limits_of`) from its
    ``limits.json``; when it has none (a run from before it existed) or ``recompute``, the
    byte counts are computed from the image cache (:func:`harness.limit.compute_run_limits`)
    and written when the cache had any. None: no limit information at all (the tables then
    keep their usual shape)."""
    from harness.limit import compute_run_limits, limits_of, read_limits, write_limits

    entries = None if recompute else read_limits(run_dir)
    if entries is None:
        try:
            found = compute_run_limits(run_dir, cache_dir)
        except UserError:
            found = {}
        # Only counts the cache could make replace what the run has: a cache that lacks an
        # image never overwrites a workload's recorded count with "unavailable".
        counted = {w: e for w, e in found.items() if "compressed_bytes" in e}
        if counted:
            write_limits(run_dir, counted)
        entries = read_limits(run_dir)
    if entries is None:
        return None
    return limits_of(entries, env, df, workloads)


def timeline_lines(
    run_dir: Path, env: dict[str, Any] | None = None, records: Sequence[Any] | None = None
) -> list[str]:
    """The pull phase split per workload × lazy mode × store, from the run's pull timelines
    (harness.timeline: sample 0, our store only), each linked, with each pull's floor on the
    run's link (``env``: its ``environment.json``; :class:`harness.limit.PullFloor`, "–"
    without a measured link); nothing for a run without timelines (older runs, foreign
    stores). With the run's ``records``, a timeline whose measurement is not in the figures
    (it fell back to a full pull, or failed) is no lazy pull's: it is listed under the table
    with its status and link, never tabled as a pull of the store."""
    from harness.limit import PULL_ROUND_TRIPS, pull_floor
    from harness.timeline import read_timelines

    docs = read_timelines(run_dir)
    if not docs:
        return []
    docs.sort(key=lambda d: (str(d.get("workload")), mode_rank(str(d.get("mode"))), d["file"]))
    aside: list[str] = []
    if records is not None:
        status = {r.key: r.status for r in records}
        kept = []
        for d in docs:
            key = Key(d.get("sample"), d.get("workload"), d.get("mode"), d.get("store") or "")
            what = {"fell-back": "fell back to a full pull", "error": "failed"}.get(
                status.get(key, "ok")
            )
            if what is None:
                kept.append(d)
                continue
            md = d["file"].removesuffix(".json") + ".md"
            aside.append(
                f"- {d.get('workload', '?')}/{d.get('mode', '?')} · {d.get('store') or '–'}: "
                f"sample {d.get('sample', '?')} {what}, so its timeline "
                f"([table]({md}) · [events]({d['file']})) is no lazy pull's"
            )
        docs = kept
    lines = [
        "",
        "## Pull phase (timeline of sample 0)",
        "",
        "What our store did per layer during `podman pull` (one measurement per workload × "
        "lazy mode; foreign stores record none). *Store*: time in which a request of the "
        "runtime to the store was unanswered (the store on the critical path); *runtime*: the "
        "rest of the pull, the runtime's own work; *store spans*: the store's manifest, "
        "footer, TOC fetch, verify, parse and tree spans added up (they overlap). *Floor*: "
        "the runtime's own share of this pull plus the least the store's part could take on "
        f"the measured link — {PULL_ROUND_TRIPS} round trips (connection, manifest, every "
        "layer's TOC at once) and the TOC bytes fetched at the measured bandwidth "
        "(harness/limit.py, `PullFloor`); *over floor*: pull − floor, the store's time "
        "beyond the network's.",
        "",
        "| workload | mode | store | pull s | store s | runtime s | store spans s "
        "| first request s | layers | TOC MB | floor s | over floor s | timeline |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def num(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, int | float) else "–"

    for d in docs:
        s = d["summary"]
        md = d["file"].removesuffix(".json") + ".md"
        floor = pull_floor(s, env or {})
        pull = s.get("pull_s")
        over = pull - floor.total_s if floor and isinstance(pull, int | float) else None
        toc = s.get("toc_bytes")
        lines.append(
            f"| {d.get('workload', '?')} | {d.get('mode', '?')} | {d.get('store') or '–'} "
            f"| {num(pull)} | {num(s.get('store_s'))} | {num(s.get('runtime_s'))} "
            f"| {num(s.get('store_work_s'))} | {num(s.get('first_request_at'))} "
            f"| {s.get('layers', '–')} "
            f"| {f'{toc / 1e6:.2f}' if isinstance(toc, int) else '–'} "
            f"| {num(floor.total_s if floor else None)} | {num(over)} "
            f"| [table]({md}) · [events]({d['file']}) |"
        )
    if not docs:
        lines = lines[:4]  # the heading and what a timeline is, no empty table
    if aside:
        lines += ["", "Not in the table (their measurement is not in the figures):", "", *aside]
    return lines


def write_report(
    run_dir: Path, *, cache_dir: Path | None = None, recompute_limits: bool = False
) -> Report:
    """(Re)build summary.csv, table.md, chart.png/svg and report.md from the run's records
    (and ``limits.json``: :func:`run_limits`, with ``cache_dir`` the image cache). Each file
    and the set are replaced together once all of them are written (in a staging directory
    beside them), or none is: a failure part-way leaves the earlier report as it was.

    Raises :class:`UserError` when ``run_dir`` is not a run directory, holds no finished
    measurement, or a file there cannot be read or written (naming the file)."""
    run_dir = Path(run_dir)
    staging: Path | None = None
    try:
        require_run_files(run_dir, RECORDS)
        staging = Path(tempfile.mkdtemp(prefix=".report-", dir=run_dir))
        try:
            report = _write_report(run_dir, staging, cache_dir, recompute_limits)
        except _OnlyFailures:
            _replace_from(staging, run_dir)  # report.md, listing them
            raise
        _replace_from(staging, run_dir)
        return report
    except OSError as exc:
        where = exc.filename2 or exc.filename or run_dir
        raise UserError(f"{where}: {exc.strerror or exc}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _replace_from(staging: Path, run_dir: Path) -> None:
    """Move the files written into ``staging`` over those of ``run_dir``."""
    staged = sorted(staging.iterdir())
    for path in staged:  # what would stop a replace part-way, before the first one
        if (run_dir / path.name).is_dir():
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(run_dir / path.name))
    for path in staged:
        os.replace(path, run_dir / path.name)


class _OnlyFailures(UserError):
    """Every measurement of the run failed: report.md, listing why, is all there is."""


def _incomplete_lines(missing: list[Any]) -> list[str]:
    """The report header's note of planned measurements without a record (none: no lines),
    placed under the measurement count it qualifies."""
    if not missing:
        return []
    return [
        f"**Incomplete**: {len(missing)} planned measurements have no record "
        "(resume with `lazybench run --resume RUN_DIR`).",
        "",
    ]


def _failure_lines(errors: Sequence[Any]) -> list[str]:
    lines = ["", "## Failed measurements", ""]
    return lines + [
        f"- sample {r.sample} {r.workload}/{r.mode}"
        + (f" [{r.store}]" if r.store else "")
        + f": {r.error}"
        for r in errors
    ]


def _write_report(
    run_dir: Path, out: Path, cache_dir: Path | None, recompute_limits: bool
) -> Report:
    """The report of ``run_dir``'s records, its files written into ``out``; the
    :class:`Report` names them where :func:`write_report` moves them (``run_dir``)."""
    env = read_environment(run_dir)
    scenario = env.get("scenario", {})
    percentile = float(scenario.get("percentile", 95))
    records = sort_records(read_records(run_dir), env)
    refuse_unplanned(run_dir, records, env)
    df = records_frame(records)
    counts = status_counts(records)
    if df.empty and not counts["fell_back"].any():
        errors = [r for r in records if r.status == "error"]
        if not errors:
            raise UserError(f"{run_dir}: no successful measurements to report on")
        recorded = {r.key for r in records}
        lines = [
            f"# lazybench run `{run_dir.name}`",
            "",
            f"Scenario **{scenario.get('name', '?')}**: no measurement succeeded; "
            f"{len(errors)} failed (no table, no chart).",
            "",
            *_incomplete_lines([k for k in planned_keys(env) if k not in recorded]),
            *_environment_lines(env),
            *_failure_lines(errors),
        ]
        write_atomic(out / "report.md", "\n".join(lines) + "\n")
        raise _OnlyFailures(
            f"{run_dir}: no successful measurements to report on; "
            f"{run_dir / 'report.md'} lists the {len(errors)} failures"
        )
    agg = aggregate(df, percentile) if not df.empty else pd.DataFrame()
    cells = cells_frame(agg, counts)  # a cell whose every measurement failed has its row too
    workload_names = [str(w) for w in dict.fromkeys(cells["workload"])]
    limits = run_limits(
        run_dir, env, df, workload_names, cache_dir=cache_dir, recompute=recompute_limits
    )
    table_text = markdown_tables(cells, percentile, limits)
    write_atomic(out / "table.md", table_text)
    write_summary_csv(with_limits(cells, limits).drop(columns=["reason"]), out / "summary.csv")
    charts = draw_chart(df, cells, percentile, out / "chart", title=_chart_title(env))
    store_names = [st for st in dict.fromkeys(cells["store"]) if st]
    first_store = store_names[0] if store_names else ""
    ratios = (
        ratio_rows(agg, scenario.get("workloads", []), read_published(), first_store, counts)
        if len(agg)
        else []
    )
    stores = store_rows(df, percentile, counts)
    recorded = {r.key for r in records}
    missing = [k for k in planned_keys(env) if k not in recorded]
    errors = [r for r in records if r.status == "error"]
    superseded = read_superseded(run_dir)
    wide = cells[(cells["ok"] > 0) & cells["wide"]] if "wide" in cells.columns else cells[:0]

    p = _pct_label(percentile)
    lines = [
        f"# lazybench run `{run_dir.name}`",
        "",
        f"Scenario **{scenario.get('name', '?')}**: {_measured(records, len(df))}, "
        f"{scenario.get('samples', '?')} samples per workload × mode"
        + (" × store" if stores else "")
        + f", network profile `{scenario.get('network', {}).get('profile', '?')}`, "
        f"figures are the {p} of the samples (interpolated linearly between them) unless "
        f"marked median; the {p}'s intervals are 95 %, between two of the samples, "
        f"whatever their distribution (∞: too few samples to bound the {p} above); the "
        f"median's is a percentile bootstrap (from {MEDIAN_MIN_SAMPLES} samples on), which "
        "holds the median less often than 95 % with this few samples: from "
        f"{MEDIAN_MIN_SAMPLES} it is always their min–max, which holds it "
        f"{100 * median_range_coverage(MEDIAN_MIN_SAMPLES):g} % of the time.",
        "",
        *_incomplete_lines(missing),
        *_environment_lines(env),
        "",
        "## Time to first exec",
        "",
        "![chart](chart.svg)",
        "",
        markdown_tables(cells, percentile, limits, legend=False),  # the cells are named below
    ]
    if len(wide):
        lines += [
            "⚠ Too few samples or too wide a spread to tell anything (the median's interval "
            "is wider than half the median): "
            + ", ".join(
                f"{r['workload']}/{cell_label(r['mode'], r['store'], store_names)}"
                for _, r in wide.iterrows()
            )
            + ".",
            "",
        ]
    lines += laziness_lines(records)
    if stores:
        lines += [
            f"## Stores side by side (total, ratio to {stores[0]['store']})",
            "",
            store_table(stores, percentile),
        ]
    lines += [
        f"## Lazy ÷ legacy total ({p}), beside the published chart",
        "",
        "Published: containerd + stargz snapshotter on GitHub Actions pulling from ghcr.io "
        "(harness/data/published.csv); ours: the stand-in images on this machine"
        + (f", through the first store ({stores[0]['store']})" if stores else "")
        + f". Ours is the {p} of each sample's total; a published total is the {p}s of "
        "pull, create and run added up (the upstream chart stacks each phase's percentile), "
        "as the chart's bars here are.",
        "",
        ratio_table(ratios),
    ]
    if limits is not None:
        lines += limit_section(cells, limits, percentile)
    lines += zstd_lazy_lines(cells, percentile, first_store)
    lines += timeline_lines(run_dir, env, records)
    lines += persistence_lines(records)
    if env.get("machines_differ"):
        lines += [
            "",
            "**Merged from shards run on different machines**: "
            + "; ".join(
                f"shard {s.get('shard')}: {s.get('host')} ({s.get('cpu')})"
                for s in env.get("shards", [])
            )
            + ". Compare cells measured on the same machine only.",
        ]
    if errors:
        lines += _failure_lines(errors)
    if superseded:
        lines += [
            "",
            "## Measured again on resume",
            "",
            "Earlier records of these measurements, replaced by the later one the figures "
            "above use:",
            "",
        ]
        lines += [
            f"- sample {r.sample} {r.workload}/{r.mode}"
            + (f" [{r.store}]" if r.store else "")
            + f": {r.status}: {r.error} — then {then.status}"
            for r, then in superseded
        ]
    write_atomic(out / "report.md", "\n".join(lines) + "\n")
    return Report(
        run_dir,
        run_dir / "table.md",
        run_dir / "summary.csv",
        [run_dir / c.name for c in charts],
        run_dir / "report.md",
        ratios,
        missing,
        table_text,
        stores,
    )


def _measured(records: Sequence[Any], ok: int) -> str:
    """``125 measurements``, or with those the figures leave out: ``7 measurements (5 in the
    figures, 1 fell back, 1 failed)``."""
    fell = sum(1 for r in records if r.status == "fell-back")
    failed = sum(1 for r in records if r.status == "error")
    out = [f"{n} {what}" for n, what in ((fell, "fell back"), (failed, "failed")) if n]
    return f"{len(records)} measurements" + (
        f" ({ok} in the figures, {', '.join(out)})" if out else ""
    )


def _chart_title(env: dict[str, Any]) -> str:
    scenario = env.get("scenario", {})
    p = _pct_label(float(scenario.get("percentile", 95)))
    profile = scenario.get("network", {}).get("profile", "")
    return f"time to first exec, {p} of {scenario.get('samples', '?')} samples, {profile} link"


def refuse_unplanned(run_dir: Path, records: Sequence[Any], env: dict[str, Any]) -> None:
    """Raise :class:`UserError` for records of measurements the run's scenario (``env``, its
    environment.json) does not plan (records of another run copied or appended into this
    one): reported and compared, they became rows of the table and cells of the gate as if
    this run had measured them. Nothing is checked without a plan (a run recorded before
    ``environment.json`` kept its scenario)."""
    known = set(planned_keys(env))
    if not known:
        return
    foreign = [r for r in records if r.key not in known]
    if foreign:
        r = foreign[0]
        what = f"sample {r.sample} of {r.workload}/{r.mode}" + (f" [{r.store}]" if r.store else "")
        raise UserError(
            f"{run_dir / RECORDS}: holds {len(foreign)} records of measurements its scenario "
            f"(environment.json) does not plan, such as {what}: records of another run? Move "
            "them out of it (shards of one run are joined with `lazybench merge`)"
        )


def planned_keys(env: dict[str, Any]) -> list[Key]:
    """The keys a run's scenario plans (only its shard's, for a shard), from its
    ``environment.json``; empty when the scenario cannot be read back."""
    from harness.plan import Shard, plan
    from harness.scenario import parse_scenario

    try:
        scenario = parse_scenario(env.get("scenario", {}), "environment.json")
    except UserError:
        return []
    shard = Shard.parse(env["shard"]) if env.get("shard") else None
    return plan(scenario, shard)


def write_runtimes_summary(path: Path, run_dirs: Sequence[Path]) -> Path:
    """One page over the run directories of a scenario run on several runtime nodes: per node
    its podman and containers/storage versions, its table, and what it did differently
    (lazily pulled images it lost). Each run directory keeps its own full report."""
    lines = ["# Runtime generations", ""]
    lines.append("| node | podman | containers/storage | measurements | lost after pull | run |")
    lines.append("|---|---|---|---:|---:|---|")
    sections: list[str] = []
    for run_dir in run_dirs:
        env = read_environment(run_dir)
        v = env.get("runtime_versions") or {}
        records = read_records(run_dir) if (run_dir / RECORDS).exists() else []
        lost = sum(1 for r in records if r.persisted is False)
        lines.append(
            f"| {v.get('node', '?')} | {v.get('podman', '?')} | "
            f"{v.get('containers_storage', '?')} | {len(records)} | {lost} | `{run_dir.name}` |"
        )
        table = run_dir / "table.md"
        sections += [
            "",
            f"## {v.get('node', run_dir.name)}: podman {v.get('podman', '?')}",
            "",
            table.read_text() if table.exists() else "(no table: no successful measurement)",
            *persistence_lines(records),
        ]
    write_atomic(path, "\n".join(lines + sections) + "\n")
    return path
