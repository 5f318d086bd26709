"""Writer specifics: input formats, determinism, Go-compatible TOC fields, odd inputs."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
import zstandard

from store.estargz import (
    BytesBlobSource,
    EstargzReader,
    LayerIndex,
    convert,
    manifest_entries,
    write_zstd_chunked,
    zstd_chunked_layer,
)
from store.estargz.errors import InvalidLayerTar
from store.estargz.listing import listing
from store.estargz.toc import encode_toc


def _tar(files: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, errors="surrogateescape") as tar:
        for name, data in files:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1_700_000_000
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _convert(data: bytes, **kw) -> tuple[bytes, EstargzReader]:
    out = io.BytesIO()
    res = convert(io.BytesIO(data), out, **kw)
    return out.getvalue(), EstargzReader(BytesBlobSource(out.getvalue()), res.toc_digest)


FILES = [("a/x.bin", bytes(range(256)) * 1000), ("a/y.txt", b"hello\n"), ("b/empty", b"")]


def test_plain_gzip_and_zstd_inputs_give_the_same_blob() -> None:
    plain = _tar(FILES)
    blob, _ = _convert(plain, chunk_size=10_000)
    assert _convert(gzip.compress(plain), chunk_size=10_000)[0] == blob
    assert _convert(zstandard.ZstdCompressor().compress(plain), chunk_size=10_000)[0] == blob


def test_a_landmark_time_gives_a_repeated_layer_a_blob_and_toc_of_its_own() -> None:
    # An image listing one layer twice needs two blobs: no layer store can serve one at two
    # places. Only the landmark's time differs; the files are the same.
    plain = _tar(FILES)
    first = io.BytesIO()
    one = convert(io.BytesIO(plain), first, chunk_size=10_000)
    again = io.BytesIO()
    two = convert(io.BytesIO(plain), again, chunk_size=10_000, landmark_mtime=1)
    assert len({one.digest, two.digest}) == 2 and len({one.toc_digest, two.toc_digest}) == 2
    assert one.diff_id != two.diff_id
    readers = [
        EstargzReader(BytesBlobSource(b.getvalue()), r.toc_digest)
        for b, r in ((first, one), (again, two))
    ]
    files = [{n: rd.read_file(n) for n in ("a/x.bin", "a/y.txt", "b/empty")} for rd in readers]
    assert files[0] == files[1] == dict(FILES)
    landmark = [
        next(e for e in rd.toc.entries if e["name"] == ".no.prefetch.landmark") for rd in readers
    ]
    assert "modtime" not in landmark[0] and landmark[1]["modtime"] == "1970-01-01T00:00:01Z"


def test_output_does_not_depend_on_worker_count() -> None:
    plain = _tar(FILES * 1 + [(f"many/{i}", bytes([i]) * i * 50) for i in range(200)])
    one = io.BytesIO()
    convert(io.BytesIO(plain), one, chunk_size=4096, workers=1)
    two = io.BytesIO()
    convert(io.BytesIO(plain), two, chunk_size=4096, workers=2)
    assert one.getvalue() == two.getvalue()


def test_toc_fields_like_go() -> None:
    _, r = _convert(_tar(FILES), chunk_size=256_000)
    e = {x["name"]: x for x in r.toc.entries if x["type"] != "chunk"}
    # exactly one chunk: reg entry carries chunkSize (= chunk size) and digest == chunkDigest
    x = e["a/x.bin"]
    assert x["chunkSize"] == 256_000 and x["digest"] == x["chunkDigest"]
    assert list(x) == [
        "name", "type", "size", "modtime", "mode", "offset", "digest", "chunkSize", "chunkDigest",
    ]  # fmt: skip
    assert x["modtime"] == "2023-11-14T22:13:20Z"
    # empty file: digest of nothing, no offset, no chunkDigest
    assert "offset" not in e["b/empty"] and "chunkDigest" not in e["b/empty"]
    assert e[".no.prefetch.landmark"] == {
        "name": ".no.prefetch.landmark",
        "type": "reg",
        "size": 1,
        "offset": e[".no.prefetch.landmark"]["offset"],
        "digest": "sha256:dc0e9c3658a1a3ed1ec94274d8b19925c93e1abb7ddba294923ad9bde30f8cb8",
        "chunkDigest": "sha256:dc0e9c3658a1a3ed1ec94274d8b19925c93e1abb7ddba294923ad9bde30f8cb8",
    }
    assert r.toc.entries[0]["name"] == ".no.prefetch.landmark"


def test_multi_chunk_entries() -> None:
    data = bytes(range(256)) * 40  # 10240 bytes, chunk 4096 → 4096, 4096, 2048
    _, r = _convert(_tar([("f", data)]), chunk_size=4096)
    chunks = [x for x in r.toc.entries if x["name"] == "f"]
    assert [x["type"] for x in chunks] == ["reg", "chunk", "chunk"]
    assert [x.get("chunkOffset", 0) for x in chunks] == [0, 4096, 8192]
    assert [x.get("chunkSize") for x in chunks] == [4096, 4096, None]  # last partial: omitted
    assert len({x["offset"] for x in chunks}) == 3  # a gzip member per chunk
    assert r.read_file("f", 4000, 200) == data[4000:4200]


def test_existing_landmarks_and_toc_are_dropped() -> None:
    files = [
        (".no.prefetch.landmark", b"\x0f"),
        ("./.prefetch.landmark", b"\x0f"),
        ("stargz.index.json", b"{}"),
        ("ok", b"abc"),
    ]
    _, r = _convert(_tar(files))
    names = [line["name"] for line in listing(r)]
    assert names == ["", ".no.prefetch.landmark", "ok"]


def test_a_name_that_is_not_utf8_is_escaped_as_go_writes_it_and_refused() -> None:
    # Go's encoding/json writes the escape \ufffd for each byte that is not UTF-8 (a real
    # U+FFFD as itself): the TOC cannot say the name, so no reader can serve it (a normal
    # pull takes it from the tar header), and the writer refuses the tar, naming the entry.
    raw = encode_toc([{"name": "bad-\udcff-\udce2\udc82-name"}, {"name": "\ufffd"}])
    assert b'"bad-\\ufffd-\\ufffd\\ufffd-name"' in raw  # one escape a byte, as Go
    assert '"\ufffd"'.encode() in raw  # the real U+FFFD, as itself
    with pytest.raises(InvalidLayerTar, match=r"name 'bad-.*U\+FFFD"):
        _convert(_tar([("bad-\udcff-name", b"abc")]))
    # A real U+FFFD is written as itself: the store's typed decode, which refuses every
    # \u escape, serves it (a TOC decoded one dict at a time cannot tell, and refuses it).
    convert(io.BytesIO(_tar([("\ufffd", b"a real U+FFFD")])), io.BytesIO())


def test_gnu_format_long_names() -> None:
    long = "d/" + "n" * 200
    _, r = _convert(_tar([(long, b"x")], fmt=tarfile.GNU_FORMAT))
    assert r.read_file(long) == b"x"


def test_duplicate_entries_later_wins() -> None:
    _, r = _convert(_tar([("f", b"old"), ("f", b"new!")]))
    assert r.read_file("f") == b"new!"


def test_a_replaced_file_lives_on_in_its_hardlinks_under_their_own_names() -> None:
    # Names outside ASCII travel in PAX path/linkpath records, which outrank the header's
    # fields: renaming the surviving entry must not leave the old name's record behind.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = b"the first file\n"
        ti = tarfile.TarInfo("c d/ü")
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
        for name in ("é", "ß"):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.LNKTYPE, "c d/ü"
            tar.addfile(link)
        sym = tarfile.TarInfo("c d/ü")
        sym.type, sym.linkname = tarfile.SYMTYPE, "日本"
        tar.addfile(sym)
    blob, reader = _convert(buf.getvalue())
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as out:
        written = [
            (ti.name, ti.type, ti.linkname)
            for ti in out
            if ti.name not in (".no.prefetch.landmark", "stargz.index.json")
        ]
    assert written == [
        ("é", tarfile.REGTYPE, ""),
        ("ß", tarfile.LNKTYPE, "é"),
        ("c d/ü", tarfile.SYMTYPE, "日本"),
    ]
    toc = [(e["name"], e["type"]) for e in reader.toc.entries if e["type"] != "dir"]
    assert toc[1:] == [("é", "reg"), ("ß", "hardlink"), ("c d/ü", "symlink")]
    assert reader.read_file("é") == data


def test_a_chunk_size_readers_refuse_is_refused_before_writing() -> None:
    import pytest

    out = io.BytesIO()
    with pytest.raises(ValueError, match=r"chunk size 67108865 is over 67108864 bytes"):
        convert(io.BytesIO(_tar(FILES)), out, chunk_size=(64 << 20) + 1)
    assert out.getvalue() == b""


def test_a_hardlink_to_its_own_name_keeps_the_file_with_the_links_owner_and_mode() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        ti = tarfile.TarInfo("f")
        ti.size, ti.mode = 5, 0o644
        tar.addfile(ti, io.BytesIO(b"data\n"))
        link = tarfile.TarInfo("f")
        link.type, link.linkname, link.mode, link.uid = tarfile.LNKTYPE, "f", 0o600, 7
        tar.addfile(link)
    _, reader = _convert(buf.getvalue())
    (entry,) = [e for e in reader.toc.entries if e["name"] == "f"]
    assert (entry["type"], entry["mode"], entry["uid"]) == ("reg", 0o600, 7)
    assert reader.read_file("f") == b"data\n"


def test_a_pax_global_headers_records_apply_to_no_entry() -> None:
    """Go's archive/tar returns a PAX global header (type ``g``) as an entry of its own and
    applies none of its records; containers/storage's extraction skips it. A normal pull of the
    input gives each file its own header's owner, time and xattrs: so must the output (its
    tar and TOC), whatever :mod:`tarfile`'s POSIX reading would apply."""
    records = {"uid": "7", "gid": "8", "mtime": "1000000000", "SCHILY.xattr.user.g": "glob"}
    plain = tarfile.TarInfo._create_pax_generic_header(records, tarfile.XGLTYPE, "utf-8")
    plain += _tar([("d/a", b"a\n"), ("d/b", b"")])
    want = {"d/a": (0, 0, 1_700_000_000, {}), "d/b": (0, 0, 1_700_000_000, {})}
    for write in (convert, write_zstd_chunked):
        out = io.BytesIO()
        res = write(io.BytesIO(plain), out)
        data = out.getvalue()
        if write is convert:
            raw = gzip.decompress(data)
            index = EstargzReader(BytesBlobSource(data), res.toc_digest).index
        else:
            raw = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()
            layer = zstd_chunked_layer(res.annotations)
            assert layer is not None
            start, end = layer.toc_range
            entries = manifest_entries(data[start:end], layer.position, layer.checksum)
            index = LayerIndex.from_entries(entries, toc_offset=start, compression="zstd")
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            headers = {
                ti.name: (ti.uid, ti.gid, ti.mtime, ti.pax_headers)
                for ti in tar
                if ti.name.startswith("d/")
            }
        assert headers == want, write.__name__
        for name in want:
            e = index.lookup(name)
            assert (e.uid, e.gid, dict(e.xattrs)) == (0, 0, {}), (write.__name__, name)
            assert e.modtime.startswith("2023-11-14T22:13:20"), (write.__name__, e.modtime)
