"""lazybench installed from a wheel (not editable), run from a directory unrelated to the source.

Checked as a new user meets it: ``lazybench report RUN`` shows the published column (the
reference numbers ship inside the package), ``lazybench compare A B --gate`` works with the
packaged default gate, and results default to ``./results/runs`` of the current directory.

The wheel is built from this checkout without build isolation and installed with ``--no-deps``
into a fresh virtualenv that sees this interpreter's third-party packages through a ``.pth``
line (a path added that way does not run that site's ``.pth`` files, so this checkout's
editable install stays invisible). Built once per test session; ~15 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ROOT / "results" / "baselines" / "default"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with lazybench installed from a freshly built wheel; its bin directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    # setuptools builds inside the source tree (build/, *.egg-info): build from a copy.
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("harness", "store"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"),
            *("-q", "-w", str(tmp / "dist"), str(src)),
        ],
        check=True,
        timeout=300,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    (wheel,) = (tmp / "dist").glob("lazybench-*.whl")
    venv = tmp / "venv"
    # No pip inside (Debian's python3 has no ensurepip without python3-venv): this
    # interpreter's pip installs into it with --python.
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300
    )
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz-lazybench-test-deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(py), "install"),
            *("-q", "--no-deps", "--no-index", str(wheel)),
        ],
        check=True,
        timeout=300,
    )
    return venv / "bin"


def lazybench(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(bin_dir / "lazybench"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_installed_package_is_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [installed / "python", "-c", "import harness; print(harness.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(ROOT) not in out and "site-packages" in out


def test_report_and_gate_from_an_unrelated_directory(installed: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("a", "b"):
        shutil.copytree(BASELINE, elsewhere / name)
    rep = lazybench(installed, elsewhere, "report", "a")
    assert rep.returncode == 0, rep.stderr
    report = (elsewhere / "a" / "report.md").read_text()
    ratio_lines = [line for line in report.splitlines() if line.startswith("| gcc | gcc:9.2.0 |")]
    # The published column: gcc:9.2.0's estargz ÷ legacy from the packaged reference (0.13).
    assert len(ratio_lines) == 1 and "| 0.13 |" in ratio_lines[0]
    cmp = lazybench(installed, elsewhere, "compare", "a", "b", "--gate")
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert "passed" in cmp.stdout
    # The default results directory is the current directory's results/runs.
    help_text = lazybench(installed, elsewhere, "run", "--help").stdout
    assert "current directory" in help_text
