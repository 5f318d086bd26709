"""Hostile layers within bounds: inflation, compressed spans, position annotations, device
numbers and chunk sizes a TOC can lie about, each without podman or a registry."""

from __future__ import annotations

import errno
import hashlib
import json
import random
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from store import estargz as E
from store.estargz import zstdchunked as Z
from store.estargz_view import load_layer_index
from tests.store.conftest import FileBlob, view_layer


def _zstd_layer(
    payloads: list[bytes], entries: list[dict], toc_compressed: bytes | None = None
) -> tuple[bytes, dict[str, str]]:
    """A podman 5 style zstd:chunked blob: ``payloads`` as one zstd frame each (entries may
    name their offsets via ``{"frame": i}``), then the TOC in a skippable frame."""
    cctx = zstandard.ZstdCompressor()
    blob = b""
    starts = []
    for p in payloads:
        starts.append(len(blob))
        blob += cctx.compress(p)
    for e in entries:
        if "frame" in e:
            i = e.pop("frame")
            e["offset"] = starts[i]
            e["endOffset"] = starts[i + 1] if i + 1 < len(starts) else len(blob)
    toc = json.dumps({"version": 1, "entries": entries}).encode()
    compressed = toc_compressed if toc_compressed is not None else cctx.compress(toc)
    position = Z.ManifestPosition(len(blob) + 8, len(compressed), len(toc))
    blob += Z.skippable_frame(compressed) + Z.footer_bytes(position, (0, 0, 0))
    return blob, {
        Z.MANIFEST_CHECKSUM_KEY: Z.manifest_checksum(compressed),
        Z.MANIFEST_POSITION_KEY: str(position),
    }


async def _load(tmp_path: Path, blob: bytes, annotations: dict[str, str]):
    path = tmp_path / "blob"
    path.write_bytes(blob)
    fb = FileBlob(path)
    layer = E.zstd_chunked_layer(annotations)
    view = await load_layer_index(fb, layer.checksum, zstd_chunked=layer)
    return view, fb


# -- innerOffset is not bounded: one small read inflates gigabytes -------------------------


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def test_inner_offset_past_the_chunk_limit_is_refused():
    """A chunk is inflated up to ``innerOffset + size`` bytes (store/estargz/chunk.py): a
    10-byte file at innerOffset 1 TiB passes the index, whose only cap is on ``size``."""
    entry = {
        "name": "f",
        "type": "reg",
        "size": 10,
        "offset": 0,
        "innerOffset": 1 << 40,
        "chunkDigest": _sha(b"x" * 10),
    }
    with pytest.raises(E.InvalidToc, match="chunk"):
        E.LayerIndex.from_entries([entry], toc_offset=1000, compression="gzip")


def test_inner_offset_makes_decompress_inflate_past_the_chunk_limit():
    """The memory it costs: a 10-byte chunk at innerOffset 48 MiB allocates 48 MiB when read
    (past a 1 MiB ``chunk_max_bytes``), from a frame of a few KB."""
    limits = E.TocLimits(max_chunk_bytes=1 << 20)
    bomb = zstandard.ZstdCompressor().compress(bytes(48 << 20))
    entry = {
        "name": "f",
        "type": "reg",
        "size": 10,
        "offset": 0,
        "innerOffset": 48 << 20,
        "chunkDigest": _sha(b"\0" * 10),
    }
    try:
        idx = E.LayerIndex.from_entries(
            [entry], toc_offset=len(bomb), compression="zstd", limits=limits
        )
    except E.InvalidToc:
        return  # refused at load: what the limit promises
    (chunk,) = idx.all_chunks()
    tracemalloc.start()
    try:
        with pytest.raises(E.CorruptChunk):  # inflated 48 MiB, then found 0 bytes of payload
            E.decompress_chunk(chunk, bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * limits.max_chunk_bytes, f"inflated {peak >> 20} MiB for a 10-byte chunk"


# -- malformed position annotations raise ValueError, not InvalidToc ------------------------


@pytest.mark.parametrize(
    "key,value",
    [
        (Z.MANIFEST_POSITION_KEY, "8:10:10:\u00b2"),  # isdigit() but not int()
        (Z.MANIFEST_POSITION_KEY, "1" * 5000 + ":10:10:1"),  # past int()'s digit limit
        (Z.TARSPLIT_POSITION_KEY, "1:2:\u00b3"),
    ],
)
def test_malformed_position_annotation_is_invalid_toc(key, value):
    """``from_annotations`` promises :class:`InvalidToc`; LayerDesc.zstd_chunked catches only
    EstargzError, so a ValueError escapes ``LayerDesc.toc_digest`` and fails the whole
    image's resolution (every layer, the valid ones included)."""
    from store.resolver import LayerDesc

    ann = {Z.MANIFEST_CHECKSUM_KEY: "sha256:" + "a" * 64, Z.MANIFEST_POSITION_KEY: "8:10:10:1"}
    ann[key] = value
    with pytest.raises(E.InvalidToc):
        Z.from_annotations(ann)
    assert LayerDesc("sha256:x", 10, ann, "sha256:y").toc_digest is None


@pytest.mark.parametrize(
    "key,value",
    [
        (Z.MANIFEST_CHECKSUM_KEY, 5),
        (Z.MANIFEST_POSITION_KEY, 8),
        (Z.TARSPLIT_POSITION_KEY, ["1:2:3"]),
    ],
)
def test_an_annotation_that_is_not_a_string_is_invalid_toc(key, value):
    """Annotations are strings (OCI image-spec); a number or a list raised AttributeError
    from ``from_annotations``, which escaped ``LayerDesc.toc_digest`` as above."""
    from store.resolver import LayerDesc

    ann = {Z.MANIFEST_CHECKSUM_KEY: "sha256:" + "a" * 64, Z.MANIFEST_POSITION_KEY: "8:10:10:1"}
    ann[key] = value
    with pytest.raises(E.InvalidToc, match="not a string"):
        Z.from_annotations(ann)
    assert LayerDesc("sha256:x", 10, ann, "sha256:y").toc_digest is None


def _image_manifest(layers: list) -> object:
    from store.registry.manifest import OCI_MANIFEST, parse_manifest

    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2}
    obj = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config | {"digest": "sha256:" + "c" * 64},
        "layers": layers,
    }
    return parse_manifest(json.dumps(obj).encode(), None, "sha256:" + "e" * 64)


def test_a_manifest_annotation_that_is_not_a_string_refuses_the_image():
    """Annotations are a string map (OCI image-spec annotations.md). containers/image decodes
    the manifest into Go's ``map[string]string`` and fails on a number, so the runtime never
    looks one of the image's layers up: the manifest parser refuses it, naming the field."""
    from store.registry import ManifestError

    bad = {"containerd.io/snapshot/stargz/toc.digest": 5, "x": "y"}
    with pytest.raises(ManifestError, match=r'layers\[1\]\.annotations\["containerd.io/'):
        _image_manifest(
            [
                {"digest": "sha256:" + "1" * 64, "size": 10},
                {"digest": "sha256:" + "3" * 64, "size": 10, "annotations": bad},
            ]
        )


@pytest.mark.parametrize(
    "config,message",
    [
        ({"rootfs": "x"}, 'config sha256:c{64}: rootfs: expected an object, got "x"'),
        ({"rootfs": {"diff_ids": [5]}}, r"config sha256:c{64}: rootfs\.diff_ids\[0\]: .* got 5"),
        ({"rootfs": {"diff_ids": []}}, r"manifest has 1 layers but config sha256:c{64} has 0"),
        ({}, r"manifest has 1 layers but config sha256:c{64} has 0 rootfs\.diff_ids"),
    ],
)
def test_a_config_that_does_not_pair_with_the_layers_names_the_image(config, message):
    from store.resolver import ResolveError, layer_descs

    manifest = _image_manifest([{"digest": "sha256:" + "1" * 64, "size": 10}])
    with pytest.raises(ResolveError, match=r"^reg\.example/img:1: " + message):
        layer_descs("reg.example/img:1", manifest, config)


def test_layer_descs_pair_layers_with_diff_ids():
    from store.resolver import layer_descs

    toc = {"containerd.io/snapshot/stargz/toc.digest": "sha256:" + "2" * 64}
    manifest = _image_manifest([{"digest": "sha256:" + "1" * 64, "size": 10, "annotations": toc}])
    (desc,) = layer_descs("r/x:1", manifest, {"rootfs": {"diff_ids": ["sha256:" + "d" * 64]}})
    assert (desc.digest, desc.size, desc.diff_id) == (
        "sha256:" + "1" * 64,
        10,
        "sha256:" + "d" * 64,
    )
    assert desc.toc_digest == "sha256:" + "2" * 64


def _rle_frame(blocks: int) -> bytes:
    """A zstd frame of ``blocks`` RLE blocks of 128 KiB each: 4 bytes apiece (RFC 8878)."""
    import struct

    out = b"\x28\xb5\x2f\xfd" + bytes([0x00, 0x38])  # magic; no content size; 128 KiB window
    for i in range(blocks):
        header = (1 if i == blocks - 1 else 0) | (1 << 1) | ((128 << 10) << 3)
        out += struct.pack("<I", header)[:3] + b"\0"
    return out


def test_inflate_bounded_refuses_a_bomb_without_inflating_it():
    """``inflate_bounded`` checked its limit after each 64 KiB slice was inflated: a slice of
    RLE blocks inflated to 2 GiB first (4 GiB of peak memory from a 64 KiB frame)."""
    frame = _rle_frame(16384)  # 2 GiB from 64 KiB
    limit = 5 << 20
    tracemalloc.start()
    try:
        with pytest.raises(E.InvalidToc, match="inflates past"):
            Z.inflate_bounded(frame, limit, "header frame")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * limit, f"{peak >> 20} MiB"
    # What it must still do: frames one after another, within the limit; a cut frame refused.
    good = zstandard.ZstdCompressor().compress(b"a" * 100_000) + _rle_frame(2)
    assert Z.inflate_bounded(good, limit, "x") == b"a" * 100_000 + bytes(256 << 10)
    with pytest.raises(E.InvalidToc, match="truncated"):
        Z.inflate_bounded(good[:-3], limit, "x")


# -- a device number past a C int escapes a FUSE handler ---------------------------------


@pytest.mark.anyio
async def test_big_device_numbers_do_not_escape_readdir(tmp_path):
    """devMajor/devMinor are accepted up to 2**32-1, but ``os.makedev`` takes C ints: the
    node's ``rdev`` raises OverflowError, and ``StoreOperations.readdir`` lists the
    directory outside its error guard (``store/fuse_ops.py``), so the exception leaves the
    handler (which ends pyfuse3's main loop: a dead mount)."""
    import pyfuse3

    from store.fuse_ops import StoreOperations
    from store.tree import LayerTree

    idx = E.LayerIndex.from_entries(
        [{"name": "dev/big", "type": "char", "devMajor": 1 << 31, "devMinor": 1}],
        toc_offset=100,
        compression="zstd",
    )

    class _FS:  # the listing StoreFS.readdir gives: (name, attr) made lazily per child
        status_ino = -1

        def readdir(self, fh, start=0):
            from store.fs import StoreFS

            class _Slot:
                base = 1000

            tree = LayerTree(idx)
            d = tree.lookup_path("dev")
            return (
                (n.decode(), StoreFS._node_attr(_Slot, c)) for n, c in sorted(d.children.items())
            )

        def is_layer_inode(self, ino):
            return True

        def readdir_counted(self, name, attr):
            return attr

    ops = StoreOperations(_FS())  # type: ignore[arg-type]
    replies = []
    orig = pyfuse3.readdir_reply
    pyfuse3.readdir_reply = lambda token, name, attr, nxt: replies.append(name) or True
    try:
        try:
            await ops.readdir(1, 0, None)
        except pyfuse3.FUSEError as exc:
            assert exc.errno == errno.EIO
    finally:
        pyfuse3.readdir_reply = orig


# -- a chunk's compressed span is not bounded: one 10-byte read fetches gigabytes -----------


class _HugeBlob:
    """A blob of ``size`` bytes: ``head`` at 0, ``tail`` at the end, zeros between (never
    materialized: a range over ``cap`` bytes is answered with its first ``cap`` only and
    noted)."""

    def __init__(
        self,
        head: bytes,
        tail: bytes,
        size: int,
        cap: int = 64 << 20,
        far: dict[int, bytes] | None = None,
    ) -> None:
        self.head, self.tail, self.size, self.cap = head, tail, size, cap
        self.far = far or {}  # more bytes, by offset
        self.asked: list[tuple[int, int]] = []

    async def read_ranges(self, ranges):
        out = []
        for lo, hi in ranges:
            self.asked.append((lo, hi))
            hi = min(hi, lo + self.cap)
            whole = bytearray(hi - lo)
            if lo < len(self.head):
                part = self.head[lo:hi]
                whole[: len(part)] = part
            t0 = self.size - len(self.tail)
            if hi > t0:
                a = max(lo, t0)
                whole[a - lo :] = self.tail[a - t0 : hi - t0]
            for base, data in self.far.items():
                a, b = max(lo, base), min(hi, base + len(data))
                if a < b:
                    whole[a - lo : b - lo] = data[a - base : b - base]
            out.append(bytes(whole))
        return out


@pytest.mark.anyio
async def test_a_small_file_never_fetches_gigabytes(tmp_path):
    """The index caps a chunk's *uncompressed* size (chunk_max_bytes) but not its compressed
    span ``[offset, compressed_end)``: a 10-byte file whose frame the TOC says ends 4 GiB
    later (``endOffset``, or simply the next start / the TOC) makes one read request, and
    buffer in memory, all 4 GiB. Frames of a valid layer are at most about a chunk long."""
    data = b"0123456789"
    frame = zstandard.ZstdCompressor().compress(data)
    size = 4 << 30
    toc_json = json.dumps(
        {
            "version": 1,
            "entries": [
                {"name": "f", "type": "reg", "size": 10, "offset": 0, "digest": _sha(data)}
            ],
        }
    ).encode()
    compressed = zstandard.ZstdCompressor().compress(toc_json)
    tail = Z.skippable_frame(compressed)
    position = Z.ManifestPosition(size - len(compressed), len(compressed), len(toc_json))
    layer = Z.ZstdChunkedLayer(Z.manifest_checksum(compressed), position, "podman5")
    blob = _HugeBlob(frame, tail, size)
    try:
        view = await load_layer_index(blob, layer.checksum, zstd_chunked=layer)
    except E.InvalidToc:
        return  # refused at load: fine
    lay = view_layer(view, blob, layer.checksum, tmp_path / "c")
    blob.asked.clear()
    got = await lay.read_file(lay.tree.lookup_path("f"), 0, 10)
    assert got == data
    biggest = max(hi - lo for lo, hi in blob.asked)
    assert biggest <= 2 * E.DEFAULT_LIMITS.max_chunk_bytes, f"one range of {biggest >> 20} MiB"


@pytest.mark.anyio
async def test_a_read_ahead_never_fetches_the_gap_to_a_far_chunk(tmp_path):
    """A file's chunks are consecutive in the file, not necessarily in the blob: a TOC that
    puts one of a 4 MiB file's 64 KiB chunks 4 GiB away made the read-ahead of a 4 KiB read
    ask for (and buffer) one 4 GiB range. Each run of adjacent chunks is its own range."""
    import trio

    chunk, count, stray, far_at = 64 << 10, 70, 67, 4 << 30
    cctx = zstandard.ZstdCompressor()
    payload = random.Random(1).randbytes(count * chunk)  # no two chunks alike
    head, far = b"", {}
    entries = []
    for i in range(count):
        piece = payload[i * chunk : (i + 1) * chunk]
        frame = cctx.compress(piece)
        if i == stray:
            offset, far[far_at] = far_at, frame
        else:
            offset, head = len(head), head + frame
        entry = {"name": "f", "type": "chunk", "offset": offset, "endOffset": offset + len(frame)}
        if i == 0:
            entry.update(type="reg", size=len(payload), digest=_sha(payload))
        entries.append({**entry, "chunkOffset": i * chunk, "chunkSize": chunk})
        entries[-1]["chunkDigest"] = _sha(piece)
    del entries[0]["chunkOffset"]
    toc = json.dumps({"version": 1, "entries": entries}).encode()
    compressed = cctx.compress(toc)
    tail = Z.skippable_frame(compressed)
    size = far_at + len(far[far_at]) + len(tail)
    position = Z.ManifestPosition(size - len(compressed), len(compressed), len(toc))
    layer = Z.ZstdChunkedLayer(Z.manifest_checksum(compressed), position, "podman5")
    blob = _HugeBlob(head, tail, size, far=far)
    view = await load_layer_index(blob, layer.checksum, zstd_chunked=layer)
    lay = view_layer(view, blob, layer.checksum, tmp_path / "c")
    async with trio.open_nursery() as nursery:
        await nursery.start(lay.run)
        node = lay.tree.lookup_path("f")
        blob.asked.clear()
        end = 64 * chunk  # the last page of the file's first 4 MiB block: read-ahead follows
        assert await lay.read_file(node, end - 4096, 4096) == payload[end - 4096 : end]
        with trio.fail_after(10):
            while not any(lo >= far_at for lo, _ in blob.asked):
                await trio.sleep(0.01)
        lay.release()
    spans = sorted(blob.asked)
    assert max(hi - lo for lo, hi in spans) <= 5 << 20, spans  # the block, not the gap
    assert (far_at, far_at + len(far[far_at])) in spans  # the far chunk: its own range


# -- a cached chunk is served for another chunk of the same digest but another size ---------


@pytest.mark.anyio
async def test_cached_chunk_of_another_size_is_not_served(tmp_path):
    """The chunk cache is keyed by digest alone; a cached chunk is handed to any chunk
    naming that digest without checking its size. A TOC giving file ``b`` (20 bytes) the
    digest of file ``a`` (10 bytes): once ``a`` was read, ``b`` reads as ``a``'s 10 bytes
    (short, the rest of ``b`` missing) where reading ``b`` first is EIO (ChunkVerifyError)."""
    from store.layer import ChunkVerifyError

    a, b = b"0123456789", b"x" * 20
    entries = [
        {"name": "a", "type": "reg", "size": 10, "frame": 0, "digest": _sha(a)},
        {"name": "b", "type": "reg", "size": 20, "frame": 1, "digest": _sha(a)},
    ]
    blob, ann = _zstd_layer([a, b], entries)
    view, fb = await _load(tmp_path, blob, ann)
    layer = view_layer(view, fb, ann[Z.MANIFEST_CHECKSUM_KEY], tmp_path / "c")
    with pytest.raises(ChunkVerifyError):
        await layer.read_file(layer.tree.lookup_path("b"), 0, 20)
    assert await layer.read_file(layer.tree.lookup_path("a"), 0, 10) == a
    with pytest.raises(ChunkVerifyError):
        got = await layer.read_file(layer.tree.lookup_path("b"), 0, 20)
        pytest.fail(f"b (20 bytes in its TOC) read as {got!r}")


# -- another layer's chunk that fails its verification fails no read of this layer -----------


class _GatedBlob(FileBlob):
    """A :class:`FileBlob` whose reads wait for ``gate`` once ``armed`` (after its TOC)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        import trio

        self.gate = trio.Event()
        self.armed = False

    async def read_ranges(self, ranges):
        if self.armed:
            await self.gate.wait()
        return await super().read_ranges(ranges)


_GOOD, _EVIL = b"shared library bytes " * 100, b"X" * 2100


async def _sharing_layers(tmp_path: Path) -> tuple[dict, dict]:
    """Two layers on one chunk cache whose file ``f`` names the same digest (the valid
    one's bytes): ``valid`` holds those bytes, ``hostile`` others. Returns the layers and
    their gated blobs, by name."""
    from store.cache import ChunkCache
    from store.layer import Layer
    from store.tree import LayerTree

    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    layers, blobs = {}, {}
    for name, data in (("valid", _GOOD), ("hostile", _EVIL)):
        entries = [
            {"name": "f", "type": "reg", "size": len(data), "frame": 0, "digest": _sha(_GOOD)}
        ]
        blob, ann = _zstd_layer([data], entries)
        path = tmp_path / f"{name}.blob"
        path.write_bytes(blob)
        layer = E.zstd_chunked_layer(ann)
        fb = blobs[name] = _GatedBlob(path)
        view = await load_layer_index(fb, layer.checksum, zstd_chunked=layer)
        layers[name] = Layer(
            key=name,
            digest="sha256:" + "0" * 64,
            toc_digest=layer.checksum,
            tree=LayerTree(view.index),
            index=view,
            blob=fb,
            cache=cache,
        )
    return layers, blobs


@pytest.mark.anyio
async def test_a_hostile_layers_failed_chunk_fails_no_read_of_another_layer(tmp_path):
    """Layers share the chunk cache and its fetches in flight, by digest. A hostile layer's
    file naming the digest of a valid layer's file but holding other bytes: while its fetch
    was in flight, the valid layer's read of that digest waited on it and got its
    ChunkVerifyError (EIO). The valid read now fetches and verifies its own bytes."""
    import trio

    from store.layer import ChunkVerifyError

    layers, blobs = await _sharing_layers(tmp_path)
    blobs["hostile"].armed = True  # its file's bytes come when the test says
    got: dict[str, object] = {}

    async def read(name: str) -> None:
        layer = layers[name]
        try:
            got[name] = await layer.read_file(layer.tree.lookup_path("f"), 0, len(_GOOD))
        except ChunkVerifyError as exc:
            got[name] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, "hostile")
        await trio.sleep(0.05)  # its fetch of the shared digest is claimed, not answered
        nursery.start_soon(read, "valid")
        await trio.sleep(0.05)  # the valid read waits on that claim
        blobs["hostile"].gate.set()
    assert isinstance(got["hostile"], ChunkVerifyError)
    assert got["valid"] == _GOOD


# -- a block cut into tiny chunks: one small read fetched, inflated and cached all of them --


@pytest.mark.anyio
async def test_a_block_cut_into_tiny_chunks_fetches_only_the_reads_own(tmp_path):
    """A read fetches the other chunks of its 4 MiB block too (riders), however many the TOC
    cut it into: a 160 KB file in 20,000 chunks of 8 bytes, each its own frame, and one 4 KiB
    read fetched the whole blob and inflated, verified and cached all 20,000 chunks (200,000:
    25 s, the store's event loop blocked for seconds at a time). A block that finely cut
    takes no riders: the read's own 512 chunks, in one aligned range."""
    n, size = 20_000, 8
    payload = b"".join(i.to_bytes(size, "big") for i in range(n))
    pieces = [payload[i * size : (i + 1) * size] for i in range(n)]
    entries = []
    for i, piece in enumerate(pieces):
        entry = {"name": "f", "type": "chunk", "frame": i, "chunkOffset": i * size}
        if i == 0:
            entry.update(type="reg", size=len(payload), digest=_sha(payload))
            del entry["chunkOffset"]
        entries.append({**entry, "chunkSize": size, "chunkDigest": _sha(piece)})
    blob, ann = _zstd_layer(pieces, entries)
    view, fb = await _load(tmp_path, blob, ann)
    layer = view_layer(view, fb, ann[Z.MANIFEST_CHECKSUM_KEY], tmp_path / "c")
    node = layer.tree.lookup_path("f")
    assert await layer.read_file(node, 8192, 4096) == payload[8192 : 8192 + 4096]
    assert layer.stats.fetched_bytes <= 2 * layer.chunk_size, layer.stats.fetched_bytes
    assert await layer.read_file(node, len(payload) - 100, 4096) == payload[-100:]


@pytest.mark.anyio
async def test_another_layers_stalled_fetch_holds_up_no_read_for_long(tmp_path, monkeypatch):
    """A read waiting for a chunk another layer claimed (the fetches of one digest are
    shared store-wide) waited for as long as that layer's registry took: a hostile TOC names
    another image's digests (libc's, say), its registry never answers, and the other image's
    reads of them waited out that fetch's deadline (fetching_timeout_sec, 300 s). A read now
    waits FOREIGN_WAIT seconds at most, then fetches and verifies its own bytes."""
    import trio

    from store import chunks

    monkeypatch.setattr(chunks, "FOREIGN_WAIT", 0.2)
    layers, blobs = await _sharing_layers(tmp_path)
    blobs["hostile"].armed = True  # its registry never answers

    async def hostile_read() -> None:
        lay = layers["hostile"]
        await lay.read_file(lay.tree.lookup_path("f"), 0, len(_EVIL))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hostile_read)
        await trio.sleep(0.05)  # its claim on the shared digest is on its way, never answered
        valid = layers["valid"]
        with trio.fail_after(5):
            assert await valid.read_file(valid.tree.lookup_path("f"), 0, len(_GOOD)) == _GOOD
        nursery.cancel_scope.cancel()
