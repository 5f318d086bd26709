"""The trace run of an optimized image: through our store, and only when its pull was lazy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness.cli import UserError
from harness.images import tiny_image
from harness.laziness import LayerEvidence, Verdict
from harness.prepare import resolve
from harness.registry_server import RegistryServer
from harness.scenario import parse_scenario
from harness.trace import trace_cache_path, traced_reads

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
]


def test_a_trace_run_whose_pull_fell_back_is_refused_and_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer podman pulled itself is read past the store: its files would be missing from
    the trace, cached for good, and the optimized image would prioritize too little."""
    built = tiny_image(tmp_path / "cache")
    scenario = parse_scenario({"workloads": [{"recipe": "tiny"}]}, "s.toml")
    w = resolve(scenario.workloads[0])
    fell_back = Verdict([LayerEvidence("id", "sha256:" + "ab" * 32, False, False)])
    monkeypatch.setattr("harness.laziness.storage_verdict", lambda *a: fell_back)
    with RegistryServer() as reg, pytest.raises(UserError, match="did not come lazily") as exc:
        traced_reads(built, w, reg.host, tmp_path / "work", cache_dir=tmp_path / "cache")
    assert "1 of 1 layers not from the store" in str(exc.value)
    assert not trace_cache_path(built.hash, w, tmp_path / "cache").exists()
