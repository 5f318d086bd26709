"""PodmanEnv against the real podman: isolated storage, a container runs, nothing is left."""

from __future__ import annotations

import io
import os
import shutil
import sys
import tarfile
import threading
import time
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


BROKEN_STORE = Path(__file__).with_name("stores") / "broken_store.py"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a FUSE filesystem")
def test_a_podman_call_blocked_on_a_hung_layer_store_times_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A podman blocked in a lookup the layer store never answers is not reaped after
    SIGKILL (its thread waits in the kernel until the store dies). ``subprocess.run`` then
    waited for it without a bound: the pull's timeout never fired, and a hung store hung
    ``lazybench run`` for good (SIGTERM and Ctrl-C too). Now the call fails within its
    timeout and the reaping grace, and the store, killed after it, frees the process."""
    import harness.processes
    from harness.podman import PodmanError
    from harness.store_proc import StoreProcess

    monkeypatch.setattr(harness.processes, "REAP_TIMEOUT", 1.0)
    command = (sys.executable, str(BROKEN_STORE), "hang", "--root", "{root}", "{mountpoint}")
    store = StoreProcess(tmp_path / "store", command=command, metrics=False, mount_timeout=20)
    store.start()
    try:
        env = PodmanEnv(tmp_path / "env")
        # Stands for the pull: a podman command that looks a layer up in the store.
        monkeypatch.setattr(env, "argv", lambda *args: ["stat", str(store.mountpoint / "x")])
        outcome: list[BaseException | None] = []

        def call() -> None:
            try:
                env.podman("pull", "x", timeout=1)
                outcome.append(None)
            except BaseException as exc:  # handed to the test's thread
                outcome.append(exc)

        thread = threading.Thread(target=call, daemon=True)
        start = time.monotonic()
        thread.start()
        thread.join(timeout=15)
        hung = thread.is_alive()
    finally:
        store.abort()  # what the runner does once the call fails: frees the blocked process
        store.stop()
    thread.join(timeout=15)
    assert not hung, "the podman call outlived its timeout while the store hung"
    assert isinstance(outcome[0], PodmanError) and "did not finish within 1s" in str(outcome[0])
    assert time.monotonic() - start < 15
