"""zstd:chunked: a layer skopeo wrote (containers/storage 1.43, as podman 4.3), and our writer's
output in both generations' layouts, read back through the one validated index."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from store import estargz as E
from store.estargz import zstdchunked as Z
from tests.estargz.test_properties import _outcome, raw_entries

DATA = Path(__file__).parent / "data"
SKOPEO = json.loads((DATA / "zstd-chunked-skopeo19.json").read_text())
SKOPEO_BLOB = (DATA / "zstd-chunked-skopeo19.blob").read_bytes()
# The same tar as written by podman 5's generation: skopeo 1.18 (containers/storage 1.57).
SKOPEO5 = json.loads((DATA / "zstd-chunked-skopeo118.json").read_text())
SKOPEO5_BLOB = (DATA / "zstd-chunked-skopeo118.blob").read_bytes()
VECTORS = {
    "podman4": (SKOPEO, SKOPEO_BLOB, E.ZSTD_FOOTER_SIZE),
    "podman5": (SKOPEO5, SKOPEO5_BLOB, E.ZSTD_FOOTER_V2_SIZE),
}


def _plain(blob: bytes) -> bytes:
    """What a plain zstd decoder makes of the blob (skippable frames are skipped)."""
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True)
    return reader.read()


def _tar(members: list[tuple[str, bytes]], *, extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti in extra:
            tar.addfile(ti)
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1700000000
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _reader(blob: bytes, annotations: dict[str, str]) -> E.EstargzReader:
    return E.EstargzReader(E.BytesBlobSource(blob), zstd_chunked=E.zstd_chunked_layer(annotations))


@pytest.mark.parametrize("generation", sorted(VECTORS))
def test_skopeo_layer_reads_back_its_files(generation):
    meta, blob, footer_size = VECTORS[generation]
    layer = E.zstd_chunked_layer(meta["descriptor"]["annotations"])
    assert layer is not None and layer.generation == generation
    r = E.EstargzReader(E.BytesBlobSource(blob), zstd_chunked=layer)
    # The TOC digest is the checksum annotation: sha256 of the *compressed* TOC bytes.
    start, end = layer.toc_range
    assert r.toc.digest == layer.checksum == Z.manifest_checksum(blob[start:end])
    assert r.footer.footer_size == footer_size
    assert r.footer.toc_offset == layer.position.offset
    assert "sha256:" + hashlib.sha256(_plain(blob)).hexdigest() == meta["diff_id"]
    sums = r.verify_all()
    for path, digest in meta["files"].items():
        e = r.lookup(path)
        assert sums.get(e.name, None) == digest, path
    for path, etype in meta["types"].items():
        assert r.index.lookup(path).type == ("reg" if etype == "hardlink" else etype), path
    tool = r.lookup("usr/bin/tool")
    assert len(tool.chunks) > 2
    kinds = [x.get("chunkType") for x in r.toc.entries if x.get("name") == "./usr/bin/tool"]
    assert "zeros" in kinds  # containers/storage 1.43 already writes zero-run chunks
    # Every chunk's frame is bounded exactly (endOffset), not by the next file's offset.
    assert tool.chunks[-1].compressed_end == next(
        x["endOffset"] for x in r.toc.entries if x.get("name") == "./usr/bin/tool"
    )


def test_podman5_tar_split_frame_as_skopeo_writes_it():
    """The tar-split frame of podman 5's generation: its compressed bytes hash to the TOC's
    ``tarSplitDigest``; JSON lines of segments and files, each file with its CRC-64/ISO —
    the schema our writer's podman-5 layout follows."""
    layer = E.zstd_chunked_layer(SKOPEO5["descriptor"]["annotations"])
    offset, length, usize = layer.tar_split
    frame = SKOPEO5_BLOB[offset : offset + length]
    start, end = layer.toc_range
    toc = json.loads(
        zstandard.ZstdDecompressor().decompressobj().decompress(SKOPEO5_BLOB[start:end])
    )
    assert toc["tarSplitDigest"] == Z.manifest_checksum(frame)
    lines = zstandard.ZstdDecompressor().decompressobj().decompress(frame)
    assert len(lines) == usize
    r = E.EstargzReader(E.BytesBlobSource(SKOPEO5_BLOB), zstd_chunked=layer)
    files = 0
    for pos, line in enumerate(lines.splitlines()):
        entry = json.loads(line)
        assert set(entry) <= {"type", "name", "size", "payload", "position"}
        assert entry["position"] == pos and entry["type"] in (1, 2)
        if entry["type"] == 1 and entry.get("size"):
            crc = Z._Crc64()
            crc.update(r.read_file(entry["name"]))
            assert base64.b64decode(entry["payload"]) == crc.digest(), entry["name"]
            files += 1
    assert files == 2


def test_skopeo_layer_tampering_is_caught():
    layer = E.zstd_chunked_layer(SKOPEO["descriptor"]["annotations"])
    start, _ = layer.toc_range
    bad_toc = bytearray(SKOPEO_BLOB)
    bad_toc[start + 20] ^= 0xFF
    with pytest.raises(E.TocDigestMismatch, match="compressed TOC hashes to"):
        E.EstargzReader(E.BytesBlobSource(bytes(bad_toc)), zstd_chunked=layer)
    r = E.EstargzReader(E.BytesBlobSource(SKOPEO_BLOB), zstd_chunked=layer)
    chunk = r.lookup("usr/bin/tool").chunks[1]
    bad = bytearray(SKOPEO_BLOB)
    bad[chunk.offset + chunk.compressed_size // 2] ^= 0x01
    r2 = E.EstargzReader(E.BytesBlobSource(bytes(bad)), zstd_chunked=layer)
    with pytest.raises((E.ChunkDigestMismatch, E.CorruptChunk)):
        r2.read_file("usr/bin/tool")


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({Z.MANIFEST_CHECKSUM_KEY: "sha256:" + "0" * 64}, "without its"),
        ({Z.MANIFEST_CHECKSUM_KEY: "md5:x", Z.MANIFEST_POSITION_KEY: "9:1:1:1"}, "not a sha256"),
        (
            {Z.MANIFEST_CHECKSUM_KEY: "sha256:" + "0" * 64, Z.MANIFEST_POSITION_KEY: "9:1:1"},
            "is not",
        ),
        (
            {Z.MANIFEST_CHECKSUM_KEY: "sha256:" + "0" * 64, Z.MANIFEST_POSITION_KEY: "9:1:1:2"},
            "type",
        ),
    ],
)
def test_malformed_annotations_are_named(annotations, message):
    with pytest.raises(E.InvalidToc, match=message):
        E.zstd_chunked_layer(annotations)


def test_no_annotations_is_not_zstd_chunked():
    assert E.zstd_chunked_layer({"containerd.io/snapshot/stargz/toc.digest": "x"}) is None


@pytest.mark.parametrize("generation", ["podman4", "podman5"])
def test_writer_round_trip_both_layouts(generation):
    big = bytes(range(256)) * 256 + bytes(2 * 65536) + b"tail" * 1000  # zeros on chunk bounds
    link = tarfile.TarInfo("d/link")
    link.type, link.linkname = tarfile.SYMTYPE, "../a"
    d = tarfile.TarInfo("d")
    d.type, d.mode = tarfile.DIRTYPE, 0o755
    src = _tar([("a", b"hello\n"), ("d/big", big), ("d/empty", b"")], extra=[d, link])
    out = io.BytesIO()
    res = E.write_zstd_chunked(io.BytesIO(src), out, generation=generation, chunk_size=65536)
    blob = out.getvalue()
    assert res.size == len(blob) and res.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert res.diff_id == "sha256:" + hashlib.sha256(_plain(blob)).hexdigest()
    layer = E.zstd_chunked_layer(res.annotations)
    assert layer is not None and layer.generation == generation and layer.checksum == res.toc_digest
    Z.check_footer(blob[-200:], len(blob), layer)
    r = E.EstargzReader(E.BytesBlobSource(blob), zstd_chunked=layer)
    assert r.read_file("d/big") == big and r.read_file("a") == b"hello\n"
    assert r.index.lookup("d/link").link_name == "../a"
    zeros = [x for x in r.toc.entries if x.get("chunkType") == "zeros"]
    assert zeros and all(x["chunkSize"] == 65536 for x in zeros)
    with tarfile.open(fileobj=io.BytesIO(_plain(blob))) as t:
        assert t.extractfile("d/big").read() == big
    footer = E.parse_footer(blob[-200:], len(blob))
    assert footer.footer_size == (E.ZSTD_FOOTER_SIZE if generation == "podman4" else 72)


@pytest.mark.parametrize("generation", ["podman4", "podman5"])
def test_the_toc_is_compressed_harder_than_the_data(generation):
    """The TOC, which every lazy pull fetches first, is written at METADATA_ZSTD_LEVEL, not
    at the layer's level (podman 5's tar-split, written the same way, is not checked here)."""
    files = [(f"dir{i % 7}/file{i}", f"{i}\n".encode()) for i in range(400)]
    out = io.BytesIO()
    res = E.write_zstd_chunked(io.BytesIO(_tar(files)), out, generation=generation, level=3)
    blob = out.getvalue()
    layer = E.zstd_chunked_layer(res.annotations)
    lo, hi = layer.toc_range
    toc_json = zstandard.ZstdDecompressor().decompress(blob[lo:hi])
    frames = {
        level: zstandard.ZstdCompressor(level=level).compress(toc_json)
        for level in (3, Z.METADATA_ZSTD_LEVEL)
    }
    assert len(frames[Z.METADATA_ZSTD_LEVEL]) < len(frames[3])
    assert blob[lo:hi] == frames[Z.METADATA_ZSTD_LEVEL]
    assert (
        E.EstargzReader(E.BytesBlobSource(blob), zstd_chunked=layer).read_file("dir3/file10")
        == b"10\n"
    )


@pytest.mark.parametrize("generation", ["podman4", "podman5"])
def test_a_mode_with_file_type_bits_is_written_as_the_stream_header_has_it(generation):
    """Go's tar writer puts the type bits in a header's mode (0o40755 for a directory); the
    TOC says what the re-encoded header in the stream and tar-split says (0o755), which
    podman >= 5 checks before a partial pull."""
    ti = tarfile.TarInfo("d")
    ti.type, ti.mode = tarfile.DIRTYPE, 0o755
    header = bytearray(ti.tobuf(tarfile.USTAR_FORMAT))
    header[100:108] = b"0040755\0"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    out = io.BytesIO()
    res = E.write_zstd_chunked(io.BytesIO(bytes(header) + bytes(1024)), out, generation=generation)
    blob = out.getvalue()
    lo, hi = E.zstd_chunked_layer(res.annotations).toc_range
    (entry,) = json.loads(zstandard.ZstdDecompressor().decompress(blob[lo:hi]))["entries"]
    assert entry["mode"] == 0o755
    with tarfile.open(fileobj=io.BytesIO(_plain(blob))) as t:
        assert t.getmember("d").mode == 0o755


def test_podman5_tar_split_reassembles_the_tar():
    """The tar-split frame (vbatts/tar-split JSON lines: segments of raw tar bytes, files by
    name, size and CRC-64/ISO) plus the files' contents give back the exact tar."""
    files = [("x", b"1" * 3000), ("y/z", b""), ("w", b"abc" * 70000)]
    out = io.BytesIO()
    res = E.write_zstd_chunked(io.BytesIO(_tar(files)), out, generation="podman5")
    blob = out.getvalue()
    offset, length, usize = (int(v) for v in res.annotations[Z.TARSPLIT_POSITION_KEY].split(":"))
    assert blob[offset - 8 : offset - 4] == b"\x50\x2a\x4d\x18"
    frame = blob[offset : offset + length]
    layer = E.zstd_chunked_layer(res.annotations)
    toc = E.EstargzReader(E.BytesBlobSource(blob), zstd_chunked=layer).toc
    lines = zstandard.ZstdDecompressor().decompressobj().decompress(frame)
    assert len(lines) == usize
    toc_json = json.loads(
        zstandard.ZstdDecompressor()
        .decompressobj()
        .decompress(blob[toc.offset : toc.offset + 9999])
    )
    assert toc_json["tarSplitDigest"] == Z.manifest_checksum(frame)
    content = dict(files)
    tar = bytearray()
    for pos, line in enumerate(lines.splitlines()):
        entry = json.loads(line)
        assert entry["position"] == pos
        if entry["type"] == 2:
            tar += base64.b64decode(entry["payload"])
        else:
            data = content[entry["name"]]
            assert entry.get("size", 0) == len(data)
            if data:
                crc = Z._Crc64()
                crc.update(data)
                assert base64.b64decode(entry["payload"]) == crc.digest()
            tar += data
    assert "sha256:" + hashlib.sha256(tar).hexdigest() == res.diff_id


def test_prioritized_files_come_first():
    files = [(f"f{i}", bytes([i]) * 5000) for i in range(6)]
    out = io.BytesIO()
    res = E.write_zstd_chunked(io.BytesIO(_tar(files)), out, prioritized_files=["f4", "f2"])
    r = E.EstargzReader(
        E.BytesBlobSource(out.getvalue()), zstd_chunked=E.zstd_chunked_layer(res.annotations)
    )
    order = [x["name"] for x in r.toc.entries if x["type"] == "reg"]
    assert order[:2] == ["f4", "f2"] and sorted(order) == [f"f{i}" for i in range(6)]
    assert r.lookup("f4").chunks[0].offset < r.lookup("f0").chunks[0].offset


def test_crc64_iso_check_value():
    crc = Z._Crc64()
    crc.update(b"123456789")
    assert crc.crc == 0xB90956C775A41001  # CRC-64/GO-ISO check value


@settings(max_examples=25, deadline=None)
@given(
    files=st.lists(st.binary(max_size=9000), min_size=1, max_size=4),
    chunk=st.integers(512, 4096),
    generation=st.sampled_from(["podman4", "podman5"]),
)
def test_writer_reader_agree(files, chunk, generation):
    members = [(f"dir/file{i}", data) for i, data in enumerate(files)]
    out = io.BytesIO()
    res = E.write_zstd_chunked(
        io.BytesIO(_tar(members)), out, chunk_size=chunk, generation=generation
    )
    r = E.EstargzReader(
        E.BytesBlobSource(out.getvalue()), zstd_chunked=E.zstd_chunked_layer(res.annotations)
    )
    for name, data in members:
        assert r.read_file(name) == data
    assert res.diff_id == "sha256:" + hashlib.sha256(_plain(out.getvalue())).hexdigest()


def test_footer_layouts_parse():
    pos = E.ManifestPosition(100, 20, 50)
    v1 = Z.footer_bytes(pos)
    v2 = Z.footer_bytes(pos, (128, 10, 30))
    assert len(v1) == 48 and v1.endswith(b"GnUlInUx")
    assert len(v2) == 72 and v2.endswith(b"GNUlInUx")
    assert struct.unpack_from("<7Q", v2, 8)[4:] == (128, 10, 30)
    for footer in (v1, v2):
        f = E.parse_footer(bytes(200) + footer, 200 + len(footer))
        assert (f.toc_offset, f.toc_size, f.toc_uncompressed_size) == (100, 20, 50)


def _manifest(entries: list[dict], *, claim: int | None = None) -> tuple[bytes, E.ManifestPosition]:
    raw = json.dumps({"version": 1, "entries": entries}).encode()
    compressed = zstandard.ZstdCompressor().compress(raw)
    return compressed, E.ManifestPosition(1000, len(compressed), claim or len(raw))


@pytest.mark.parametrize(
    ("entries", "claim", "error", "message"),
    [
        (  # a frame that ends before it starts
            [{"type": "reg", "name": "f", "size": 3, "offset": 50, "endOffset": 40}],
            None,
            E.TocOutOfRange,
            "endOffset 40 is not in",
        ),
        (  # a frame that ends inside the TOC
            [{"type": "reg", "name": "f", "size": 3, "offset": 50, "endOffset": 1001}],
            None,
            E.TocOutOfRange,
            "endOffset 1001",
        ),
        (  # more JSON than the position promises
            [{"type": "dir", "name": "d"}],
            10,
            E.InvalidToc,
            "inflate",
        ),
        ([{"type": "reg", "name": "f", "chunkType": "sparse"}], None, E.InvalidToc, "chunkType"),
    ],
)
def test_hostile_manifests_are_refused(entries, claim, error, message):
    compressed, position = _manifest(entries, claim=claim)
    with pytest.raises(error, match=message):
        toc = E.parse_manifest(compressed, position, Z.manifest_checksum(compressed))
        E.LayerIndex.from_toc(toc)


def test_position_length_must_match_the_bytes_read():
    compressed, position = _manifest([{"type": "dir", "name": "d"}])
    with pytest.raises(E.InvalidToc, match="position says"):
        E.parse_manifest(compressed + b"x", position, None)


@pytest.mark.parametrize("generation", ["podman4", "podman5"])
def test_writer_refuses_what_no_layer_can_hold_like_the_estargz_writer(generation):
    """An entry under a regular file: both writers refuse the tar (the reader's rules), so
    nothing either writes is a layer the store would refuse."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("b", "b/x"):
            ti = tarfile.TarInfo(name)
            ti.size = 1
            tar.addfile(ti, io.BytesIO(b"x"))
    data = buf.getvalue()
    with pytest.raises(E.InvalidLayerTar, match="zstd:chunked layer"):
        Z.write_zstd_chunked(io.BytesIO(data), io.BytesIO(), generation=generation)
    with pytest.raises(E.InvalidLayerTar, match="eStargz layer"):
        E.convert(io.BytesIO(data), io.BytesIO())


_CHUNK_TYPES = st.sampled_from([None, "", "zeros", "sparse", 3, "ZEROS"])


@st.composite
def _zstd_entries(draw) -> list[dict]:
    entries = draw(raw_entries())
    for e in entries:
        if draw(st.booleans()):
            e["chunkType"] = draw(_CHUNK_TYPES)
        if draw(st.booleans()):
            e["endOffset"] = draw(st.sampled_from([0, 60, 250, 999, 1001, None, -1]))
    return entries


def _zstd_outcome(build) -> object:
    files: list = []

    def run():
        index, frames = build()
        files.extend(frames)
        return index

    return _outcome(run), files


@settings(max_examples=300, deadline=None)
@given(entries=_zstd_entries(), spaced=st.booleans())
def test_typed_zstd_path_agrees_with_the_entry_at_a_time_path(entries, spaced):
    """The store's zstd:chunked index (typed msgspec records when it can vouch for the TOC)
    accepts and refuses what the entry-at-a-time path does, normalizes one-frame files the
    same way, and notes the same file frames."""
    from store.estargz.toc import DEFAULT_LIMITS
    from store.estargz_view import _tap, zstd_chunked_index

    raw = json.dumps(
        {"version": 1, "entries": entries}, separators=(", ", " : ") if spaced else (",", ":")
    ).encode()
    compressed = zstandard.ZstdCompressor().compress(raw)
    pos = E.ManifestPosition(1000, len(compressed), len(raw))
    limits = DEFAULT_LIMITS

    def entry_at_a_time():
        from array import array

        files = array("q")
        it = Z.manifest_entries(compressed, pos, None, limits)
        return E.LayerIndex.from_entries(
            _tap(it, files), toc_offset=1000, compression="zstd"
        ), files

    store = _zstd_outcome(lambda: zstd_chunked_index(compressed, pos, limits))
    assert store == _zstd_outcome(entry_at_a_time)


@settings(max_examples=300, deadline=None)
@given(
    entries=_zstd_entries(),
    named=st.sampled_from([None, "", "sha256:" + "c" * 64, 5, "in a name"]),
)
def test_the_store_skips_the_tar_split_check_only_where_it_would_find_nothing(entries, named):
    """The store's load (the JSON inflated once, the tar-split check skipped for a typed TOC
    that names no tar-split) accepts and refuses what building the index and then checking
    the tar-split does, for TOCs with and without a ``tarSplitDigest`` (or the word in a
    file's name), and builds the same tree."""
    from store.estargz.toc import DEFAULT_LIMITS
    from store.estargz_view import zstd_chunked_index

    toc: dict = {"version": 1, "entries": entries}
    if named == "in a name":
        entries.append({"type": "dir", "name": "tarSplitDigest"})
    elif named is not None:
        toc["tarSplitDigest"] = named
    raw = json.dumps(toc).encode()
    compressed = zstandard.ZstdCompressor().compress(raw)
    pos = E.ManifestPosition(1000, len(compressed), len(raw))
    limits = DEFAULT_LIMITS

    def index_then_check():
        index, files = zstd_chunked_index(compressed, pos, limits)
        Z.check_manifest_tar_split(compressed, pos, None, limits)
        return index, files

    json_, _ = Z.toc_json_and_digest(compressed, pos, limits)
    assert json_ == raw
    store = _zstd_outcome(
        lambda: zstd_chunked_index(compressed, pos, limits, toc_json=json_, tar_split=None)
    )
    assert store == _zstd_outcome(index_then_check)


def test_a_typed_toc_naming_no_tar_split_is_decoded_once(monkeypatch):
    """The pull phase's zstd:chunked parse: a TOC podman 4.3's writer made (no tar-split) is
    inflated by the caller, decoded once and never handed to the tar-split check."""
    from store.estargz import tarsplit
    from store.estargz.toc import DEFAULT_LIMITS
    from store.estargz_view import zstd_chunked_index

    entries = [
        {"type": "reg", "name": "f", "size": 3, "offset": 5, "endOffset": 40,
         "digest": "sha256:" + "a" * 64},
    ]  # fmt: skip
    compressed, pos = _manifest(entries)
    toc_json, digest = Z.toc_json_and_digest(compressed, pos, DEFAULT_LIMITS)
    assert toc_json is not None and digest == Z.toc_json_digest(compressed, pos)

    def no(*_args: object, **_kw: object) -> None:
        raise AssertionError("inflated or checked again")

    monkeypatch.setattr(tarsplit, "check_tar_split", no)
    monkeypatch.setattr(Z, "toc_json_pieces", no)
    index, _ = zstd_chunked_index(
        compressed, pos, DEFAULT_LIMITS, toc_json=toc_json, tar_split=None
    )
    assert index.lookup("f") is not None


def test_typed_zstd_path_is_taken_for_writer_output_and_refused_for_a_bad_chunk_type():
    entries = [
        {"type": "reg", "name": "f", "size": 3, "offset": 5, "endOffset": 40,
         "digest": "sha256:" + "a" * 64},
        {"type": "reg", "name": "z", "size": 3, "offset": 40, "endOffset": 60, "chunkType": "zeros",
         "chunkSize": 3, "chunkDigest": "sha256:" + "b" * 64},
    ]  # fmt: skip
    compressed, pos = _manifest(entries)
    records = Z.typed_manifest_entries(compressed, pos)
    assert records is not None and records[0].chunkDigest == "sha256:" + "a" * 64
    bad, pos = _manifest([*entries, {"type": "dir", "name": "d", "chunkType": "sparse"}])
    assert Z.typed_manifest_entries(bad, pos) is None
    escaped = json.dumps({"version": 1, "entries": entries}).replace("chunkType", "chunk\\u0054ype")
    raw = escaped.encode()
    c = zstandard.ZstdCompressor().compress(raw)
    assert Z.typed_manifest_entries(c, E.ManifestPosition(1000, len(c), len(raw))) is None
