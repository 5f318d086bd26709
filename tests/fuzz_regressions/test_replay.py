"""Every committed fuzz input replayed through its target: only the target's typed errors.

``fuzz/corpus/<name>/`` (seeds) and ``fuzz/regressions/<name>/`` (inputs that once found a
bug) — see :mod:`fuzz`. Fast: no fuzzing engine, a few hundred small inputs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from fuzz import targets
from fuzz.run import corpus_dir, regressions_dir


def _inputs() -> list[tuple[str, Path]]:
    out = []
    for name in targets.names():
        for d in (corpus_dir(name), regressions_dir(name)):
            out += [(name, p) for p in sorted(d.glob("*")) if p.is_file() and p.name[0] != "."]
    return out


def test_every_target_keeps_the_contract_and_has_seeds() -> None:
    assert targets.names(), "no fuzz targets found"
    for name in targets.names():
        targets.load(name)
        assert any(corpus_dir(name).glob("*")), f"fuzz/corpus/{name}/ has no seeds"


@pytest.mark.parametrize(
    ("name", "path"), _inputs(), ids=lambda v: v.name if isinstance(v, Path) else v
)
def test_replay(name: str, path: Path) -> None:
    mod = targets.load(name)
    with contextlib.suppress(mod.ALLOWED):
        mod.one_input(path.read_bytes())
