"""The run directory's files: measurement records and the environment they were taken in.

A run directory (``results/runs/<id>/``) holds ``records.jsonl`` — one JSON object per
finished measurement, appended and fsynced as it completes, so an interrupted run keeps every
finished sample — ``environment.json`` (versions and machine facts, the scenario, the link)
and ``scenario.json`` (the scenario as the run started it, for ``--resume``). Everything else
in a run directory is derived from these (:mod:`harness.report`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import math
import os
import platform
import subprocess
import types
import typing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from harness.cli import UserError
from harness.laziness import counts_lazy
from harness.runtimes import runtime_versions
from harness.scenario import DEFAULT_STORE_NAME, LAZY_MODES, Scenario

RECORDS = "records.jsonl"
ENVIRONMENT = "environment.json"
SCENARIO_COPY = "scenario.json"
ROOT = Path(__file__).resolve().parent.parent

# Version of the record format, stored in every record as ``schema``. Readers migrate older
# records when reading (:func:`migrate`):
#   1 (no ``schema`` key): one store per run; no ``store``, no laziness verdict.
#   2: ``store`` (the store's name in lazy modes, "" otherwise), ``layers_total``,
#      ``layers_from_store``, ``layers_served_whole``, and status "fell-back".
SCHEMA_VERSION = 2
STATUSES = ("ok", "error", "fell-back")


class Key(NamedTuple):
    """What identifies a measurement in a run: a resumed run skips keys recorded as ok."""

    sample: int
    workload: str
    mode: str
    store: str = ""  # the store's name in lazy modes, "" otherwise


@dataclass
class Record:
    """One measurement: a workload started once in one mode (through one store, in lazy
    modes), from an empty cache.

    ``status`` is "ok"; "error" (``error`` says why); or, in a lazy mode, "fell-back" when the
    runtime did not take every layer from the store or the registry served a layer whole to
    the runtime (``error`` gives the evidence and the reason found; see
    :mod:`harness.laziness`). Timings of a fell-back record are kept but not aggregated.
    """

    sample: int
    workload: str
    mode: str
    status: str = "ok"
    error: str | None = None
    pull_s: float | None = None
    create_s: float | None = None
    run_s: float | None = None
    total_s: float | None = None
    bytes_fetched: int | None = None  # bytes the registry served from pull start to ready line
    requests: int | None = None
    bytes_before_first_output: int | None = None  # ...by requests done before first output
    requests_before_first_output: int | None = None
    first_output_s: float | None = None  # seconds from `run` start to the first stdout line
    # legacy (podman) only: `podman pull` of the same image again after the run, every layer
    # now local — podman's own pull work, the limit model's runtime floor (harness.limit).
    # Not part of pull/create/run/total or of the bytes and requests above.
    repull_s: float | None = None
    repull_requests: int | None = None  # ...the requests the registry served it
    ready: bool | None = None  # the ready line was seen (or the workload exited 0)
    exit_code: int | None = None
    stdout_head: str = ""
    image: str = ""
    runtime: str = "podman"
    # The podman generation: "host" or a runtime node (harness.runtimes), with the versions
    # that decide the layer-store protocol and its bugs, and the [storage.options] it was given.
    node: str = "host"
    podman_version: str = ""
    storage_version: str = ""  # containers/storage
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Lazy modes: did the pulled image survive its pull (listed, layers known to a fresh
    # podman)? False where the runtime forgets lazily pulled images; `persistence` says why.
    persisted: bool | None = None
    persistence: str | None = None
    store_metrics: dict[str, float] = field(default_factory=dict)
    started: str = ""
    finished: str = ""
    store: str = ""  # the store's name (lazy modes), "" when no store was used
    layers_total: int | None = None  # the pulled image's layers in the runtime's storage
    layers_from_store: int | None = None  # ...of which the runtime took from the store
    layers_served_whole: int | None = None  # ...whose whole blob the registry sent the runtime
    schema: int = SCHEMA_VERSION

    @property
    def key(self) -> Key:
        return Key(self.sample, self.workload, self.mode, self.store)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """A record from its JSON object, migrated to the current schema (:func:`migrate`).
        Raises :class:`ValueError` naming the field that is of the wrong type, not a finite
        number, a negative count or time, or an unknown status (:func:`check_fields`)."""
        data = migrate(data)
        known = {f for f in cls.__dataclass_fields__}
        data = {k: v for k, v in data.items() if k in known}
        check_fields(data)
        return cls(**data)

    def with_honest_status(self, verdict_due: bool = True) -> Record:
        """This record, or — a lazy record marked ok whose laziness verdict says a layer did
        not come from the store or was served whole (a hand edit, another tool) — the same
        record as "fell-back": a lazy figure counts only when every layer came from the store
        (:func:`harness.laziness.counts_lazy`, as :meth:`~harness.laziness.Verdict.lazy`).

        A lazy record marked ok with no verdict, or a lazy mode's record naming no store, is
        one no lazybench wrote since the verdict exists (``verdict_due``: the record's schema
        is 2 or later): nothing shows its layers came from the store, so it falls back too.
        Only records from before the verdict (schema 1) stay ok, "not checked"."""
        if self.status != "ok" or not (self.store or self.mode in LAZY_MODES):
            return self
        if self.layers_total is None or not self.store:
            if self.store and not verdict_due:
                return self
            why = (
                f"names no store in lazy mode {self.mode}"
                if not self.store
                else "carries no laziness verdict (layers_total)"
            )
            return replace(self, status="fell-back", error=f"recorded as ok, but {why}")
        from_store, whole = self.layers_from_store or 0, self.layers_served_whole or 0
        if counts_lazy(self.layers_total, from_store, whole):
            return self
        reason = (
            f"recorded as ok, but {from_store} of {self.layers_total} layers came from the "
            f"store, {whole} served whole"
        )
        return replace(self, status="fell-back", error=reason)


# The one number of a record that may be negative: the exit code (minus the signal).
_MAY_BE_NEGATIVE = {"exit_code"}


@functools.cache
def _record_types() -> dict[str, Any]:
    return typing.get_type_hints(Record)


def check_fields(data: dict[str, Any]) -> None:
    """Check a record's fields against :class:`Record`'s types: strings, integers, numbers
    (finite), booleans and objects where the dataclass says so, no negative time, count or
    sample, store metrics that are finite numbers, a status of :data:`STATUSES`, the key's
    fields, and a total above 0 where the status is ok (every measurement that finished has
    one, and no start takes no time).
    Raises :class:`ValueError` naming the field."""
    hints = _record_types()
    for name, value in data.items():
        hint = hints[name]
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if value is None:
            if types.NoneType in options:
                continue
            raise ValueError(f"{name}: must be given, got null")
        kinds = {typing.get_origin(t) or t for t in options}
        if bool in kinds:
            if not isinstance(value, bool):
                raise ValueError(f"{name}: must be true or false, got {value!r}")
        elif int in kinds or float in kinds:
            if isinstance(value, bool) or not isinstance(value, int | float):
                what = "an integer" if int in kinds else "a number"
                raise ValueError(f"{name}: must be {what}, got {value!r}")
            if int in kinds and not isinstance(value, int):
                raise ValueError(f"{name}: must be an integer, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name}: must be finite, got {value!r}")
            if value < 0 and name not in _MAY_BE_NEGATIVE:
                raise ValueError(f"{name}: must not be negative, got {value!r}")
        elif str in kinds:
            if not isinstance(value, str):
                raise ValueError(f"{name}: must be a string, got {value!r}")
        elif dict in kinds and not isinstance(value, dict):
            raise ValueError(f"{name}: must be an object, got {value!r}")
    for key, value in (data.get("store_metrics") or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"store_metrics.{key}: must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"store_metrics.{key}: must be finite, got {value!r}")
    if data.get("status", "ok") not in STATUSES:
        raise ValueError(f"status: must be one of {', '.join(STATUSES)}, got {data['status']!r}")
    for name in ("sample", "workload", "mode"):
        if name not in data:
            raise ValueError(f"{name}: missing")
    if data.get("status", "ok") == "ok" and data.get("total_s") is None:
        raise ValueError("total_s: missing from a record with status ok")
    # No start takes no time: a zero total divided the lazy ÷ legacy ratios (the gate let a
    # ceiling pass unchecked; the report's ratio came out empty) and made a change's Δ % inf.
    if data.get("status", "ok") == "ok" and data["total_s"] == 0:
        raise ValueError(
            f"total_s: must be more than 0 in a record with status ok, got {data['total_s']!r}"
        )


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a decoded record of any known schema to :data:`SCHEMA_VERSION`. Raises
    :class:`ValueError` for a record written by a newer lazybench, or whose ``schema`` is no
    version at all (a hand edit)."""
    version = data.get("schema", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(
            f"schema: must be a record schema version (1 to {SCHEMA_VERSION}), got {version!r}"
        )
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"record schema {version!r} is newer than this lazybench reads "
            f"({SCHEMA_VERSION}): upgrade lazybench"
        )
    data = dict(data)
    if version < 2:
        # One store per run: its records name it as a one-store scenario names it now.
        data["store"] = DEFAULT_STORE_NAME if data.get("mode") in LAZY_MODES else ""
    data["schema"] = SCHEMA_VERSION
    return data


# -- records file -----------------------------------------------------------------------------


def append_record(run_dir: Path, record: Record) -> None:
    """Append one record and fsync it: once this returns, the measurement survives a crash.
    A torn last line (a run that died mid-write; :func:`read_records` skips it) is cut off
    first: the record written after it joined it in one line that no reader takes, and the
    run could be neither reported nor resumed."""
    path = run_dir / RECORDS
    line = (record.to_json() + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _cut_torn_line(fd)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _cut_torn_line(fd: int, block: int = 65536) -> None:
    """Truncate the file open at ``fd`` after its last newline (to nothing without one)."""
    end = size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return
    while end > 0:
        start = max(0, end - block)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            os.ftruncate(fd, start + newline + 1)
            return
        end = start
    os.ftruncate(fd, 0)


def read_records(run_dir: Path) -> list[Record]:
    """All records, oldest first. A torn last line (the process died mid-write) is skipped;
    for a key recorded twice (a failed measurement retried on resume) the last record wins
    (the earlier ones: :func:`read_superseded`).
    Raises :class:`UserError` naming the file and line of a record that cannot be read (not
    UTF-8, not a JSON object, a key given twice, a field as :meth:`Record.from_dict` refuses).
    A lazy record marked ok against its own laziness verdict is read as fell back
    (:meth:`Record.with_honest_status`)."""
    by_key: dict[Key, Record] = {}
    for rec in _read_all(run_dir):
        by_key.pop(rec.key, None)
        by_key[rec.key] = rec
    return list(by_key.values())


def read_superseded(run_dir: Path) -> list[tuple[Record, Record]]:
    """The records a later record of the same key replaced (a failed measurement measured
    again by ``run --resume``), oldest first, each with the record that replaced it: the
    report keeps the failures a resume measured over. Raises as :func:`read_records`."""
    records = _read_all(run_dir)
    last = {rec.key: rec for rec in records}
    return [(rec, last[rec.key]) for rec in records if last[rec.key] is not rec]


def _read_all(run_dir: Path) -> list[Record]:
    """Every record of ``records.jsonl`` in file order, repeated keys included."""
    path = run_dir / RECORDS
    if not path.exists():
        return []
    out: list[Record] = []
    try:
        with path.open("rb") as f:
            lines = list(f)
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    for n, raw in enumerate(lines, 1):
        torn = not raw.endswith(b"\n")  # only the last line can be: the process died mid-write
        try:
            line = raw.decode()
        except UnicodeDecodeError:
            if torn:
                continue
            raise UserError(f"{path}:{n}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            data = json.loads(line, object_pairs_hook=_no_repeated_keys)
        except json.JSONDecodeError:
            if not torn:
                raise UserError(f"{path}:{n}: not a JSON record") from None
            continue
        except ValueError as exc:  # a key given twice
            raise UserError(f"{path}:{n}: {exc}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}:{n}: not a JSON object")
        try:
            # schema 1 (no ``schema``) was written before the laziness verdict existed
            due = data.get("schema", 1) != 1
            rec = Record.from_dict(data).with_honest_status(verdict_due=due)
        except (ValueError, TypeError) as exc:
            raise UserError(f"{path}:{n}: {exc}") from None
        out.append(rec)
    return out


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; :class:`ValueError` for a key given twice (a hand
    edit: which of the two values was meant cannot be told)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{key}: given twice")
        out[key] = value
    return out


def finished_keys(run_dir: Path) -> set[Key]:
    """Keys of finished measurements (ok, or fell back: a verdict is a result): what a
    resumed run skips. Errors are measured again."""
    return {r.key for r in read_records(run_dir) if r.status in ("ok", "fell-back")}


def sort_records(records: list[Record], env: dict[str, Any]) -> list[Record]:
    """Records in the scenario's order (from ``environment.json``): workloads, then modes, then
    no store before the stores in their scenario order (the first is the one reports compare
    the others with), then samples. Unknown names go last, in their own order."""
    scenario = env.get("scenario", {})
    workloads = [w.get("name", w.get("recipe")) for w in scenario.get("workloads", [])]
    modes = list(scenario.get("modes", []))
    stores = [s.get("name") for s in scenario.get("stores", [])] or [DEFAULT_STORE_NAME]

    def rank(seq: list[Any], value: Any) -> int:
        return seq.index(value) if value in seq else len(seq)

    return sorted(
        records,
        key=lambda r: (
            rank(workloads, r.workload),
            rank(modes, r.mode),
            -1 if r.store == "" else rank(stores, r.store),
            r.sample,
        ),
    )


def read_json(path: Path) -> Any:
    """The JSON value in ``path``. Raises :class:`UserError` naming the file (and line) when it
    cannot be read, is not UTF-8 or is not JSON."""
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None


def require_run_files(run_dir: Path, *names: str) -> None:
    """Raise :class:`UserError` unless ``run_dir`` holds every file in ``names``: saying
    that the path does not exist or is no directory, else which file is missing."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory (name a run directory)")
    missing = [n for n in names if not (run_dir / n).exists()]
    if missing == [RECORDS] and (run_dir / SCENARIO_COPY).exists():
        # What a run interrupted or killed before its first record leaves: its scenario.
        raise UserError(
            f"{run_dir}: no {RECORDS} here: no measurement of this run finished (it was "
            f"interrupted or killed before the first); measure it with `lazybench run "
            f"--resume {run_dir}`, or remove it"
        )
    if missing:
        raise UserError(f"{run_dir}: no {' and '.join(missing)} here (not a run directory?)")


def read_environment(run_dir: Path) -> dict[str, Any]:
    """``environment.json`` ({} when there is none). Raises :class:`UserError` naming the file
    when it is not a JSON object, or its scenario not an object with a percentile in (0, 100]
    (which every statistic of the run is taken at)."""
    path = run_dir / ENVIRONMENT
    if not path.exists():
        return {}
    env = read_json(path)
    if not isinstance(env, dict):
        raise UserError(f"{path}: not a JSON object")
    scenario = env.get("scenario", {})
    if not isinstance(scenario, dict):
        raise UserError(f"{path}: scenario: must be an object")
    percentile = scenario.get("percentile", 95)
    if (
        isinstance(percentile, bool)
        or not isinstance(percentile, int | float)
        or not 0 < percentile <= 100
    ):
        raise UserError(
            f"{path}: scenario.percentile: must be a number in (0, 100], got {percentile!r}"
        )
    return env


# -- environment metadata ---------------------------------------------------------------


def _version(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if proc.returncode == 0 else ""


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def git_commit() -> str:
    """The checkout's short commit, "" when lazybench does not run from a git checkout."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        proc = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return proc.stdout.strip() if proc.returncode == 0 else ""
    return ""


def environment(scenario: Scenario) -> dict[str, Any]:
    """Versions and machine facts stored with the records (the link is added once measured)."""
    git = git_commit()
    return {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": f"{platform.system()} {platform.release()} {platform.version()}",
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "podman": _version(["podman", "--version"]),
        "runc": _version(["runc", "--version"]),
        # The podman measured: the host's, or a runtime node's (its versions.json).
        "node": scenario.node,
        "runtime_versions": runtime_versions(scenario.node),
        "registry": _version(["docker-registry", "--version"]),
        "skopeo": _version(["skopeo", "--version"]),
        "runtime": scenario.runtime,
        "store_command": list(scenario.store.command),
        "stores": {s.name: list(s.command) for s in scenario.stores},
        "git_commit": git,
        "scenario": scenario.to_dict(),
    }
