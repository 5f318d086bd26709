"""The CI templates users copy: a gate that fails must fail the job."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TEMPLATES = Path(__file__).resolve().parents[2] / "ci" / "templates"


def _steps(text: str) -> list[str]:
    """A GitHub workflow's steps, each as its text (from one ``- `` item to the next)."""
    return re.split(r"\n(?=\s*- (?:name|uses):)", text)


@pytest.mark.parametrize("template", sorted(TEMPLATES.glob("github-*.yml")), ids=lambda p: p.name)
def test_a_piped_step_runs_with_pipefail(template: Path) -> None:
    """GitHub runs a step without ``shell:`` as ``bash -e {0}``, no pipefail: a gate piped into
    ``tee`` exits with tee's status, 0, whatever the gate said. ``shell: bash`` adds pipefail."""
    piped = [s for s in _steps(template.read_text()) if re.search(r"\|\s*tee\b", s)]
    assert piped, "the gate's step pipes into tee"
    for step in piped:
        assert re.search(r"^\s*shell: bash\s*$", step, re.M), step
