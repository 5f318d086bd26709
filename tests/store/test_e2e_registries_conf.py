"""The mounted store reaching registries the way podman does, from podman's own
containers-registries.conf(5): no ``[resolver]`` mirror in the store's config, one private
registries.conf given to both podman and the store.

(1) A registry that speaks plain HTTP at an address that is not loopback (a network
namespace behind a veth), marked ``insecure`` in registries.conf only. (2) An air-gapped
name, ``nowhere.invalid``, whose ``[[registry.mirror]]`` is the real registry. Both pulls are
lazy: podman takes every layer from the store, which reads ranges of them.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from harness.netshape import NetworkLink
from harness.registry_server import RegistryServer
from tests.store.images import full_blob_gets, push_two_layer_estargz

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("docker-registry") is None, reason="no docker-registry"),
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed"),
    pytest.mark.store_ours_only(reason="the Go store v0.12 reads no registries.conf"),
]

HEAD = 'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'


def _lazy_pull(tmp_path, podman_env, store, registry, ref, blobs, registries_conf) -> None:  # type: ignore[no-untyped-def]
    """Pull ``ref`` with podman, given ``registries_conf`` (the text the store has too), and
    check that every layer came from the store (no whole layer blob GET, ranges read)."""
    mark = registry.log_mark()
    with podman_env(tmp_path / "podman", additional_layer_store=store.mnt) as env:
        (env.workdir / "registries.conf").write_text(registries_conf)
        env.pull(ref, timeout=120)
        assert full_blob_gets(registry, mark, blobs) == []
        assert env.run(ref, "/bin/cat", "/etc/hello", timeout=120).stdout == "hello from upper\n"
        assert full_blob_gets(registry, mark, blobs) == []
    served = registry.access_log_since(mark)
    digests = {b.digest for b in blobs}
    assert any(r.kind == "blobs" and r.status == 206 and r.digest in digests for r in served)


def test_an_insecure_registry_off_loopback_from_registries_conf_only(
    tmp_path, store_factory, layers, podman_env, monkeypatch
):
    if os.geteuid() != 0:
        pytest.skip("a network namespace needs root")
    storage = tmp_path / "registry"
    with RegistryServer(storage_dir=storage) as loopback:
        _, blobs = push_two_layer_estargz(loopback.host, "conf/insecure", layers)
    with (
        NetworkLink("veth") as link,
        RegistryServer(storage_dir=storage, host_addr=link.ns_addr, wrapper=link.prefix) as reg,
    ):
        assert not reg.host.startswith("127.")
        text = f'{HEAD}\n[[registry]]\nlocation = "{reg.host}"\ninsecure = true\n'
        conf = tmp_path / "registries.conf"
        conf.write_text(text)
        monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
        store = store_factory()
        ref = f"{reg.host}/conf/insecure:1"
        _lazy_pull(tmp_path, podman_env, store, reg, ref, blobs, text)


def test_a_name_pulled_through_its_registries_conf_mirror(
    tmp_path, store_factory, layers, podman_env, registry, monkeypatch
):
    _, blobs = push_two_layer_estargz(registry.host, "conf/mirrored", layers)
    text = (
        f'{HEAD}\n[[registry]]\nlocation = "nowhere.invalid"\n\n'
        f'[[registry.mirror]]\nlocation = "{registry.host}"\ninsecure = true\n'
    )
    conf = tmp_path / "registries.conf"
    conf.write_text(text)
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
    store = store_factory()
    ref = "nowhere.invalid/conf/mirrored:1"
    _lazy_pull(tmp_path, podman_env, store, registry, ref, blobs, text)


def test_registries_conf_key_rewrites_a_prefix_and_blocks(
    tmp_path, store_factory, layers, registry
):
    """``registries_conf`` names the file: a ``prefix`` rewritten to the registry's
    ``location`` (another repository path) is read through; a blocked one is not served
    (ENOENT: the runtime's own pull is refused too), with the file named in the log; a
    change of the file while the store runs counts."""
    _, blobs = push_two_layer_estargz(registry.host, "real/path/img", layers)
    conf = tmp_path / "registries.conf"
    rewrite = f'[[registry]]\nprefix = "example.com/team"\nlocation = "{registry.host}/real/path"\n'
    blocked = '\n[[registry]]\nlocation = "blocked.example"\nblocked = true\n'
    conf.write_text(rewrite)
    store = store_factory(f"registries_conf = {json.dumps(str(conf))}\n")
    mark = registry.log_mark()
    layer = store.layer_dir("example.com/team/img:1", blobs[1].digest)
    assert (layer / "diff" / "etc" / "hello").read_text() == "hello from upper\n"
    assert full_blob_gets(registry, mark, blobs) == []
    assert any(r.path.startswith("/v2/real/path/img/") for r in registry.access_log_since(mark))
    # The same image under a blocked name: not served, and the log says why.
    conf.write_text(rewrite + blocked)
    time.sleep(1.5)  # the files are looked at again at most every second
    with pytest.raises(FileNotFoundError):
        os.listdir(store.layer_dir("blocked.example/img:1", blobs[0].digest) / "diff")
    log = store.log.read_text()
    assert f"registry blocked.example is blocked in {conf}" in log
    assert "not served (normal pull fallback)" in log
