"""One test per class of malformed input, each expecting its own typed error.

Every test of a malformed *layer* runs twice (``engine``): against the format library, and
against the mounted store — the layer pushed to a real registry and looked up through the
real FUSE mount, where the same error must come back as an errno (EIO) with one log line
naming it, never a tree and never wrong bytes. The writer-input tests have no layer to mount.
"""

from __future__ import annotations

import copy
import errno
import io
import os
import tarfile
import time
from pathlib import Path

import pytest
from fmt_helpers import encode_entries, replace_toc, toc_entries

from store.estargz import (
    BadFooter,
    BytesBlobSource,
    ChunkDigestMismatch,
    CorruptChunk,
    EstargzReader,
    FileDigestMismatch,
    InvalidEntryName,
    InvalidLayerTar,
    InvalidToc,
    TocDigestMismatch,
    TocOutOfRange,
    TruncatedBlob,
    convert,
    estargz_footer_bytes,
    parse_footer,
)
from store.estargz.listing import listing


@pytest.fixture(scope="module")
def blob(vectors_dir) -> bytes:
    return (vectors_dir / "basic.blob").read_bytes()


@pytest.fixture(scope="module")
def chunked_blob(vectors_dir) -> bytes:
    return (vectors_dir / "chunked-1m.blob").read_bytes()


def _open(data: bytes, digest: str | None = None) -> EstargzReader:
    return EstargzReader(BytesBlobSource(data), digest)


class _Library:
    name = "library"

    def open(self, data: bytes, digest: str | None = None) -> EstargzReader:
        return _open(data, digest)

    def read(self, r: EstargzReader, path: str) -> bytes:
        return r.read_file(path)


class _Store:
    name = "store"

    def __init__(self, mounted) -> None:
        self.mounted = mounted

    def open(self, data: bytes, digest: str | None = None) -> Path:
        diff, blob_digest = self.mounted.serve(data, digest)
        try:
            os.stat(diff)
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
            raise self.mounted.expect_refused(diff, blob_digest) from None
        return diff

    def read(self, diff: Path, path: str) -> bytes:
        return self.mounted.read(diff / path)


@pytest.fixture(scope="module")
def mounted(tmp_path_factory):
    from tests.store.mounted import mounted_store

    config = "noprefetch = true\nno_background_fetch = true\n"
    with mounted_store(tmp_path_factory.mktemp("malformed-store"), config) as store:
        yield store


@pytest.fixture(params=["library", pytest.param("store", marks=pytest.mark.e2e)])
def engine(request):
    if request.param == "library":
        return _Library()
    return _Store(request.getfixturevalue("mounted"))


def test_bad_footer(blob: bytes, engine) -> None:
    with pytest.raises(BadFooter, match="no eStargz, stargz or zstd:chunked footer"):
        engine.open(blob[:-51] + b"\0" * 51)


def test_footer_with_non_hex_offset(blob: bytes, engine) -> None:
    bad = bytearray(blob)
    bad[-51 + 16 : -51 + 20] = b"zzzz"
    with pytest.raises(BadFooter):
        engine.open(bytes(bad))


def test_footer_pointing_outside_blob(blob: bytes, engine) -> None:
    bad = blob[:-51] + estargz_footer_bytes(len(blob) * 2)
    with pytest.raises(BadFooter, match="outside the blob"):
        engine.open(bad)


def test_blob_too_short_for_a_footer(engine) -> None:
    with pytest.raises(TruncatedBlob, match="too short"):
        if engine.name == "library":
            parse_footer(b"\x1f\x8b" * 5, 10)
        else:
            engine.open(b"\x1f\x8b" * 5, "sha256:" + "0" * 64)


def test_source_that_under_delivers(blob: bytes) -> None:
    # Library only: a BlobSource that lies about its size (the store's registry client has
    # its own tests of short and wrong answers).
    class Short(BytesBlobSource):
        def size(self) -> int:
            return len(blob) + 100  # claims more bytes than it has

    with pytest.raises(TruncatedBlob, match="the blob gave"):
        EstargzReader(Short(blob))


def test_blob_cut_in_the_middle(blob: bytes, engine) -> None:
    # Lost its tail: no footer any more.
    with pytest.raises(BadFooter):
        engine.open(blob[: len(blob) // 2])


def test_toc_not_json(blob: bytes, engine) -> None:
    with pytest.raises(InvalidToc, match="not JSON"):
        engine.open(replace_toc(blob, b"{this is not json"))


def test_toc_member_with_a_huge_pax_header_is_refused_at_once(blob: bytes, engine) -> None:
    """CPython's tarfile parses a PAX header in time quadratic in a run of digits before
    3.11.10 (CVE-2024-6232): 160,000 digits cost 15 s of CPU while the TOC was read. A TOC
    member needs no PAX header; a big one is refused before it is parsed."""
    start = time.monotonic()
    with pytest.raises(InvalidToc, match="PAX"):
        engine.open(replace_toc(blob, encode_entries(toc_entries(blob)), pax=b"1" * 160_000))
    assert time.monotonic() - start < 5


def test_toc_not_gzip(blob: bytes, engine) -> None:
    footer = parse_footer(blob[-51:], len(blob))
    bad = blob[: footer.toc_offset] + b"garbage!" * 10 + estargz_footer_bytes(footer.toc_offset)
    with pytest.raises(InvalidToc, match="not gzip"):
        engine.open(bad)


def test_toc_without_entries(blob: bytes, engine) -> None:
    with pytest.raises(InvalidToc, match="entries"):
        engine.open(replace_toc(blob, b'{"version": 1}'))


def test_toc_offset_outside_blob(blob: bytes, engine) -> None:
    entries = toc_entries(blob)
    e = next(e for e in entries if e.get("size", 0) > 0)
    e["offset"] = len(blob) + 1000
    with pytest.raises(TocOutOfRange, match=r"offset \d+ is at or past the TOC"):
        engine.open(replace_toc(blob, encode_entries(entries)))


def test_toc_unknown_type(blob: bytes, engine) -> None:
    entries = toc_entries(blob)
    entries[1]["type"] = "socket"
    with pytest.raises(InvalidToc, match="unknown type 'socket'"):
        engine.open(replace_toc(blob, encode_entries(entries)))


def test_name_escaping_root(blob: bytes, engine) -> None:
    entries = toc_entries(blob)
    entries.append({"name": "../../etc/shadow", "type": "reg", "mode": 420})
    with pytest.raises(InvalidEntryName, match="escapes the layer root"):
        engine.open(replace_toc(blob, encode_entries(entries)))


def test_hardlink_escaping_root(blob: bytes, engine) -> None:
    entries = toc_entries(blob)
    entries.append({"name": "x", "type": "hardlink", "linkName": "a/../../x"})
    with pytest.raises(InvalidEntryName):
        engine.open(replace_toc(blob, encode_entries(entries)))


def test_hardlink_to_nothing(blob: bytes, engine) -> None:
    entries = toc_entries(blob)
    entries.append({"name": "x", "type": "hardlink", "linkName": "no/such/file"})
    with pytest.raises(InvalidToc, match="target not found"):
        engine.open(replace_toc(blob, encode_entries(entries)))


def test_toc_digest_mismatch(blob: bytes, engine) -> None:
    with pytest.raises(TocDigestMismatch, match="does not match the expected sha256:0000"):
        engine.open(blob, "sha256:" + "0" * 64)


def test_chunk_digest_mismatch(blob: bytes, engine) -> None:
    entries = toc_entries(blob)
    e = next(e for e in entries if e["name"] == "etc/hostname")
    e["chunkDigest"] = "sha256:" + "1" * 64
    r = engine.open(replace_toc(blob, encode_entries(entries)))
    with pytest.raises(ChunkDigestMismatch, match=r"'etc/hostname' chunk at file offset 0"):
        engine.read(r, "etc/hostname")


def test_chunk_without_digest_is_verified_by_the_file_digest(blob: bytes, engine) -> None:
    """The Go reader's rule (estargz ``genVerifier``): in a TOC without ``chunk`` entries,
    a file's ``digest`` stands in for a missing ``chunkDigest``; the bytes are verified by it."""
    entries = toc_entries(blob)
    assert not any(e["type"] == "chunk" for e in entries)
    e = next(e for e in entries if e["name"] == "etc/hostname")
    del e["chunkDigest"]
    r = engine.open(replace_toc(blob, encode_entries(entries)))
    assert engine.read(r, "etc/hostname") == _open(blob).read_file("etc/hostname")
    e["digest"] = "sha256:" + "1" * 64
    r = engine.open(replace_toc(blob, encode_entries(entries)))
    with pytest.raises(ChunkDigestMismatch, match=r"'etc/hostname' chunk at file offset 0"):
        engine.read(r, "etc/hostname")


def _refuses_unverifiable(engine, data: bytes, name: str) -> None:
    """The library opens a layer with a chunk no digest verifies and refuses that chunk's
    reads (as the Go library's ``Open`` takes it, and ``VerifyTOC`` refuses it); the store
    refuses the layer at load (as the Go store does at mount: "some ChunkDigest not found in
    TOC JSON"), so the runtime pulls it whole, not a mount whose file answers EIO."""
    if engine.name == "library":
        r = engine.open(data)
        with pytest.raises(ChunkDigestMismatch, match="no sha256 chunkDigest"):
            engine.read(r, name)
        return
    with pytest.raises(InvalidToc, match=rf"'{name}'.*no chunkDigest, and not a whole file"):
        engine.open(data)


def test_chunk_without_any_digest_is_not_served(blob: bytes, engine) -> None:
    entries = toc_entries(blob)
    e = next(e for e in entries if e["name"] == "etc/hostname")
    del e["chunkDigest"], e["digest"]
    _refuses_unverifiable(engine, replace_toc(blob, encode_entries(entries)), "etc/hostname")


def test_a_file_digest_never_stands_in_for_part_of_a_file(chunked_blob: bytes, engine) -> None:
    """A chunk that is not the whole file has no digest of its own without ``chunkDigest``:
    the file's is of other bytes. Its reads are refused, whichever chunk lacks it, and the
    store refuses the layer."""
    entries = toc_entries(chunked_blob)
    first = next(i for i, e in enumerate(entries) if e["type"] == "chunk") - 1
    name = entries[first]["name"]
    for missing in (first, first + 1):
        cut = copy.deepcopy(entries)
        del cut[missing]["chunkDigest"]
        _refuses_unverifiable(engine, replace_toc(chunked_blob, encode_entries(cut)), name)


@pytest.mark.parametrize(
    "digest",
    [
        "sha512:" + "ab" * 64,  # go-digest knows it; the store verifies and caches by sha256
        "sha256:" + "AB" * 32,  # go-digest takes lowercase hex only
        "sha256:" + "0" * 63,
        "sha256:" + "g" * 64,
        "md5:" + "0" * 32,
    ],
)
def test_chunk_digest_that_is_no_sha256_is_refused_at_open(blob: bytes, engine, digest) -> None:
    entries = toc_entries(blob)
    e = next(e for e in entries if e["name"] == "etc/hostname")
    e["chunkDigest"] = digest
    with pytest.raises(InvalidToc, match=r"'etc/hostname'.*chunkDigest .* is no sha256 digest"):
        engine.open(replace_toc(blob, encode_entries(entries)))


def test_corrupt_chunk_bytes(blob: bytes, engine) -> None:
    r = _open(blob)
    c = r.lookup("usr/bin/tool").chunks[0]
    bad = bytearray(blob)
    bad[c.offset : c.offset + 40] = b"\xff" * 40
    with pytest.raises(CorruptChunk, match="not gzip"):
        engine.read(engine.open(bytes(bad)), "usr/bin/tool")


def test_file_digest_mismatch(chunked_blob: bytes, engine) -> None:
    entries = toc_entries(chunked_blob)
    e = next(e for e in entries if e["name"] == "big/random.bin" and e["type"] == "reg")
    e["digest"] = "sha256:" + "2" * 64
    if engine.name == "store":
        # The store verifies every chunk it serves (as the Go store does): the bytes served
        # are exactly the file's, whatever the whole-file digest field says.
        diff = engine.open(replace_toc(chunked_blob, encode_entries(entries)))
        assert engine.read(diff, "big/random.bin") == _open(chunked_blob).read_file(
            "big/random.bin"
        )
        return
    r = _open(replace_toc(chunked_blob, encode_entries(entries)))
    assert r.read_file("big/random.bin", 0, 10)  # chunks themselves are fine
    with pytest.raises(FileDigestMismatch, match=r"big/random\.bin"):
        r.verify_all()


def test_chunks_not_covering_file(blob: bytes, engine) -> None:
    entries = toc_entries(blob)
    e = next(e for e in entries if e["name"] == "usr/bin/tool")
    e["chunkSize"] = 100  # claims a first chunk of 100 bytes, and no other chunk follows
    with pytest.raises(InvalidToc, match="chunks cover 100 of its 70000 bytes"):
        engine.open(replace_toc(blob, encode_entries(entries)))


# -- writer input -------------------------------------------------------------------------


def test_writer_rejects_non_tar() -> None:
    with pytest.raises(InvalidLayerTar, match="not a readable tar"):
        convert(io.BytesIO(b"hello, this is not a tar archive" * 40), io.BytesIO())


def test_writer_takes_empty_input_as_an_archive_of_no_entries() -> None:
    """As Go's archive/tar (io.EOF at once) and so estargz.Build; podman pulls a 0-byte layer
    as an empty one. The Go reader's view: tests/estargz/test_go_options.py, "empty-input"."""
    out = io.BytesIO()
    res = convert(io.BytesIO(b""), out)
    names = [
        e["name"] for e in listing(EstargzReader(BytesBlobSource(out.getvalue()), res.toc_digest))
    ]
    assert names == ["", ".no.prefetch.landmark"]


def test_writer_rejects_truncated_tar() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ti = tarfile.TarInfo("big")
        ti.size = 100_000
        tar.addfile(ti, io.BytesIO(b"x" * 100_000))
    with pytest.raises(InvalidLayerTar, match=r"truncated|unexpected end"):
        convert(io.BytesIO(buf.getvalue()[:50_000]), io.BytesIO())


def test_writer_rejects_bad_gzip() -> None:
    with pytest.raises(InvalidLayerTar):
        convert(io.BytesIO(b"\x1f\x8b\x08\x00" + b"\xff" * 100), io.BytesIO())


def test_writer_rejects_bad_zstd() -> None:
    with pytest.raises(InvalidLayerTar):
        convert(io.BytesIO(b"\x28\xb5\x2f\xfd" + b"\xff" * 100), io.BytesIO())


def test_unmodified_copy_still_reads(blob: bytes, engine) -> None:
    """Sanity for the helpers above: replacing the TOC with itself keeps a valid layer."""
    entries = copy.deepcopy(toc_entries(blob))
    r = engine.open(replace_toc(blob, encode_entries(entries)))
    assert engine.read(r, "etc/hostname") == _open(blob).read_file("etc/hostname")
    assert len(engine.read(r, "etc/hostname")) == 5


def test_external_toc_footer_is_named(blob: bytes, engine) -> None:
    """stargz-snapshotter >= 0.13 ``--estargz-external-toc``: the TOC is in a separate image
    and the blob ends with a 46-byte footer (an empty gzip member whose ``SG`` subfield is
    ``STARGZEXTERNALTOC``). Not served; the refusal says what the layer is."""
    import struct

    payload = b"STARGZEXTERNALTOC"
    extra = b"SG" + struct.pack("<H", len(payload)) + payload
    footer = (
        b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
        + struct.pack("<H", len(extra))
        + extra
        + b"\x01\x00\x00\xff\xff"
        + b"\x00" * 8
    )
    assert len(footer) == 46
    toc_offset = parse_footer(blob[-51:], len(blob)).toc_offset
    with pytest.raises(BadFooter, match=r"TOC outside the blob .*--estargz-external-toc"):
        engine.open(blob[:toc_offset] + footer)


def test_a_chunk_entrys_digest_that_is_no_sha256_is_refused_at_open(
    chunked_blob: bytes, engine
) -> None:
    entries = toc_entries(chunked_blob)
    c = next(e for e in entries if e["type"] == "chunk")
    c["chunkDigest"] = "sha512:" + "ab" * 64
    with pytest.raises(InvalidToc, match=r"chunkDigest 'sha512:abab.*' is no sha256 digest"):
        engine.open(replace_toc(chunked_blob, encode_entries(entries)))
