"""``lazybench merge OUT RUN_DIR…``: join the shards of one run (``lazybench run --shard K/N``)
into one run directory, as if one machine had run the whole plan.

Refused, with the reason, before anything is written: inputs that are not run directories,
shards of different scenarios, shards measured at different git commits (``git_commit``),
shards of different shard counts or the same shard twice, a measurement recorded in two
inputs, an ``OUT`` that already holds a run. The merged
``environment.json`` is the first input's, with ``merged_from`` (the inputs), ``shards`` (each
input's shard, host, CPU, kernel, podman, start time and commit) and ``machines_differ`` (true
when those machines differ: the report says so, since cells measured on different machines do
not compare). Records keep their order within each input; store logs and pull timelines are
copied along, and the inputs' ``limits.json`` entries are joined.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from harness.cli import UserError, check_writable_dir
from harness.limit import read_limits, write_limits
from harness.records import (
    ENVIRONMENT,
    RECORDS,
    SCENARIO_COPY,
    read_environment,
    read_json,
    read_records,
    require_run_files,
)
from harness.scenario import parse_scenario

MACHINE_KEYS = ("host", "cpu", "cpus", "kernel", "podman")


def _scenario(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SCENARIO_COPY
    require_run_files(run_dir, RECORDS, SCENARIO_COPY)
    # Parsed, so copies written in older forms compare equal.
    return parse_scenario(read_json(path), str(path)).to_dict()


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def merge_runs(out: Path, run_dirs: list[Path]) -> Path:
    """Merge ``run_dirs`` into ``out`` (see the module docstring); return ``out``.
    Raises :class:`UserError` on any refusal or a file that cannot be written (naming it);
    ``out`` is written whole or not at all."""
    if not run_dirs:
        raise UserError("merge: name at least one RUN_DIR")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; merge into a new directory")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; merge into a new directory")
    check_writable_dir(out.absolute().parent, "merge: OUT's parent")
    run_dirs = [Path(d) for d in run_dirs]
    named: dict[Path, Path] = {}
    for d in run_dirs:
        same = named.setdefault(d.resolve(), d)
        if same is not d:
            raise UserError(f"merge: {same} and {d} are the same run directory; name each run once")
    scenarios = [_scenario(d) for d in run_dirs]
    for d, s in zip(run_dirs[1:], scenarios[1:], strict=True):
        if s != scenarios[0]:
            raise UserError(
                f"merge: {run_dirs[0]} and {d} are runs of different scenarios "
                f"({scenarios[0].get('name')!r} and {s.get('name')!r}; they differ in: "
                f"{', '.join(_differences(scenarios[0], s))}); only shards of one scenario merge"
            )
    envs = [read_environment(d) for d in run_dirs]
    # The code measured: shards of one run are one commit's. Mixed, the merged run (and the
    # gate on it) judged two versions as one, its report naming the first one's commit only.
    # A run outside a git checkout records none ("") and is not compared.
    commits = [(d, e.get("git_commit")) for d, e in zip(run_dirs, envs, strict=True)]
    known = [(d, c) for d, c in commits if c]
    for d, c in known[1:]:
        if c != known[0][1]:
            raise UserError(
                f"merge: {known[0][0]} was measured at commit {known[0][1]} and {d} at {c}; "
                "only shards of one run merge: run every shard at one commit"
            )
    shards = [e.get("shard") for e in envs]
    counts = {s.split("/")[1] for s in shards if s}
    if len(counts) > 1:
        raise UserError(f"merge: the inputs are shards of different counts: {', '.join(shards)}")
    seen_shards: dict[str, Path] = {}
    for d, shard in zip(run_dirs, shards, strict=True):
        if shard and shard in seen_shards:
            raise UserError(f"merge: {seen_shards[shard]} and {d} are both shard {shard}")
        if shard:
            seen_shards[shard] = d
    records = []
    owner: dict[Any, Path] = {}
    for d in run_dirs:
        for r in read_records(d):
            if r.key in owner:
                where = f"sample {r.sample} of {r.workload}/{r.mode}" + (
                    f" [{r.store}]" if r.store else ""
                )
                raise UserError(
                    f"merge: {where} is recorded in both {owner[r.key]} and {d}: merge the "
                    "shards of one `run --shard K/N` each once (not a whole run beside them)"
                )
            owner[r.key] = d
            records.append(r)

    env = dict(envs[0])
    env.pop("shard", None)
    env["merged_from"] = [str(d) for d in run_dirs]
    env["shards"] = [
        {"run_dir": str(d), "shard": s, **{k: e.get(k) for k in (*MACHINE_KEYS, "started")}}
        | {"git_commit": e.get("git_commit"), "link": e.get("link")}
        for d, s, e in zip(run_dirs, shards, envs, strict=True)
    ]
    machines = {tuple(str(e.get(k)) for k in MACHINE_KEYS) for e in envs}
    env["machines_differ"] = len(machines) > 1

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise UserError(f"merge: cannot create {out}: {exc.strerror or exc}") from None
    try:
        (tmp / SCENARIO_COPY).write_text(json.dumps(scenarios[0], indent=1))
        (tmp / ENVIRONMENT).write_text(json.dumps(env, indent=1, sort_keys=True))
        with (tmp / RECORDS).open("w") as f:
            for r in records:
                f.write(r.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        limits: dict[str, Any] = {}
        for d in run_dirs:  # each shard's limit-model byte counts (harness.limit)
            limits.update(read_limits(d) or {})
        if limits:
            write_limits(tmp, limits)
        for d in run_dirs:
            for sub in ("logs", "timeline"):
                if (d / sub).is_dir():
                    shutil.copytree(d / sub, tmp / sub, dirs_exist_ok=True)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UserError(f"merge: {exc.filename or out}: {exc.strerror or exc}") from None
        raise
    return out
