"""StoreFS without a mount: lookups, both protocol generations, refcounts, inode lifetimes."""

from __future__ import annotations

import base64
import errno
import json
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from store.cache import ChunkCache
from store.config import StoreConfig
from store.fs import ROOT_INO, FSError, StoreFS
from store.resolver import LayerDesc, LayerManager, RegistryAccess
from tests.store.conftest import FileBlob

REF = "127.0.0.1:5000/vec/basic:1"


class VectorRegistry(RegistryAccess):
    """One image whose single layer is the Go-written ``basic`` vector."""

    def __init__(self, vectors: Path, annotate: bool = True, name: str = "basic") -> None:
        self.meta = json.loads((vectors / f"{name}.json").read_text())
        self.path = vectors / f"{name}.blob"
        self.annotate = annotate

    async def image(self, ref: str, on_layers=None):
        ann = {"containerd.io/snapshot/stargz/toc.digest": self.meta["toc_digest"]}
        desc = LayerDesc(
            self.meta["digest"],
            self.meta["size"],
            ann if self.annotate else {},
            self.meta["diff_id"],
        )
        return b"{}", b"{}", [desc]

    def blob(self, ref: str, digest: str, size: int):
        return FileBlob(self.path)


def _manager(nursery, reg: RegistryAccess, tmp_path: Path, **config) -> LayerManager:
    """A manager over ``reg`` with no prefetch or background fetch, resolving within 5 s."""
    cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=5, **config)
    return LayerManager(cfg, reg, ChunkCache(tmp_path / "c", 1 << 30), nursery)


async def _fs(
    nursery, vectors_dir, tmp_path, annotate=True, vector="basic", **config
) -> tuple[StoreFS, dict]:
    reg = VectorRegistry(vectors_dir, annotate, vector)
    return StoreFS(_manager(nursery, reg, tmp_path, **config)), reg.meta


async def _path(fs: StoreFS, *names: str) -> int:
    ino = ROOT_INO
    for name in names:
        ino = (await fs.lookup(ino, name)).ino
    return ino


@pytest.mark.anyio
async def test_both_generations_refcount_and_release(vectors_dir, tmp_path):
    async with trio.open_nursery() as nursery:
        fs, meta = await _fs(nursery, vectors_dir, tmp_path)
        b64 = base64.b64encode(REF.encode()).decode()
        old = await _path(fs, b64, meta["digest"])
        new = await _path(fs, b64, meta["toc_digest"])
        diff_old = await _path(fs, b64, meta["digest"], "diff")
        diff_new = await _path(fs, b64, meta["toc_digest"], "diff")
        assert diff_old == diff_new  # one layer, whichever name
        info_old = json.loads(await fs.read(await _path(fs, b64, meta["digest"], "info"), 0, 4096))
        assert info_old["diff-digest"] == meta["diff_id"]
        info_new = json.loads(
            await fs.read(await _path(fs, b64, meta["toc_digest"], "info"), 0, 4096)
        )
        assert info_new["flags"] == {"expected-layer-diffid": meta["diff_id"]}
        blob_ino = await _path(fs, b64, meta["digest"], "blob")
        blob = (vectors_dir / "basic.blob").read_bytes()
        assert await fs.read(blob_ino, 10, 100) == blob[10:110]
        with pytest.raises(FSError) as exc:
            await fs.lookup(old, "use")
        assert exc.value.errno_value == errno.ENOENT
        for d in (old, new):
            with pytest.raises(FSError) as exc:
                fs.create(d, "use")
            assert exc.value.errno_value == errno.ENOENT
        assert fs.manager.refcount(REF, meta["digest"]) == 2
        ref_ino = await _path(fs, b64)
        with pytest.raises(FSError):
            fs.rmdir(ref_ino, meta["digest"])
        assert fs.manager.refcount(REF, meta["digest"]) == 1
        with pytest.raises(FSError):
            fs.rmdir(ref_ino, meta["toc_digest"])
        assert fs.manager.layers() == [] and fs.manager.released == [meta["digest"]]
        # The kernel still holds the tree's inodes: it stays until forgotten, then goes.
        assert fs.mounted_layers() == 1
        fs.forget(diff_old, 2)
        assert fs.mounted_layers() == 0
        with pytest.raises(FSError):
            fs.getattr(diff_old)
        # Looked up again: resolved afresh, with new inode numbers.
        again = await _path(fs, b64, meta["digest"], "diff")
        assert again > diff_old
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_not_estargz_is_enoent_and_bad_names_einval(vectors_dir, tmp_path):
    async with trio.open_nursery() as nursery:
        fs, meta = await _fs(nursery, vectors_dir, tmp_path, annotate=False)
        b64 = base64.b64encode(REF.encode()).decode()
        with pytest.raises(FSError) as exc:
            await _path(fs, b64, meta["digest"], "diff")
        assert exc.value.errno_value == errno.ENOENT
        with pytest.raises(FSError) as exc:
            await fs.lookup(ROOT_INO, "not base64!")
        assert exc.value.errno_value == errno.EINVAL
        with pytest.raises(FSError) as exc:
            await _path(fs, b64, "sha256:xyz")
        assert exc.value.errno_value == errno.EINVAL
        with pytest.raises(FSError) as exc:  # a name that is not UTF-8 (os.fsdecode's escapes)
            await fs.lookup(ROOT_INO, "ab\udce9cd")
        assert exc.value.errno_value == errno.EINVAL
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_blob_after_the_layer_was_released_and_pulled_again(vectors_dir, tmp_path):
    """`podman rmi` then `pull` again: the kernel may still hold the released layer's `blob`
    node, and `podman save` must read the layer loaded anew, not get EIO from the old one."""
    async with trio.open_nursery() as nursery:
        fs, meta = await _fs(nursery, vectors_dir, tmp_path)
        b64 = base64.b64encode(REF.encode()).decode()
        d = meta["digest"]
        await _path(fs, b64, d, "diff")
        old_blob = await _path(fs, b64, d, "blob")
        blob = (vectors_dir / "basic.blob").read_bytes()
        assert await fs.read(old_blob, 0, 10) == blob[:10]
        with pytest.raises(FSError):
            fs.rmdir(await _path(fs, b64), d)  # refcount 0: released
        assert fs.manager.released == [d]
        await _path(fs, b64, d, "diff")  # pulled again
        new_blob = await _path(fs, b64, d, "blob")
        assert new_blob != old_blob
        assert await fs.read(new_blob, 0, 10) == blob[:10]
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_each_open_of_status_reads_one_whole_state(vectors_dir, tmp_path):
    """It was kept in the page cache with mtime 0: a later open could read the old JSON when
    the new one had the same length; and one open could read the start of one state and
    the end of another. Each open now reads its own snapshot (past the page cache)."""
    async with trio.open_nursery() as nursery:
        fs, meta = await _fs(nursery, vectors_dir, tmp_path)
        b64 = base64.b64encode(REF.encode()).decode()
        status = await _path(fs, "status")
        before = fs.open(status, write=False)
        assert before is not None and before != status
        await _path(fs, b64, meta["digest"], "diff")  # a layer loads: the state changes
        old = json.loads(await fs.read(before, 0, 1 << 20))
        assert old["layers"] == {}  # the state as of that open, whole
        after = fs.open(status, write=False)
        assert after is not None
        assert len(json.loads(await fs.read(after, 0, 1 << 20))["layers"]) == 1
        fs.release(before)
        fs.release(after)
        assert fs.open(await _path(fs, b64, meta["digest"], "blob"), write=False) is None
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_inode_numbers_are_never_reused(vectors_dir, tmp_path):
    async with trio.open_nursery() as nursery:
        fs, _meta = await _fs(nursery, vectors_dir, tmp_path)
        seen = set()
        for i in range(3):
            ref = base64.b64encode(f"127.0.0.1:5000/vec/basic:{i}".encode()).decode()
            ino = await _path(fs, ref)
            assert ino not in seen
            seen.add(ino)
            fs.forget(ino, 1)
        nursery.cancel_scope.cancel()


class GatedRegistry(VectorRegistry):
    """Three layers (the ``basic`` vector under three digests) whose reads wait for a gate."""

    def __init__(self, vectors: Path) -> None:
        super().__init__(vectors)
        self.gate = trio.Event()
        self.started: list[str] = []
        self.digests = [f"sha256:{i:064x}" for i in range(1, 4)]

    async def image(self, ref: str, on_layers=None):
        ann = {"containerd.io/snapshot/stargz/toc.digest": self.meta["toc_digest"]}
        descs = [LayerDesc(d, self.meta["size"], ann, self.meta["diff_id"]) for d in self.digests]
        return b"{}", b"{}", descs

    def blob(self, ref: str, digest: str, size: int):
        registry, inner = self, FileBlob(self.path)

        class Gated:
            size = inner.size

            async def read_ranges(self, ranges):
                registry.started.append(digest)
                await registry.gate.wait()
                return await inner.read_ranges(ranges)

        return Gated()


@pytest.mark.anyio
async def test_all_layer_tocs_are_fetched_at_once_when_the_manifest_is_known(vectors_dir, tmp_path):
    """podman 4.3 looks layers up one by one; their footer+TOC reads must overlap anyway."""
    async with trio.open_nursery() as nursery:
        reg = GatedRegistry(vectors_dir)
        manager = _manager(nursery, reg, tmp_path)
        await manager.image(REF)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(reg.started) == reg.digests  # all three in flight before any lookup
        reg.gate.set()
        layers = [await manager.get_layer(REF, d) for d in reg.digests]
        assert [layer.digest for layer in layers] == reg.digests
        assert sorted(reg.started) == reg.digests  # the lookups reused them: no second read
        assert manager.layers() == layers
        nursery.cancel_scope.cancel()


class LongManifestRegistry(GatedRegistry):
    """Two plain layers, then EARLY_LOADS_MAX + 2 eStargz ones; hands them on early too."""

    def __init__(self, vectors: Path) -> None:
        from store.resolver import EARLY_LOADS_MAX

        super().__init__(vectors)
        self.plain = [f"sha256:{i:064x}" for i in range(1, 3)]
        self.digests = [f"sha256:{i:064x}" for i in range(3, EARLY_LOADS_MAX + 5)]

    def _descs(self, diff_id: str) -> list[LayerDesc]:
        ann = {"containerd.io/snapshot/stargz/toc.digest": self.meta["toc_digest"]}
        return [LayerDesc(d, self.meta["size"], {}, diff_id) for d in self.plain] + [
            LayerDesc(d, self.meta["size"], ann, diff_id) for d in self.digests
        ]

    async def image(self, ref: str, on_layers=None):
        if on_layers is not None:
            on_layers(self._descs(""))
        return b"{}", b"{}", self._descs(self.meta["diff_id"])


@pytest.mark.anyio
async def test_only_the_first_layers_of_a_long_manifest_load_with_it(vectors_dir, tmp_path):
    """A manifest may list thousands of layers (a hostile one can, within its 4 MiB): only
    its first EARLY_LOADS_MAX eStargz layers start loading with the image (plain layers do
    not count); the others load at their lookup."""
    from store.resolver import EARLY_LOADS_MAX

    async with trio.open_nursery() as nursery:
        reg = LongManifestRegistry(vectors_dir)
        manager = _manager(nursery, reg, tmp_path)
        await manager.image(REF)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(set(reg.started)) == reg.digests[:EARLY_LOADS_MAX]
        assert len(reg.started) == EARLY_LOADS_MAX  # each once: early, then after the config
        reg.gate.set()
        last = await manager.get_layer(REF, reg.digests[-1])  # loaded at its lookup
        assert last.digest == reg.digests[-1] and reg.digests[-1] in reg.started
        nursery.cancel_scope.cancel()


class SlowConfigRegistry(GatedRegistry):
    """Hands its layers on when the manifest is known; the config waits for ``config_gate``."""

    def __init__(self, vectors: Path) -> None:
        super().__init__(vectors)
        self.gate.set()
        self.config_gate = trio.Event()

    async def image(self, ref: str, on_layers=None):
        ann = {"containerd.io/snapshot/stargz/toc.digest": self.meta["toc_digest"]}
        if on_layers is not None:
            on_layers([LayerDesc(d, self.meta["size"], ann, "") for d in self.digests])
        await self.config_gate.wait()
        descs = [LayerDesc(d, self.meta["size"], ann, self.meta["diff_id"]) for d in self.digests]
        return b"{}", b"{}", descs


@pytest.mark.anyio
async def test_layer_loads_start_with_the_manifest_before_the_config_arrives(vectors_dir, tmp_path):
    async with trio.open_nursery() as nursery:
        reg = SlowConfigRegistry(vectors_dir)
        manager = _manager(nursery, reg, tmp_path)
        nursery.start_soon(manager.image, REF)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(reg.started) == reg.digests  # footers asked for, config still pending
        reg.config_gate.set()
        layers = [await manager.get_layer(REF, d) for d in reg.digests]
        assert sorted(reg.started) == reg.digests  # not loaded a second time
        info = await manager.layer_info(REF, reg.digests[0])
        assert info["diff-digest"] == reg.meta["diff_id"]  # the config's, not the early ""
        assert manager.layers() == layers
        nursery.cancel_scope.cancel()


class RecordingRegistry(VectorRegistry):
    """:class:`VectorRegistry` keeping the blob readers it hands out (their requests)."""

    def __init__(self, vectors: Path, name: str) -> None:
        super().__init__(vectors, name=name)
        self.readers: list[FileBlob] = []

    def blob(self, ref: str, digest: str, size: int):
        self.readers.append(FileBlob(self.path))
        return self.readers[-1]


@pytest.mark.anyio
@pytest.mark.parametrize("vector", ["whiteout", "special", "basic"])
async def test_a_blob_the_footer_read_takes_whole_is_asked_for_once(vectors_dir, tmp_path, vector):
    """A blob no bigger than the footer read (TAIL_GUESS: a small layer, e.g. one config file)
    comes whole in that read: the head probe asked for the same bytes again (two identical
    ranged GETs of every such layer in a pull), and each first read of one of its files asked
    for some of them once more. Now its files are read (verified) from that one answer. A
    bigger one gets its head probe as before."""
    from store.estargz_view import TAIL_GUESS
    from store.prefetch import HEAD_PROBE

    async with trio.open_nursery() as nursery:
        reg = RecordingRegistry(vectors_dir, vector)
        cfg = StoreConfig(no_background_fetch=True, resolve_timeout_sec=5)
        manager = LayerManager(cfg, reg, ChunkCache(tmp_path / "c", 1 << 30), nursery)
        layer = await manager.get_layer(REF, reg.meta["digest"])
        await trio.testing.wait_all_tasks_blocked()
        (blob,) = reg.readers
        size = blob.size
        if size <= TAIL_GUESS:
            assert blob.requests == [[(0, size)]]
        else:
            assert sorted(blob.requests) == [[(0, HEAD_PROBE)], [(size - TAIL_GUESS, size)]]
        asked = len(blob.requests)
        files = [n for n in layer.tree.nodes if stat.S_ISREG(n.mode) and n.size]
        assert files
        for node in files:
            assert len(await layer.read_file(node, 0, node.size)) == node.size
        if size <= TAIL_GUESS:
            assert len(blob.requests) == asked, blob.requests[asked:]
        else:
            assert len(blob.requests) > asked
        nursery.cancel_scope.cancel()


class OnceWrongBlob(FileBlob):
    """A :class:`FileBlob` whose first answer holding offset ``flip`` has that byte wrong (a
    proxy or cache that answered bad bytes once); its later answers are right."""

    def __init__(self, path: Path, flip: int) -> None:
        super().__init__(path)
        self.flip = flip
        self.wrong = True

    async def read_ranges(self, ranges):
        parts = await super().read_ranges(ranges)
        for n, (lo, hi) in enumerate(ranges):
            if self.wrong and lo <= self.flip < hi:
                self.wrong = False
                bad = bytearray(parts[n])
                bad[self.flip - lo] ^= 0xFF
                parts[n] = bytes(bad)
        return parts


@pytest.mark.anyio
@pytest.mark.parametrize("what", ["file", "blob"])
async def test_a_small_blob_that_came_wrong_whole_is_asked_for_again(vectors_dir, tmp_path, what):
    """The footer read of a small layer takes the whole blob; when a byte of a file's chunk
    came wrong in it (the TOC still verifies), that answer is not kept whole: the file's read
    asks the registry and gets it. Before, every read of the file verified the same wrong
    bytes kept whole (ChunkVerifyError, EIO for the layer's life), and the ``blob`` file's
    second download after its mismatch hashed them once more (BlobVerifyError)."""
    from store.estargz_view import load_layer_index

    reg = RecordingRegistry(vectors_dir, "special")
    index = await load_layer_index(FileBlob(reg.path), reg.meta["toc_digest"])
    chunk = next(c for c in index.all_chunks() if c.size > 100)  # bin/su's
    flip = (chunk.offset + chunk.compressed_end) // 2
    reg.blob = lambda ref, digest, size: OnceWrongBlob(reg.path, flip)  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        cfg = StoreConfig(no_background_fetch=True, resolve_timeout_sec=5)
        manager = LayerManager(cfg, reg, ChunkCache(tmp_path / "c", 1 << 30), nursery)
        layer = await manager.get_layer(REF, reg.meta["digest"])
        if what == "blob":
            size = reg.meta["size"]
            data = await layer.read_blob(0, size)
            assert len(data) == size
        else:
            files = [n for n in layer.tree.nodes if stat.S_ISREG(n.mode) and n.size]
            (node,) = [n for n in files if layer.index.chunks_of(n.entry)[0].name == chunk.name]
            assert len(await layer.read_file(node, 0, node.size)) == node.size
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_layer_loaded_with_its_image_but_never_looked_up_is_dropped(vectors_dir, tmp_path):
    async with trio.open_nursery() as nursery:
        reg = GatedRegistry(vectors_dir)
        reg.gate.set()
        manager = _manager(nursery, reg, tmp_path)
        manager.early_ttl = 0.3
        await manager.image(REF)
        looked_up = await manager.get_layer(REF, reg.digests[0])
        manager.use(REF, reg.digests[0])  # as containers/storage does after its lookup
        await trio.sleep(0.6)
        assert list(manager._states) == [reg.digests[0]]  # the two never looked up are gone
        assert not looked_up.released and manager.layers() == [looked_up]
        again = await manager.get_layer(REF, reg.digests[1])  # loaded afresh on demand
        assert again.digest == reg.digests[1] and not again.released
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_layer_looked_up_but_never_used_is_released(vectors_dir, tmp_path):
    """containers/storage counts a reference (``use``) right after its lookup; a layer never
    counted (the runtime gave up, or someone only listed it) stops its background work and
    its tree goes once the kernel forgets it, as a released one's does. A used one stays."""
    async with trio.open_nursery() as nursery:
        fs, meta = await _fs(nursery, vectors_dir, tmp_path)
        fs.manager.early_ttl = 0.3
        b64 = base64.b64encode(REF.encode()).decode()
        diff = await _path(fs, b64, meta["digest"], "diff")
        layer = fs.manager.layers()[0]
        fs.forget(diff, 1)
        assert fs.mounted_layers() == 1 and not layer.released  # kept until the TTL
        await trio.sleep(0.6)
        assert layer.released and fs.manager.layers() == []
        assert fs.manager.released == [meta["digest"]]
        assert fs.mounted_layers() == 0  # the kernel held none of its inodes: dropped now
        # Looked up again and used this time: it stays past the TTL.
        layer_dir = await _path(fs, b64, meta["digest"])
        await _path(fs, b64, meta["digest"], "diff")
        with pytest.raises(FSError):
            fs.create(layer_dir, "use")
        again = fs.manager.layers()[0]
        assert again is not layer
        await trio.sleep(0.6)
        assert fs.manager.layers() == [again] and not again.released
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_layer_load_runs_no_gc_and_trims_memory_off_the_fuse_thread(
    vectors_dir, tmp_path, monkeypatch
):
    """A full collection on the thread that answers FUSE requests stalls every lookup (it
    grows with the layers held); the heap trim it was paired with runs in a worker thread."""
    import gc
    import threading

    import store.resolver as resolver

    def no_gc(*_args: object) -> int:
        raise AssertionError("gc.collect() on the FUSE thread")

    trims: list[threading.Thread] = []
    monkeypatch.setattr(resolver, "_malloc_trim", lambda: trims.append(threading.current_thread()))
    with monkeypatch.context() as patch:  # undone before pytest's own collections
        patch.setattr(gc, "collect", no_gc)
        async with trio.open_nursery() as nursery:
            fs, meta = await _fs(nursery, vectors_dir, tmp_path)
            b64 = base64.b64encode(REF.encode()).decode()
            await _path(fs, b64, meta["digest"], "diff")
            with trio.fail_after(10):
                while not trims:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert trims and all(t is not threading.main_thread() for t in trims)


TRUSTED, USER = b"trusted.overlay.opaque", b"user.overlay.opaque"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kind", "answered"),
    [("trusted", [TRUSTED]), ("user", [USER]), ("all", [TRUSTED, USER]), (None, [TRUSTED])],
)
async def test_opaque_directory_answers_the_configured_xattr(vectors_dir, tmp_path, kind, answered):
    """``overlay_opaque_type`` picks the opaque attribute (rootful overlayfs reads trusted.,
    userxattr mounts user.); the default is what rootful podman needs."""
    config = {} if kind is None else {"overlay_opaque_type": kind}
    entries = (vectors_dir / "whiteout.entries.jsonl").read_text().splitlines()
    opaque = [
        json.loads(line)["name"].rpartition("/")[0]
        for line in entries
        if json.loads(line)["name"].endswith(".wh..wh..opq")
    ]
    assert opaque
    async with trio.open_nursery() as nursery:
        fs, meta = await _fs(nursery, vectors_dir, tmp_path, vector="whiteout", **config)
        b64 = base64.b64encode(REF.encode()).decode()
        for d in opaque:
            ino = await _path(fs, b64, meta["digest"], "diff", *d.split("/"))
            assert sorted(fs.listxattr(ino)) == sorted(answered)
            for name in (TRUSTED, USER):
                if name in answered:
                    assert fs.getxattr(ino, name) == b"y"
                else:
                    with pytest.raises(FSError) as exc:
                        fs.getxattr(ino, name)
                    assert exc.value.errno_value == errno.ENODATA
        nursery.cancel_scope.cancel()


def test_a_blob_listed_twice_in_an_image_is_left_to_a_normal_pull():
    """Both occurrences would be one directory: overlayfs refuses it twice as a lowerdir."""
    from store.resolver import ImageInfo, NotEstargzError

    toc = "containerd.io/snapshot/stargz/toc.digest"
    twice = LayerDesc("sha256:" + "a" * 64, 10, {toc: "sha256:" + "b" * 64}, "sha256:" + "c" * 64)
    once = LayerDesc("sha256:" + "d" * 64, 10, {toc: "sha256:" + "e" * 64}, "sha256:" + "f" * 64)
    image = ImageInfo("r", b"{}", b"{}", [twice, once, twice])
    for name in (twice.digest, twice.toc_digest):
        with pytest.raises(NotEstargzError, match="listed 2 times"):
            image.servable(name)
    assert image.servable(once.digest) == (once, False)
    assert image.servable(once.toc_digest) == (once, True)


@pytest.mark.anyio
async def test_resolved_images_are_a_bounded_lru_and_counts_survive_eviction(vectors_dir, tmp_path):
    """At most ``IMAGE_CACHE_ENTRIES`` resolved images are kept (least recently used leave
    first, to be resolved afresh if wanted again); a layer counted under a TOC-digest name is
    still released after its image left the cache."""
    from store.resolver import IMAGE_CACHE_ENTRIES

    reg = VectorRegistry(vectors_dir)
    asked: list[str] = []
    image = reg.image

    async def counting(ref: str, on_layers=None):
        asked.append(ref)
        return await image(ref, on_layers)

    reg.image = counting  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        manager = _manager(nursery, reg, tmp_path)
        refs = [f"127.0.0.1:5000/vec/img{i}:1" for i in range(IMAGE_CACHE_ENTRIES + 1)]
        await manager.get_layer(refs[0], reg.meta["toc_digest"])
        assert manager.use(refs[0], reg.meta["toc_digest"]) == 1
        for ref in refs[1:]:
            await manager.image(ref)
        assert len(asked) == IMAGE_CACHE_ENTRIES + 1
        await manager.image(refs[-1])  # recently used: kept
        assert len(asked) == IMAGE_CACHE_ENTRIES + 1
        assert manager.refcount(refs[0], reg.meta["toc_digest"]) == 1
        assert manager.release(refs[0], reg.meta["toc_digest"]) == 0
        assert manager.released == [reg.meta["digest"]]
        await manager.image(refs[0])  # evicted: resolved again
        assert len(asked) == IMAGE_CACHE_ENTRIES + 2
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_each_layer_is_one_state_machine(vectors_dir, tmp_path):
    """loading → loaded (with its image) → resolved (looked up); a looked-up layer whose last
    reference goes while it still loads is released, and its layer let go once loaded."""
    from store.resolver import LayerPhase, ResolveTimeout

    async with trio.open_nursery() as nursery:
        cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=0.3)
        reg = GatedRegistry(vectors_dir)
        manager = LayerManager(cfg, reg, ChunkCache(tmp_path / "c", 1 << 30), nursery)
        await manager.image(REF)

        def phases() -> dict[str, LayerPhase]:
            return {d: s.phase for d, s in manager._states.items()}

        assert set(phases().values()) == {LayerPhase.LOADING}
        first, second = reg.digests[:2]
        with pytest.raises(ResolveTimeout):
            await manager.get_layer(REF, second)
        state = manager._states[second]
        assert state.wanted and state.phase is LayerPhase.LOADING
        assert manager.use(REF, second) == 1
        assert manager.release(REF, second) == 0
        assert second not in manager._states and state.phase is LayerPhase.RELEASED
        reg.gate.set()
        with trio.fail_after(10):
            while state.layer is None or phases().get(first) is not LayerPhase.LOADED:
                await trio.sleep(0.01)
        assert state.layer.released and state.phase is LayerPhase.RELEASED
        layer = await manager.get_layer(REF, first)
        assert phases()[first] is LayerPhase.RESOLVED and manager.layers() == [layer]
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_resolved_layer_runs_its_background_fetch_in_its_own_nursery(vectors_dir, tmp_path):
    """The manager starts each layer's nursery (``nursery.start(layer.run)``), so a lookup's
    background fetch really fetches, and release cancels that work whole."""
    async with trio.open_nursery() as nursery:
        cfg = StoreConfig(noprefetch=False, no_background_fetch=False, resolve_timeout_sec=5)
        reg = VectorRegistry(vectors_dir)
        manager = LayerManager(cfg, reg, ChunkCache(tmp_path / "c", 1 << 30), nursery)
        layer = await manager.get_layer(REF, reg.meta["digest"])
        assert layer._nursery is not None and layer.cancel_scope is not None
        chunks = list(layer.index.all_chunks())
        with trio.fail_after(10):
            while not all(c.digest in layer.cache for c in chunks):
                await trio.sleep(0.01)
        layer.release()
        # Cancelled work may still be finishing in a worker thread (a chunk's inflate), which
        # wait_all_tasks_blocked counts as blocked: wait for the nursery itself to close.
        with trio.fail_after(10):
            while layer._nursery is not None:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


class _BigDirRegistry(RegistryAccess):
    """One image whose single eStargz layer holds directory ``d`` of ``count`` empty files."""

    def __init__(self, tmp: Path, count: int) -> None:
        import io
        import tarfile

        from store.estargz.writer import convert

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            tf.addfile(_dir_info("d"))
            for i in range(count):
                tf.addfile(tarfile.TarInfo(f"d/f{count - i:06d}"))  # written in reverse order
        self.path = tmp / "big.blob"
        with self.path.open("wb") as f:
            res = convert(io.BytesIO(buf.getvalue()), f)
        ann = {"containerd.io/snapshot/stargz/toc.digest": res.toc_digest}
        self.desc = LayerDesc(res.digest, res.size, ann, res.diff_id)

    async def image(self, ref: str, on_layers=None):
        return b"{}", b"{}", [self.desc]

    def blob(self, ref: str, digest: str, size: int):
        return FileBlob(self.path)


def _dir_info(name: str):
    import tarfile

    ti = tarfile.TarInfo(name)
    ti.type, ti.mode = tarfile.DIRTYPE, 0o755
    return ti


@pytest.mark.anyio
async def test_a_directory_is_listed_in_linear_work_across_the_kernels_calls(tmp_path, monkeypatch):
    """The kernel lists a directory in calls of one reply buffer each (about 25 entries),
    each resuming where the last stopped. Every call sorted the whole directory and made
    every entry's attributes (16,000 entries: 30 s of the FUSE loop); now the listing is
    sorted once per open handle and only the entries handed out get attributes."""
    import pyfuse3

    from store.fuse_ops import StoreOperations

    count, per_call = 2000, 25
    made = 0
    node_attr = StoreFS._node_attr

    def counted(slot, node):
        nonlocal made
        made += 1
        return node_attr(slot, node)

    monkeypatch.setattr(StoreFS, "_node_attr", staticmethod(counted))
    async with trio.open_nursery() as nursery:
        reg = _BigDirRegistry(tmp_path, count)
        fs = StoreFS(_manager(nursery, reg, tmp_path))
        b64 = base64.b64encode(REF.encode()).decode()
        d = await _path(fs, b64, reg.desc.digest, "diff", "d")
        ops = StoreOperations(fs)
        fh = await ops.opendir(d, pyfuse3.RequestContext())  # uid 0
        names: list[bytes] = []
        calls, made = 0, 0
        while True:
            box: list[bytes] = []

            def reply(token, name, attr, nxt, box=box):
                if len(box) == per_call:
                    return False
                box.append(name)
                return True

            monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
            await ops.readdir(fh, len(names), None)
            calls += 1
            if not box:
                break
            names += box
        await ops.releasedir(fh)
        assert names == [b".", b"..", *sorted(f"f{i:06d}".encode() for i in range(1, count + 1))]
        # each call makes at most one entry it cannot hand out; "." and ".." once
        assert made <= count + calls + 2
        with pytest.raises(FSError) as exc:
            list(fs.readdir(fh))  # released
        assert exc.value.errno_value == errno.EBADF
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("kind", "size", "blocks"),
    [
        (0o100644, 0, 0),
        (0o100644, 1, 8),  # one whole 4 KiB block, as extraction on ext4 gives it
        (0o100644, 4096, 8),
        (0o100644, 4097, 16),
        (0o040755, 4096, 8),
        (0o120777, 59, 0),  # a fast symlink: its target in the inode
        (0o120777, 60, 8),
        (0o020666, 0, 0),
    ],
)
def test_blocks_count_whole_4k_blocks_as_a_normal_pull_shows_them(
    kind: int, size: int, blocks: int
) -> None:
    from store.fs import Attr

    assert Attr(ino=1, mode=kind, size=size).blocks == blocks


@pytest.mark.anyio
async def test_a_listing_counts_no_lookup_for_dot_and_dotdot(vectors_dir, tmp_path, monkeypatch):
    """readdirplus links an inode for every entry but ``.`` and ``..`` (the kernel skips
    those): counting them too left the layer's tree mounted forever once released."""
    import pyfuse3

    from store.fuse_ops import StoreOperations

    async with trio.open_nursery() as nursery:
        fs, meta = await _fs(nursery, vectors_dir, tmp_path)
        b64 = base64.b64encode(REF.encode()).decode()
        diff = await _path(fs, b64, meta["digest"], "diff")
        with pytest.raises(FSError):
            fs.create(await _path(fs, b64, meta["digest"]), "use")
        ops = StoreOperations(fs)
        listed: list[tuple[bytes, int]] = []
        monkeypatch.setattr(
            pyfuse3, "readdir_reply", lambda t, name, a, n: listed.append((name, a.st_ino)) or True
        )
        fh = await ops.opendir(diff, pyfuse3.RequestContext())  # uid 0
        await ops.readdir(fh, 0, None)
        await ops.releasedir(fh)
        assert [n for n, _ in listed[:2]] == [b".", b".."] and len(listed) > 2
        with pytest.raises(FSError):
            fs.rmdir(await _path(fs, b64), meta["digest"])
        assert fs.mounted_layers() == 1  # the kernel holds diff and what it listed
        for _, ino in listed[2:]:
            fs.forget(ino, 1)
        fs.forget(diff, 1)
        assert fs.mounted_layers() == 0
        nursery.cancel_scope.cancel()


# -- who is served ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("uid", "serve_all", "served"),
    [
        (0, False, True),  # root: rootful podman, CRI-O, uid 0 of a rootless store's namespace
        (1000, False, True),  # the store's own user
        (65534, False, False),  # any other user
        (1001, False, False),
        (65534, True, True),  # serve_all_users: a store shared on purpose
    ],
)
async def test_only_root_and_the_stores_own_user_are_served(
    vectors_dir, tmp_path, uid: int, serve_all: bool, served: bool
) -> None:
    """The mount is ``allow_other`` without ``default_permissions``: every local user could
    read every layer file and ``blob`` through it, whatever their modes."""
    async with trio.open_nursery() as nursery:
        fs, _ = await _fs(nursery, vectors_dir, tmp_path, serve_all_users=serve_all)
        fs.own_uid = 1000
        if served:
            fs.admit(uid)
        else:
            with pytest.raises(FSError) as exc:
                fs.admit(uid)
            assert exc.value.errno_value == errno.EACCES
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_every_request_naming_its_caller_is_refused_to_another_user(vectors_dir, tmp_path):
    """Each pyfuse3 handler given a caller (``ctx``) answers another user EACCES before it
    does anything (``statfs`` excepted: it shows nothing of a layer): an ``rmdir`` of a layer
    directory, which drops a reference, leaves the layer in use."""
    import inspect
    import types

    import pyfuse3

    from store.fuse_ops import StoreOperations

    async with trio.open_nursery() as nursery:
        fs, meta = await _fs(nursery, vectors_dir, tmp_path)
        b64 = base64.b64encode(REF.encode()).decode()
        ref_ino = await _path(fs, b64)
        layer_ino = await _path(fs, b64, meta["digest"])
        with pytest.raises(FSError):
            fs.create(layer_ino, "use")
        assert fs.manager.refcount(REF, meta["digest"]) == 1
        ops = StoreOperations(fs)
        stranger = types.SimpleNamespace(uid=65534, gid=65534, pid=1, umask=0)
        handlers = [
            name
            for name, fn in vars(StoreOperations).items()  # pyfuse3's own answer ENOSYS
            if inspect.iscoroutinefunction(fn)
            and "ctx" in inspect.signature(fn).parameters
            and name != "statfs"
        ]
        assert {"lookup", "getattr", "open", "opendir", "access", "rmdir"} <= set(handlers)
        for name in handlers:
            params = list(inspect.signature(getattr(StoreOperations, name)).parameters)[1:-1]
            args: list[object] = [ref_ino] * len(params)
            if name == "rmdir":
                args = [ref_ino, meta["digest"].encode()]
            with pytest.raises(pyfuse3.FUSEError) as exc:
                await getattr(ops, name)(*args, ctx=stranger)
            assert exc.value.errno == errno.EACCES, name
        assert fs.manager.refcount(REF, meta["digest"]) == 1
        root = pyfuse3.RequestContext()  # uid 0
        assert (await ops.lookup(ref_ino, meta["digest"].encode(), root)).st_ino == layer_ino
        nursery.cancel_scope.cancel()
