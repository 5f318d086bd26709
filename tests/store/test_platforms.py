"""The layers of an index's other platforms (a cross-platform pull: ``podman pull --platform``),
found without a mount: the reference resolves to this host's manifest, the runtime looks up
another platform's layers by compressed digest (podman < 5.1) or TOC digest (podman ≥ 5.1)."""

from __future__ import annotations

import base64
import errno
import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from store.cache import ChunkCache
from store.config import StoreConfig
from store.fs import ROOT_INO, FSError, StoreFS
from store.registry.manifest import OCI_MANIFEST, Descriptor, sha256_digest
from store.resolver import (
    PLATFORM_MANIFESTS_MAX,
    LayerDesc,
    LayerManager,
    NotEstargzError,
    RegistryAccess,
    ResolveError,
    ResolveTimeout,
)
from tests.store.conftest import FileBlob, tar_of
from tests.store.images import TOC_ANN, Blob, to_estargz, to_gzip

REF = "127.0.0.1:5000/multi/img:1"
B64 = base64.b64encode(REF.encode()).decode()
HOST = "linux/amd64"  # the platform the fake resolves the reference to, as RemoteRegistry does


def _layer(name: str, text: str) -> Blob:
    return to_estargz(tar_of({name: text.encode()}))


class IndexRegistry(RegistryAccess):
    """An index of one image per platform (``images``: platform → layer blobs; the first is
    this host's), each with its own config; blobs in ``tmp_path``. ``calls`` records what
    was fetched; ``index=False`` serves the first image as a plain manifest."""

    def __init__(self, tmp_path: Path, images: dict[str, list[Blob]], index: bool = True):
        self.dir = tmp_path / "blobs"
        self.dir.mkdir(exist_ok=True)
        self.index = index
        self.calls: list[tuple[str, ...]] = []
        self.failing: set[str] = set()  # platforms whose manifest fetch fails
        self.stall_index = False
        self.entries: list[Descriptor] = []
        self.images: dict[str, tuple[bytes, bytes, list[LayerDesc]]] = {}
        self.blobs = images
        for platform, blobs in images.items():
            self.add(platform, blobs)

    def add(self, platform: str, blobs: list[Blob], annotations: dict | None = None) -> str:
        config = json.dumps(
            {"architecture": platform.split("/")[1], "rootfs": {"diff_ids": []}}
        ).encode()
        layers = []
        for b in blobs:
            (self.dir / b.digest[7:]).write_bytes(b.data)
            ann = {TOC_ANN: b.toc_digest} if b.toc_digest else {}
            layers.append(LayerDesc(b.digest, len(b.data), ann, b.diff_id))
        manifest = json.dumps({"platform": platform, "layers": [b.digest for b in blobs]})
        raw = manifest.encode()
        fields = dict(zip(("os", "architecture", "variant"), platform.split("/"), strict=False))
        desc = Descriptor(OCI_MANIFEST, sha256_digest(raw), len(raw), annotations, fields)
        self.entries.append(desc)
        self.images[desc.digest] = (raw, config, layers)
        return desc.digest

    async def image(self, ref: str, on_layers=None):
        self.calls.append(("image",))
        return self.images[self.entries[0].digest]

    async def index_manifests(self, ref: str):
        self.calls.append(("index",))
        if self.stall_index:
            await trio.sleep_forever()
        return list(self.entries) if self.index else []

    async def index_image(self, ref: str, digest: str):
        self.calls.append(("index_image", digest))
        platform = next(d.platform_name for d in self.entries if d.digest == digest)
        if platform in self.failing:
            raise ResolveError(f"{ref}@{digest}: manifest unknown")
        return self.images[digest]

    def blob(self, ref: str, digest: str, size: int):
        return FileBlob(self.dir / digest[7:])

    def fetched(self) -> list[tuple[str, ...]]:
        return [c for c in self.calls if c[0] != "image"]


def _fs(nursery, reg: IndexRegistry, tmp_path: Path, **config) -> StoreFS:
    config = {"noprefetch": True, "no_background_fetch": True, "resolve_timeout_sec": 5} | config
    cfg = StoreConfig(**config)
    return StoreFS(LayerManager(cfg, reg, ChunkCache(tmp_path / "c", 1 << 30), nursery))


async def _path(fs: StoreFS, *names: str) -> int:
    ino = ROOT_INO
    for name in names:
        ino = (await fs.lookup(ino, name)).ino
    return ino


async def _read(fs: StoreFS, *names: str) -> bytes:
    ino = await _path(fs, *names)
    return await fs.read(ino, 0, 1 << 20)


@pytest.fixture
def reg(tmp_path):
    """Two platforms of two layers each: this host's and linux/arm64."""
    amd = [_layer("etc/arch", "amd64\n"), _layer("etc/hello", "hello amd64\n")]
    arm = [_layer("etc/arch", "arm64\n"), _layer("etc/hello", "hello arm64\n")]
    return IndexRegistry(tmp_path, {HOST: amd, "linux/arm64": arm})


@pytest.mark.anyio
@pytest.mark.parametrize("by_toc", [False, True], ids=["compressed-digest", "toc-digest"])
async def test_another_platforms_layer_is_served_from_its_manifest(tmp_path, reg, by_toc):
    arm = reg.blobs["linux/arm64"]
    async with trio.open_nursery() as nursery:
        fs = _fs(nursery, reg, tmp_path)
        for blob in arm:
            name = blob.toc_digest if by_toc else blob.digest
            assert name is not None
            info = json.loads(await _read(fs, B64, name, "info"))
            if by_toc:
                assert info["toc-digest"] == name
                assert info["flags"] == {"expected-layer-diffid": blob.diff_id}
            else:
                assert info["compressed-diff-digest"] == blob.digest
                assert info["diff-digest"] == blob.diff_id
            assert await _read(fs, B64, name, "blob") == blob.data
        diff = await _path(fs, B64, (arm[1].toc_digest if by_toc else arm[1].digest), "diff")
        etc = (await fs.lookup(diff, "etc")).ino
        hello = (await fs.lookup(etc, "hello")).ino
        assert await fs.read(hello, 0, 100) == b"hello arm64\n"
        # The index and its other manifest were fetched once, on the first lookup.
        assert reg.fetched() == [("index",), ("index_image", reg.entries[1].digest)]
        # The start look-ahead goes by the arm64 image: its config, its layers.
        whole = fs.manager.image_whole(REF)
        assert whole is not None
        assert whole[1] == reg.images[reg.entries[1].digest][1]
        assert [x.digest for x in whole[2]] == [b.digest for b in reversed(arm)]
        # The reference's manifest and config stay this host's.
        assert await _read(fs, B64, "manifest") == reg.images[reg.entries[0].digest][0]
        assert await _read(fs, B64, "config") == reg.images[reg.entries[0].digest][1]
        assert b"amd64" in await _read(fs, B64, "config")
        # Counted by whichever name it was looked up by, and released at zero.
        name = arm[0].toc_digest if by_toc else arm[0].digest
        assert name is not None
        ref_ino = await _path(fs, B64)
        for _ in range(2):
            with pytest.raises(FSError):
                fs.create(await _path(fs, B64, name), "use")
        assert fs.manager.refcount(REF, name) == 2
        for _ in range(2):
            with pytest.raises(FSError):
                fs.rmdir(ref_ino, name)
        assert arm[0].digest in fs.manager.released
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_this_hosts_layers_fetch_no_other_manifest(tmp_path, reg):
    async with trio.open_nursery() as nursery:
        fs = _fs(nursery, reg, tmp_path)
        for blob in reg.blobs[HOST]:
            info = json.loads(await _read(fs, B64, blob.digest, "info"))
            assert info["diff-digest"] == blob.diff_id
        assert reg.fetched() == []
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_layer_in_no_manifest_is_enoent_naming_those_searched(tmp_path, reg, caplog):
    stray = _layer("etc/stray", "x\n")
    async with trio.open_nursery() as nursery:
        fs = _fs(nursery, reg, tmp_path)
        with caplog.at_level(logging.INFO, logger="store.resolver"):
            for _ in range(2):
                with pytest.raises(FSError) as exc:
                    await _path(fs, B64, stray.digest, "diff")
                assert exc.value.errno_value == errno.ENOENT
        nursery.cancel_scope.cancel()
    searched = [m for r in caplog.records if "no manifest of its index" in (m := r.getMessage())]
    assert searched, caplog.text
    assert stray.digest in searched[0]
    assert f"{reg.entries[0].digest} (this host)" in searched[0]
    assert f"{reg.entries[1].digest} (linux/arm64)" in searched[0]
    # Fetched once: the second lookup searched what the first fetched.
    assert reg.fetched() == [("index",), ("index_image", reg.entries[1].digest)]


@pytest.mark.anyio
async def test_a_reference_to_an_image_manifest_searches_nothing_more(tmp_path, reg):
    arm = reg.blobs["linux/arm64"]
    reg = IndexRegistry(tmp_path, reg.blobs, index=False)
    async with trio.open_nursery() as nursery:
        manager = _fs(nursery, reg, tmp_path).manager
        with pytest.raises(NotEstargzError, match="no layer"):
            await manager.get_layer(REF, arm[0].digest)
        nursery.cancel_scope.cancel()
    assert reg.fetched() == [("index",)]


@pytest.mark.anyio
async def test_the_manifests_fetched_are_bounded_and_skip_attestations(tmp_path, reg):
    arm = reg.blobs["linux/arm64"]
    reg.entries.pop()  # arm64 goes last, past the cap
    attestation = {"vnd.docker.reference.type": "attestation-manifest"}
    reg.add("unknown/unknown", [_layer("att", "in-toto\n")], attestation)
    for i in range(PLATFORM_MANIFESTS_MAX):
        reg.add(f"linux/other{i}", [_layer("etc/arch", f"other{i}\n")])
    arm_digest = reg.add("linux/arm64", arm)
    async with trio.open_nursery() as nursery:
        manager = _fs(nursery, reg, tmp_path).manager
        with pytest.raises(NotEstargzError, match="no layer"):
            await manager.get_layer(REF, arm[0].digest)
        nursery.cancel_scope.cancel()
    fetched = [c[1] for c in reg.fetched() if c[0] == "index_image"]
    assert len(fetched) == PLATFORM_MANIFESTS_MAX
    assert arm_digest not in fetched and reg.entries[1].digest not in fetched


@pytest.mark.anyio
async def test_a_manifest_that_fails_is_left_out_and_the_others_searched(tmp_path, reg):
    arm = reg.blobs["linux/arm64"]
    riscv = [_layer("etc/arch", "riscv64\n")]
    reg.add("linux/riscv64", riscv)
    reg.failing.add("linux/arm64")
    async with trio.open_nursery() as nursery:
        manager = _fs(nursery, reg, tmp_path).manager
        layer = await manager.get_layer(REF, riscv[0].digest)
        assert layer.digest == riscv[0].digest
        with pytest.raises(NotEstargzError):
            await manager.get_layer(REF, arm[0].digest)
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_an_index_that_does_not_answer_is_a_bounded_wait(tmp_path, reg):
    arm = reg.blobs["linux/arm64"]
    reg.stall_index = True
    async with trio.open_nursery() as nursery:
        manager = _fs(nursery, reg, tmp_path, resolve_timeout_sec=0.5).manager
        start = trio.current_time()
        with pytest.raises(ResolveTimeout):
            await manager.get_layer(REF, arm[0].digest)
        assert trio.current_time() - start < 0.8
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_manifest_that_does_not_answer_ends_the_search_and_the_next_lookup_retries(
    tmp_path, reg
):
    arm = reg.blobs["linux/arm64"]
    stalled = trio.Event()

    async def stall(ref: str, digest: str):
        reg.calls.append(("index_image", digest))
        if stalled.is_set():
            return reg.images[digest]
        await trio.sleep_forever()

    reg.index_image = stall  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        manager = _fs(nursery, reg, tmp_path, resolve_timeout_sec=0.5).manager
        with pytest.raises(ResolveTimeout):
            await manager.get_layer(REF, arm[0].digest)
        search = (await manager.image(REF)).others[""]
        await trio.sleep(0.6)  # the search gives up after IMAGE_FETCH_BOUNDS resolve bounds
        assert search.done.is_set()
        assert "the manifests of its index not in within 1s" in str(search.error)
        stalled.set()  # the next lookup searches afresh
        layer = await manager.get_layer(REF, arm[0].digest)
        assert layer.digest == arm[0].digest
        assert [c[0] for c in reg.fetched()].count("index_image") == 2
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_gzip_layer_of_another_platform_is_not_served(tmp_path, reg):
    gz = to_gzip(tar_of({"etc/arch": b"s390x\n"}))
    reg.add("linux/s390x", [gz])
    async with trio.open_nursery() as nursery:
        manager = _fs(nursery, reg, tmp_path).manager
        with pytest.raises(NotEstargzError, match="neither eStargz nor zstd:chunked"):
            await manager.get_layer(REF, gz.digest)
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_tag_moved_to_another_index_is_resolved_afresh_not_searched(tmp_path, reg):
    """The tag now names another index (the runtime looks up the layers of the manifest it
    fetched): its index no longer lists the resolution's manifest, so its manifests are not
    taken for the cached resolution's other platforms; the reference is resolved afresh, as
    for an image manifest, and its ``manifest`` is the new one."""
    new_amd = [_layer("etc/arch", "amd64 v2\n"), _layer("etc/hello", "hello amd64 v2\n")]
    new_arm = [_layer("etc/arch", "arm64 v2\n")]
    async with trio.open_nursery() as nursery:
        fs = _fs(nursery, reg, tmp_path)
        manager = fs.manager
        await manager.get_layer(REF, reg.blobs[HOST][0].digest)
        old = await manager.image(REF)
        old.resolved_at -= 2  # past IMAGE_REFRESH_AFTER
        reg.entries = []
        reg.add(HOST, new_amd)
        reg.add("linux/arm64", new_arm)
        reg.calls.clear()
        layer = await manager.get_layer(REF, new_amd[1].digest)
        assert layer.digest == new_amd[1].digest
        assert [c[0] for c in reg.calls] == ["index", "image"]
        assert await _read(fs, B64, "manifest") == reg.images[reg.entries[0].digest][0]
        # The new index's other platform is searched from the new resolution.
        reg.calls.clear()
        assert (await manager.get_layer(REF, new_arm[0].digest)).digest == new_arm[0].digest
        assert reg.fetched() == [("index",), ("index_image", reg.entries[1].digest)]
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_manifest_the_index_lists_twice_is_fetched_once(tmp_path, reg):
    """An index may list one manifest under two platforms (``linux/arm64`` and
    ``linux/arm64/v8``), or a hostile one many times over: it is fetched once, and the copies
    do not take the places of the manifests after them (:data:`PLATFORM_MANIFESTS_MAX`)."""
    arm = reg.entries[1]
    v8 = {**(arm.platform or {}), "variant": "v8"}
    reg.entries[2:] = [replace(arm, platform=v8)] * PLATFORM_MANIFESTS_MAX
    riscv = [_layer("etc/arch", "riscv64\n")]
    reg.add("linux/riscv64", riscv)
    async with trio.open_nursery() as nursery:
        manager = _fs(nursery, reg, tmp_path).manager
        assert (await manager.get_layer(REF, riscv[0].digest)).digest == riscv[0].digest
        nursery.cancel_scope.cancel()
    fetched = reg.fetched()
    assert fetched[0] == ("index",)
    assert sorted(fetched[1:]) == sorted(
        [("index_image", arm.digest), ("index_image", reg.entries[-1].digest)]
    )


@pytest.mark.anyio
async def test_a_missing_layer_looked_up_again_later_fetches_no_manifest_again(tmp_path, reg):
    """A layer in no manifest, looked up past IMAGE_REFRESH_AFTER, resolves the reference
    afresh (the tag may have moved) and fetches its index; the index unchanged, its other
    manifests are not fetched again, neither for the stale resolution nor for the fresh one."""
    stray = _layer("etc/stray", "x\n")
    async with trio.open_nursery() as nursery:
        manager = _fs(nursery, reg, tmp_path).manager
        await manager.image(REF)
        searched = [("index",), ("index_image", reg.entries[1].digest)]
        for i in range(3):
            (await manager.image(REF)).resolved_at -= 2  # past IMAGE_REFRESH_AFTER
            reg.calls.clear()
            with pytest.raises(NotEstargzError):
                await manager.get_layer(REF, stray.digest)
            assert reg.calls == (searched if i == 0 else []) + [("image",), ("index",)]
        nursery.cancel_scope.cancel()
