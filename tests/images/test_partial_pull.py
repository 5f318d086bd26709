"""Our layers under podman 4.3's zstd:chunked partial pull (containers/storage 1.43).

That pull assembles each layer in a fresh ``mkdtemp`` directory (mode 0700) and renames it into
place; only a tar entry for the layer's root (``./``) sets that directory's mode. Layers that
do not name their root gave the container a 0700 ``/``: root could still run it, any other user
got "permission denied" from runc before the workload started (the postgres image, whose server
runs as the postgres user). The builder now writes ``./`` first in every layer; this test pulls the
tiny image both ways and runs it as an unprivileged user.
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import pytest

from harness.images import TINY_OUTPUT, BuiltImage, push_image
from harness.images.build import BuiltLayer
from harness.images.layertar import file_digest
from harness.podman import PodmanEnv, PodmanResult
from harness.registry_server import RegistryServer

pytestmark = pytest.mark.e2e

NOBODY = "65534:65534"


def _without_root_entries(built: BuiltImage, directory: Path) -> BuiltImage:
    """``built`` with the ``./`` entry dropped from every layer (the layout before the fix)."""
    (directory / "layers").mkdir(parents=True)
    layers = []
    for i, layer in enumerate(built.layers):
        out = directory / "layers" / f"{i}.tar"
        with (
            tarfile.open(layer.path) as src,
            tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst,
        ):
            for member in src:
                if member.name != ".":
                    dst.addfile(member, src.extractfile(member) if member.isreg() else None)
        layers.append(BuiltLayer(out, file_digest(out), out.stat().st_size, layer.comment))
    config = json.loads(json.dumps(built.config))
    config["rootfs"]["diff_ids"] = [x.diff_id for x in layers]
    return dataclasses.replace(
        built, name=f"{built.name}-noroot", dir=directory, layers=tuple(layers), config=config
    )


def test_zstd_chunked_partial_pull_keeps_root_traversable(tiny, tmp_path):
    for layer in tiny.layers:
        with tarfile.open(layer.path) as tar:
            assert tar.next().name == "."  # every layer names its root first
    stripped = _without_root_entries(tiny, tmp_path / "noroot")
    with RegistryServer() as reg:
        named = push_image(tiny, reg.host, "t/root", "named", "zstd-chunked")
        unnamed = push_image(stripped, reg.host, "t/root", "unnamed", "zstd-chunked")
        with PodmanEnv(insecure_registries=[reg.host], partial_pulls=True) as env:
            for image in (named, unnamed):
                pull = env.podman("--log-level", "debug", "pull", image.ref, timeout=120)
                assert pull.stderr.count("Retrieved partial blob") == len(image.layers)

            def run(ref: str, *cmd: str) -> PodmanResult:
                return env.podman(
                    "run", "--rm", "--network=none", "--user", NOBODY, ref, *cmd,
                    check=False, timeout=60,
                )  # fmt: skip

            ok = run(named.ref, "/bin/cat", "/data/hello.txt")
            assert (ok.returncode, ok.stdout.strip()) == (0, TINY_OUTPUT), ok.stderr
            assert run(named.ref, "/bin/ls", "-ld", "/").stdout.startswith("drwxr-xr-x")
            # the root cause, reproduced: without ./ the layer root is mkdtemp's 0700
            denied = run(unnamed.ref, "/bin/cat", "/data/hello.txt")
            assert denied.returncode != 0
            assert "permission denied" in denied.stderr.lower(), denied.stderr
