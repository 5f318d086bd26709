"""Pull and push against a real anonymous docker-registry: images, indexes, blobs, ranges."""

from __future__ import annotations

import json
import random

import pytest

from harness.registry_server import RegistryServer
from store.registry import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    Descriptor,
    DigestMismatch,
    ManifestError,
    NotFoundError,
    Platform,
    RegistryBlobSource,
    RegistryClient,
    RegistryUnavailable,
    build_index,
    sha256_digest,
)

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _config(arch: str, variant: str = "") -> bytes:
    cfg = {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    if variant:
        cfg["variant"] = variant
    return json.dumps(cfg).encode()


async def test_multi_layer_oci_image_round_trip(registry: RegistryServer, big_blob: bytes) -> None:
    ref = f"{registry.host}/round/trip:v1"
    layers = [
        (big_blob, LAYER, {"containerd.io/snapshot/stargz/toc.digest": "sha256:" + "0" * 64}),
        (b"second layer" * 1000, LAYER),
        (b"third", LAYER),
    ]
    async with RegistryClient(timeout=10) as c:
        pushed = await c.push_image(
            ref, _config("amd64"), layers, annotations={"org.example": "yes"}, chunk_size=1 << 20
        )
        pulled = await c.get_manifest(ref)
        assert pulled.digest == pushed.digest == sha256_digest(pulled.raw)
        assert pulled.raw == pushed.raw
        assert pulled.annotations == {"org.example": "yes"}
        assert [d.digest for d in pulled.layers] == [sha256_digest(x[0]) for x in layers]
        assert pulled.layers[0].annotations == layers[0][2]
        for (data, _, *_rest), desc in zip(layers, pulled.layers, strict=True):
            assert await c.blob_size(ref, desc.digest) == len(data)
            assert await c.get_blob(ref, desc.digest) == data
        assert (await c.get_config(ref))["architecture"] == "amd64"
        by_digest = await c.get_manifest(f"{registry.host}/round/trip@{pushed.digest}")
        assert by_digest.raw == pushed.raw
        # Pushing again skips every blob (HEAD finds them).
        again = await c.push_blob(ref, big_blob)
        assert again.how == "exists"


async def test_docker_schema2_and_tag(registry: RegistryServer) -> None:
    ref = f"{registry.host}/docker/s2:one"
    async with RegistryClient(timeout=10) as c:
        m = await c.push_image(ref, _config("amd64"), [(b"l1", LAYER)], media_type=DOCKER_MANIFEST)
        got = await c.get_manifest(ref)
        assert got.media_type == DOCKER_MANIFEST and got.digest == m.digest
        assert got.config.media_type == "application/vnd.docker.container.image.v1+json"
        assert await c.tag(ref, "two") == m.digest
        assert (await c.get_manifest(f"{registry.host}/docker/s2:two")).digest == m.digest


async def test_two_platform_index_and_selection(registry: RegistryServer) -> None:
    repo = f"{registry.host}/multi/arch"
    async with RegistryClient(timeout=10) as c:
        descs = []
        for arch, variant in (("amd64", ""), ("arm64", "v8")):
            m = await c.push_image(
                f"{repo}:{arch}", _config(arch, variant), [(f"layer-{arch}".encode(), LAYER)]
            )
            plat = {"os": "linux", "architecture": arch} | ({"variant": variant} if variant else {})
            descs.append(Descriptor(m.media_type, m.digest, len(m.raw), platform=plat))
        raw, mt = build_index(descs, annotations={"org.opencontainers.image.ref.name": "multi"})
        idx_digest = await c.push_manifest(f"{repo}:latest", raw, mt)
        index = await c.get_index(f"{repo}:latest")
        assert index.media_type == OCI_INDEX and index.digest == idx_digest and index.raw == raw
        assert index.annotations == {"org.opencontainers.image.ref.name": "multi"}
        arm = await c.get_manifest(f"{repo}:latest", Platform.parse("linux/arm64"))
        assert arm.digest == descs[1].digest
        assert (await c.get_config(f"{repo}:latest", "linux/arm64/v8"))["architecture"] == "arm64"
        amd = await c.get_manifest(f"{repo}:latest", "linux/amd64")
        assert amd.digest == descs[0].digest
        host = await c.get_manifest(f"{repo}:latest")  # default: this machine
        expected = descs[0] if Platform.host().architecture == "amd64" else descs[1]
        assert host.digest == expected.digest
        with pytest.raises(ManifestError, match="no manifest for platform linux/s390x"):
            await c.get_manifest(f"{repo}:latest", "linux/s390x")


async def test_cross_repo_mount(registry: RegistryServer) -> None:
    data = random.Random(7).randbytes(100_000)
    async with RegistryClient(timeout=10) as c:
        first = await c.push_blob(f"{registry.host}/mount/src", data)
        assert first.how == "uploaded"
        mounted = await c.push_blob(f"{registry.host}/mount/dst", data, mount_from="mount/src")
        assert mounted.how == "mounted"
        assert await c.get_blob(f"{registry.host}/mount/dst", first.digest) == data
        with pytest.raises(DigestMismatch):
            await c.push_blob(f"{registry.host}/mount/dst", data, digest="sha256:" + "1" * 64)


async def test_random_ranges_equal_whole_blob(registry: RegistryServer, big_blob: bytes) -> None:
    ref = f"{registry.host}/ranges/blob"
    rnd = random.Random(42)
    size = len(big_blob)
    async with RegistryClient(timeout=10) as c:
        digest = (await c.push_blob(ref, big_blob)).digest
        whole = await c.get_blob(ref, digest)
        assert whole == big_blob
        mark = registry.log_mark()
        for _ in range(25):
            off = rnd.randrange(size)
            n = rnd.randrange(1, min(size - off, 700_000) + 1)
            assert await c.read_range(ref, digest, off, n) == whole[off : off + n]
        for _ in range(10):
            ranges = [(rnd.randrange(size - 5000), rnd.randrange(1, 5000)) for _ in range(12)]
            ranges.append(ranges[0])  # duplicates and overlaps are fine
            got = await c.read_ranges(ref, digest, ranges)
            assert got == [whole[o : o + s] for o, s in ranges]
        src = RegistryBlobSource(c, ref, digest)
        assert await src.size() == size
        assert await src.read_at(size - 10, 100) == whole[-10:]
        assert await src.read_at(size, 10) == b""
        records = registry.access_log_since(mark)
        blob_gets = [r for r in records if r.is_blob_get]
        assert blob_gets and all(r.status == 206 for r in blob_gets)
        assert not any(r.is_full_blob_get for r in records)
        # 12-13 ranges per read_ranges call went out as one multi-range request each.
        assert len(blob_gets) <= 25 + 10 + 1


async def test_not_found_and_corruption(fresh_registry: RegistryServer) -> None:
    reg = fresh_registry
    ref = f"{reg.host}/nf/app:v1"
    async with RegistryClient(timeout=10) as c:
        with pytest.raises(NotFoundError, match=rf"{reg.host}/nf/app.*not found.*MANIFEST_UNKNOWN"):
            await c.get_manifest(ref)
        with pytest.raises(NotFoundError, match="sha256:" + "e" * 64):
            await c.blob_size(ref, "sha256:" + "e" * 64)
        data = b"precious bytes" * 1000
        digest = (await c.push_blob(ref, data)).digest
        path = reg.blob_path(digest)
        raw = bytearray(path.read_bytes())
        raw[100] ^= 0xFF
        path.write_bytes(bytes(raw))
        with pytest.raises(DigestMismatch, match=digest):
            await c.get_blob(ref, digest)
        dest = reg.workdir / "out.bin"
        with pytest.raises(DigestMismatch):
            await c.download_blob(ref, digest, dest)
        assert not dest.exists()


async def test_https_registry_through_configured_scheme(tmp_path, monkeypatch) -> None:
    """TLS path: a registry serving HTTPS with a certificate our throwaway CA signed, reached
    through a mirror entry that names the scheme, pushes and ranged reads included; the CA is
    trusted when given as a bundle path or, by default, through ``SSL_CERT_FILE`` (the system's
    CAs as OpenSSL finds them), and not otherwise."""
    from store.registry import parse_resolver_config
    from tests.tls import make_tls_files

    tls = make_tls_files(tmp_path / "tls")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with RegistryServer(tls_cert=tls.cert, tls_key=tls.key) as reg:
        assert reg.url.startswith("https://")
        cfg = parse_resolver_config(
            {"resolver": {"host": {reg.host: {"mirrors": [{"host": f"https://{reg.host}"}]}}}}
        )
        ref = f"{reg.host}/tls/app:v1"
        data = random.Random(11).randbytes(200_000)
        async with RegistryClient(resolver=cfg, timeout=10, verify=str(tls.ca)) as c:
            assert [e.base_url for e in c.endpoints(reg.host)] == [reg.url]
            m = await c.push_image(ref, _config("amd64"), [(data, LAYER)])
            assert (await c.get_manifest(ref)).digest == m.digest
            assert await c.read_ranges(ref, m.layers[0].digest, [(5, 10), (1000, 3)]) == [
                data[5:15],
                data[1000:1003],
            ]
        async with RegistryClient(resolver=cfg, timeout=10) as untrusting:
            with pytest.raises(RegistryUnavailable, match=r"CERTIFICATE_VERIFY_FAILED"):
                await untrusting.get_manifest(ref)
        monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
        async with RegistryClient(resolver=cfg, timeout=10) as by_env:
            assert (await by_env.get_manifest(ref)).digest == m.digest
            assert await by_env.read_ranges(ref, m.layers[0].digest, [(7, 9)]) == [data[7:16]]
