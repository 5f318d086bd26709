"""Collect ``bench_*.py`` files as test modules when pytest is pointed at ``benchmarks/``.

Why: the default ``python_files`` pattern (``test_*.py``) would silently collect nothing from
``nox -s microbench`` (``pytest benchmarks``). Each benchmark skips itself unless
``LAZYBENCH_BENCH=1``.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Module | None:
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest's python plugin collects it already
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
