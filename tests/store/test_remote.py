"""The store's registry access (store/remote.py) against a real registry: what it refuses
before reading, and what it bounds while reading."""

from __future__ import annotations

import json

import pytest
import trio

from store.registry import RegistryClient, TooLargeError
from store.registry.client import MAX_CONFIG_BYTES
from store.registry.manifest import OCI_CONFIG, OCI_MANIFEST, dumps_canonical
from store.remote import RemoteRegistry
from store.resolver import ResolveError

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
