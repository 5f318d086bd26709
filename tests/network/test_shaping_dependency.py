"""A missing shaping dependency names its cause and what to install, at every layer.

The NFQUEUE delayer (used for profiles with an RTT on kernels without ``sch_netem``) needs the
optional netfilterqueue package. Without it, ``lazybench run`` on a wan profile used to fail
with ``ValueError: I/O operation on closed file`` (the delayer's stderr was read after it was
closed), hiding the cause.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.netshape import NetworkError, NetworkLink, get_profile
from harness.netshape.link import _wait_ready, needs_delayer

ROOT = Path(__file__).resolve().parents[2]
HINT = "pip install 'lazybench[shaping]'"


@pytest.fixture
def shadowed(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import netfilterqueue."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "netfilterqueue.py").write_text(
        "raise ImportError(\"No module named 'netfilterqueue'\")\n"
    )
    return {**os.environ, "PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}"}


def test_a_child_that_dies_is_reported_with_its_stderr() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stderr.write('the real cause'); sys.exit(2)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with pytest.raises(NetworkError, match=r"did not start \(exit status 2\): the real cause"):
        _wait_ready(proc, "child", timeout=30)
    assert proc.stdout.closed and proc.stderr.closed


def test_delayer_without_netfilterqueue_says_what_to_install(shadowed: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "harness.netshape.delayer", "--delay-ms", "1"],
        env=shadowed,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert HINT in proc.stderr and "libnetfilter-queue-dev" in proc.stderr


def test_run_on_a_wan_profile_refuses_before_building_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if not needs_delayer(get_profile("wan")):
        pytest.skip("this kernel has sch_netem: the wan profile needs no netfilterqueue")
    monkeypatch.setitem(sys.modules, "netfilterqueue", None)  # import fails, find_spec: None
    scenario = tmp_path / "wan.toml"
    scenario.write_text('[network]\nprofile = "wan"\n[[workloads]]\nrecipe = "tiny"\n')
    rc = main(["run", str(scenario), "--results-dir", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "network profile 'wan'" in err and HINT in err
    assert "closed file" not in err and "Traceback" not in err


@pytest.mark.e2e
def test_link_without_netfilterqueue_names_the_cause_and_cleans_up(
    tmp_path: Path, shadowed: dict[str, str], no_leftovers: None
) -> None:
    python = tmp_path / "python-without-nfq"
    python.write_text(
        f'#!/bin/sh\nexport PYTHONPATH={shadowed["PYTHONPATH"]}\nexec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    with (
        pytest.raises(NetworkError, match=r"network profile 'wan': .*lazybench\[shaping\]"),
        NetworkLink("wan", delay_method="nfqueue", python=str(python)),
    ):
        pass
