"""Entry points: `nox -s tests`, `nox -s bench`, `nox -s lint`, `nox -s fuzz`.

Each session makes sure the Debian packages it needs are present (through
`ci/install-system-deps`) before installing the Python packages into its own virtualenv.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox
from nox.command import CommandFailed

ROOT = Path(__file__).parent
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


def _system_deps(session: nox.Session) -> None:
    session.run(str(ROOT / "ci" / "install-system-deps"), external=True)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole pytest suite: unit tests and end-to-end tests against real services."""
    _system_deps(session)
    session.install("-e", ".[test,shaping]")
    args = session.posargs or ["-ra", "--durations=15"]
    session.run("pytest", *args, env={"PYTHONUNBUFFERED": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Run scenarios/default.toml end to end and print where the table and chart are."""
    _system_deps(session)
    session.install("-e", ".[shaping]")
    # `nox -s bench -- [SCENARIO.toml] [lazybench run options]`; images are built once and
    # cached (~/.cache/lazybench or $LAZYBENCH_CACHE), so a second run only measures.
    args = list(session.posargs)
    scenario = args.pop(0) if args and args[0].endswith(".toml") else "scenarios/default.toml"
    session.run("lazybench", "run", str(ROOT / scenario), *args)


@nox.session
def microbench(session: nox.Session) -> None:
    """The component benchmarks (format, registry client, store data path) with baselines."""
    _system_deps(session)
    session.install("-e", ".[test]")
    # `nox -s microbench -- benchmarks/bench_store_read.py` runs that file only: the directory
    # is added only when no argument names a path.
    named = any(Path(a.split("::")[0]).exists() for a in session.posargs)
    session.run(
        "pytest",
        *([] if named else ["benchmarks"]),
        "-p",
        "no:cacheprovider",
        "-s",
        *session.posargs,
        env={"LAZYBENCH_BENCH": "1", **os.environ},
    )


@nox.session
def fuzz(session: nox.Session) -> None:
    """Coverage-guided fuzzing of the format parsers and the writer (atheris), not in `tests`;
    and the differential test's image generator against podman's own extraction (`shapes`).

    `nox -s fuzz -- [--seconds N] [TARGET...]`: each target (fuzz/targets/, and `shapes`) for N
    seconds (default 600); exits non-zero when an input raises anything but the target's typed
    errors, and saves it to fuzz/regressions/<target>/, which `nox -s tests` replays. `shapes`
    runs unseeded rounds of tests/shapes' generator (images pulled lazily through the store and
    normally, listings compared), keeps each failing image in tests/shapes/regressions/ (also
    replayed by `nox -s tests`) and prints how many images ran, per minute, and what it found.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="nox -s fuzz --", add_help=False)
    parser.add_argument("--seconds", default="600")
    opts, rest = parser.parse_known_args(session.posargs)
    targets = [a for a in rest if not a.startswith("-")]
    session.install("-e", ".[fuzz,test,shaping]")
    failed = []
    if not targets or any(t != "shapes" for t in targets):
        try:
            session.run(
                "python",
                "-m",
                "fuzz.run",
                "--seconds",
                opts.seconds,
                *[a for a in rest if a != "shapes"],
                env={"PYTHONUNBUFFERED": "1"},
            )
        except CommandFailed:
            failed.append("fuzz targets")
    if not targets or "shapes" in targets:
        _system_deps(session)
        try:
            session.run(
                "pytest",
                "tests/shapes",
                "-m",
                "differential",
                "-k",
                "generated",
                "-s",
                "-p",
                "no:cacheprovider",
                env={
                    "SHAPES_SECONDS": opts.seconds,
                    "SHAPES_EXAMPLES": "20",
                    "PYTHONUNBUFFERED": "1",
                },
            )
        except CommandFailed:
            failed.append("shapes")
    if failed:
        session.error(f"found something: {', '.join(failed)}")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
