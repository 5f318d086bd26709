"""Session fixtures of the differential test: one registry, one store mount, two graphroots."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests import gotools

# `SHAPES_EXAMPLES` images per round (30 in the test session); `SHAPES_SECONDS` > 0 keeps
# generating rounds (unseeded) until that many seconds have passed: `nox -s fuzz`.
settings.register_profile(
    "shapes",
    max_examples=int(os.environ.get("SHAPES_EXAMPLES", "30")),
    deadline=None,
    derandomize=float(os.environ.get("SHAPES_SECONDS", "0")) <= 0,
    database=None,
    report_multiple_bugs=False,
    suppress_health_check=list(HealthCheck),
    # Shrinking costs many pulls: the test session keeps the failing example as generated.
    phases=(
        [Phase.explicit, Phase.generate, Phase.shrink]
        if float(os.environ.get("SHAPES_SECONDS", "0")) > 0
        else [Phase.explicit, Phase.generate]
    ),
)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from harness.registry_server import RegistryServer
    from tests.shapes.lab import Lab
    from tests.store.conftest import StoreProcess

    for tool in ("podman", "docker-registry", "fusermount3"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    if os.geteuid() != 0:
        pytest.skip("podman image mount and device nodes need root")
    work = tmp_path_factory.mktemp("shapes")
    gowrite = gotools.build("estargz/gowrite", work) if gotools.available() else None
    with RegistryServer(storage_dir=work / "registry") as reg:
        store = StoreProcess(work / "store", "").start()
        try:
            with Lab(work, reg, store, gowrite) as lab:
                yield lab
        finally:
            store.stop()


def regressions_dir() -> Path:
    return Path(os.environ.get("SHAPES_REGRESSIONS", Path(__file__).parent / "regressions"))
