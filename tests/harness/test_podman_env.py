"""PodmanEnv against the real podman: isolated storage, a container runs, nothing is left."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from harness.podman import PodmanEnv, mounts_below

pytestmark = pytest.mark.e2e


def busybox_tar(path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
        for name in ("sh", "echo", "cat"):
            link = tarfile.TarInfo(f"bin/{name}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        hello = tarfile.TarInfo("etc/hello")
        hello.size = 6
        tar.addfile(hello, io.BytesIO(b"hello\n"))
    return path


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
def test_isolated_env_runs_a_container_and_cleans_up(tmp_path: Path) -> None:
    tar = busybox_tar(tmp_path / "bb.tar")
    with PodmanEnv(tmp_path / "env") as env:
        env.podman("import", str(tar), "localhost/bb:1")
        out = env.run("localhost/bb:1", "/bin/cat", "/etc/hello", timeout=60)
        assert out.stdout == "hello\n"
        storage = (env.workdir / "storage.conf").read_text()
        assert str(env.graphroot) in storage and "additionallayerstores" not in storage
        assert env.podman("images", "--quiet").stdout.strip()
        assert env.host_path("/var/lib/x") == Path("/var/lib/x")  # no node: the host's own
    assert mounts_below(tmp_path) == []
    assert not (tmp_path / "env" / "graph").exists()


def test_storage_conf_names_the_layer_store(tmp_path: Path) -> None:
    with PodmanEnv(
        tmp_path / "env",
        additional_layer_store=Path("/mnt/store"),
        insecure_registries=["10.0.0.1:5000"],
        partial_pulls=True,
        keep_blob_info_cache=True,
    ) as env:
        storage = (env.workdir / "storage.conf").read_text()
        assert 'additionallayerstores = ["/mnt/store:ref"]' in storage
        assert "enable_partial_images" in storage
        registries = (env.workdir / "registries.conf").read_text()
        assert 'location = "10.0.0.1:5000"' in registries and "insecure = true" in registries
