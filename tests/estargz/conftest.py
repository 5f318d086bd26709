"""Fixtures for the eStargz format tests: the Go reference vectors and a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
from fmt_helpers import CliResult, Vector, load_vectors

from harness.cli import main as cli_main


@pytest.fixture(scope="session")
def vectors(vectors_dir: Path) -> dict[str, Vector]:
    return {v.name: v for v in load_vectors(vectors_dir)}


@pytest.fixture
def lazybench(capsys: pytest.CaptureFixture[str]):
    """Run ``lazybench`` in-process (fast); returns exit code and captured output."""

    def run(*argv: str) -> CliResult:
        capsys.readouterr()
        code = cli_main(list(argv))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
