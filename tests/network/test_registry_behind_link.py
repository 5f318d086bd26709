"""The registry inside the namespace, pulled through the shaped link by a real podman."""

from __future__ import annotations

import time

import pytest

from harness.images import TINY_OUTPUT, push_image, tiny_image
from harness.netshape import NetworkLink, leftovers
from harness.podman import PodmanEnv
from harness.registry_server import RegistryServer

pytestmark = pytest.mark.e2e


def test_pull_through_the_wan_link(tmp_path, no_leftovers):
    built = tiny_image(tmp_path / "cache")
    storage = tmp_path / "registry"
    # Push on loopback into the registry's storage (the runner does the same), then serve that
    # storage from inside the namespace.
    with RegistryServer(storage_dir=storage) as reg:
        pushed = push_image(built, reg.host, "t/tiny", "legacy", "legacy")
    with NetworkLink("wan") as link:
        with RegistryServer(
            storage_dir=storage, host_addr=link.ns_addr, wrapper=link.prefix
        ) as reg:
            ref = f"{reg.host}/t/tiny:legacy"
            with PodmanEnv(insecure_registries=[reg.host]) as env:
                start = time.monotonic()
                env.pull(ref)
                seconds = time.monotonic() - start
                assert env.run(ref).stdout.strip() == TINY_OUTPUT
            got = sum(r.bytes for r in reg.access_log() if r.is_blob_get)
            assert got >= pushed.compressed_size
            assert {r.remote for r in reg.access_log()} == {link.host_addr}
        # 6 MB at 100 Mbit/s is about half a second; the handshakes and requests add RTTs.
        assert seconds > 0.5
        netns = link.netns
    assert netns not in leftovers()
