"""The store over its lifetime: one bad helper request, a moved tag, a slow image and many
releases never stop it, leave it answering stale, nor make a wait or a list grow unbounded."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import trio
import trio.testing

from store import helper
from store.cache import ChunkCache
from store.config import ConfigError, StoreConfig, parse_config
from store.credsocket import serve_credentials
from store.layer import Layer
from store.registry.credentials import CredentialStore
from store.resolver import (
    IMAGE_CACHE_ENTRIES,
    LayerDesc,
    LayerManager,
    LayerRefused,
    ResolveError,
    ResolveTimeout,
)
from tests.store.conftest import FileBlob
from tests.store.test_fs_logic import REF, VectorRegistry, _manager

# -- credential socket ---------------------------------------------------------------------


def test_a_deeply_nested_helper_request_does_not_end_the_store(tmp_path: Path) -> None:
    """json.loads raises RecursionError (not ValueError) on deep nesting: it escaped
    credsocket._handle, ended serve_credentials' nursery and with it the store's nursery
    (cli.serve): one bad request unmounts the store."""
    creds = CredentialStore(auth_files=[])
    path = tmp_path / "store.sock"
    replies: list[object] = []

    def client(p: str) -> object:
        try:
            helper.send(b"[" * 200_000, p)
        except (OSError, ValueError) as exc:
            return exc
        return None

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_credentials, path, creds)
                replies.append(await trio.to_thread.run_sync(client, str(path)))
                # The socket still serves afterwards.
                good = json.dumps({"127.0.0.1:5000/a/b:1": {"username": "u", "password": "p"}})
                replies.append(
                    await trio.to_thread.run_sync(lambda: helper.send(good.encode(), str(path)))
                )
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert isinstance(replies[0], ValueError) and "refused" in str(replies[0])
    assert replies[1] is None


# -- resolve bound ---------------------------------------------------------------------------


class SlowRegistry(VectorRegistry):
    """The manifest+config take ``image_delay`` s; blob reads never answer."""

    def __init__(self, vectors: Path, image_delay: float) -> None:
        super().__init__(vectors)
        self.image_delay = image_delay

    async def image(self, ref: str, on_layers=None):
        await trio.sleep(self.image_delay)
        return await super().image(ref, on_layers)

    def blob(self, ref: str, digest: str, size: int):
        inner = FileBlob(self.path)

        class Never:
            size = inner.size

            async def read_ranges(self, ranges):
                await trio.sleep_forever()

        return Never()


@pytest.mark.anyio
async def test_a_layer_lookup_answers_within_resolve_timeout_sec(vectors_dir, tmp_path):
    """``resolve_timeout_sec`` is "the bound on any lookup that needs the registry"; get_layer
    waited up to that long for the image, then up to that long again for the layer."""
    bound = 1.0
    async with trio.open_nursery() as nursery:
        reg = SlowRegistry(vectors_dir, image_delay=0.8 * bound)
        cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=bound)
        manager = LayerManager(cfg, reg, ChunkCache(tmp_path / "c", 1 << 30), nursery)
        start = trio.current_time()
        with pytest.raises(ResolveTimeout):
            await manager.get_layer(REF, reg.meta["digest"])
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert elapsed <= bound * 1.2, f"lookup took {elapsed:.2f}s, bound {bound}s"


# -- unbounded growth --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_released_list_does_not_grow_without_bound(vectors_dir, tmp_path):
    """Every release appended to ``LayerManager.released`` for the life of the store, and
    ``status`` (read on every open of <mnt>/status) serialises all of it."""
    async with trio.open_nursery() as nursery:
        reg = VectorRegistry(vectors_dir)
        cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=5)
        manager = LayerManager(cfg, reg, ChunkCache(tmp_path / "c", 1 << 30), nursery)
        for _ in range(300):
            await manager.get_layer(REF, reg.meta["digest"])
            manager.use(REF, reg.meta["digest"])
            assert manager.release(REF, reg.meta["digest"]) == 0
        nursery.cancel_scope.cancel()
    assert len(manager.released) < 300
    assert len(manager.status()["released"]) < 300


@pytest.mark.anyio
async def test_names_released_while_their_layer_stays_in_use_are_forgotten(vectors_dir, tmp_path):
    """A layer's reference count is per layer, its names (ref, digest) were forgotten only at
    its last release: a base layer held by one running container kept a name for every image
    sharing it that was pulled, run and removed meanwhile, for as long as the container ran
    (35 such images on podman 4.3: 37 names for the 2 layers in use)."""
    async with trio.open_nursery() as nursery:
        reg = VectorRegistry(vectors_dir)
        cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=5)
        manager = LayerManager(cfg, reg, ChunkCache(tmp_path / "c", 1 << 30), nursery)
        digest = reg.meta["digest"]
        layer = await manager.get_layer(REF, digest)
        manager.use(REF, digest)  # the running container's image
        for i in range(50):
            other = f"127.0.0.1:5000/other/img{i}:1"
            assert await manager.get_layer(other, digest) is layer
            assert manager.use(other, digest) == 2
            assert manager.use(other, digest) == 3  # its container, too
            assert manager.release(other, digest) == 2
            assert manager.release(other, digest) == 1
        assert list(manager._counted) == [(REF, digest)]
        assert list(manager._name_uses) == [(REF, digest)]
        assert manager._held(REF, digest) is layer
        assert manager.release(REF, digest) == 0 and layer.released
        assert manager._counted == {} and manager._name_uses == {}
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_released_layer_is_freed_at_its_release_not_after_the_ttl(vectors_dir, tmp_path):
    """The expiry timers of a layer (``resolve_result_entry_ttl_sec``: loaded but never looked
    up, looked up but never used) held its state, so its tree and index, until they fired:
    pull/rmi cycles of a 30-layer image kept every layer released in the last two minutes
    (280 released layers in memory after 40 cycles of 4 images here)."""
    async with trio.open_nursery() as nursery:
        reg = VectorRegistry(vectors_dir)
        cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=5)
        cache = ChunkCache(tmp_path / "c", 1 << 30)
        manager = LayerManager(cfg, reg, cache, nursery, early_ttl=600)
        digest = reg.meta["digest"]
        layer = weakref.ref(await manager.get_layer(REF, digest))
        manager.use(REF, digest)
        assert manager.release(REF, digest) == 0
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        assert layer() is None, gc.get_referrers(layer())
        # Released while it loads, too.
        reg_gate = GatedRegistry(vectors_dir)
        manager = LayerManager(cfg, reg_gate, cache, nursery, early_ttl=600)
        nursery.start_soon(manager.image, REF)  # loads the layer early: held at its TOC
        await trio.testing.wait_all_tasks_blocked()
        manager.use(REF, digest)
        manager._states[digest].wanted = True  # looked up meanwhile
        assert manager.release(REF, digest) == 0
        reg_gate.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        assert not [o for o in gc.get_objects() if isinstance(o, Layer) and o.released]
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_released_layer_is_freed_without_the_collector(vectors_dir, tmp_path):
    """A released layer goes by reference counting, tree and index with it. Reference cycles
    (the chunk source's and the blob download's callbacks to the layer, the tree's node
    table and root node to the tree) left them to the collector's next full pass, which an
    idle store may not make for hours: after three 60,000-entry layers were used and
    released, the store stayed at 130 MB where it started at 45 (70 MB once fixed)."""
    async with trio.open_nursery() as nursery:
        reg = VectorRegistry(vectors_dir)
        manager, digest = _manager(nursery, reg, tmp_path), reg.meta["digest"]
        layer = await manager.get_layer(REF, digest)
        manager.use(REF, digest)
        node = layer.tree.lookup_path("etc/hostname")
        assert node is not None and await layer.read_file(node, 0, 5)  # fetches, counted
        assert await layer.read_blob(0, 2) == b"\x1f\x8b"  # the whole blob, verified
        held = [weakref.ref(x) for x in (layer, layer.tree, layer.index, layer.source)]
        del layer, node
        gc.collect()
        gc.disable()
        try:
            assert manager.release(REF, digest) == 0
            await trio.testing.wait_all_tasks_blocked()
            alive = [type(r()).__name__ for r in held if r() is not None]
        finally:
            gc.enable()
        assert alive == []
        nursery.cancel_scope.cancel()


class MisannotatedRegistry(VectorRegistry):
    """The ``basic`` vector, its descriptor naming a TOC digest its TOC does not hash to."""

    async def image(self, ref: str, on_layers=None):
        manifest, config, layers = await super().image(ref, on_layers)
        layers[0].annotations["containerd.io/snapshot/stargz/toc.digest"] = "sha256:" + "ab" * 32
        return manifest, config, layers


@pytest.mark.anyio
async def test_a_refused_layer_keeps_no_frames_of_its_load(vectors_dir, tmp_path):
    """A refused layer is remembered for the life of the store (its lookups answer at once),
    with the error it was refused with. That error kept its traceback, and the frames of the
    load with it: a 60,000-entry layer whose TOC did not match its annotation held its
    compressed TOC, 3.4 MB, for good, and every other refused layer likewise."""
    async with trio.open_nursery() as nursery:
        reg = MisannotatedRegistry(vectors_dir)
        manager, digest = _manager(nursery, reg, tmp_path), reg.meta["digest"]
        with pytest.raises(LayerRefused, match="does not match"):
            await manager.get_layer(REF, digest)
        with pytest.raises(LayerRefused, match="does not match"):  # remembered
            await manager.get_layer(REF, digest)
        kept, chain = manager._states[digest].error, []
        while kept is not None:
            chain.append(kept)
            kept = kept.__cause__ or kept.__context__
        assert len(chain) >= 2  # the refusal, and the format's error it came from
        assert [e.__traceback__ for e in chain] == [None] * len(chain)
        nursery.cancel_scope.cancel()


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [[1], {"a": "b"}, 7, True])
def test_a_mirror_header_that_is_not_strings_is_refused(value: object) -> None:
    """The Go store accepts a header value that is a string or an array of strings and
    fails on anything else ("invalid type … for header"); ours sent ``str(value)`` or
    kept non-string items, which httpx then refuses on every request."""
    mirror = {"host": "m", "header": {"X": value}}
    table = {"resolver": {"host": {"r.example": {"mirrors": [mirror]}}}}
    with pytest.raises(ConfigError):
        parse_config(table)


# -- names ----------------------------------------------------------------------------------


def test_a_layer_name_with_a_trailing_newline_is_not_a_digest() -> None:
    """``$`` matches before a final newline: "sha256:<hex>\\n" passed valid_digest."""
    good = "sha256:" + "a" * 64
    assert LayerManager.valid_digest(good)
    assert not LayerManager.valid_digest(good + "\n")


# -- stale image resolutions -------------------------------------------------------------------


class RetaggedRegistry(VectorRegistry):
    """The tag first names an image whose one layer is the vector under ``old``; after
    ``retag()`` (a new image pushed under the same tag) the layer is the vector under ``new``."""

    def __init__(self, vectors: Path) -> None:
        super().__init__(vectors)
        self.old, self.new = "sha256:" + "1" * 64, "sha256:" + "2" * 64
        self.current = self.old
        self.asked = 0

    def retag(self) -> None:
        self.current = self.new

    async def image(self, ref: str, on_layers=None):
        self.asked += 1
        ann = {"containerd.io/snapshot/stargz/toc.digest": self.meta["toc_digest"]}
        desc = LayerDesc(self.current, self.meta["size"], ann, self.meta["diff_id"])
        return b"{}", b"{}", [desc]


@pytest.mark.anyio
async def test_a_tag_pushed_again_is_served_with_its_new_layers(vectors_dir, tmp_path):
    """The runtime fetches the manifest itself and looks up the layers it names. After the
    tag moved, the store answered every new layer from the manifest it resolved before —
    ENOENT ("no layer"), a silent normal pull — for as long as the ref stayed in the LRU,
    which each of those lookups refreshed."""
    async with trio.open_nursery() as nursery:
        reg = RetaggedRegistry(vectors_dir)
        cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=5)
        manager = LayerManager(cfg, reg, ChunkCache(tmp_path / "c", 1 << 30), nursery)
        assert (await manager.get_layer(REF, reg.old)).digest == reg.old
        reg.retag()
        await trio.sleep(1.5)
        layer = await manager.get_layer(REF, reg.new)
        assert layer.digest == reg.new
        info = await manager.layer_info(REF, reg.new)
        assert info["compressed-diff-digest"] == reg.new
        # The layer of the image the tag named before is still found: a container made from
        # it looks it up again. No third resolution for it.
        assert (await manager.get_layer(REF, reg.old)).digest == reg.old
        assert reg.asked == 2
        nursery.cancel_scope.cancel()


# -- a release while a lookup waits ------------------------------------------------------------


class GatedRegistry(VectorRegistry):
    """Blob reads wait for ``gate`` (the layer's TOC fetch, so its load, is held)."""

    def __init__(self, vectors: Path) -> None:
        super().__init__(vectors)
        self.gate = trio.Event()

    def blob(self, ref: str, digest: str, size: int):
        inner = FileBlob(self.path)
        gate = self.gate

        class Gated:
            size = inner.size

            async def read_ranges(self, ranges):
                await gate.wait()
                return await inner.read_ranges(ranges)

        return Gated()


@pytest.mark.anyio
async def test_a_lookup_waiting_through_a_release_gets_a_live_layer(vectors_dir, tmp_path):
    """Two lookups of one loading layer; the first one's reference comes and goes (``use``,
    then ``release`` to zero) before the load ends. The second lookup was handed the layer
    released on arrival: no background work, ``blob`` EIO until looked up again."""
    async with trio.open_nursery() as nursery:
        reg = GatedRegistry(vectors_dir)
        cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=5)
        manager = LayerManager(cfg, reg, ChunkCache(tmp_path / "c", 1 << 30), nursery)
        digest = reg.meta["digest"]
        got: list = []

        async def lookup() -> None:
            got.append(await manager.get_layer(REF, digest))

        nursery.start_soon(lookup)
        await trio.testing.wait_all_tasks_blocked()
        manager.use(REF, digest)
        assert manager.release(REF, digest) == 0  # while the load is held
        reg.gate.set()
        with trio.fail_after(5):
            while not got:
                await trio.sleep(0.01)
        assert not got[0].released
        nursery.cancel_scope.cancel()


class GoneRegistry(VectorRegistry):
    """Answers until ``gone`` is set, then every image fetch fails (the registry is away)."""

    def __init__(self, vectors: Path) -> None:
        super().__init__(vectors)
        self.gone = False

    async def image(self, ref: str, on_layers=None):
        if self.gone:
            raise OSError(f"cannot connect to {ref.split('/')[0]}")
        return await super().image(ref, on_layers)


@pytest.mark.anyio
async def test_a_layer_in_use_is_served_after_its_image_left_the_lru_and_the_registry(
    vectors_dir, tmp_path
):
    """A container start looks its image's lowerdirs up again (once the kernel's entry for
    ``diff`` expired). With the image's resolution pushed out of the LRU by 30 others (or,
    for a shared base layer, the first image that brought it) that lookup fetched the
    manifest again, and with the registry away every ``podman run`` of an image pulled long
    ago failed with EIO ("can't stat lower layer"), its layers held and loaded all along."""
    async with trio.open_nursery() as nursery:
        reg = GoneRegistry(vectors_dir)
        cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=2)
        manager = LayerManager(cfg, reg, ChunkCache(tmp_path / "c", 1 << 30), nursery)
        digest = reg.meta["digest"]
        layer = await manager.get_layer(REF, digest)
        manager.use(REF, digest)  # pulled: podman holds it
        for i in range(IMAGE_CACHE_ENTRIES):
            await manager.image(f"127.0.0.1:5000/other/img{i}:1")
        reg.gone = True
        assert await manager.get_layer(REF, digest) is layer
        # Only what the runtime holds: a name nothing counted still needs the registry, and
        # so does the layer once released.
        with pytest.raises(ResolveError):
            await manager.get_layer("127.0.0.1:5000/vec/other:1", digest)
        assert manager.release(REF, digest) == 0
        with pytest.raises(ResolveError):
            await manager.get_layer(REF, digest)
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_use_by_toc_digest_after_the_image_left_the_lru_holds_the_layer(
    vectors_dir, tmp_path
):
    """podman >= 5.1 names a layer by its TOC digest. With the image's resolution pushed out
    of the LRU between the lookup and the ``use`` (30 other images resolved meanwhile, as a
    burst of pulls does), the reference was counted under the TOC digest and held nothing:
    the layer in use was released as never used once ``early_ttl`` passed."""
    async with trio.open_nursery() as nursery:
        reg = VectorRegistry(vectors_dir)
        cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=2)
        cache = ChunkCache(tmp_path / "c", 1 << 30)
        manager = LayerManager(cfg, reg, cache, nursery, early_ttl=0.2)
        digest, toc = reg.meta["digest"], reg.meta["toc_digest"]
        layer = await manager.get_layer(REF, toc)
        for i in range(IMAGE_CACHE_ENTRIES):
            await manager.image(f"127.0.0.1:5000/other/img{i}:1")
        assert manager.use(REF, toc) == 1
        assert manager.refcount(REF, toc) == 1 and manager.status()["layers"]
        await trio.sleep(0.5)  # past early_ttl
        assert not layer.released and manager.released == []
        assert manager.release(REF, toc) == 0
        assert layer.released and manager.released == [digest]
        nursery.cancel_scope.cancel()


class StuckOnceRegistry(VectorRegistry):
    """The first image fetch never ends (a registry sending the manifest a byte at a time,
    each within the read timeout); later ones answer."""

    def __init__(self, vectors: Path) -> None:
        super().__init__(vectors)
        self.fetches = 0

    async def image(self, ref: str, on_layers=None):
        self.fetches += 1
        if self.fetches == 1:
            await trio.sleep_forever()
        return await super().image(ref, on_layers)


@pytest.mark.anyio
async def test_a_stuck_image_fetch_is_given_up_and_a_later_lookup_fetches_again(
    vectors_dir, tmp_path
):
    """Every lookup of the image joined the one shared fetch, which never ended: each one
    answered after the resolve bound, for as long as the store ran."""
    bound = 0.3
    async with trio.open_nursery() as nursery:
        reg = StuckOnceRegistry(vectors_dir)
        cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=bound)
        manager = LayerManager(cfg, reg, ChunkCache(tmp_path / "c", 1 << 30), nursery)
        digest = reg.meta["digest"]
        with pytest.raises(ResolveTimeout):
            await manager.get_layer(REF, digest)
        await trio.sleep(2 * bound)  # the shared fetch is given up meanwhile
        with trio.fail_after(5):
            assert (await manager.get_layer(REF, digest)).digest == digest
        assert reg.fetches == 2
        nursery.cancel_scope.cancel()
