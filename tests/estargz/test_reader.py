"""Reader and LayerIndex specifics: innerOffset, carry-forward, nlink, ranges, one-read TOC."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib

import pytest
from fmt_helpers import Vector

from store.estargz import (
    BytesBlobSource,
    EstargzReader,
    FileBlobSource,
    InvalidEntryName,
    clean_name,
    estargz_footer_bytes,
    tail_fetch_size,
    toc_bytes_from_tail,
)
from store.estargz.toc import encode_toc


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _blob_with(entries_for, members: list[bytes]) -> bytes:
    """Blob = gzip members, then a TOC built by ``entries_for(offsets)``, then the footer."""
    body = b""
    offsets = []
    for m in members:
        offsets.append(len(body))
        body += zlib.compress(m, 6, wbits=31)
    toc_json = encode_toc(entries_for(offsets))
    ti = tarfile.TarInfo("stargz.index.json")
    ti.size = len(toc_json)
    toc = ti.tobuf(tarfile.USTAR_FORMAT) + toc_json + b"\0" * (-len(toc_json) % 512 + 1024)
    return body + zlib.compress(toc, wbits=31) + estargz_footer_bytes(len(body))


def test_inner_offset_packs_files_in_one_member() -> None:
    """Go ≥ 0.14 (minChunkSize) puts several small payloads in one member."""
    a, b, c = b"first", b"second-file", b"x" * 3000
    member = a + b"<pad>" + b + c

    def entries(offs: list[int]) -> list[dict]:
        return [
            {"name": "hdr", "type": "dir"},
            {"name": "a", "type": "reg", "size": len(a), "offset": offs[1],
             "chunkDigest": _sha(a)},
            {"name": "b", "type": "reg", "size": len(b), "offset": offs[1],
             "innerOffset": len(a) + 5, "chunkDigest": _sha(b)},
            {"name": "c", "type": "reg", "size": len(c), "offset": offs[1], "chunkSize": 1000,
             "innerOffset": len(a) + 5 + len(b), "chunkDigest": _sha(c[:1000])},
            {"name": "c", "type": "chunk", "offset": offs[2], "chunkOffset": 1000,
             "chunkDigest": _sha(c[1000:])},
        ]  # fmt: skip

    blob = _blob_with(entries, [b"headers", member, c[1000:]])
    r = EstargzReader(BytesBlobSource(blob))
    assert r.read_file("a") == a
    assert r.read_file("b") == b
    assert r.read_file("c") == c
    assert r.read_file("c", 990, 20) == c[990:1010]
    ca = r.lookup("a").chunks[0]
    cb = r.lookup("b").chunks[0]
    assert ca.compressed_end == cb.compressed_end == r.lookup("c").chunks[1].offset


def test_uname_carry_forward_and_nlink() -> None:
    def entries(offs: list[int]) -> list[dict]:
        return [
            {"name": "./d/", "type": "dir", "uid": 1000, "userName": "dev", "mode": 0o755},
            {"name": "d/f", "type": "reg", "uid": 1000, "gid": 7, "groupName": "g"},
            {"name": "d/g", "type": "reg", "gid": 7},
            {"name": "d/h", "type": "hardlink", "linkName": "./d/f"},
            {"name": "d/sub/deeper/x", "type": "symlink", "linkName": "../../f"},
        ]

    r = EstargzReader(BytesBlobSource(_blob_with(entries, [b"h"])))
    f = r.lookup("d/f")
    assert (f.uname, f.gname) == ("dev", "g")
    assert r.lookup("d/g").gname == "g"
    assert f.nlink == 2 and r.lookup("d/h") is f
    assert r.index.hardlink_target("d/h") == "d/f"
    d = r.lookup("d")
    assert d.nlink == 3  # ".", its entry in the root, "sub/.."
    assert r.lookup("d/sub").implicit and r.lookup("d/sub").mode == 0o755
    assert r.index.root.nlink == 3
    assert sorted(d.children) == ["f", "g", "h", "sub"]
    assert r.index.parent(r.lookup("d/sub/deeper")) is r.lookup("d/sub")
    assert r.index.parent(d) is r.index.root and r.index.parent(r.index.root) is None


@pytest.mark.parametrize(
    ("raw", "clean"),
    [("./a//b/", "a/b"), ("/a/./b", "a/b"), ("./", ""), ("a/b/../c", "a/c"), ("", "")],
)
def test_clean_name(raw: str, clean: str) -> None:
    assert clean_name(raw) == clean


def test_clean_name_refuses_escape() -> None:
    with pytest.raises(InvalidEntryName):
        clean_name("a/../../b")


def test_chunks_for_range(vectors: dict[str, Vector]) -> None:
    with FileBlobSource(vectors["chunked-1m"].blob) as src:
        r = EstargzReader(src)
        e = r.lookup("big/random.bin")
        mib = 1 << 20
        assert [c.chunk_offset for c in r.index.chunks_for_range(e, 0, 1)] == [0]
        got = r.index.chunks_for_range(e, mib - 1, 2)
        assert [c.chunk_offset for c in got] == [0, mib]
        assert r.index.chunks_for_range(e, e.size, 10) == []
        assert r.index.chunks_for_range(e, 0, 0) == []
        assert len(r.index.chunks_for_range(e, 0, e.size)) == 6
        whole = r.read_file(e)
        assert r.read_file(e, mib - 3, 6) == whole[mib - 3 : mib + 3]
        assert r.read_file(e, e.size - 2, 100) == whole[-2:]


def test_footer_and_toc_in_one_read(vectors: dict[str, Vector]) -> None:
    """The default tail read holds the TOC: the reader makes exactly one request for it."""
    blob = vectors["chunked-1m"].blob.read_bytes()
    reads: list[tuple[int, int]] = []

    class Counting(BytesBlobSource):
        def read_at(self, offset: int, size: int) -> bytes:
            reads.append((offset, size))
            return super().read_at(offset, size)

    r = EstargzReader(Counting(blob))
    assert reads == [(len(blob) - tail_fetch_size(len(blob)), tail_fetch_size(len(blob)))]
    # and a short tail needs exactly one more read, of the TOC range
    reads.clear()
    EstargzReader(Counting(blob), tail_guess=64)
    assert len(reads) == 2 and reads[1][0] == r.footer.toc_offset
    assert toc_bytes_from_tail(blob[-64:], len(blob), r.footer) is None


def test_landmarks(vectors: dict[str, Vector]) -> None:
    with FileBlobSource(vectors["prioritized"].blob) as src:
        idx = EstargzReader(src).index
        assert idx.prefetch_end_offset == 400634 and not idx.has_no_prefetch_landmark
        assert idx.is_landmark(".prefetch.landmark")
    with FileBlobSource(vectors["basic"].blob) as src:
        idx = EstargzReader(src).index
        assert idx.prefetch_end_offset is None and idx.has_no_prefetch_landmark


def test_reader_on_our_writer_output_io() -> None:
    from store.estargz import convert

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ti = tarfile.TarInfo("f")
        ti.size = 5
        tar.addfile(ti, io.BytesIO(b"12345"))
    out = io.BytesIO()
    res = convert(io.BytesIO(buf.getvalue()), out)
    assert EstargzReader(BytesBlobSource(out.getvalue()), res.toc_digest).read_file("f") == b"12345"
