"""Our reader and writer against layers written by the Go reference library (v0.12.0)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from fmt_helpers import VECTORS, Vector, load_vectors

from store.estargz import (
    DEFAULT_CHUNK_SIZE,
    BytesBlobSource,
    EstargzReader,
    FileBlobSource,
    FooterKind,
    convert,
)
from store.estargz.listing import listing

ALL = [v.name for v in load_vectors(VECTORS)] if VECTORS.is_dir() else []
LISTED = [n for n in ALL if n != "zstdchunked"]


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.split("\n") if line.strip()]


@pytest.mark.parametrize("name", LISTED)
def test_ls_matches_go_listing(name: str, vectors: dict[str, Vector], lazybench) -> None:
    v = vectors[name]
    res = lazybench("estargz", "ls", str(v.blob), "--toc-digest", v.meta["toc_digest"])
    assert res.code == 0, res.err
    assert _jsonl(res.out) == v.entries


@pytest.mark.parametrize("name", ALL)
def test_toc_digest_matches(name: str, vectors: dict[str, Vector]) -> None:
    v = vectors[name]
    with FileBlobSource(v.blob) as src:
        r = EstargzReader(src)
        assert r.toc_digest == v.meta["toc_digest"]
        assert r.footer.kind == {
            "basic-legacy-footer": FooterKind.LEGACY_STARGZ,
            "zstdchunked": FooterKind.ZSTD_CHUNKED,
        }.get(name, FooterKind.ESTARGZ)


def test_zstdchunked_reads_and_verifies(vectors: dict[str, Vector]) -> None:
    v = vectors["zstdchunked"]
    # The blob decompresses (all frames) to the layer tar: every file must read back equal.
    expected: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(v.uncompressed_tar())) as tar:
        for ti in tar:
            if ti.isreg():
                f = tar.extractfile(ti)
                assert f is not None
                expected[ti.name.removeprefix("./")] = f.read()
    with FileBlobSource(v.blob) as src:
        r = EstargzReader(src, v.meta["toc_digest"])
        sums = r.verify_all()  # every chunk against chunkDigest, every file against digest
        assert r.index.has_no_prefetch_landmark
        assert sums.keys() == expected.keys()
        for name, data in expected.items():
            assert sums[name] == hashlib.sha256(data).hexdigest()
            assert r.read_file(name) == data
            if len(data) > 3:
                assert r.read_file(name, 1, len(data) - 2) == data[1:-1]


def _writer_options(v: Vector) -> dict:
    opts: dict = {"chunk_size": int(v.option("-chunk") or DEFAULT_CHUNK_SIZE)}
    if v.option("-level") is not None:
        opts["level"] = int(v.option("-level"))
    if v.option("-prioritized"):
        opts["prioritized_files"] = v.option("-prioritized").split(",")
    return opts


def _without_offsets(entries: list[dict]) -> list[dict]:
    return [{k: x for k, x in e.items() if k != "offset"} for e in entries]


@pytest.mark.parametrize("name", ALL)
def test_writer_roundtrip_matches_go(name: str, vectors: dict[str, Vector]) -> None:
    """The vector's own tar through our writer lists the same tree as the Go layer, and the
    TOC entries equal the Go writer's field for field except compressed offsets."""
    v = vectors[name]
    out = io.BytesIO()
    res = convert(io.BytesIO(v.uncompressed_tar()), out, **_writer_options(v))
    blob = out.getvalue()
    assert res.size == len(blob)
    assert res.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    ours = EstargzReader(BytesBlobSource(blob), res.toc_digest)
    with FileBlobSource(v.blob) as src:
        go = EstargzReader(src)
        assert list(listing(ours)) == list(listing(go))
        if name != "zstdchunked":  # the zstd writer packs entries differently (no tar TOC)
            assert _without_offsets(ours.toc.entries) == _without_offsets(go.toc.entries)


@pytest.mark.parametrize("name", ["basic", "chunked-1m"])
def test_gzip_input_is_accepted(name: str, vectors: dict[str, Vector], tmp_path: Path) -> None:
    """A gzip layer (the Go blob itself) converts: existing landmark and TOC entries dropped."""
    v = vectors[name]
    out = io.BytesIO()
    with v.blob.open("rb") as f:
        res = convert(f, out, **_writer_options(v))
    ours = EstargzReader(BytesBlobSource(out.getvalue()), res.toc_digest)
    assert [e["name"] for e in listing(ours)] == [e["name"] for e in v.entries or []]
    assert sum(1 for e in ours.toc.entries if e["name"].endswith("stargz.index.json")) == 0


def test_containers_storage_zstd_footer(vectors: dict[str, Vector]) -> None:
    """The same zstd:chunked layer with containers/storage's 64-byte footer payload (tar-split
    fields added, magic spelled GNUlInUx) reads the same."""
    import struct

    v = vectors["zstdchunked"]
    blob = v.blob.read_bytes()
    offset, csize, usize, mtype = struct.unpack_from("<QQQQ", blob, len(blob) - 40)
    payload = struct.pack("<QQQQQQQ", offset, csize, usize, mtype, 0, 0, 0) + b"GNUlInUx"
    footer = b"\x50\x2a\x4d\x18" + struct.pack("<I", len(payload)) + payload
    r = EstargzReader(BytesBlobSource(blob[:-48] + footer), v.meta["toc_digest"])
    assert r.footer.footer_size == 72
    with FileBlobSource(v.blob) as src:
        assert r.verify_all() == EstargzReader(src).verify_all()
