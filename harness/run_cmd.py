"""``lazybench run SCENARIO``, ``lazybench merge OUT RUN_DIR…``, ``lazybench report RUN_DIR``,
``lazybench compare BASE NEW``."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from harness.cli import RUN_NEEDS, UserError, make_console, require_root

# The longest --run-id: a file name's 255 bytes, less a runtime node's "-<node>" and the
# "-runtimes.md" beside a run of several nodes.
MAX_RUN_ID = 200
# `--gate` given without a file: the gate file shipped in the package.
PACKAGED_GATE = "packaged default gate"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    run = sub.add_parser(
        "run",
        help="run a scenario: registry behind a shaped link, podman full vs lazy pulls",
        description="Run SCENARIO (a TOML file) and write results/runs/<id>/: records.jsonl, "
        "environment.json, summary.csv, table.md, chart.png/svg, report.md.",
    )
    run.add_argument("scenario", nargs="?", type=Path, help="scenario TOML file")
    run.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="finish an interrupted run (its own copy of the scenario is used)",
    )
    run.add_argument("--run-id", help="name of the run directory (default: time + scenario)")
    run.add_argument(
        "--results-dir",
        type=Path,
        help="where run directories go (default: results/runs under the current directory)",
    )
    run.add_argument(
        "--cache-dir",
        type=Path,
        help="image/trace cache (default: $LAZYBENCH_CACHE or ~/.cache/lazybench)",
    )
    run.add_argument("--samples", type=int, help="override the scenario's sample count")
    run.add_argument(
        "--shard",
        metavar="K/N",
        help="run only part K of N of the plan (deterministic; join the parts with "
        "`lazybench merge`)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    merge = sub.add_parser(
        "merge",
        help="join the shards of one run (`run --shard K/N`) into one run directory",
        description="Join run directories holding shards of one scenario into OUT and report "
        "on it. Shards of different scenarios are refused; shards run on different machines "
        "are marked in environment.json and the report.",
    )
    merge.add_argument("out", type=Path, metavar="OUT", help="the merged run directory (new)")
    merge.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    merge.set_defaults(func=cmd_merge)

    report = sub.add_parser(
        "report",
        help="(re)build table, chart and report of a run",
        description="Rebuild summary.csv, table.md, chart.png/svg and report.md of RUN_DIR. "
        "A run without limits.json (the limit model's byte counts) gets it from the image "
        "cache when the cache holds its images and traces.",
    )
    report.add_argument("run_dir", type=Path)
    report.add_argument(
        "--limits",
        action="store_true",
        help="recompute limits.json from the image cache even when the run has one",
    )
    report.add_argument(
        "--cache-dir",
        type=Path,
        help="image/trace cache (default: $LAZYBENCH_CACHE or ~/.cache/lazybench)",
    )
    report.set_defaults(func=cmd_report)

    compare = sub.add_parser(
        "compare",
        help="per workload × mode deltas between two runs; --gate fails on regressions",
    )
    compare.add_argument("base", type=Path, metavar="BASE", help="the reference run directory")
    compare.add_argument("new", type=Path, metavar="NEW", help="the run to judge")
    compare.add_argument(
        "--gate",
        nargs="?",
        const=PACKAGED_GATE,
        metavar="GATE_TOML",
        help="exit 1 when NEW regresses past these thresholds, 2 when the runs cannot be "
        "compared (without a file: the packaged default, harness/data/gate.toml; a run "
        "directory right after --gate is BASE)",
    )
    compare.add_argument(
        "--statistic", choices=("median", "percentile"), help="override the gate's statistic"
    )
    compare.set_defaults(func=cmd_compare)


def gate_before_runs(argv: list[str]) -> list[str]:
    """``argv`` with ``compare --gate BASE NEW`` (flags first, as podman users write them)
    spelled so that argparse reads it so: a bare ``--gate`` followed by a directory takes the
    packaged gate, and the directory stays a run directory. Other command lines unchanged."""
    if not argv or argv[0] != "compare":
        return argv
    out = list(argv)
    for i, word in enumerate(out[:-1]):
        if word == "--gate" and Path(out[i + 1]).is_dir():
            out[i] = f"--gate={PACKAGED_GATE}"
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from harness.measure import RESULTS_DIR, load_run_scenario, new_run_id
    from harness.plan import Shard
    from harness.records import read_environment
    from harness.scenario import load_scenario

    check_run_args(args)
    console = make_console(soft_wrap=True)
    shard = Shard.parse(args.shard) if args.shard else None
    if args.resume is not None:
        run_dir = args.resume.resolve()
        scenario = load_run_scenario(run_dir)
        require_root("run", RUN_NEEDS)
        recorded = read_environment(run_dir).get("shard")
        if shard is None and recorded:
            shard = Shard.parse(recorded)
        return _run_one(scenario, run_dir, args, console, shard)
    if args.scenario is None:
        raise UserError("run: name a SCENARIO file or --resume RUN_DIR")
    scenario = load_scenario(args.scenario)
    if args.samples is not None:
        from harness.scenario import MAX_SAMPLES

        if not 1 <= args.samples <= MAX_SAMPLES:
            # Above the scenario's bound, the run's own scenario copy no longer reads back:
            # `--resume` refused it and its report could not tell it incomplete.
            raise UserError(f"--samples must be between 1 and {MAX_SAMPLES}, got {args.samples}")
        scenario = replace(scenario, samples=args.samples)
    require_root("run", RUN_NEEDS)  # the scenario's own mistakes are named first
    results = args.results_dir or RESULTS_DIR
    run_id = args.run_id or new_run_id(scenario)
    if shard is not None and not args.run_id:
        run_id += f"-shard{shard.index}of{shard.count}"
    if len(scenario.nodes) == 1:
        return _run_one(scenario, (results / run_id).resolve(), args, console, shard)
    # One run directory per runtime node: each is a complete run (records, table, report)
    # that resumes on its own.
    status = 0
    run_dirs = []
    for node in scenario.nodes:
        console.rule(f"node {node}")
        run_dirs.append((results / f"{run_id}-{node}").resolve())
        one = _run_one(scenario.for_node(node), run_dirs[-1], args, console, shard)
        if one == 130:
            return one
        status = status or one
    from harness.report import write_runtimes_summary

    summary = write_runtimes_summary(results / f"{run_id}-runtimes.md", run_dirs)
    console.print(f"runtimes: {summary}", markup=False)
    return status


def check_run_args(args: argparse.Namespace) -> None:
    """Refuse, with :class:`UserError`, what ``run`` would otherwise ignore or misplace: a
    ``--run-id`` that is not one path component (``..``, ``a/b`` put the run directory
    outside ``--results-dir``) or is too long for one (:data:`MAX_RUN_ID`), ``--resume``
    with what only a new run takes (the resumed run keeps its own scenario copy, sample
    count and directory), and a results or cache directory that cannot be written
    (:func:`check_output_dirs`)."""
    run_id = args.run_id
    if run_id is not None and (run_id in ("", ".", "..") or "/" in run_id or "\0" in run_id):
        raise UserError(
            f"--run-id {run_id!r}: must be one path component (a directory name, no '/', "
            "not '.' or '..')"
        )
    if run_id is not None and len(run_id.encode()) > MAX_RUN_ID:
        raise UserError(
            f"--run-id: {len(run_id.encode())} bytes long, at most {MAX_RUN_ID} fit (a "
            "directory name, with room for a runtime node's suffix); shorten it"
        )
    given = [
        what
        for what, value in (
            (f"SCENARIO ({args.scenario})", args.scenario),
            ("--samples", args.samples),
            ("--run-id", args.run_id),
            ("--results-dir", args.results_dir),
        )
        if value is not None
    ]
    if given and args.resume is not None:
        raise UserError(
            f"--resume {args.resume}: not with {', '.join(given)}: a resumed run keeps the "
            "scenario, samples and directory it was started with"
        )
    check_output_dirs(args)


def check_output_dirs(args: argparse.Namespace) -> None:
    """The results directory (a new run's) and the cache directory must be directories
    lazybench can create and write to: found out now, not with a traceback after the run
    directory is made (:func:`harness.cli.check_writable_dir`)."""
    from harness.cli import check_cache_dir, check_writable_dir
    from harness.measure import RESULTS_DIR

    if args.resume is None:
        if args.results_dir is not None:
            check_writable_dir(args.results_dir, "--results-dir")
        else:
            check_writable_dir(RESULTS_DIR, "results directory")
    check_cache_dir(args.cache_dir)


def _run_one(
    scenario: Any, run_dir: Path, args: argparse.Namespace, console: Console, shard: Any
) -> int:
    from harness.measure import Runner
    from harness.plan import plan
    from harness.report import write_report

    console.print(f"run directory: {run_dir}", markup=False)
    runner = Runner(
        scenario,
        run_dir,
        console=console,
        cache_dir=args.cache_dir,
        show_progress=not args.no_progress,
        shard=shard,
    )
    try:
        runner.run()
    except KeyboardInterrupt as exc:  # Interrupted, or a signal before measuring began
        if not run_dir.exists():
            raise
        # After SIGHUP the terminal may be gone (EIO): the exit status still says it.
        with contextlib.suppress(OSError):
            print(interrupted_message(str(exc) or "SIGINT", run_dir), file=sys.stderr)
        return 130
    except UserError as exc:
        if run_dir.exists():
            raise
        # Runner.run removed the directory it made: nothing in it to resume or report.
        raise UserError(f"{exc}; nothing was measured, so {run_dir} was removed") from None
    if shard is not None and not plan(scenario, shard):
        # More shards than measurements: an empty shard directory, nothing to report on.
        console.print(f"shard {shard}: no report (merge takes {run_dir} with the others)")
        return 0
    try:
        report = write_report(run_dir, cache_dir=args.cache_dir)
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM/SIGHUP (harness.cli.Terminated)
        print(
            f"lazybench: interrupted ({str(exc) or 'SIGINT'}) while writing the report; every "
            f"measurement is recorded in {run_dir}: `lazybench report {run_dir}` writes it",
            file=sys.stderr,
        )
        return 130
    print(report.table_text)
    failed = _failures(run_dir, "error")
    fell_back = _failures(run_dir, "fell-back")
    console.print(f"table:  {report.table}", markup=False)
    console.print(f"chart:  {report.charts[0]} (and .svg)", markup=False)
    console.print(f"report: {report.report}", markup=False)
    if report.missing or failed or fell_back:
        print(
            f"lazybench: {len(failed)} measurements failed, {len(fell_back)} fell back to a "
            f"full pull, {len(report.missing)} missing; "
            f"see {report.report}",
            file=sys.stderr,
        )
        return 1
    return 0


def interrupted_message(signal_name: str, run_dir: Path) -> str:
    """What to say when a run is interrupted: where its finished measurements are, or that
    none finished (interrupted while preparing), and how to resume."""
    from harness.records import read_records

    resume = f"resume with `lazybench run --resume {run_dir}`"
    try:
        finished = len(read_records(run_dir))
    except (OSError, ValueError, UserError):
        finished = 0
    if not finished:
        return (
            f"lazybench: interrupted ({signal_name}) before any measurement finished; nothing "
            f"measured is kept; {run_dir} holds the run's scenario: {resume}, or remove it"
        )
    return (
        f"lazybench: interrupted ({signal_name}); {finished} finished measurements are kept in "
        f"{run_dir}; {resume}"
    )


def _failures(run_dir: Path, status: str) -> list[str]:
    from harness.records import read_records

    return [f"{r.workload}/{r.mode}" for r in read_records(run_dir) if r.status == status]


def cmd_merge(args: argparse.Namespace) -> int:
    from harness.merge import merge_runs
    from harness.records import read_environment
    from harness.report import write_report

    out = merge_runs(args.out, args.run_dirs)
    env = read_environment(out)
    print(f"merged {len(args.run_dirs)} run directories into {out}")
    if env.get("machines_differ"):
        print(
            "lazybench: the shards ran on different machines (see environment.json: shards)",
            file=sys.stderr,
        )
    report = write_report(out)
    print(report.table_text)
    print(f"table:  {report.table}\nchart:  {report.charts[0]} (and .svg)\nreport: {report.report}")
    absent = _absent_shards(env)
    if absent:
        print(
            f"lazybench: shard {', '.join(absent)} is not among the inputs: "
            f"{len(report.missing)} planned measurements have no record; merge again with "
            f"every shard's run directory into a new OUT (or remove {out} first), or measure "
            f"them with `lazybench run --resume {out}`",
            file=sys.stderr,
        )
        return 1
    return 0


def _absent_shards(env: dict[str, Any]) -> list[str]:
    """The shards K/N of the merged inputs' count N that no input holds."""
    shards = [s.get("shard") for s in env.get("shards", []) if s.get("shard")]
    if not shards:
        return []
    count = int(shards[0].split("/")[1])
    return [f"{k}/{count}" for k in range(1, count + 1) if f"{k}/{count}" not in shards]


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import write_report

    report = write_report(args.run_dir, cache_dir=args.cache_dir, recompute_limits=args.limits)
    print(report.table_text)
    print(f"table:  {report.table}\nchart:  {report.charts[0]} (and .svg)\nreport: {report.report}")
    if report.missing:
        # The table printed above is of part of the run: said only in report.md, it read
        # as the whole (exit 0), as `run` and `compare --gate` say it of the same directory.
        print(
            f"lazybench: {len(report.missing)} planned measurements have no record (the run "
            f"was interrupted or killed part way): the figures are of part of the run; see "
            f"{report.report}, finish it with `lazybench run --resume {report.run_dir}`",
            file=sys.stderr,
        )
        return 1
    return 0


# compare's exit status when the runs could not be compared (a run directory missing or
# damaged, a bad gate file): not 1, which a failed gate returns (as diff and cmp do).
COMPARE_TROUBLE = 2


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        return _compare(args)
    except UserError as exc:
        exc.status = COMPARE_TROUBLE
        raise


def _compare(args: argparse.Namespace) -> int:
    from harness.gate import (
        Gate,
        compare_runs,
        compare_table,
        condition_differences,
        gate_failures,
        gate_warnings,
        load_gate,
    )

    if args.gate is None:
        gate = Gate()
    else:
        gate = load_gate(None if args.gate == PACKAGED_GATE else Path(args.gate))
    statistic = args.statistic or gate.statistic
    cmp = compare_runs(args.base, args.new, statistic)
    print(f"{args.base} → {args.new} ({statistic})\n")
    print(compare_table(cmp))
    differences = condition_differences(args.base, args.new)
    for difference in differences:
        print(f"warning: the runs were measured differently: {difference}", file=sys.stderr)
    warnings = gate_warnings(cmp)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.gate is None:
        return 0
    # Another link or runtime changes every figure: a gate on them would pass or fail on that.
    apart = [d for d in differences if d.startswith(UNGATEABLE)]
    if apart:
        print(f"gate {args.gate}: the runs cannot be compared", file=sys.stderr)
        for difference in apart:
            print(f"  {difference}", file=sys.stderr)
        print(
            "  gate against a base run measured on the same network profile and runtime",
            file=sys.stderr,
        )
        return 2
    problems = gate_failures(cmp, gate)
    if problems:
        print(f"gate {args.gate}: FAILED", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    said = len(differences) + len(warnings)
    # On stdout, where a CI job's summary is taken from: the warnings went to stderr.
    print(f"gate {args.gate}: passed" + (f" ({said} warnings, above)" if said else ""))
    return 0


# Conditions (harness.gate.condition_differences) under which no gate is run: exit 2.
UNGATEABLE = ("network profile:", "runtime:")
