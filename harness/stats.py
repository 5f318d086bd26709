"""Statistics over a run's records: one row per measurement in, one row per cell out.

A *cell* is a workload × mode × store (``store`` is "" outside lazy modes). :func:`records_frame`
turns the records that count (status ``ok``) into a DataFrame; :func:`aggregate` gives, per
cell, the median, the chosen percentile, min, max and std of every phase, the total and the
bytes fetched, with 95 % confidence intervals for the median and the percentile of the
timed phases and the bytes, and a flag where the spread is too wide to tell anything;
:func:`compare_samples` tests whether two cells differ (Mann–Whitney U) and bounds the
difference of their statistics (bootstrap). Report (:mod:`harness.report`) and gate
(:mod:`harness.gate`) read only these.

Percentiles are linearly interpolated between the sorted samples (numpy's and pandas'
default). Mann–Whitney p-values are exact, counted over every arrangement of the pooled
samples with ties as they are, for the few samples a benchmark has
(:func:`mann_whitney_method`). Intervals are 95 %; with fewer than :data:`MIN_SAMPLES`
samples none is given.

* The median's: bootstrap, ``scipy.stats.bootstrap``, percentile method (BCa is unstable with
  the 3–10 samples a benchmark has), seeded so a report is reproducible, from
  :data:`MEDIAN_MIN_SAMPLES` samples (:func:`median_interval`).
* The chosen percentile's: the distribution-free interval between two order statistics
  (:func:`quantile_interval`). A bootstrap cannot give one: no resample has a percentile
  above the largest sample, while the true 95th percentile lies above the largest of 5
  samples 77 % of the time (0.95⁵), so its "95 %" interval held it about a fifth of the time.
  Few samples bound a high percentile from below only: the upper end is then ``inf``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from harness.records import Record
from harness.scenario import MODES

PHASES = ("pull", "create", "run")
MODE_ORDER = MODES  # tables list modes in the scenario schema's order
CELL = ["workload", "mode", "store"]
MB = 1e6
CONFIDENCE = 0.95
RESAMPLES = 2000
MIN_SAMPLES = 3
# The median's interval from fewer samples is [min, max] at best, which holds the median with
# probability 1 - 2 × 0.5ⁿ only: 75 % with 3 samples, 87.5 % with 4 — no 95 % interval.
# From 5 the bootstrap's is given, though it is no 95 % interval either: with 5 it is always
# [min, max] (a resample's median is the smallest sample 5.8 % of the time, past the 2.5 %
# tail), 93.75 % whatever the distribution (median_range_coverage), and from 6 to 10 normal or
# exponential samples it holds the median 87–94 % of the time. Reports say so.
MEDIAN_MIN_SAMPLES = 5
# A cell whose total's median interval is wider than this fraction of the median cannot tell
# a change of that size from noise: reports warn about it.
WIDE_SPREAD = 0.5
# Metrics given intervals (the ones tables and the gate use).
CI_METRICS = ("pull", "create", "run", "total", "mb_fetched")


def records_frame(records: Iterable[Record]) -> pd.DataFrame:
    """Records with status ``ok`` as a DataFrame (one row per measurement); fell-back and
    failed measurements are counted by :func:`status_counts`, not aggregated."""
    rows = [asdict(r) for r in records if r.status == "ok"]
    columns = list(Record.__dataclass_fields__)
    df = pd.DataFrame(rows, columns=columns)
    for col in ("bytes_fetched", "bytes_before_first_output"):
        df[col.replace("bytes", "mb")] = pd.to_numeric(df[col]) / MB
    return df


def status_counts(records: Iterable[Record]) -> pd.DataFrame:
    """Per cell: how many measurements were ``ok``, ``fell-back`` and ``error``, how many ok
    ones carry a laziness verdict (``checked``: records from before the verdict have none),
    and the last fallback reason (columns ``workload, mode, store, ok, fell_back, error,
    checked, reason``)."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in records:
        row = rows.setdefault(
            (r.workload, r.mode, r.store),
            {"workload": r.workload, "mode": r.mode, "store": r.store, "ok": 0, "fell_back": 0}
            | {"error": 0, "checked": 0, "reason": ""},
        )
        column = {"ok": "ok", "fell-back": "fell_back"}.get(r.status, "error")
        row[column] += 1
        if r.status == "ok" and r.layers_total is not None:
            row["checked"] += 1
        if r.status == "fell-back" and r.error:
            row["reason"] = r.error
    columns = ["workload", "mode", "store", "ok", "fell_back", "error", "checked", "reason"]
    return pd.DataFrame(list(rows.values()), columns=columns)


def mode_rank(mode: str) -> int:
    return MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER)


def _quantile(q: float) -> Callable[..., Any]:
    def statistic(x: np.ndarray, axis: int = -1) -> Any:
        return np.quantile(x, q, axis=axis)

    return statistic


def median_of(x: np.ndarray, axis: int = -1) -> Any:
    return np.median(x, axis=axis)


def bootstrap_interval(
    values: Any, statistic: Callable[..., Any], *, seed: int = 0
) -> tuple[float, float]:
    """The 95 % percentile-bootstrap interval of ``statistic`` over ``values``; (nan, nan)
    with fewer than :data:`MIN_SAMPLES` values."""
    x = np.asarray(values, dtype=float)
    if len(x) < MIN_SAMPLES:
        return (float("nan"), float("nan"))
    if np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sps.bootstrap(
            (x,),
            statistic,
            n_resamples=RESAMPLES,
            vectorized=True,
            method="percentile",
            confidence_level=CONFIDENCE,
            rng=np.random.default_rng(seed),
        )
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def quantile_interval(values: Any, q: float) -> tuple[float, float]:
    """The 95 % distribution-free interval of the ``q`` quantile (0 < q < 1) of the population
    ``values`` were drawn from: ``[x_(l), x_(u)]``, the l-th and u-th smallest, each end missing
    the quantile with probability at most 2.5 % whatever the distribution (the number of samples
    below the quantile is binomial(n, q)). An end no order statistic can give at that level is
    infinite: the upper end of a high percentile needs many samples (the 95th: 72). (nan, nan)
    with fewer than :data:`MIN_SAMPLES` values."""
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    if n < MIN_SAMPLES:
        return (float("nan"), float("nan"))
    tail = (1 - CONFIDENCE) / 2
    ks = np.arange(n + 1)
    # P(x_(k) <= quantile) = P(B >= k) and P(x_(k) >= quantile) = P(B <= k - 1), B ~ Bin(n, q)
    below = sps.binom.sf(ks - 1, n, q)  # P(B >= k)
    above = sps.binom.cdf(ks - 1, n, q)  # P(B <= k - 1)
    lows = [k for k in range(1, n + 1) if below[k] >= 1 - tail]
    highs = [k for k in range(1, n + 1) if above[k] >= 1 - tail]
    lo = float(x[max(lows) - 1]) if lows else -math.inf
    hi = float(x[min(highs) - 1]) if highs else math.inf
    return (lo, hi)


def median_range_coverage(n: int) -> float:
    """How often ``[min, max]`` of ``n`` samples holds the median of any continuous
    distribution: ``1 - 2 × 0.5ⁿ`` (93.75 % with 5)."""
    return 1.0 - 2.0 * 0.5**n


def median_interval(values: Any) -> tuple[float, float]:
    """The median's 95 % bootstrap interval (:func:`bootstrap_interval`); (nan, nan) with
    fewer than :data:`MEDIAN_MIN_SAMPLES` values, too few for one."""
    if len(values) < MEDIAN_MIN_SAMPLES:
        return (float("nan"), float("nan"))
    return bootstrap_interval(values, median_of)


def aggregate(df: pd.DataFrame, percentile: float) -> pd.DataFrame:
    """Per cell (workload × mode × store): median, the chosen percentile (``p``), min, max,
    std and the sample count ``n`` for each phase, the total and the bytes fetched; for the
    timed phases, the total and ``mb_fetched`` also ``_median_lo/_median_hi``, the median's
    95 % bootstrap interval, and ``_p_lo/_p_hi``, the percentile's 95 % order-statistic
    interval (:func:`quantile_interval`; ``inf`` where too few samples bound it above);
    ``wide`` where the total's median interval
    is wider than :data:`WIDE_SPREAD` of the median or there are too few samples to tell.

    Columns are ``<metric>_<stat>``, e.g. ``total_p``, ``pull_median``, ``mb_fetched_max``.
    Rows keep the workloads' first-appearance order, the usual mode order, then the stores'
    first-appearance order.
    """
    metrics = [f"{p}_s" for p in PHASES] + [
        "total_s",
        "mb_fetched",
        "mb_before_first_output",
        "requests",
        "first_output_s",
    ]
    if "store" not in df.columns:
        df = df.assign(store="")
    rows = []
    workloads = list(dict.fromkeys(df["workload"]))
    stores = list(dict.fromkeys(df["store"]))
    q = percentile / 100.0
    for (workload, mode, store), group in df.groupby(CELL, sort=False):
        row: dict[str, Any] = {"workload": workload, "mode": mode, "store": store}
        row["n"] = len(group)
        for metric in metrics:
            values = pd.to_numeric(group[metric], errors="coerce").dropna()
            name = metric.removesuffix("_s")
            stats = ["median", "p", "min", "max", "std"]
            if name in CI_METRICS:
                stats += ["median_lo", "median_hi", "p_lo", "p_hi"]
            if values.empty:
                for stat in stats:
                    row[f"{name}_{stat}"] = float("nan")
                continue
            row[f"{name}_median"] = float(values.median())
            row[f"{name}_p"] = float(values.quantile(q))
            row[f"{name}_min"] = float(values.min())
            row[f"{name}_max"] = float(values.max())
            row[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            if name in CI_METRICS:
                lo, hi = median_interval(values)
                row[f"{name}_median_lo"], row[f"{name}_median_hi"] = lo, hi
                lo, hi = quantile_interval(values, q)
                row[f"{name}_p_lo"], row[f"{name}_p_hi"] = lo, hi
        row["wide"] = spread_too_wide(
            row.get("total_median", float("nan")),
            row.get("total_median_lo", float("nan")),
            row.get("total_median_hi", float("nan")),
        )
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["_w"] = out["workload"].map(workloads.index)
    out["_m"] = out["mode"].map(mode_rank)
    out["_s"] = out["store"].map(stores.index)
    return (
        out.sort_values(["_w", "_m", "_s"]).drop(columns=["_w", "_m", "_s"]).reset_index(drop=True)
    )


def spread_too_wide(median: float, lo: float, hi: float) -> bool:
    """No interval (too few samples), or one wider than :data:`WIDE_SPREAD` of the median."""
    if any(pd.isna(v) for v in (median, lo, hi)):
        return True
    return median > 0 and (hi - lo) > WIDE_SPREAD * median


@dataclass(frozen=True)
class Change:
    """How a cell's samples moved from a base run to a new run.

    ``delta`` is new − base of the statistic (median or percentile) with its 95 % bootstrap
    interval ``[lo, hi]`` (nan with too few samples: see :func:`_bootstrap_fits`); ``p_value``
    is the one-sided
    Mann–Whitney U test that new is larger than base (nan when it cannot be computed);
    ``p_value_two_sided`` the same test in either direction.
    """

    base: float
    new: float
    delta: float
    lo: float
    hi: float
    p_value: float
    p_value_two_sided: float


def _bootstrap_fits(statistic: str, percentile: float, *samples: np.ndarray) -> bool:
    """Whether a bootstrap interval of a statistic of ``samples`` (a difference, a ratio) can
    be given: :data:`MIN_SAMPLES` on each side, and for a percentile, enough samples that each
    side's percentile is bounded at all (:func:`quantile_interval`): from fewer, no resample
    reaches past the largest sample, and the interval would claim what it cannot hold."""
    if min(len(x) for x in samples) < MIN_SAMPLES:
        return False
    if statistic == "median":
        return True
    q = percentile / 100.0
    return all(all(map(math.isfinite, quantile_interval(x, q))) for x in samples)


def compare_samples(
    base: Any, new: Any, statistic: str = "median", percentile: float = 95.0, seed: int = 0
) -> Change:
    """Compare two cells' samples (see :class:`Change`). Raises ValueError on an empty side."""
    a = np.asarray(base, dtype=float)
    b = np.asarray(new, dtype=float)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("compare_samples needs samples on both sides")
    stat = median_of if statistic == "median" else _quantile(percentile / 100.0)
    va, vb = float(stat(a)), float(stat(b))
    lo = hi = float("nan")
    if _bootstrap_fits(statistic, percentile, a, b):
        if np.all(a == a[0]) and np.all(b == b[0]):
            lo = hi = vb - va
        else:

            def diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> Any:
                return stat(y, axis=axis) - stat(x, axis=axis)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = sps.bootstrap(
                    (a, b),
                    diff,
                    n_resamples=RESAMPLES,
                    vectorized=True,
                    method="percentile",
                    confidence_level=CONFIDENCE,
                    rng=np.random.default_rng(seed),
                )
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    p_one = p_two = float("nan")
    if len(a) >= 2 and len(b) >= 2 and not (np.all(a == a[0]) and np.all(b == a[0])):
        method = mann_whitney_method(len(a), len(b))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p_one = float(sps.mannwhitneyu(b, a, alternative="greater", method=method).pvalue)
            p_two = float(sps.mannwhitneyu(b, a, alternative="two-sided", method=method).pvalue)
    return Change(va, vb, vb - va, lo, hi, p_one, p_two)


# Up to this many ways to split the pooled samples into the two sides, the Mann–Whitney
# p-value is counted over every one of them (C(10, 5) = 252 for 5 a side; C(16, 8) = 12870).
EXACT_ARRANGEMENTS = 20_000


def mann_whitney_method(n: int, m: int) -> Any:
    """How :func:`scipy.stats.mannwhitneyu` should compute the p-value of ``n`` and ``m``
    samples: exactly, over every arrangement of the pooled samples (ties included), when
    there are at most :data:`EXACT_ARRANGEMENTS`; else scipy's choice. scipy's own choice
    ("auto") takes the normal approximation as soon as two samples tie, as the bytes fetched
    always do (a deterministic count): with 5 a side it gave p = 0.033 where the exact
    p-value is 0.083 (base [1, 1, 1, 2, 2], new [2] × 5), and 0.023 for 3 a side set apart,
    below the 0.05 no arrangement of 3 and 3 can reach (the gate file says so)."""
    if math.comb(n + m, n) <= EXACT_ARRANGEMENTS:
        return sps.PermutationMethod(n_resamples=np.inf)
    return "auto"


def ratio_of(
    base: Any, new: Any, statistic: str = "median", percentile: float = 95.0, seed: int = 0
) -> tuple[float, float, float]:
    """new's statistic ÷ base's (median or percentile) and its 95 % bootstrap interval
    ((ratio, nan, nan) with too few samples on a side: see :func:`_bootstrap_fits`)."""
    a = np.asarray(base, dtype=float)
    b = np.asarray(new, dtype=float)
    stat = median_of if statistic == "median" else _quantile(percentile / 100.0)
    ratio = float(stat(b) / stat(a)) if stat(a) else float("nan")
    if not _bootstrap_fits(statistic, percentile, a, b) or not stat(a):
        return (ratio, float("nan"), float("nan"))
    if np.all(a == a[0]) and np.all(b == b[0]):
        return (ratio, ratio, ratio)

    def quotient(x: np.ndarray, y: np.ndarray, axis: int = -1) -> Any:
        with np.errstate(divide="ignore", invalid="ignore"):
            return stat(y, axis=axis) / stat(x, axis=axis)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sps.bootstrap(
            (a, b),
            quotient,
            n_resamples=RESAMPLES,
            vectorized=True,
            method="percentile",
            confidence_level=CONFIDENCE,
            rng=np.random.default_rng(seed),
        )
    return (ratio, float(res.confidence_interval.low), float(res.confidence_interval.high))
