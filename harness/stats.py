"""Statistics over a run's records: one row per measurement in, one row per workload × mode out.

:func:`records_frame` turns successful records into a DataFrame; :func:`aggregate` gives, per
workload × mode, the median, the chosen percentile, min, max and std of every phase, the
total and the bytes fetched. Report (:mod:`harness.report`) and gate (:mod:`harness.gate`)
read only these.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import pandas as pd

from harness.records import Record

PHASES = ("pull", "create", "run")
MODE_ORDER = ("legacy", "estargz-noopt", "estargz", "zstd-chunked")
MB = 1e6


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
