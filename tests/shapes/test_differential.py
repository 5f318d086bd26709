"""Differential test: generated images pulled lazily through the store and normally by podman.

Each image (:mod:`tests.shapes.strategies`) is written as eStargz by our writer and by the Go
writer; each is pulled through the mounted store and by a podman without it, and the two
listings (``podman image mount``) must agree as :func:`tests.shapes.lab.judge` rules. Each is
also written as zstd:chunked by our writer and pulled through the store, judged against the
normal pull of our eStargz image of the same tars. Failing
examples are kept in ``regressions/`` and replayed first.

``SHAPES_EXAMPLES`` (default 30) images per round; ``SHAPES_SECONDS`` runs unseeded rounds
for that long (``nox -s fuzz``), keeping every failure as a regression file.
"""

from __future__ import annotations

import collections
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings

from tests.shapes.conftest import regressions_dir
from tests.shapes.lab import Lab, Outcome
from tests.shapes.model import Image, dumps, loads
from tests.shapes.strategies import images

pytestmark = [pytest.mark.e2e, pytest.mark.differential]


# Shapes with a known fault whose fix lives elsewhere: a mismatch on them is counted and
# reported, not failed (their kept examples are xfail with the same reason). None at present.
KNOWN: list[tuple[str, Callable[[Image], bool]]] = []


def known_cause(image: Image) -> str:
    for reason, predicate in KNOWN:
        if predicate(image):
            return reason
    return ""


def _problems(outcomes: list[Outcome]) -> list[str]:
    return [f"[{o.writer}] {p}" for o in outcomes for p in o.problems]


def _report(image: Image, outcomes: list[Outcome]) -> str:
    lines = _problems(outcomes)
    for o in outcomes:
        if o.normal.error:
            lines.append(f"[{o.writer}] normal pull refused: {o.normal.error}")
    return "\n".join([*lines, dumps(image)])


def _save(image: Image, why: str) -> Path:
    text = dumps(image, why=why)
    d = regressions_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{hashlib.sha256(dumps(image).encode()).hexdigest()[:12]}.json"
    path.write_text(text + "\n")
    return path


def _check(lab: Lab, image: Image) -> None:
    outcomes = lab.check(image)
    if any(o.problems for o in outcomes):
        raise AssertionError(_report(image, outcomes))


REGRESSIONS = sorted(regressions_dir().glob("*.json")) if regressions_dir().is_dir() else []


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.stem for p in REGRESSIONS])
def test_regression(lab: Lab, path: Path) -> None:
    """A kept failing example; one whose ``xfail`` names a pending fix may still fail."""
    image, meta = loads(path.read_text())
    outcomes = lab.check(image)
    if any(o.problems for o in outcomes):
        if meta.get("xfail"):
            pytest.xfail(meta["xfail"])
        raise AssertionError(_report(image, outcomes))


BUDGET = float(os.environ.get("SHAPES_SECONDS", "0"))


# The fuzz budget, plus time for the round running when it ends (shrinking included).
@pytest.mark.timeout(600 + 2 * BUDGET)
def test_generated_images(lab: Lab) -> None:
    budget = BUDGET
    deadline = time.monotonic() + budget
    failures: list[str] = []
    known: list[str] = []
    rounds = 0
    failing: list[Image] = []
    while True:
        failing.clear()

        @settings(settings.get_profile("shapes"))
        @given(images())
        def prop(image: Image) -> None:
            outcomes = lab.check(image)
            if not any(o.problems for o in outcomes):
                return
            cause = known_cause(image)
            if cause:
                known.append(cause)
                return
            failing.append(image)
            raise AssertionError(_report(image, outcomes))

        try:
            prop()
        except AssertionError as exc:
            path = _save(failing[-1], str(exc).splitlines()[0][:500])
            failures.append(f"{path.name}: {exc}")
        rounds += 1
        if time.monotonic() >= deadline or (failures and budget <= 0):
            break
    rate = lab.count / max(lab.seconds / 60, 1e-9)
    kinds = collections.Counter(k[:40] for k in known)
    print(f"\nshapes: {lab.count} images in {lab.seconds:.0f}s ({rate:.1f}/min), "
          f"{rounds} round(s), {len(failures)} failure(s), {len(known)} known {dict(kinds)}; "
          f"normal pulls: {dict(lab.stats)}")  # fmt: skip
    for why, n in lab.refusals.most_common():
        print(f"  normal pull refused ({n}x): {why}")
    assert not failures, "\n\n".join(failures)
