"""zstd:chunked through the mounted store: layers written by skopeo (containers/image with
containers/storage 1.43, as ``podman push --compression-format zstd:chunked`` on podman 4.3)
and by our writer, a real docker-registry, podman 4.3 pulling through the store."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile

import pytest
import zstandard

from harness.podman import PodmanEnv
from store.estargz import BytesBlobSource, EstargzReader, zstd_chunked_layer
from tests.store.concurrent_pulls import pull_all
from tests.store.images import (
    Blob,
    add_file,
    add_node,
    busybox,
    full_blob_gets,
    make_tar,
    push,
    to_estargz,
    to_gzip,
    to_zstd_chunked_ours,
    to_zstd_chunked_skopeo,
    with_go_mode_bits,
)
from tests.store.test_e2e_podman import LISTING

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.store_ours_only(
        reason="the Go store v0.12 reads a zstd:chunked layer only with a stargz TOC-digest "
        "annotation; podman and skopeo write the zstd-chunked manifest checksum instead "
        "('digest of TOC JSON must be passed')"
    ),
    pytest.mark.skipif(
        shutil.which("podman") is None or shutil.which("skopeo") is None,
        reason="podman and skopeo are needed",
    ),
]


@pytest.fixture(scope="module")
def skopeo_layers(layers, tmp_path_factory) -> list[Blob]:
    """The two-layer image's tars as zstd:chunked, compressed by skopeo."""
    return to_zstd_chunked_skopeo(
        [layers["lower"], layers["upper"]], tmp_path_factory.mktemp("skopeo")
    )


def _saved_layer_digests(env: PodmanEnv, ref: str, path) -> list[str]:
    """``podman save`` as an oci-archive; the digests of its layers, decompressed (c/image
    recompresses them: gzip here)."""
    env.podman("save", "--format", "oci-archive", "-o", str(path), ref, timeout=300)
    with tarfile.open(path) as tar:

        def blob(digest: str) -> bytes:
            return tar.extractfile("blobs/sha256/" + digest.split(":")[1]).read()

        index = json.loads(tar.extractfile("index.json").read())
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        out = []
        for layer in manifest["layers"]:
            data = blob(layer["digest"])
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            elif data[:4] == b"\x28\xb5\x2f\xfd":
                reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
                data = reader.read()
            out.append("sha256:" + hashlib.sha256(data).hexdigest())
        return out


def _layer_bytes(registry, mark: int, blobs: list[Blob]) -> int:
    digests = {b.digest for b in blobs}
    return sum(r.bytes for r in registry.access_log_since(mark) if r.digest in digests)


def test_lazy_pull_of_skopeo_layers_matches_full_pull(
    registry, store_factory, tmp_path, skopeo_layers
):
    host = registry.host
    blobs = skopeo_layers
    assert all(zstd_chunked_layer(b.annotations).generation == "podman4" for b in blobs)
    push(host, "zstd/img", "1", blobs)
    ref = f"{host}/zstd/img:1"
    store = store_factory(
        "noprefetch = true\nno_background_fetch = true\nzstd_measure_diff_size = true\n"
    )

    mark = registry.log_mark()
    with PodmanEnv(
        tmp_path / "lazy", additional_layer_store=store.mnt, insecure_registries=[host]
    ) as env:
        env.pull(ref, timeout=120)
        assert full_blob_gets(registry, mark, blobs) == []
        assert env.run(ref, "/bin/cat", "/etc/hello", timeout=120).stdout == "hello from upper\n"
        lazy_listing = env.run(ref, "/bin/sh", "-c", LISTING, timeout=300).stdout
        assert full_blob_gets(registry, mark, blobs) == []
        assert len(store.status()["layers"]) == 2  # both layers came from the store
        # podman save reproduces the layers: the saved layers decompress to the diff IDs.
        # (oci-archive: podman 4.3 cannot write any image with zstd layers as a
        # docker-archive, "zstd compression is not supported for docker images".)
        assert _saved_layer_digests(env, ref, tmp_path / "saved.tar") == [b.diff_id for b in blobs]
        # And the blob file serves the original bytes.
        d = store.layer_dir(ref, blobs[0].digest)
        assert (d / "blob").read_bytes() == blobs[0].data
        info = json.loads((d / "info").read_text())
        assert info["compression"] == 4 and info["diff-digest"] == blobs[0].diff_id
        plain = zstandard.ZstdDecompressor().stream_reader(blobs[0].data, read_across_frames=True)
        assert info["diff-size"] == len(plain.read())

    with PodmanEnv(tmp_path / "full", insecure_registries=[host]) as env:
        env.pull(ref, timeout=120)
        full_listing = env.run(ref, "/bin/sh", "-c", LISTING, timeout=300).stdout
    assert "/opq/new|" in full_listing and "/data/a|" not in full_listing
    lazy_set, full_set = set(lazy_listing.splitlines()), set(full_listing.splitlines())
    assert lazy_set == full_set, (sorted(lazy_set - full_set), sorted(full_set - lazy_set))


def test_corrupted_chunk_gives_eio(registry, store_factory, skopeo_layers):
    host = registry.host
    blob = skopeo_layers[0]
    push(host, "zstdbad/img", "1", [blob])
    reader = EstargzReader(
        BytesBlobSource(blob.data), zstd_chunked=zstd_chunked_layer(blob.annotations)
    )
    chunk = reader.lookup("big").chunks[-1]
    path = registry.blob_path(blob.digest)
    data = bytearray(path.read_bytes())
    data[chunk.offset + chunk.compressed_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    store = store_factory("no_background_fetch = true\nnoprefetch = true\n")
    diff = store.layer_dir(f"{host}/zstdbad/img:1", blob.digest) / "diff"
    with pytest.raises(OSError) as exc:
        (diff / "big").read_bytes()
    assert exc.value.errno == errno.EIO
    assert (diff / "etc" / "hello").read_bytes() == b"hello from lower\n"
    assert "chunk verification failed" in store.log.read_text()


def test_toc_not_matching_its_checksum_is_refused_and_podman_falls_back(
    registry, store_factory, tmp_path, skopeo_layers
):
    host = registry.host
    lower = skopeo_layers[0]
    bad = Blob(
        lower.data, lower.diff_id, media_type=lower.media_type, annotations=dict(lower.annotations)
    )
    bad.annotations["io.containers.zstd-chunked.manifest-checksum"] = "sha256:" + "ab" * 32
    push(host, "zstdtoc/img", "1", [bad])
    ref = f"{host}/zstdtoc/img:1"
    store = store_factory("resolve_timeout_sec = 5\n")
    with pytest.raises(OSError) as exc:
        os.stat(store.layer_dir(ref, lower.digest) / "diff")
    assert exc.value.errno == errno.EIO
    assert "refusing layer" in store.log.read_text()
    with PodmanEnv(
        tmp_path / "env", additional_layer_store=store.mnt, insecure_registries=[host]
    ) as env:
        env.pull(ref, timeout=120)  # podman pulls the layer itself
        assert env.run(ref, "/bin/cat", "/etc/hello", timeout=60).stdout == "hello from lower\n"
    assert store.status()["layers"] == {}


def test_two_images_sharing_a_skopeo_layer_pulled_concurrently(
    registry, store_factory, tmp_path, layers, skopeo_layers
):
    host = registry.host
    other = to_zstd_chunked_skopeo(
        [layers["lower"], make_tar(lambda t: add_file(t, "etc/other", b"other\n"))],
        tmp_path / "other",
    )
    assert other[0].digest == skopeo_layers[0].digest  # skopeo compresses deterministically
    push(host, "zshare/one", "1", skopeo_layers)
    push(host, "zshare/two", "1", other)
    store = store_factory()
    refs = [f"{host}/zshare/one:1", f"{host}/zshare/two:1"]
    mark = registry.log_mark()
    with PodmanEnv(
        tmp_path / "env", additional_layer_store=store.mnt, insecure_registries=[host]
    ) as env:
        errors, _ = pull_all(env, refs)  # one at a time if podman 4.3 deadlocked
        assert errors == []
        assert env.run(refs[0], "/bin/cat", "/etc/hello", timeout=60).stdout == (
            "hello from upper\n"
        )
        assert env.run(refs[1], "/bin/cat", "/etc/other", timeout=60).stdout == "other\n"
        assert full_blob_gets(registry, mark, [*skopeo_layers, *other]) == []


def test_our_writer_is_accepted_by_podman_partial_pull_and_by_the_store(
    registry, store_factory, tmp_path, layers
):
    """Our writer's podman-4.3 layout goes through podman's own partial pull (every layer
    "Retrieved partial blob", no whole-blob GET), and through the store."""
    host = registry.host
    blobs = [
        to_zstd_chunked_ours(layers["lower"], prioritized_files=["etc/hello", "bin/busybox"]),
        to_zstd_chunked_ours(layers["upper"]),
    ]
    push(host, "zours/img", "1", blobs)
    ref = f"{host}/zours/img:1"
    mark = registry.log_mark()
    with PodmanEnv(tmp_path / "partial", insecure_registries=[host], partial_pulls=True) as env:
        log = env.podman("--log-level", "debug", "pull", ref, timeout=120).stderr
        assert log.count("Retrieved partial blob") == len(blobs), log[-3000:]
        assert env.run(ref, "/bin/cat", "/etc/hello", timeout=60).stdout == "hello from upper\n"
    assert full_blob_gets(registry, mark, blobs) == []
    store = store_factory()
    with PodmanEnv(
        tmp_path / "lazy", additional_layer_store=store.mnt, insecure_registries=[host]
    ) as env:
        env.pull(ref, timeout=120)
        assert env.run(ref, "/bin/cat", "/etc/hello", timeout=60).stdout == "hello from upper\n"
        assert len(store.status()["layers"]) == 2


def _trixie() -> object:
    """The podman 5.4 runtime node (built on first use, cached)."""
    from harness.runtimes import NodeError, build_node

    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap not installed (ci/install-system-deps)")
    try:
        return build_node("trixie")
    except NodeError as exc:
        pytest.fail(f"building runtime node trixie: {exc}")


def _as_buildah_writes_it(tar: tarfile.TarFile) -> None:
    """What Go-written layer tars carry and Python's tarfile never writes on its own: a
    whiteout file with a linkname left over from an earlier header (containers/storage),
    PAX atime/ctime records, a file at the epoch (``--timestamp 0``); the file-type bits
    in the modes come from :func:`with_go_mode_bits`."""
    add_node(tar, "t", tarfile.DIRTYPE)
    add_file(tar, "t/.wh.gone", b"", linkname="t/dir2/sub")
    add_file(
        tar, "t/times", b"times\n", pax_headers={"atime": "1700000000.5", "ctime": "1700000001"}
    )
    add_file(tar, "t/epoch", b"epoch\n", mtime=0)
    add_file(tar, "etc/hello", b"hello from upper\n")


def test_podman_5_partial_pull_takes_our_writer_s_layers_of_go_written_tars(
    registry, tmp_path, layers
):
    """A tar as Go writes it (buildah, ``podman save``; :func:`_as_buildah_writes_it`)
    through our writer's podman 5 layout: podman 5.4 checks every TOC field against the
    tar-split before its partial pull (a mismatch fails the pull), every layer is "Retrieved
    partial blob", and the file at the epoch keeps its time."""
    node = _trixie()
    tars = [with_go_mode_bits(layers["lower"]), with_go_mode_bits(make_tar(_as_buildah_writes_it))]
    with tarfile.open(fileobj=io.BytesIO(tars[1])) as t:  # what the layer is made of
        assert t.getmember("t").mode == 0o40755
        assert t.getmember("t/.wh.gone").linkname == "t/dir2/sub"
        assert t.getmember("t/times").pax_headers["atime"] == "1700000000.5"
    blobs = [to_zstd_chunked_ours(tar, generation="podman5") for tar in tars]
    host = registry.host
    push(host, "zgo/img", "1", blobs)
    ref = f"{host}/zgo/img:1"
    mark = registry.log_mark()
    with PodmanEnv(
        tmp_path / "p5", insecure_registries=[host], partial_pulls=True, node=node
    ) as env:
        log = env.podman("--log-level", "debug", "pull", ref, timeout=180).stderr
        assert log.count("Retrieved partial blob") == len(blobs), log[-3000:]
        out = env.run(ref, "/bin/stat", "-c", "%n %Y", "/t/epoch", "/t/times", timeout=120).stdout
        assert out.split("\n")[:2] == ["/t/epoch 0", "/t/times 1700000000"], out
        assert env.run(ref, "/bin/cat", "/etc/hello", timeout=120).stdout == "hello from upper\n"
    assert full_blob_gets(registry, mark, blobs) == []


def test_new_protocol_by_manifest_checksum_podman5_layout(registry, store_factory, layers):
    """podman ≥ 5.1 looks a zstd:chunked layer up by ``io.github.containers.zstd-chunked.
    manifest-checksum`` (its TOC digest); podman 5's layout made by our writer."""
    host = registry.host
    blob = to_zstd_chunked_ours(layers["lower"], generation="podman5")
    push(host, "z5/img", "1", [blob])
    ref = f"{host}/z5/img:1"
    store = store_factory()
    d = store.layer_dir(ref, blob.toc_digest)
    info = json.loads((d / "info").read_text())
    assert info == {
        "diff-size": -1,
        "compression": 4,
        "toc-digest": blob.toc_digest,
        "flags": {"expected-layer-diffid": blob.diff_id},
    }
    assert (d / "diff" / "etc" / "hello").read_bytes() == b"hello from lower\n"
    assert (d / "diff" / "big").read_bytes()[:1000] == layers["big"][:1000]
    with open(d / "blob", "rb") as f:
        assert f.read() == blob.data


def test_bytes_fetched_per_format(registry, store_factory, tmp_path, layers, skopeo_layers):
    """Bytes the registry served for the same two-layer image pulled and run (cat one small
    file): zstd:chunked and eStargz through the store, and the full gzip pull. Recorded in
    the test's output; asserted only loosely (lazy fetches less than the whole)."""
    host = registry.host
    images = {
        "zstd-chunked-lazy": skopeo_layers,
        "estargz-noopt": [to_estargz(layers["lower"]), to_estargz(layers["upper"])],
        "legacy": [to_gzip(layers["lower"]), to_gzip(layers["upper"])],
    }
    fetched = {}
    for i, (mode, blobs) in enumerate(images.items()):
        push(host, f"bytes/{i}", "1", blobs)
        ref = f"{host}/bytes/{i}:1"
        lazy = mode != "legacy"
        store = (
            store_factory("noprefetch = true\nno_background_fetch = true\n", name=f"s{i}")
            if lazy
            else None
        )
        mark = registry.log_mark()
        with PodmanEnv(
            tmp_path / f"env{i}",
            additional_layer_store=store.mnt if store else None,
            insecure_registries=[host],
        ) as env:
            env.pull(ref, timeout=120)
            assert env.run(ref, "/bin/cat", "/etc/hello", timeout=60).stdout == "hello from upper\n"
        fetched[mode] = (_layer_bytes(registry, mark, blobs), sum(len(b.data) for b in blobs))
        if store is not None:
            store.stop()
    print("bytes fetched (fetched, image size):", json.dumps(fetched))
    for mode in ("zstd-chunked-lazy", "estargz-noopt"):
        assert fetched[mode][0] < fetched[mode][1]


def test_podman_5_pulls_its_own_zstd_chunked_image_lazily_by_toc_digest(
    registry, store_factory, tmp_path
):
    """podman 5.4 (Debian trixie, containers/storage 1.57) looks a zstd:chunked layer up by its
    TOC digest — the ``io.github.containers.zstd-chunked.manifest-checksum`` its own skopeo
    wrote into the image — and the store serves it lazily: no whole-layer GET, the container
    runs, every layer counted by the store."""
    from harness.images import TINY_OUTPUT, build_layers, find_recipe, push_image
    from store.estargz import MANIFEST_CHECKSUM_KEY

    node = _trixie()
    built = build_layers(find_recipe("tiny"), None)
    pushed = push_image(built, registry.host, "tiny5", "z", "zstd-chunked", node=node)
    checksums = {x.annotations[MANIFEST_CHECKSUM_KEY] for x in pushed.layers}
    assert all(zstd_chunked_layer(x.annotations).generation == "podman5" for x in pushed.layers)
    store = store_factory("noprefetch = true\nno_background_fetch = true\n")
    ref = f"{registry.host}/tiny5:z"
    mark = registry.log_mark()
    with PodmanEnv(
        tmp_path / "p5",
        additional_layer_store=store.mnt,
        insecure_registries=[registry.host],
        node=node,
    ) as env:
        env.pull(ref, timeout=180)
        assert env.run(ref, timeout=120).stdout.strip() == TINY_OUTPUT
        assert set(store.status()["layers"]) == {f"{ref}/{x.digest}" for x in pushed.layers}
    assert full_blob_gets(registry, mark, pushed.layers) == []
    log = store.log.read_text()
    assert all(f"{ref}/{checksum} in use" in log for checksum in checksums), log[-3000:]


def _with_toc_edited(blob: Blob, edit) -> Blob:
    """``blob`` (podman 5's layout) with its TOC decoded, changed by ``edit`` and written
    again, its annotations to match: a TOC the manifest checksum vouches for, disagreeing
    with the tar (and the tar-split) it came with."""
    from store.estargz import zstdchunked as Z

    pos = Z.ManifestPosition.parse(blob.annotations[Z.MANIFEST_POSITION_KEY])
    offset, length, usize = (int(v) for v in blob.annotations[Z.TARSPLIT_POSITION_KEY].split(":"))
    toc = json.loads(zstandard.ZstdDecompressor().decompress(blob.data[pos.offset :][: pos.length]))
    edit(toc)
    raw = json.dumps(toc, separators=(",", ":")).encode()
    compressed = zstandard.ZstdCompressor(level=19).compress(raw)
    head = blob.data[: pos.offset - 8]
    new_pos = Z.ManifestPosition(len(head) + 8, len(compressed), len(raw))
    split = (new_pos.offset + len(compressed) + 8, length, usize)
    data = (
        head
        + Z.skippable_frame(compressed)
        + blob.data[offset - 8 : offset + length]
        + Z.footer_bytes(new_pos, split)
    )
    annotations = {
        Z.MANIFEST_CHECKSUM_KEY: Z.manifest_checksum(compressed),
        Z.MANIFEST_POSITION_KEY: str(new_pos),
        Z.TARSPLIT_POSITION_KEY: ":".join(map(str, split)),
    }
    return Blob(
        data,
        blob.diff_id,
        annotations[Z.MANIFEST_CHECKSUM_KEY],
        media_type=blob.media_type,
        annotations=annotations,
    )


def test_a_toc_that_disagrees_with_its_tar_split_is_refused(
    registry, store_factory, tmp_path, podman_env
):
    """A TOC giving a file a setuid bit its tar header (and tar-split) does not have: the
    store served it with the bit (4755) where a normal pull of the layer gives 755.
    containers/storage refuses such a TOC for its own partial pull ("tar-split and TOC data is
    inconsistent"); the store refuses the layer, naming it, and podman pulls it normally."""
    tar = make_tar(lambda t: (busybox(t), add_file(t, "f", b"hello\n", 0o755)))
    blob = to_zstd_chunked_ours(tar, generation="podman5")

    def setuid(toc: dict) -> None:
        next(e for e in toc["entries"] if e["name"] == "f")["mode"] = 0o4755

    bad = _with_toc_edited(blob, setuid)
    host = registry.host
    push(host, "split/img", "1", [bad])
    ref = f"{host}/split/img:1"
    store = store_factory("noprefetch = true\nno_background_fetch = true\n")
    with podman_env(
        tmp_path / "lazy", additional_layer_store=store.mnt, insecure_registries=[host]
    ) as env:
        env.pull(ref, timeout=120)
        assert env.run(ref, "/bin/stat", "-c", "%a", "/f", timeout=60).stdout == "755\n"
        assert store.status()["layers"] == {}  # pulled normally
    log = store.log.read_text()
    assert f"refusing layer {bad.digest}" in log
    assert "'f' does not match the layer's tar-split: mode 4755, the tar's 755" in log


def test_a_layer_within_the_toc_caps_is_served_whatever_its_tar_split_s_size(
    registry, store_factory
):
    """A podman 5 layout's tar-split takes ~800 bytes a file where its TOC takes ~80: held to
    ``toc_max_bytes`` like the TOC, a layer of ~340,000 files (a 30 MB TOC, a third of the
    default ``toc_max_entries``) was refused ("tar-split: inflates past 268435456 bytes").
    Scaled down: a layer at ``toc_max_entries`` whose TOC is half of ``toc_max_bytes`` and
    its tar-split four times it is served; one entry more is refused, naming the limit."""
    cap_bytes = 400_000

    def layer(files: int) -> Blob:
        def add(tar: tarfile.TarFile) -> None:
            for i in range(files):
                add_file(tar, f"f{i:05d}")

        return to_zstd_chunked_ours(make_tar(add), generation="podman5")

    at_cap = layer(2000)
    pos = zstd_chunked_layer(at_cap.annotations).position
    toc = zstandard.ZstdDecompressor().decompress(
        at_cap.data[pos.offset : pos.offset + pos.length], max_output_size=cap_bytes
    )
    assert len(json.loads(toc)["entries"]) == 2000 and len(toc) < cap_bytes // 2
    host = registry.host
    push(host, "cap/at", "1", [at_cap])
    push(host, "cap/over", "1", [over := layer(2001)])
    store = store_factory(f"toc_max_entries = 2000\ntoc_max_bytes = {cap_bytes}\n")
    diff = store.layer_dir(f"{host}/cap/at:1", at_cap.digest) / "diff"
    assert len(os.listdir(diff)) == 2000
    with pytest.raises(OSError) as refused:
        os.stat(store.layer_dir(f"{host}/cap/over:1", over.digest) / "diff")
    assert refused.value.errno == errno.EIO
    assert "more than 2000 entries (the limit on TOC entries: store config toc_max_entries)" in (
        store.log.read_text()
    )
