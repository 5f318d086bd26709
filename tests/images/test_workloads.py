"""The Debian workload images really do what their recipes say (slow: real apt builds).

``python`` always runs (about a minute on first build, then cached in the user's image
cache); the full set runs with ``LAZYBENCH_ALL_IMAGES=1``, plus ``postgres`` under podman's
zstd:chunked partial pull (the one workload that runs as a non-root user, so the one that
depends on layer roots and file owners surviving that pull).
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from harness.images import RECIPES, build_layers, push_image
from harness.podman import PodmanEnv
from harness.registry_server import RegistryServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ALL = os.environ.get("LAZYBENCH_ALL_IMAGES") == "1"
CASES = [(name, "legacy") for name in (RECIPES if ALL else ["python"])]
if ALL:
    CASES.append(("postgres", "zstd-chunked"))


def _run_until_ready(env: PodmanEnv, ref: str, recipe) -> str:
    cmd = ["podman", "run", "--rm", "--network=none", "--name", "lzb-wl"]
    if recipe.stdin is not None:
        cmd.append("-i")
    proc = subprocess.Popen(
        [*cmd, ref, *recipe.run_cmd],
        env=env.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.stdin.write(recipe.stdin or "")
    proc.stdin.close()
    want = recipe.ready_line or recipe.expected_output
    out, deadline = "", time.monotonic() + recipe.timeout
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out += line
            if want in line:
                return out
        raise AssertionError(f"{recipe.name}: no {want!r} in output:\n{out[-3000:]}")
    finally:
        env.podman("rm", "--force", "--time", "0", "lzb-wl", check=False)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_workload_image_runs(name, mode):
    recipe = RECIPES[name]
    built = build_layers(recipe)
    assert len(built.layers) >= 3  # a Debian base plus application layers, like real images
    with RegistryServer() as reg:
        pushed = push_image(built, reg.host, f"wl/{name}", mode, mode)
        partial = mode == "zstd-chunked"
        with PodmanEnv(insecure_registries=[reg.host], partial_pulls=partial) as env:
            pull = env.podman("--log-level", "debug", "pull", pushed.ref, timeout=600)
            if partial:
                assert "Retrieved partial blob" in pull.stderr
            out = _run_until_ready(env, pushed.ref, recipe)
    if recipe.expected_output:
        assert recipe.expected_output in out
