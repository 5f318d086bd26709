"""The store's data path over a zstd:chunked layer skopeo wrote (containers/storage 1.43) and
one our writer made in podman 5's layout: found by annotations, verified, served."""

from __future__ import annotations

import hashlib
import io
import json
import stat
from pathlib import Path

import pytest
import zstandard

from store import estargz
from store.cache import ChunkCache
from store.estargz_view import TocError, TocMismatchError, load_layer_index, measure_tar_size
from store.layer import ChunkVerifyError, Layer
from store.resolver import LayerDesc
from store.tree import LayerTree
from tests.store.conftest import FileBlob

DATA = Path(__file__).parents[1] / "estargz" / "data"
META = json.loads((DATA / "zstd-chunked-skopeo19.json").read_text())
# skopeo 1.9 → podman 4.3's writer; skopeo 1.18 (Debian trixie) → podman 5's writer.
WRITERS = ["zstd-chunked-skopeo19", "zstd-chunked-skopeo118"]


async def _open(blob: FileBlob, annotations: dict[str, str], tmp_path: Path) -> Layer:
    desc = LayerDesc("sha256:x", blob.size, annotations, "sha256:y")
    assert desc.zstd_chunked is not None and desc.compression == estargz.ZSTD_COMPRESSION
    index = await load_layer_index(blob, desc.toc_digest, zstd_chunked=desc.zstd_chunked)
    return Layer(
        key="k",
        digest=desc.digest,
        toc_digest=desc.toc_digest,
        tree=LayerTree(index.index),
        index=index,
        blob=blob,
        cache=ChunkCache(tmp_path / "cache", 1 << 30),
    )


@pytest.mark.anyio
@pytest.mark.parametrize("writer", WRITERS)
async def test_skopeo_layer_tree_and_contents(tmp_path, writer):
    meta = json.loads((DATA / f"{writer}.json").read_text())
    blob = FileBlob(DATA / f"{writer}.blob")
    layer = await _open(blob, meta["descriptor"]["annotations"], tmp_path)
    zc = estargz.zstd_chunked_layer(meta["descriptor"]["annotations"])
    start, end = zc.toc_range
    if zc.tar_split is not None:  # podman 5's: the tar-split it is checked against follows
        assert zc.tar_split[0] == end + 8
        end = zc.tar_split[0] + zc.tar_split[1]
    assert blob.requests == [[(start, end)]]  # in one read, where the annotations say
    # On demand (podman 4.3's info): the header frames' sizes give the tar's exact length.
    plain = zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(blob.data), read_across_frames=True
    )
    assert await measure_tar_size(layer.index, blob) == len(plain.read())
    assert len(blob.requests) <= 3  # frame headers, then frames that do not say their size
    assert await measure_tar_size(layer.index, blob) == layer.index.uncompressed_size  # once
    assert len(blob.requests) <= 3
    nodes = dict(layer.tree.walk())
    for path, digest in meta["files"].items():
        if path.rsplit("/", 1)[-1].startswith(".wh."):
            continue
        node = nodes[path]
        data = await layer.read_file(node, 0, node.size + 1)
        assert hashlib.sha256(data).hexdigest() == digest, path
    assert stat.S_ISCHR(nodes["etc/gone"].mode)  # the whiteout, as overlay wants it
    assert stat.S_ISFIFO(nodes["var/fifo"].mode) and stat.S_ISLNK(nodes["usr/bin/tool-link"].mode)
    assert nodes["etc/hello.txt"] == nodes["etc/hello-hard.txt"]
    assert stat.S_IMODE(nodes["var/empty"].mode) == 0o1777


@pytest.mark.anyio
async def test_corrupt_chunk_and_wrong_checksum_are_refused(tmp_path):
    annotations = META["descriptor"]["annotations"]
    blob = FileBlob(DATA / "zstd-chunked-skopeo19.blob")
    layer = await _open(blob, annotations, tmp_path)
    tool = dict(layer.tree.walk())["usr/bin/tool"]
    chunk = layer.index.chunks_of(tool.entry)[0]
    data = bytearray(blob.data)
    data[(chunk.compressed_offset + chunk.compressed_end) // 2] ^= 0xFF
    blob.data = bytes(data)
    with pytest.raises(ChunkVerifyError):
        await layer.read_file(tool, 0, 10)
    assert chunk.digest not in layer.cache

    wrong = dict(annotations)
    wrong[estargz.LEGACY_MANIFEST_CHECKSUM_KEY] = "sha256:" + "1" * 64
    with pytest.raises(TocMismatchError):
        await _open(FileBlob(DATA / "zstd-chunked-skopeo19.blob"), wrong, tmp_path / "w")


@pytest.mark.anyio
async def test_podman5_layout_from_our_writer(tmp_path):
    """podman 5's layout (tar-split frame, 64-byte footer, ``io.github.`` keys), made by our
    writer: the layer is looked up by its checksum, which is also its ``toc_digest``."""
    buf = io.BytesIO()
    import tarfile

    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in [("bin/a", b"A" * 300000), ("b", b"bee\n")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            tar.addfile(ti, io.BytesIO(payload))
    out = io.BytesIO()
    res = estargz.write_zstd_chunked(
        io.BytesIO(buf.getvalue()), out, generation="podman5", chunk_size=65536
    )
    assert estargz.MANIFEST_CHECKSUM_KEY in res.annotations
    path = tmp_path / "blob"
    path.write_bytes(out.getvalue())
    desc = LayerDesc("sha256:x", len(out.getvalue()), res.annotations, res.diff_id)
    assert desc.toc_digest == res.toc_digest
    layer = await _open(FileBlob(path), res.annotations, tmp_path)
    nodes = dict(layer.tree.walk())
    assert await layer.read_file(nodes["bin/a"], 299990, 100) == b"A" * 10
    assert len(layer.index.chunks_of(nodes["bin/a"].entry)) == 5


@pytest.mark.anyio
async def test_toc_past_the_blob_is_a_toc_error(tmp_path):
    annotations = dict(META["descriptor"]["annotations"])
    annotations[estargz.LEGACY_MANIFEST_POSITION_KEY] = "999999:757:3351:1"
    with pytest.raises(TocError, match="past the blob"):
        await _open(FileBlob(DATA / "zstd-chunked-skopeo19.blob"), annotations, tmp_path)


@pytest.mark.anyio
async def test_stargz_snapshotter_zstdchunked_vector_through_its_footer(vectors_dir, tmp_path):
    """stargz-snapshotter's zstdchunked writer: eStargz's TOC digest annotation (sha256 of
    the TOC JSON), the TOC found through the 48-byte footer; served like eStargz."""
    meta = json.loads((vectors_dir / "zstdchunked.json").read_text())
    blob = FileBlob(vectors_dir / "zstdchunked.blob")
    index = await load_layer_index(blob, meta["toc_digest"])
    assert index.index.compression == "zstd"
    layer = Layer(
        key="k",
        digest=meta["digest"],
        toc_digest=meta["toc_digest"],
        tree=LayerTree(index.index),
        index=index,
        blob=blob,
        cache=ChunkCache(tmp_path / "cache", 1 << 30),
    )
    reader = estargz.EstargzReader(estargz.BytesBlobSource(blob.data), meta["toc_digest"])
    checked = 0
    for path, node in layer.tree.walk():
        if stat.S_ISREG(node.mode) and node.size:
            data = await layer.read_file(node, 0, node.size)
            assert data == reader.read_file(path), path
            checked += 1
    assert checked


def test_layer_descriptor_toc_digest_rules():
    """Which value a layer is looked up by (containers/storage ``toc.GetTOCDigest``)."""
    z4 = META["descriptor"]["annotations"]
    checksum = z4[estargz.LEGACY_MANIFEST_CHECKSUM_KEY]
    assert LayerDesc("d", 1, dict(z4), "i").toc_digest == checksum
    z5 = {
        estargz.MANIFEST_CHECKSUM_KEY: checksum,
        estargz.MANIFEST_POSITION_KEY: z4[estargz.LEGACY_MANIFEST_POSITION_KEY],
    }
    assert LayerDesc("d", 1, z5, "i").toc_digest == checksum
    both = {**z5, estargz.TOC_DIGEST_ANNOTATION: "sha256:" + "2" * 64}
    assert LayerDesc("d", 1, both, "i").toc_digest is None  # refused, as c/storage does
    bad = {estargz.MANIFEST_CHECKSUM_KEY: checksum, estargz.MANIFEST_POSITION_KEY: "x"}
    assert LayerDesc("d", 1, bad, "i").toc_digest is None
    assert (
        LayerDesc("d", 1, {}, "i", "application/vnd.oci.image.layer.v1.tar+zstd").compression == 4
    )
    assert LayerDesc("d", 1, {}, "i").compression == 2


@pytest.mark.anyio
@pytest.mark.parametrize("writer", WRITERS)
async def test_unsized_header_frames_past_the_cap_are_refused_unread(tmp_path, writer, monkeypatch):
    # A TOC may leave any gap between two files; a frame that does not say its size is read
    # and inflated to count it, so those frames' bytes are capped (a hostile gap held GBs).
    import store.estargz_view

    meta = json.loads((DATA / f"{writer}.json").read_text())
    blob = FileBlob(DATA / f"{writer}.blob")
    layer = await _open(blob, meta["descriptor"]["annotations"], tmp_path)
    await measure_tar_size(layer.index, blob)
    unsized_reads = len(blob.requests) - 2  # the TOC, the frame headers
    if unsized_reads == 0:
        pytest.skip(f"{writer}: every header frame says its size")
    blob = FileBlob(DATA / f"{writer}.blob")
    layer = await _open(blob, meta["descriptor"]["annotations"], tmp_path)
    monkeypatch.setattr(store.estargz_view, "MEASURE_UNSIZED_MAX", 1)
    with pytest.raises(
        estargz.InvalidToc, match=r"without a content size hold \d+ bytes, over the 1"
    ):
        await measure_tar_size(layer.index, blob)
    assert len(blob.requests) == 2  # nothing of them read


@pytest.mark.anyio
async def test_a_skippable_frame_between_files_adds_nothing_to_the_tar_size(tmp_path):
    """A skippable frame's header holds its payload's length where a frame's holds its content
    size: read as one, a skippable frame between two files (plain zstd decoders skip it, so
    the tar has none of it) counted its 1,000 bytes into ``diff-size``."""
    Z = estargz.zstdchunked
    cctx = zstandard.ZstdCompressor()
    p1, p2 = b"one" * 100, b"two" * 200
    pieces = [
        cctx.compress(b"H" * 512),
        cctx.compress(p1),
        Z.skippable_frame(b"x" * 1000) + cctx.compress(b"I" * 1024),
        cctx.compress(p2),
        cctx.compress(bytes(1024)),
    ]
    starts = [sum(map(len, pieces[:i])) for i in range(len(pieces) + 1)]
    entries = [
        {"type": "reg", "name": name, "size": len(p), "offset": starts[i],
         "endOffset": starts[i + 1], "digest": "sha256:" + hashlib.sha256(p).hexdigest()}
        for name, p, i in (("a", p1, 1), ("b", p2, 3))
    ]  # fmt: skip
    raw = json.dumps({"version": 1, "entries": entries}).encode()
    compressed = cctx.compress(raw)
    position = estargz.ManifestPosition(starts[-1] + 8, len(compressed), len(raw))
    blob = b"".join(pieces) + Z.skippable_frame(compressed)
    ann = {Z.MANIFEST_CHECKSUM_KEY: Z.manifest_checksum(compressed)}
    ann[Z.MANIFEST_POSITION_KEY] = str(position)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    fb = FileBlob(path)
    layer = await _open(fb, ann, tmp_path)
    assert await layer.read_file(layer.tree.lookup_path("b"), 0, len(p2)) == p2
    tar = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True).read()
    assert len(tar) == 512 + len(p1) + 1024 + len(p2) + 1024
    assert await measure_tar_size(layer.index, fb) == len(tar)


def test_the_toc_and_its_tar_split_are_read_in_one_range_when_close() -> None:
    """The ranges the TOC fetch reads (and the timeline counts: it counted the TOC's alone)."""
    from store.estargz_view import _TAR_SPLIT_GAP, _toc_reads

    assert _toc_reads((100, 200), None) == [(100, 200)]
    assert _toc_reads((100, 200), (200, 300)) == [(100, 300)]
    far = 300 + _TAR_SPLIT_GAP + 1
    assert _toc_reads((100, 200), (far, far + 50)) == [(100, 200), (far, far + 50)]
