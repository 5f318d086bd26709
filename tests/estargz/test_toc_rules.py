"""The one TOC → validated index path: ordering rules, caps, hostile shapes (no blob needed).

Entries are applied in TOC order as ``tar -x`` applies members; the Go reader agrees on the
duplicates it can represent (checked in ``test_go_reader`` style by the gocheck listing).
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from store.estargz import InvalidEntryName, InvalidToc, LayerIndex, TocLimits, TocOutOfRange
from store.estargz.toc import iter_toc_entries

TOC_OFFSET = 1 << 20


@pytest.fixture(autouse=True, params=["whole", "streamed"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every rule holds through both decoders: small TOCs decoded whole (msgspec) and large
    ones streamed entry by entry (forced here by a size limit of 0)."""
    if request.param == "streamed":
        monkeypatch.setattr("store.estargz.toc.WHOLE_DECODE_MAX", 0)
    return request.param


def build(entries: list[dict], limits: TocLimits | None = None) -> LayerIndex:
    text = json.dumps({"version": 1, "entries": entries}).encode()
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]  # values cut anywhere
    return LayerIndex.from_toc_json(pieces, toc_offset=TOC_OFFSET, limits=limits or TocLimits())


def reg(name: str, size: int = 0, offset: int = 0, **kw) -> dict:
    return {"name": name, "type": "reg", "size": size, "offset": offset, **kw}


@pytest.mark.parametrize("body", [b'{"version":1,"entries":null}', b'{"entries":[],"version":1}'])
def test_entries_null_and_empty_list_are_an_empty_layer(body: bytes) -> None:
    idx = LayerIndex.from_toc_json([body], toc_offset=100)
    assert [name for name, _ in idx.names()] == [""] and idx.entries == [idx.root]


@pytest.mark.parametrize(
    "body, match",
    [
        (b'{"version":1}', "no 'entries'"),
        (b'{"version":2,"entries":[]}', "version 2"),
        (b'{"version":1,"entries":{}}', "not a list"),
        (b'{"version":1,"entries":[1]}', "entry 0 is a int"),
        (b'{"version":1,"entries":[]} x', "data after"),
        (b'{"version":1,"entries":[{"name":"a","type":"dir"}', "expected"),
        (b"[]", "expected a JSON object"),
    ],
)
def test_toc_shape_errors(body: bytes, match: str) -> None:
    with pytest.raises(InvalidToc, match=match):
        LayerIndex.from_toc_json([body], toc_offset=100)


@pytest.mark.parametrize(
    "entry, match",
    [
        (reg("a", size="5"), "size is '5'"),
        (reg("a", mode=True), "mode is True"),
        (reg("a", uid=-1), "uid is -1"),
        (reg("a", uid=1 << 40), "uid is"),
        (reg("a", size=1.5), "size is 1.5"),
        ({"name": 5, "type": "reg"}, "name is 5"),
        ({"name": "a", "type": ["reg"]}, "unknown type"),
        (reg("a", xattrs={"user.x": "***"}), "not base64"),
        (reg("a", xattrs={"user.x": 5}), "not base64"),
        (reg("a", xattrs=[1]), "xattrs is not an object"),
        (reg("a", digest=7), "digest is 7"),
        ({"name": "l", "type": "symlink", "linkName": 3}, "linkName is 3"),
    ],
)
def test_wrong_json_types_are_refused(entry: dict, match: str) -> None:
    with pytest.raises(InvalidToc, match=match):
        build([entry])


@pytest.mark.parametrize(
    "entries, error, match",
    [
        ([reg("../../etc/evil")], InvalidEntryName, "escapes the layer root"),
        ([reg("f"), reg("f/x")], InvalidToc, "'f' is a reg, not a directory"),
        ([{"name": "l", "type": "symlink", "linkName": "/"}, reg("l/x")], InvalidToc, "symlink"),
        ([{"name": "h", "type": "hardlink", "linkName": "nope"}], InvalidToc, "not found"),
        (
            [{"name": "h", "type": "hardlink", "linkName": "later"}, reg("later")],
            InvalidToc,
            "not found",
        ),
        (
            [{"name": "d", "type": "dir"}, {"name": "h", "type": "hardlink", "linkName": "d"}],
            InvalidToc,
            "is a directory",
        ),
        (  # extraction removes the directory "a" before it links: the target is gone
            [reg("a/x/deep"), {"name": "a", "type": "hardlink", "linkName": "a/x/deep"}],
            InvalidToc,
            "'a/x/deep' lies under 'a', which the link replaces",
        ),
        ([reg("a" * 256)], InvalidEntryName, "longer than Linux allows"),
        ([reg("a/" * 2048 + "f")], InvalidEntryName, "longer than Linux allows"),
        ([reg("a\0b")], InvalidEntryName, "NUL"),
        ([{"name": "", "type": "reg"}], InvalidToc, "root is a reg"),
        ([reg("f", 100, 10, chunkSize=10)], InvalidToc, "chunks cover 10 of its 100 bytes"),
        (
            [
                reg("f", 100, 10, chunkSize=60),
                {"name": "f", "type": "chunk", "offset": 20, "chunkOffset": 50, "chunkSize": 50},
            ],
            InvalidToc,
            "does not continue the file",
        ),
        (
            [
                reg("f", 100, 10, chunkSize=60),
                {"name": "f", "type": "chunk", "offset": 20, "chunkOffset": 70, "chunkSize": 30},
            ],
            InvalidToc,
            "does not continue the file",
        ),
        (
            [
                reg("f", 100, 10, chunkSize=60),
                {"name": "f", "type": "chunk", "offset": 20, "chunkOffset": 60, "chunkSize": 50},
            ],
            InvalidToc,
            "does not continue the file",
        ),
        ([{"name": "f", "type": "chunk", "offset": 20}], InvalidToc, "does not follow its file"),
        ([reg("f", 5, TOC_OFFSET)], TocOutOfRange, "at or past the TOC"),
        ([reg("f", 5, 1 << 50)], TocOutOfRange, "at or past the TOC"),
        ([{"name": "l", "type": "symlink", "linkName": "x" * 5000}], InvalidToc, "4095"),
        # A "\ud800" escape decodes to a lone surrogate: no file name has it as bytes.
        ([reg("\ud800")], InvalidEntryName, "lone surrogate"),
        ([reg("\ud800" * 40 + "/" + "\ud800" * 40)], InvalidEntryName, "lone surrogate"),
        ([{"name": "l", "type": "symlink", "linkName": "\udfff"}], InvalidEntryName, "surrogate"),
        # symlink(2) takes a C string: no extraction makes a target holding NUL.
        ([{"name": "l", "type": "symlink", "linkName": "a\0b"}], InvalidEntryName, "NUL"),
        # Go's encoding/json writes U+FFFD for a byte that is not UTF-8: the name is unknown.
        ([reg("bad-\ufffd-name")], InvalidEntryName, r"name .* holds U\+FFFD"),
        ([{"name": "l", "type": "symlink", "linkName": "t\ufffd"}], InvalidEntryName, r"U\+FFFD"),
        (
            [reg("f"), {"name": "h", "type": "hardlink", "linkName": "\ufffd"}],
            InvalidEntryName,
            "FFFD",
        ),
        (
            [reg("f"), {"name": "h", "type": "hardlink", "linkName": "\ud800" * 70}],
            InvalidEntryName,
            "lone surrogate",
        ),
    ],
)
def test_hostile_entries_are_refused(entries, error, match) -> None:
    with pytest.raises(error, match=match):
        build(entries)


@pytest.mark.parametrize(
    "offset, end",
    [
        (0, 0),
        (500, 500),
        (TOC_OFFSET - 1, TOC_OFFSET - 1),
        (TOC_OFFSET, TOC_OFFSET),
        (TOC_OFFSET + 1, TOC_OFFSET),
        (1 << 50, TOC_OFFSET),
    ],
)
def test_an_empty_landmark_past_the_toc_ends_the_region_at_the_toc(offset, end, caplog) -> None:
    # Size 0: no data offset check saw it. A hint, as in the Go reader (the layer is not
    # refused), but the region stops where the layer's data does.
    idx = build([reg("f", 5, 10), reg(".prefetch.landmark", 0, offset)])
    assert idx.prefetch_end_offset == end
    warned = [r.getMessage() for r in caplog.records if "prefetch region ends" in r.getMessage()]
    assert len(warned) == (offset >= TOC_OFFSET)
    if warned:
        assert "'.prefetch.landmark'" in warned[0] and str(offset) in warned[0]


def test_a_landmark_with_data_past_the_toc_is_refused_as_any_data_entry() -> None:
    with pytest.raises(TocOutOfRange, match=r"\.prefetch\.landmark.*at or past the TOC"):
        build([reg("f", 5, 10), reg(".prefetch.landmark", 1, TOC_OFFSET)])


@pytest.mark.parametrize(
    "entries",
    [
        [reg("f", 1 << 40, 10)],  # one chunk of 1 TiB
        [reg("f", 1 << 40, 10, chunkSize=1 << 39), reg("g")],  # refused at the first chunk
        [
            reg("f", 100 + (1 << 30), 10, chunkSize=100),
            {"name": "f", "type": "chunk", "offset": 20, "chunkOffset": 100},  # to the end
        ],
    ],
)
def test_a_chunk_over_the_chunk_size_limit_is_refused(entries) -> None:
    # Verifying a chunk inflates it whole: a TOC claiming a huge one (a few MB of gzip'ed
    # zeros) would make one small read allocate that much.
    with pytest.raises(InvalidToc, match="over the limit on chunk size"):
        build(entries)


def test_the_chunk_size_limit_is_configurable() -> None:
    assert build([reg("f", 1 << 40, 10)], TocLimits(max_chunk_bytes=1 << 40)).lookup("f")
    message = r"over the limit on chunk size \(1000, store config chunk_max_bytes\)"
    with pytest.raises(InvalidToc, match=message):
        build([reg("f", 1001, 10)], TocLimits(max_chunk_bytes=1000))


def test_chunks_at_the_chunk_size_limit_are_served() -> None:
    cap = TocLimits().max_chunk_bytes
    idx = build(
        [
            reg("f", 2 * cap, 10, chunkSize=cap),
            {"name": "f", "type": "chunk", "offset": 20, "chunkOffset": cap, "chunkSize": cap},
        ]
    )
    assert [c.size for c in idx.lookup("f").chunks] == [cap, cap]


def test_later_entry_wins_for_every_type() -> None:
    idx = build(
        [
            reg("conf", 4, 10, digest="sha256:old"),
            reg("conf", 4, 20, digest="sha256:new"),
            {"name": "d/", "type": "dir", "mode": 0o755},
            reg("d/kept", 0),
            {"name": "d/", "type": "dir", "mode": 0o700, "uid": 7},
            {"name": "s", "type": "symlink", "linkName": "target"},
            reg("s", 0, mode=0o600),
            reg("f2l", 0),
            {"name": "f2l", "type": "symlink", "linkName": "x"},
            {"name": "x/", "type": "dir"},
            reg("x/gone", 0),
            reg("x", 0),  # a directory replaced by a file: its subtree goes, as with tar -x
            reg("y", 0),
            {"name": "y/", "type": "dir", "mode": 0o711},
            reg("y/in", 0),
            reg("t", 0),
            {"name": "hl", "type": "hardlink", "linkName": "t"},
            reg("t", 0, mode=0o640),  # the link keeps the old file, as tar -x leaves it
        ]
    )
    assert idx.lookup("conf").digest == "sha256:new"
    assert idx.lookup("conf").chunks[0].offset == 20
    d = idx.lookup("d")
    assert d.mode == 0o700 and d.uid == 7 and "kept" in d.children
    assert idx.lookup("s").type == "reg" and idx.lookup("f2l").type == "symlink"
    assert idx.lookup("x").type == "reg" and idx.lookup("x/gone") is None
    assert idx.lookup("y").mode == 0o711 and idx.lookup("y/in") is not None
    assert idx.lookup("hl") is not idx.lookup("t") and idx.lookup("hl").nlink == 1
    assert idx.hardlink_target("hl") is None  # "t" names another file now
    assert idx.root.nlink == 2 + 2  # d and y
    # Numbering: every node of the final tree once, root first; replaced entries are gone.
    assert idx.entries[0] is idx.root and [e.ino for e in idx.entries] == list(
        range(len(idx.entries))
    )
    assert len({id(e) for e in idx.entries}) == len(idx.entries) == 1 + 10
    assert [c.name for c in idx.all_chunks()] == ["conf"]


def test_deep_nesting_builds_without_recursion() -> None:
    deep = "a/" * 2000 + "f"  # 4001 bytes: within PATH_MAX
    idx = build([reg(deep)])
    assert idx.lookup(deep) is not None and len(idx.entries) == 2002


def test_directories_the_toc_never_names_count_against_the_toc_limits() -> None:
    # Each implicit directory holds its whole path: 200 entries "x<k>/a/a/…/f" (800 KB of
    # TOC) made 400,000 of them holding 800 MB of names, and the build took 950 MB.
    deep = [{"name": f"x{k}/" + "a/" * 2000 + "f", "type": "reg"} for k in range(200)]
    with pytest.raises(InvalidToc, match="directories the TOC never names are over the limit"):
        build(deep, TocLimits(max_bytes=8 << 20))
    many = [{"name": f"d{k}/e/f", "type": "reg"} for k in range(11)]  # two directories each
    with pytest.raises(InvalidToc, match="directories the TOC never names are over the limit"):
        build(many, TocLimits(max_entries=20))
    assert len(build(many[:10], TocLimits(max_entries=20)).entries) == 31


def test_entry_cap_stops_decoding_early() -> None:
    entries = [{"name": f"f{i}", "type": "reg"} for i in range(1000)]
    with pytest.raises(InvalidToc, match="more than 100 entries"):
        build(entries, TocLimits(max_entries=100))
    assert len(build(entries, TocLimits(max_entries=1000)).entries) == 1001


def test_a_gigantic_name_is_decoded_in_linear_time_and_refused() -> None:
    text = json.dumps({"version": 1, "entries": [reg("x" * (16 << 20))]}).encode()
    start = time.monotonic()
    pieces = [text[i : i + (1 << 16)] for i in range(0, len(text), 1 << 16)]
    with pytest.raises(InvalidEntryName, match="longer than Linux allows"):
        LayerIndex.from_toc_json(pieces, toc_offset=100)
    assert time.monotonic() - start < 5


def test_iter_toc_entries_yields_dicts_in_order() -> None:
    text = b'{"entries":[{"name":"a","type":"dir"},{"name":"b","type":"reg"}],"version":1}'
    assert [e["name"] for e in iter_toc_entries([text])] == ["a", "b"]


@pytest.mark.parametrize(
    "text, message",
    [
        (b'{"version":1,"entries":[],"entries":[{"name":"a","type":"dir"}]}', "twice"),
        (b'{"version":1,"entries":[{"name":"entries","type":"dir"}]}', None),
        (b'{"version":1,"entries":[{"name":"a","type":"dir"}]} x', "after the TOC"),
        (b'{"version":true,"entries":[]}', "version"),
        (b'{"version":1,"entries":[1]}', "not an object"),
        (b'{"version":1,"entries":[{"name":"\\ud800","type":"dir"}]}', None),
        (b'{"version":1,"entries":[{"name":"a","size":NaN,"type":"reg"}]}', None),
        (b'\xef\xbb\xbf{"version":1,"entries":[]}', "expected a JSON object"),
        (b'{"version":1,"entries":[{"name":"a","type":"dir"}],"entri\\u0065s":null}', "twice"),
        (
            b'{"version":1,"entries":[{"name":"a","type":"dir","x":'
            + b"[" * 5000
            + b"]" * 5000
            + b"}]}",
            "nested too deeply",
        ),
    ],
)
def test_both_decoders_agree_on_unusual_tocs(text: bytes, message: str | None) -> None:
    """What the whole decoder cannot vouch for goes the streaming way: same entries, same
    errors (a duplicate ``entries`` key is refused, not decoded last-wins)."""
    if message is None:
        expected = json.loads(text)["entries"]
        got = list(iter_toc_entries([text]))
        assert json.dumps(got) == json.dumps(expected)
    else:
        with pytest.raises(InvalidToc, match=message):
            list(iter_toc_entries([text]))


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_a_chunk_inflating_past_its_size_is_refused_without_inflating_it(compression) -> None:
    import hashlib
    import tracemalloc
    import zlib

    import zstandard

    from store.estargz import Chunk, ChunkDigestMismatch, decompress_chunk

    bomb_size = 128 << 20
    if compression == "zstd":
        bomb = zstandard.ZstdCompressor(level=1).compress(bytes(bomb_size))
    else:
        z = zlib.compressobj(1, wbits=31)
        bomb = b"".join(z.compress(bytes(1 << 20)) for _ in range(bomb_size >> 20)) + z.flush()
    digest = "sha256:" + hashlib.sha256(b"\1" * 10).hexdigest()
    chunk = Chunk("bomb", 0, 10, 0, len(bomb), 0, digest, compression)
    tracemalloc.start()
    try:
        with pytest.raises(ChunkDigestMismatch):
            decompress_chunk(chunk, bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # only the 10 bytes asked for were inflated


def test_entries_null_reads_and_lists_as_an_empty_layer(vectors_dir, lazybench, tmp_path) -> None:
    from fmt_helpers import replace_toc

    from store.estargz import BytesBlobSource, EstargzReader
    from store.estargz.listing import listing

    blob = replace_toc((vectors_dir / "basic.blob").read_bytes(), b'{"version":1,"entries":null}')
    r = EstargzReader(BytesBlobSource(blob))
    assert [line["name"] for line in listing(r)] == [""]
    path = tmp_path / "empty.blob"
    path.write_bytes(blob)
    res = lazybench("estargz", "ls", str(path))
    assert res.code == 0, res.err


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("", b"v", r"xattr name '' is not 1-255 bytes without NUL"),
        ("user.a\0b", b"v", r"xattr name 'user.a\\x00b' is not 1-255 bytes without NUL"),
        ("user." + "n" * 251, b"v", r"is not 1-255 bytes"),
        ("user.big", bytes(65537), r"xattr 'user.big' is 65537 bytes, over Linux's 65536"),
    ],
)
def test_xattrs_no_file_could_hold_are_refused(name, value, message) -> None:
    # A NUL would split the name in a listxattr answer; Linux sets none of these.
    with pytest.raises(InvalidToc, match=message):
        build([reg("f", 0, xattrs={name: base64.b64encode(value).decode()})])


def test_xattrs_at_linux_limits_are_kept() -> None:
    name = "user." + "n" * 250
    idx = build([reg("f", 0, xattrs={name: base64.b64encode(bytes(65536)).decode()})])
    assert idx.lookup("f").xattrs == {name: bytes(65536)}


def test_a_whiteout_under_a_whiteout_of_the_same_layer_is_ignored() -> None:
    """``rm -rf /c/y`` makes some tools write ``.wh.c`` and ``c/.wh.y``: containers/storage
    has the character device ``c`` when it reaches ``c/.wh.y``, ignores the ENOTDIR of its
    mknod, and ``c`` stays whited out — it is not made a directory (nor is an opaque marker
    under it). A whiteout under a real directory ``c`` later in the tar is applied."""
    idx = build([reg(".wh.c"), reg("c/.wh.y"), reg("c/.wh..wh..opq")])
    assert sorted(idx.root.children) == [".wh.c"]
    idx = build([reg(".wh.c"), {"name": "c/", "type": "dir"}, reg("c/.wh.y")])
    assert sorted(idx.lookup("c").children) == [".wh.y"]


def test_a_whiteout_deeper_under_a_whiteout_of_the_same_layer_is_ignored() -> None:
    """containers/storage makes no directory under the whiteout's character device (the
    ``Lstat`` of an entry's parent gives ``ENOTDIR``, not ``ENOENT``: no ``MkdirAll``), so the
    mknod of a whiteout at any depth under it fails with ``ENOTDIR``, which it ignores: the
    name stays whited out, no directory is made for it (podman 4.3.1 shows ``c`` a device)."""
    idx = build([reg(".wh.c"), reg("c/d/.wh.y"), reg("c/d/e/.wh.z")])
    assert sorted(idx.root.children) == [".wh.c"]
    idx = build([{"name": "a/", "type": "dir"}, reg("a/.wh.b"), reg("a/b/c/.wh.d")])
    assert sorted(idx.lookup("a").children) == [".wh.b"]
    # The directory the layer names afterwards replaces the device: it holds none of them.
    idx = build([reg(".wh.c"), reg("c/d/.wh.y"), {"name": "c/", "type": "dir"}])
    assert idx.lookup("c").children == {}


def test_an_opaque_marker_deeper_under_a_whiteout_of_the_same_layer_is_applied() -> None:
    # Extraction fails on it (its setxattr gives ENOTDIR: not ignored): the layer keeps the
    # tree it had, with the marker's directories.
    idx = build([reg(".wh.c"), reg("c/d/.wh..wh..opq")])
    assert list(idx.lookup("c/d").children) == [".wh..wh..opq"]


def test_whiteouts_ignored_under_a_whited_out_name_apply_when_a_later_entry_makes_it() -> None:
    # Extraction fails at c/x (ENOTDIR under the device): the tree is the one the layer had,
    # the OCI spec's, which holds the whiteout's directory c/d.
    idx = build([reg(".wh.c"), reg("c/d/.wh.y"), reg("c/x")])
    assert list(idx.lookup("c").children) == ["d", "x"]
    assert list(idx.lookup("c/d").children) == [".wh.y"]


def test_two_spellings_of_one_byte_string_are_one_name() -> None:
    # A \udcXX escape stands for the byte XX: "caf\udcc3\udca9" is the bytes of "café".
    # Extraction makes one file of both, the later entry winning; so does the index.
    idx = build([reg("café", 3, 10), reg("caf\udcc3\udca9", 4, 20), reg("d/\udcff", 5, 30)])
    names = {name: e for name, e in idx.names()}
    assert sorted(names) == ["", "café", "d", "d/\udcff"]
    assert (names["café"].size, names["café"].chunks[0].offset) == (4, 20)
    assert names["d/\udcff"].size == 5  # a byte that is not UTF-8 keeps its escape
