"""`python -m fuzz.run [--seconds N] [TARGET...]`: fuzz each target for a fixed time budget.

Each target runs in its own process under atheris (libFuzzer): seeds from
``fuzz/corpus/<name>/``, new coverage kept in a scratch directory (the committed corpus only
changes when someone copies inputs into it on purpose), and any input that raises something
outside the target's ``ALLOWED`` — or runs longer than ``--timeout`` seconds, or takes more
than ``--rss-limit-mb`` of memory — saved to ``fuzz/regressions/<name>/`` (libFuzzer names:
``crash-…``, ``timeout-…``, ``oom-…``). The test session replays that directory.

Prints one line per target (executions, seconds, outcome); exits 1 when any target found
something, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
DEFAULT_SECONDS = 600


@dataclass
class Outcome:
    target: str
    executions: int
    seconds: float
    returncode: int
    findings: list[Path]

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.findings


def corpus_dir(name: str) -> Path:
    return FUZZ_DIR / "corpus" / name


def regressions_dir(name: str) -> Path:
    return FUZZ_DIR / "regressions" / name


def _child(name: str, seconds: int, timeout: int, rss_mb: int, scratch: Path) -> None:
    """Runs inside the per-target process: instrument the code under test, hand to libFuzzer."""
    import atheris

    from fuzz import targets

    with atheris.instrument_imports(include=["store", "fuzz.targets"]):
        mod = targets.load(name)
    allowed = mod.ALLOWED

    def test_one(data: bytes) -> None:
        with contextlib.suppress(allowed):
            mod.one_input(data)

    regressions = regressions_dir(name)
    regressions.mkdir(parents=True, exist_ok=True)
    args = [
        sys.argv[0],
        f"-max_total_time={seconds}",
        f"-timeout={timeout}",
        f"-rss_limit_mb={rss_mb}",
        f"-artifact_prefix={regressions}/",
        "-print_final_stats=1",
        str(scratch),
        str(corpus_dir(name)),
    ]
    atheris.Setup(args, test_one)
    atheris.Fuzz()


def run_target(name: str, seconds: int, timeout: int, rss_mb: int) -> Outcome:
    before = set(regressions_dir(name).glob("*"))
    corpus_dir(name).mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as scratch:
        cmd = [
            sys.executable,
            "-m",
            "fuzz.run",
            "--child",
            name,
            "--seconds",
            str(seconds),
            "--timeout",
            str(timeout),
            "--rss-limit-mb",
            str(rss_mb),
            "--scratch",
            scratch,
        ]
        # libFuzzer stops by itself at -max_total_time; the margin covers start-up and a
        # final slow input, and keeps a wedged child from blocking the session for ever.
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                timeout=seconds + timeout + 120,
            )
            log, rc = proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            log, rc = (exc.stderr or b"").decode(errors="replace"), -9
    execs = [int(m) for m in re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)]
    findings = sorted(set(regressions_dir(name).glob("*")) - before)
    if rc != 0 or findings:
        sys.stderr.write(log[-6000:])
    return Outcome(name, execs[-1] if execs else 0, time.monotonic() - start, rc, findings)


def main(argv: list[str] | None = None) -> int:
    from fuzz import targets

    p = argparse.ArgumentParser(prog="fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="*", metavar="TARGET", help="default: every target")
    p.add_argument("--seconds", type=int, default=DEFAULT_SECONDS, help="budget per target")
    p.add_argument("--timeout", type=int, default=20, help="seconds one input may take")
    p.add_argument("--rss-limit-mb", type=int, default=2048, help="memory one process may use")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child, args.seconds, args.timeout, args.rss_limit_mb, args.scratch)
        return 0
    known = targets.names()
    unknown = [t for t in args.targets if t not in known]
    if unknown or args.seconds <= 0:
        p.error(f"unknown target(s) {unknown}; known: {known}" if unknown else "--seconds > 0")
    outcomes = []
    for name in args.targets or known:
        print(f"fuzzing {name} for {args.seconds}s ...", flush=True)
        o = run_target(name, args.seconds, args.timeout, args.rss_limit_mb)
        outcomes.append(o)
        verdict = "ok" if o.ok else f"FOUND {len(o.findings)} (exit {o.returncode})"
        print(f"{name:20} {o.executions:>10} execs {o.seconds:7.0f}s  {verdict}", flush=True)
        for f in o.findings:
            print(f"    saved {f.relative_to(ROOT)}: replay with pytest tests/fuzz_regressions")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
