"""A multi-platform eStargz image (an OCI index of a linux/amd64 and a linux/arm64 image)
pulled through the store: another platform's pull (``podman pull --platform``) is lazy too.

podman passes the store only the reference and the layer's digest, never the platform; the
store resolves the reference to this host's manifest. The arm64 image's binaries are never
run: its files are read through ``podman image mount``."""

from __future__ import annotations

import contextlib
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.podman import PodmanEnv
from harness.registry_server import RegistryServer
from tests.store.conftest import StoreProcess, lost_lazy_layers
from tests.store.images import (
    add_file,
    full_blob_gets,
    lower_layer,
    make_tar,
    push,
    push_index,
    to_estargz,
    upper_layer,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed"),
]

REPO = "multi/img"


def _push_multi(host: str, layers: dict) -> tuple[str, list, list, dict[str, str]]:
    """``host/multi/img:multi``, an index of the two-layer image for linux/amd64 and one with
    other layers (``/etc/arch``, another ``/etc/hello``) for linux/arm64; (ref, amd64 blobs,
    arm64 blobs, platform → manifest digest)."""

    def arm_lower(tar: tarfile.TarFile) -> None:
        lower_layer(tar, layers["big"])
        add_file(tar, "etc/arch", b"arm64\n")

    def arm_upper(tar: tarfile.TarFile) -> None:
        upper_layer(tar)
        add_file(tar, "etc/hello", b"hello from arm64\n")

    amd = [to_estargz(layers["lower"]), to_estargz(layers["upper"])]
    arm = [to_estargz(make_tar(arm_lower)), to_estargz(make_tar(arm_upper))]
    manifests = {
        "linux/amd64": push(host, REPO, "amd64", amd),
        "linux/arm64": push(host, REPO, "arm64", arm, architecture="arm64"),
    }
    push_index(host, REPO, "multi", manifests)
    return f"{host}/{REPO}:multi", amd, arm, manifests


def _read_image_file(env: PodmanEnv, ref: str, path: str) -> bytes:
    root = env.host_path(env.podman("image", "mount", ref, timeout=60).stdout.strip())
    try:
        return (root / path).read_bytes()
    finally:
        env.podman("image", "unmount", "--force", ref, timeout=60, check=False)


def _served(store: StoreProcess) -> list[str]:
    return sorted(store.status()["layers"])


@contextlib.contextmanager
def _pulled(
    registry: RegistryServer,
    store_factory: Callable[[], StoreProcess],
    podman_env: Callable[..., PodmanEnv],
    workdir: Path,
    layers: dict,
    *options: str,
) -> Iterator[tuple]:
    """The multi-platform image pushed (:func:`_push_multi`) and pulled through a store with
    ``podman pull OPTIONS``, checked lazy; yields (env, store, registry log mark, ref,
    amd64 blobs, arm64 blobs, platform → manifest digest)."""
    host = registry.host
    ref, amd, arm, manifests = _push_multi(host, layers)
    store = store_factory()
    mark = registry.log_mark()
    with podman_env(workdir, additional_layer_store=store.mnt, insecure_registries=[host]) as env:
        env.podman("pull", "--quiet", *options, ref, timeout=120)
        assert full_blob_gets(registry, mark, amd + arm) == []
        yield env, store, mark, ref, amd, arm, manifests


@pytest.mark.store_ours_only(
    reason="the Go store v0.12 looks layers up in the host platform's manifest only: "
    "another platform's are pulled in full"
)
def test_a_pull_of_another_platform_of_an_index_is_lazy(
    registry, store_factory, tmp_path, layers, podman_env, runtime_node
):
    with _pulled(
        registry, store_factory, podman_env, tmp_path / "arm", layers, "--platform", "linux/arm64"
    ) as (env, store, mark, ref, amd, arm, _):
        assert _served(store) == sorted(f"{ref}/{b.digest}" for b in arm)
        if lost_lazy_layers(runtime_node):
            return  # podman ≥ 5.5 forgets the lazily pulled image at once (test_e2e_podman)
        inspect = env.podman(
            "image", "inspect", "--format", "{{.Architecture}} {{json .RootFS.Layers}}", ref
        ).stdout.split(" ", 1)
        assert inspect[0] == "arm64"
        assert inspect[1].strip() == '["' + '","'.join(b.diff_id for b in arm) + '"]'
        assert _read_image_file(env, ref, "etc/hello") == b"hello from arm64\n"
        assert _read_image_file(env, ref, "etc/arch") == b"arm64\n"
        assert _read_image_file(env, ref, "big") == layers["big"]
        assert full_blob_gets(registry, mark, amd + arm) == []
        env.podman("rmi", "-f", ref, timeout=120)
        deadline = time.monotonic() + 10
        while store.status()["layers"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sorted(store.status()["released"]) == sorted(b.digest for b in arm)


def test_the_default_platform_pull_of_an_index_fetches_no_other_manifest(
    registry, store_factory, tmp_path, layers, podman_env, runtime_node
):
    with _pulled(registry, store_factory, podman_env, tmp_path / "amd", layers) as pulled:
        env, store, mark, ref, amd, arm, manifests = pulled
        if store.impl == "ours":
            assert _served(store) == sorted(f"{ref}/{b.digest}" for b in amd)
        if not lost_lazy_layers(runtime_node):
            assert _read_image_file(env, ref, "etc/hello") == b"hello from upper\n"
    asked = {r.digest for r in registry.access_log_since(mark)}
    assert manifests["linux/arm64"] not in asked
    assert not asked & {b.digest for b in arm}
