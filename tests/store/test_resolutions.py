"""The tags' resolutions the store keeps under ``--root`` across restarts
(:mod:`store.resolutions`)."""

from __future__ import annotations

import base64
import hashlib
import json
import os

from store.resolutions import Resolution, Resolutions

REF = "registry.example:5000/app:latest"


def _resolution(n: int) -> Resolution:
    manifest = b'{"schemaVersion":2,"n":%d}' % n
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    return Resolution(manifest, "application/vnd.oci.image.manifest.v1+json", digest, b"{}")


def test_kept_resolutions_read_back_most_recent_first(tmp_path):
    kept = Resolutions(tmp_path / "r", per_ref=2)
    for n in range(3):
        kept.save(REF, _resolution(n))
        path = kept._ref_dir(REF) / _resolution(n).digest[7:]
        os.utime(path, (1000 + n, 1000 + n))  # a clock that moved on between the saves
    assert kept.load(REF) == [_resolution(2), _resolution(1)]  # the oldest dropped
    assert kept.load("registry.example:5000/other:1") == []
    assert Resolutions(tmp_path / "r").load(REF) == [_resolution(2), _resolution(1)]
    assert (tmp_path / "r").stat().st_mode & 0o777 == 0o700


def test_a_reference_by_digest_is_not_kept(tmp_path):
    kept = Resolutions(tmp_path / "r")
    kept.save(f"registry.example:5000/app@{_resolution(0).digest}", _resolution(0))
    assert not (tmp_path / "r").exists() or list((tmp_path / "r").iterdir()) == []


def test_a_file_whose_manifest_does_not_hash_to_its_name_is_left_out(tmp_path):
    kept = Resolutions(tmp_path / "r")
    kept.save(REF, _resolution(0))
    kept.save(REF, _resolution(1))
    path = kept._ref_dir(REF) / _resolution(0).digest[7:]
    record = json.loads(path.read_text())
    record["manifest"] = base64.b64encode(b'{"schemaVersion":2,"n":9}').decode()
    path.write_text(json.dumps(record))  # another manifest's bytes under this one's name
    (kept._ref_dir(REF) / ("0" * 64)).write_text("not json")
    assert kept.load(REF) == [_resolution(1)]


def test_the_least_recently_resolved_tags_go_first(tmp_path):
    kept = Resolutions(tmp_path / "r", refs=2)
    for n in range(3):
        kept.save(f"registry.example:5000/app{n}:1", _resolution(n))
        os.utime(kept._ref_dir(f"registry.example:5000/app{n}:1"), (1000 + n, 1000 + n))
    kept.save("registry.example:5000/app3:1", _resolution(3))
    assert [kept.load(f"registry.example:5000/app{n}:1") != [] for n in range(4)] == [
        False,
        False,
        True,
        True,
    ]


def _image(diff_id: str) -> tuple[Resolution, bytes]:
    """A resolution of an image of one eStargz layer whose config names ``diff_id``, and
    that config's bytes."""
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": "sha256:" + "1" * 64,
                    "size": 1000,
                    "annotations": {
                        "containerd.io/snapshot/stargz/toc.digest": "sha256:" + "2" * 64
                    },
                }
            ],
        }
    ).encode()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    return Resolution(
        manifest, "application/vnd.oci.image.manifest.v1+json", digest, config
    ), config


def test_a_kept_config_that_is_not_the_manifests_is_left_out(tmp_path):
    """The config read back vouches for the layers' diff IDs (``info``'s ``diff-digest`` and
    ``expected-layer-diffid``): it is the one the manifest names, checked as the registry's
    was, or the resolution is left out. Only the manifest was checked: a config changed on
    disk gave its layers another diff ID."""
    import trio

    from store.remote import RemoteRegistry

    kept = Resolutions(tmp_path / "r")
    good, _ = _image("sha256:" + "3" * 64)
    kept.save(REF, good)
    registry = RemoteRegistry(None, resolutions=kept)  # type: ignore[arg-type]
    [(_, _, layers)] = trio.run(registry.remembered, REF)
    assert layers[0].diff_id == "sha256:" + "3" * 64
    path = kept._ref_dir(REF) / good.digest[7:]
    record = json.loads(path.read_text())
    other = json.dumps({"rootfs": {"type": "layers", "diff_ids": ["sha256:" + "4" * 64]}})
    record["config"] = base64.b64encode(other.encode()).decode()
    path.write_text(json.dumps(record))
    assert trio.run(registry.remembered, REF) == []


def test_a_kept_image_looked_up_by_several_layers_at_once_is_kept_once(tmp_path):
    """c/image looks an image's layers up in parallel. After a restart, each lookup of a layer
    the tag's current manifest lacks searched the kept resolutions (a thread's disk read)
    and added the one it found to the tag's superseded resolutions: five layers, five copies
    of one image, which pushed every other resolution the tag superseded out of the four
    kept (:data:`store.resolver.SUPERSEDED_KEPT`)."""
    import trio

    from store.cache import ChunkCache
    from store.config import StoreConfig
    from store.resolver import ImageInfo, LayerDesc, LayerManager, RegistryAccess

    def layers(first: int) -> list[LayerDesc]:  # none loads: no TOC annotation
        return [
            LayerDesc(f"sha256:{i:064x}", 10, {}, f"sha256:{i + 100:064x}")
            for i in range(first, first + 5)
        ]

    class Registry(RegistryAccess):
        async def image(self, ref, on_layers=None):
            return b'{"now":1}', b"{}", layers(50)

        async def remembered(self, ref):
            await trio.sleep(0.01)  # read from disk in a worker thread
            return [(b'{"before":1}', b"{}", layers(0))]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=5)
            manager = LayerManager(cfg, Registry(), ChunkCache(tmp_path / "c", 1 << 20), nursery)
            other = ImageInfo(REF, b'{"other":1}', b"{}", layers(20))
            manager._superseded[REF] = [other]  # a tag move the store saw while it ran
            deadline = trio.current_time() + 5
            async with trio.open_nursery() as lookups:
                for desc in layers(0):
                    lookups.start_soon(manager._image_naming, REF, desc.digest, deadline)
            kept = manager._superseded[REF]
            assert [i.manifest_bytes for i in kept] == [b'{"other":1}', b'{"before":1}']
            holders = [await manager._image_naming(REF, d.digest, deadline) for d in layers(0)]
            assert all(h is kept[1] for h in holders)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_write_a_crash_cut_short_is_removed_at_the_next_save(tmp_path):
    """A store that died between ``mkstemp`` and ``os.replace`` left a ``.tmp-`` file that
    stayed for good; the next save of the tag removes such files once they are old enough
    that no write can still be going on, and leaves a young one alone."""
    kept = Resolutions(tmp_path / "r")
    kept.save(REF, _resolution(0))
    ref_dir = kept._ref_dir(REF)
    old, young = ref_dir / ".tmp-crashed", ref_dir / ".tmp-writing"
    old.write_text('{"ref": "half')
    young.write_text('{"ref": "half')
    os.utime(old, (1000, 1000))
    kept.save(REF, _resolution(1))
    assert not old.exists() and young.exists()
    assert kept.load(REF)[0] == _resolution(1)
