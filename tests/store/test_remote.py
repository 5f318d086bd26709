"""The store's registry access (store/remote.py) against a real registry: what it refuses
before reading, what it bounds while reading, and where a layer two images share is read."""

from __future__ import annotations

import json
import random
import threading

import pytest
import trio

from store.cache import ChunkCache
from store.chunks import LayerFetchError
from store.config import StoreConfig
from store.registry import RegistryClient, TooLargeError
from store.registry.client import MAX_CONFIG_BYTES
from store.registry.manifest import OCI_CONFIG, OCI_MANIFEST, dumps_canonical
from store.remote import RemoteRegistry
from store.resolver import LayerManager, ResolveError
from tests.registry.regtest_proxies import HttpFaultProxy, answer
from tests.store.images import add_file, make_tar, push_image, push_index_of, to_estargz

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _config(pad: int) -> bytes:
    return json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
        | {"pad": "x" * pad}
    ).encode()


async def test_a_config_over_the_limit_is_refused_before_it_is_read(registry) -> None:
    ref = f"{registry.host}/remote/bigconfig:1"
    async with RegistryClient(timeout=10) as client:
        manifest = await client.push_image(ref, _config(MAX_CONFIG_BYTES), [])
        assert manifest.config.size > MAX_CONFIG_BYTES
        seen = registry.log_mark()
        with trio.fail_after(10), pytest.raises(ResolveError) as exc:
            await RemoteRegistry(client, warm_connections=0).image(ref)
        assert f"{MAX_CONFIG_BYTES}-byte limit on image configs" in str(exc.value)
        assert manifest.config.digest in str(exc.value)
        asked = [r for r in registry.access_log_since(seen) if r.is_blob_get]
        assert asked == []  # the config was never asked for


async def test_a_config_its_descriptor_understates_is_cut_off_at_the_limit(registry) -> None:
    """The manifest says 2 bytes; the registry serves the blob as it is, 4 MiB and more."""
    ref = f"{registry.host}/remote/liar:1"
    big = _config(MAX_CONFIG_BYTES)
    async with RegistryClient(timeout=10) as client:
        digest = (await client.push_blob(ref, big)).digest
        raw = dumps_canonical(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": digest, "size": 2},
                "layers": [],
            }
        )
        await client.push_manifest(ref, raw, OCI_MANIFEST)
        with trio.fail_after(10), pytest.raises(ResolveError) as exc:
            await RemoteRegistry(client, warm_connections=0).image(ref)
        assert f"blob larger than {MAX_CONFIG_BYTES} bytes" in str(exc.value)


async def test_a_config_within_the_limit_resolves(registry) -> None:
    ref = f"{registry.host}/remote/config:1"
    async with RegistryClient(timeout=10) as client:
        await client.push_image(ref, _config(1000), [])
        _manifest, config, layers = await RemoteRegistry(client, warm_connections=0).image(ref)
        assert json.loads(config)["pad"] == "x" * 1000 and layers == []


async def test_a_blob_read_with_a_bound_stops_past_it(registry) -> None:
    """A descriptor's size can lie; the bound holds on the bytes actually received."""
    ref = f"{registry.host}/remote/bounded:1"
    data = b"y" * (256 << 10)
    async with RegistryClient(timeout=10) as client:
        manifest = await client.push_image(ref, _config(10), [(data, LAYER)])
        digest = manifest.layers[0].digest
        assert await client.get_blob(ref, digest, max_bytes=len(data)) == data
        with pytest.raises(TooLargeError) as exc:
            await client.get_blob(ref, digest, max_bytes=len(data) - 1)
        assert f"blob larger than {len(data) - 1} bytes" in str(exc.value)


class _BlobsGone:
    """A policy for ``HttpFaultProxy``: blob range reads stall until the proxy stops
    (``stall``), or are answered 404 (the blob deleted in that registry)."""

    def __init__(self, how: str = "") -> None:
        self.how = how
        self.stop = threading.Event()
        self.asked = 0

    def __call__(self, h) -> bool:
        if not self.how or "/blobs/" not in h.path or "Range" not in h.headers:
            return False
        self.asked += 1
        if self.how == "stall":
            self.stop.wait(60)
            h.close_connection = True
            return True
        answer(h, 404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}')
        return True


@pytest.mark.parametrize("how", ["404", "stall"])
async def test_a_layer_two_images_share_reads_from_the_other_when_one_registry_fails(
    registry, tmp_path, how
) -> None:
    """One layer is loaded per blob digest, through the image that brought it first. When that
    image's registry stalls or lost the blob, the other image's lookups and reads of the
    layer went there all the same (EIO); they now go to the other image's registry: at once
    after a 404, and from the next read on after a read that hit its deadline."""
    data = random.Random(3).randbytes(600_000)
    tar = make_tar(lambda t: add_file(t, "f", data))
    blob = to_estargz(tar, chunk_size=64 << 10)
    await push_image(registry.host, "shared/a", "1", [blob])
    await push_image(registry.host, "shared/b", "1", [blob])
    host, port = registry.host.rsplit(":", 1)
    gone = _BlobsGone()
    deadline = 2.0
    with HttpFaultProxy((host, int(port)), gone) as proxy:
        ref_a, ref_b = f"{proxy.host}/shared/a:1", f"{registry.host}/shared/b:1"
        cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=10)
        async with (
            RegistryClient(timeout=1.0, retries=2, backoff=0.01, retry_timeouts=True) as client,
            trio.open_nursery() as nursery,
        ):
            # As the store makes them (store.cli.request_timeout): the tries fill the deadline.
            remote = RemoteRegistry(client, fetch_deadline=deadline, warm_connections=0)
            manager = LayerManager(cfg, remote, ChunkCache(tmp_path / "c", 1 << 30), nursery)
            layer = await manager.get_layer(ref_a, blob.digest)
            gone.how = how
            assert await manager.get_layer(ref_b, blob.digest) is layer
            node = layer.tree.lookup_path("f")
            start = trio.current_time()
            with trio.fail_after(10):
                if how == "stall":
                    with pytest.raises(LayerFetchError, match="within 2s"):
                        await layer.read_file(node, 0, 100_000)
                got = await layer.read_file(node, 0, 100_000)
                got += await layer.read_file(node, 300_000, 300_000)
            elapsed = trio.current_time() - start
            nursery.cancel_scope.cancel()
        gone.stop.set()
    assert got == data[:100_000] + data[300_000:]
    assert gone.asked >= 1
    assert elapsed < (deadline + 1 if how == "stall" else 1), elapsed


async def test_an_index_lists_its_manifests_and_each_resolves_by_digest(registry) -> None:
    """What the manager searches for another platform's layer (resolver._other_platforms)."""
    host, repo = registry.host, "remote/multi"
    amd = [to_estargz(make_tar(lambda t: add_file(t, "arch", b"amd64\n")))]
    arm = [to_estargz(make_tar(lambda t: add_file(t, "arch", b"arm64\n")))]
    on_amd = await push_image(host, repo, "amd64", amd)
    on_arm = await push_image(host, repo, "arm64", arm, architecture="arm64")
    await push_index_of(host, repo, "multi", {"linux/amd64": on_amd, "linux/arm64/v8": on_arm})
    async with RegistryClient(timeout=10) as client:
        remote = RemoteRegistry(client, warm_connections=0)
        entries = await remote.index_manifests(f"{host}/{repo}:multi")
        assert [(d.digest, d.platform_name) for d in entries] == [
            (on_amd, "linux/amd64"),
            (on_arm, "linux/arm64/v8"),
        ]
        assert await remote.index_manifests(f"{host}/{repo}:arm64") == []
        _, config, layers = await remote.index_image(f"{host}/{repo}:multi", on_arm)
        assert json.loads(config)["architecture"] == "arm64"
        assert [(d.digest, d.diff_id) for d in layers] == [(b.digest, b.diff_id) for b in arm]
