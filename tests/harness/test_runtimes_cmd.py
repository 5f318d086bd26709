"""`lazybench runtimes ls|prune|build` on a fake cache (no building)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import runtimes
from harness.cli import main


def test_ls_prune_and_bad_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "nodes" / f"sid-{runtimes.recipe_hash('sid')}"
    (d / "root").mkdir(parents=True)
    (d / "versions.json").write_text(
        json.dumps({"node": "sid", "podman": "5.8.6", "containers_storage": "1.64.0"})
    )
    old = tmp_path / "nodes" / "trixie-0000000000000000"
    (old / "root").mkdir(parents=True)
    assert main(["runtimes", "ls", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "5.8.6" in out and "1.64.0" in out and "old recipe" in out
    assert main(["runtimes", "build", "bookworm", "--cache-dir", str(tmp_path)]) == 1
    assert "unknown node 'bookworm'" in capsys.readouterr().err
    # A cached build is printed without building.
    assert main(["runtimes", "build", "sid", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(d / "root")
    assert main(["runtimes", "prune", "--cache-dir", str(tmp_path)]) == 0
    assert f"removed {old}" in capsys.readouterr().out
    assert d.exists() and not old.exists()
