"""A zstd:chunked TOC against its tar-split (podman 5's layout): what containers/storage
refuses before its own partial pull, the store refuses before serving the layer."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import time
import tracemalloc

import pytest
import zstandard
from fmt_helpers import pax_header

from store import estargz as E
from store.estargz import zstdchunked as Z
from store.estargz.tarsplit import check_tar_split


def _layer_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("d")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
        tar.addfile(d)
        for name, data in (("d/f", b"hello\n"), ("d/big", bytes(range(256)) * 40)):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o755, 1_700_000_000.25
            ti.pax_headers = {"SCHILY.xattr.user.k": "v"} if name == "d/f" else {}
            tar.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("d/link")
        link.type, link.linkname, link.mtime = tarfile.LNKTYPE, "d/f", 1_700_000_000
        tar.addfile(link)
        dev = tarfile.TarInfo("d/null")
        dev.type, dev.devmajor, dev.devminor, dev.mode = tarfile.CHRTYPE, 1, 3, 0o666
        tar.addfile(dev)
    return buf.getvalue()


@pytest.fixture(scope="module")
def layer() -> tuple[dict, bytes]:
    """The TOC (decoded) and compressed tar-split our writer makes in podman 5's layout."""
    out = io.BytesIO()
    res = Z.write_zstd_chunked(io.BytesIO(_layer_tar()), out, generation="podman5", chunk_size=4096)
    blob = out.getvalue()
    pos = E.ManifestPosition.parse(res.annotations[Z.MANIFEST_POSITION_KEY])
    offset, length, _ = (int(v) for v in res.annotations[Z.TARSPLIT_POSITION_KEY].split(":"))
    toc = json.loads(zstandard.ZstdDecompressor().decompress(blob[pos.offset :][: pos.length]))
    return toc, blob[offset : offset + length]


def _check(toc: dict, tar_split: bytes | None) -> None:
    check_tar_split(json.dumps(toc).encode(), tar_split, "layer X")


def test_the_writers_toc_matches_its_tar_split(layer):
    toc, split = layer
    assert toc["tarSplitDigest"] and any(e["type"] == "chunk" for e in toc["entries"])
    _check(toc, split)


def _entry(toc: dict, name: str) -> dict:
    return next(e for e in toc["entries"] if e["name"] == name and e["type"] != "chunk")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: _entry(t, "d/f").update(mode=0o4755), "mode 4755, the tar's 755"),
        (lambda t: _entry(t, "d/f").update(uid=1000), "owner 1000:0, the tar's 0:0"),
        (lambda t: _entry(t, "d/f").update(size=5), "size 5, the tar's 6"),
        (lambda t: _entry(t, "d/f").update(modtime="2023-11-14T22:13:20Z"), "modtime"),
        (lambda t: _entry(t, "d/f").update(xattrs={}), "xattrs"),
        (lambda t: _entry(t, "d/f").update(xattrs={"user.k": "dw=="}), "xattrs"),
        (lambda t: _entry(t, "d/link").update(linkName="d/big"), "link target 'd/big'"),
        (lambda t: _entry(t, "d/null").update(devMinor=5), "device 1:5, the tar's 1:3"),
        (lambda t: _entry(t, "d/null").update(type="block"), "type 'block'"),
        (lambda t: t["entries"].append({"type": "reg", "name": "extra"}), "does not: ['extra']"),
        (lambda t: t["entries"].remove(_entry(t, "d/link")), "holds 'd/link', which the TOC"),
        (lambda t: t["entries"].append({"type": "dir", "name": "d/"}), "names 'd' twice"),
        (lambda t: t.update(tarSplitDigest="sha256:" + "0" * 64), "tarSplitDigest says"),
    ],
)
def test_a_toc_that_disagrees_with_its_tar_split_is_refused(layer, edit, message):
    toc, split = layer
    toc = json.loads(json.dumps(toc))
    edit(toc)
    with pytest.raises(E.InvalidToc, match="layer X") as caught:
        _check(toc, split)
    assert message in str(caught.value)


def test_a_toc_naming_a_tar_split_the_annotations_do_not_locate_is_refused(layer):
    with pytest.raises(E.InvalidToc, match="locate none"):
        _check(layer[0], None)


def test_a_toc_without_tar_split_digest_is_not_checked(layer):
    toc = {k: v for k, v in layer[0].items() if k != "tarSplitDigest"}
    toc["entries"] = [{"type": "reg", "name": "anything"}]
    _check(toc, None)
    _check(toc, b"not even zstd")


def _split_of(lines: list[dict]) -> bytes:
    raw = b"".join(json.dumps(e).encode() + b"\n" for e in lines)
    return zstandard.ZstdCompressor().compress(raw)


def _with_split(toc: dict, split: bytes) -> dict:
    return {**toc, "tarSplitDigest": "sha256:" + hashlib.sha256(split).hexdigest()}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([{"type": 3}], "type 3"),
        ([{"type": 1, "size": -1}], "size -1"),
        ([{"type": 2, "payload": "not base64!"}], "not a tar-split entry"),
        ([{"type": 2, "payload": base64.b64encode(b"x" * 512).decode()}], "do not read"),
    ],
)
def test_a_tar_split_that_is_not_one_is_refused(layer, lines, message):
    split = _split_of(lines)
    with pytest.raises(E.InvalidToc, match=message):
        _check(_with_split(layer[0], split), split)


def test_header_data_a_tar_split_puts_in_a_files_contents_is_not_read():
    """A PAX header claiming an exabyte of records whose bytes the tar-split says are a
    file's contents (not in it): refused, not inflated as zeros."""
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 1 << 60
    head = pax.tobuf(tarfile.GNU_FORMAT)
    split = _split_of(
        [
            {"type": 2, "payload": base64.b64encode(head).decode()},
            {"type": 1, "name": "x", "size": 1 << 60},
        ]
    )
    with pytest.raises(E.InvalidToc, match="lies in a file's contents"):
        _check(_with_split({"version": 1, "entries": []}, split), split)


@pytest.mark.parametrize("mtime", ["inf", "-inf", "nan", "1e400"])
def test_a_pax_mtime_that_is_no_number_is_refused_as_a_mismatch(mtime):
    """A PAX ``mtime`` record ``tarfile`` reads as an infinite or NaN float (Go's tar reader
    refuses it: ErrHeader) is a TOC mismatch, an :class:`~store.estargz.InvalidToc`; its
    OverflowError or ValueError escaped the check, and the layer failed (loaded again at
    every lookup) instead of being refused."""
    info = tarfile.TarInfo("f")
    info.mode, info.pax_headers = 0o644, {"mtime": mtime}
    head = info.tobuf(tarfile.PAX_FORMAT) + bytes(2 * tarfile.BLOCKSIZE)
    split = _split_of([{"type": 2, "payload": base64.b64encode(head).decode()}])
    toc = {"version": 1, "entries": [{"type": "reg", "name": "f", "mode": 0o644}]}
    with pytest.raises(E.InvalidToc, match="modtime"):
        _check(_with_split(toc, split), split)


def test_a_pax_header_with_a_long_run_of_digits_is_refused_at_once():
    """CPython before 3.11.10 parses a PAX header in time quadratic in a run of digits
    (CVE-2024-6232): a tar-split whose header held 120,000 of them took 16 s to load, and
    was then served. Refused, naming the header, before tarfile parses it."""
    ti = tarfile.TarInfo("f")
    ti.mode, ti.mtime = 0o644, 1_700_000_000
    raw = pax_header(b"1" * 120_000) + ti.tobuf(tarfile.USTAR_FORMAT)
    split = _split_of(
        [
            {"type": 2, "payload": base64.b64encode(raw).decode()},
            {"type": 1, "name": "f"},
            {"type": 2, "payload": base64.b64encode(bytes(1024)).decode()},
        ]
    )
    toc = {"version": 1, "entries": [{"type": "reg", "name": "f", "mode": 0o644}]}
    started = time.monotonic()
    with pytest.raises(E.InvalidToc, match="PAX extended header of 120000 bytes holds a run"):
        _check(_with_split(toc, split), split)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("uid", [0, 1000])
def test_a_pax_global_header_in_the_tar_split_is_refused(uid):
    """tarfile applies a PAX global header's records to every later member; Go's reader
    returns it as an entry of its own, applied to none, which containers/storage finds in no
    TOC entry and refuses. Applied here, a global ``uid=0`` made a TOC calling a file root's
    (which extraction makes uid 1000's, as its own header says) match, and the honest TOC
    fail."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"uid": "0", "gid": "0"}
    ) as tar:
        ti = tarfile.TarInfo("f")
        ti.uid, ti.gid, ti.mode, ti.mtime = 1000, 1000, 0o4755, 1_700_000_000
        tar.addfile(ti)
    split = _split_of([{"type": 2, "payload": base64.b64encode(buf.getvalue()).decode()}])
    entry = {"type": "reg", "name": "f", "uid": uid, "gid": uid, "mode": 0o4755}
    toc = {"version": 1, "entries": [entry | {"modtime": "2023-11-14T22:13:20Z"}]}
    with pytest.raises(E.InvalidToc, match="PAX global header"):
        _check(_with_split(toc, split), split)


def test_pax_records_of_a_real_layer_still_read():
    """Long names, xattrs and times with fractions in PAX records: read as before."""
    buf = io.BytesIO()
    name = "d/" + "n" * 150 + "/" + "9" * 60  # a long name, with a long run of digits
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("d")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
        tar.addfile(d)
        d2 = tarfile.TarInfo(name.rsplit("/", 1)[0])
        d2.type, d2.mode, d2.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
        tar.addfile(d2)
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = 3, 0o644, 1_700_000_000.123456789
        ti.pax_headers = {"SCHILY.xattr.user.k": "v" * 300}
        tar.addfile(ti, io.BytesIO(b"abc"))
    out = io.BytesIO()
    res = Z.write_zstd_chunked(io.BytesIO(buf.getvalue()), out, generation="podman5")
    blob = out.getvalue()
    pos = E.ManifestPosition.parse(res.annotations[Z.MANIFEST_POSITION_KEY])
    offset, length, _ = (int(v) for v in res.annotations[Z.TARSPLIT_POSITION_KEY].split(":"))
    toc = json.loads(zstandard.ZstdDecompressor().decompress(blob[pos.offset :][: pos.length]))
    _check(toc, blob[offset : offset + length])


def test_a_tar_split_of_more_lines_than_the_toc_allows_is_refused_in_bounded_memory():
    """Its lines were split into a list before the first was decoded: 64 MiB of 3-byte lines
    (a 6 KB zstd frame) took 1.3 GB to refuse. Now decoded one at a time, and no more of
    them than the limit on TOC entries allows (two per tar member): 3 million empty file
    entries are refused at the 2,017th."""
    line = b'{"type":1,"size":0}\n'
    lines = line * ((64 << 20) // len(line))
    split = zstandard.ZstdCompressor(level=19).compress(lines)
    del lines
    toc = _with_split({"version": 1, "entries": []}, split)
    limits = E.TocLimits(max_bytes=64 << 20, max_entries=1000)
    tracemalloc.start()
    try:
        with pytest.raises(E.InvalidToc, match="more than 2016 lines"):
            check_tar_split(json.dumps(toc).encode(), split, "layer X", limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 << 20, f"{peak >> 20} MB at the peak"


def test_one_tar_split_line_of_a_bomb_is_refused_in_bounded_memory():
    """A tar-split that is one line (a 5 KB zstd frame inflating to 60 MiB: a header whose
    PAX records fill it) was held inflated, copied as its line, decoded, and its PAX header
    read twice and parsed: 240 MB at the peak and 13 s under a 64 MiB limit (1.4 GB of RSS
    under the default 256 MiB). No tar Go's archive/tar reads has a header line near that
    long (its extension headers are at most 1 MiB each): refused at its length, unparsed,
    never inflated whole."""
    record = b" SCHILY.xattr.user.k=" + b"v" * 40 + b"\n"
    record = str(len(record) + 2).encode() + record
    body = record * ((60 << 20) * 3 // 4 // len(record))
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(body)
    info = tarfile.TarInfo("f")
    info.mode = 0o644
    raw = (
        pax.tobuf(tarfile.GNU_FORMAT)
        + body
        + bytes(-len(body) % tarfile.BLOCKSIZE)
        + info.tobuf(tarfile.GNU_FORMAT)
        + bytes(2 * tarfile.BLOCKSIZE)
    )
    del body
    split = _split_of([{"type": 2, "payload": base64.b64encode(raw).decode()}])
    del raw
    entries = [{"type": "reg", "name": "f", "mode": 0o644}]
    toc = _with_split({"version": 1, "entries": entries}, split)
    limits = E.TocLimits(max_bytes=64 << 20)
    started = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(E.InvalidToc) as refused:
            check_tar_split(json.dumps(toc).encode(), split, "layer X", limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20, f"{peak >> 20} MB at the peak"
    assert time.monotonic() - started < 5
    assert "tar-split: line 1 is longer than 16777216 bytes" in str(refused.value)


@pytest.mark.parametrize("seed", range(20))
def test_tar_split_lines_cut_across_inflated_pieces_read_whole(monkeypatch, seed):
    """Lines are read from the inflated pieces as they come: one cut anywhere across them
    (several times, or at its newline) reads as the line, and the last without a newline."""
    import random

    from store.estargz import tarsplit, zstdchunked

    rng = random.Random(seed)
    lines = [rng.randbytes(rng.randrange(0, 300)).replace(b"\n", b"") + b"\n" for _ in range(50)]
    lines += [b"last line without its newline"] if seed % 2 else []
    text = b"".join(lines)

    def pieces(data, limit, where):
        at = 0
        while at < len(text):
            n = rng.choice([1, 2, rng.randrange(1, 700)])
            yield text[at : at + n]
            at += n

    monkeypatch.setattr(zstdchunked, "_inflate_pieces", pieces)
    got = list(tarsplit._lines(b"", "x", E.DEFAULT_LIMITS))
    assert got == lines
    longest = max(len(line) for line in lines)
    monkeypatch.setattr(tarsplit, "MAX_SPLIT_LINE", longest)
    assert list(tarsplit._lines(b"", "x", E.DEFAULT_LIMITS)) == lines
    monkeypatch.setattr(tarsplit, "MAX_SPLIT_LINE", longest - 1)
    with pytest.raises(E.InvalidToc, match=f"line {lines.index(max(lines, key=len)) + 1} is "):
        list(tarsplit._lines(b"", "x", E.DEFAULT_LIMITS))


def _many_files_layer(n: int) -> tuple[bytes, bytes, int]:
    """``(TOC JSON, compressed tar-split, its inflated size)`` of a podman 5 zstd:chunked
    layer of ``n`` empty files, by our writer."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            ti = tarfile.TarInfo(f"f{i:06d}")
            ti.mode, ti.mtime = 0o644, 1_700_000_000
            tar.addfile(ti, io.BytesIO(b""))
    out = io.BytesIO()
    res = Z.write_zstd_chunked(io.BytesIO(buf.getvalue()), out, generation="podman5")
    blob = out.getvalue()
    pos = E.ManifestPosition.parse(res.annotations[Z.MANIFEST_POSITION_KEY])
    offset, length, inflated = (int(v) for v in res.annotations[Z.TARSPLIT_POSITION_KEY].split(":"))
    toc_json = zstandard.ZstdDecompressor().decompress(blob[pos.offset :][: pos.length])
    return toc_json, blob[offset : offset + length], inflated


def test_a_tar_split_is_not_held_to_the_limit_on_toc_bytes():
    """A tar-split records each member's raw headers in base64 (~800 bytes a plain one)
    where the TOC has ~80 bytes an entry: held to ``max_bytes`` like the TOC, a layer of a
    third of the entries ``max_entries`` admits (~340,000 files under the defaults, a 30 MB
    TOC) was refused ("tar-split: inflates past 268435456 bytes") and podman pulled it in
    full. Scaled down: a TOC within both limits, its tar-split well past ``max_bytes``."""
    toc_json, split, inflated = _many_files_layer(300)
    limits = E.TocLimits(max_bytes=100_000, max_entries=1000)
    assert len(toc_json) < limits.max_bytes < inflated
    check_tar_split(toc_json, split, "layer X", limits)


def test_a_tar_split_past_its_allowance_per_member_is_refused():
    """What a tar-split may inflate to grows with the TOC's members, never past
    ``max_bytes`` plus 4 KiB a member: blank lines beyond it are refused at that size."""
    from store.estargz.tarsplit import tar_split_max_bytes

    limits = E.TocLimits(max_bytes=1 << 20, max_entries=1000)
    cap = tar_split_max_bytes(1, limits)
    assert cap == (1 << 20) + 4096
    split = zstandard.ZstdCompressor().compress((b" " * 50_000 + b"\n") * 30)
    toc = _with_split({"version": 1, "entries": [{"type": "reg", "name": "f"}]}, split)
    with pytest.raises(E.InvalidToc, match=f"tar-split: inflates past {cap} bytes"):
        check_tar_split(json.dumps(toc).encode(), split, "layer X", limits)
