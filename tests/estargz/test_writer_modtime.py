"""The TOC ``modtime`` both writers write, from a tar entry's (PAX) modification time.

eStargz: whole seconds as the Go reference writer writes them (stargz-snapshotter estargz
``formatModtime``: ``t.UTC().Round(time.Second).Format(time.RFC3339)``, a half second
rounding up; left out when ``Unix()`` is 0). zstd:chunked: ``time.RFC3339Nano`` as
containers/storage's ``time.Time`` JSON writes it. A year RFC 3339 cannot hold is the epoch,
the time a normal pull gives such a file (containers/storage ``pkg/system.Chtimes``).
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store.estargz import (
    BytesBlobSource,
    EstargzReader,
    convert,
    write_zstd_chunked,
    zstd_chunked_layer,
)
from store.estargz.writer import (
    GO_ZERO_TIME_NS,
    NS,
    estargz_modtime,
    rfc3339_nano,
    tar_mtime_ns,
)
from store.tree import LayerTree
from tests import gotools

T = 1_700_000_000  # 2023-11-14T22:13:20Z
YEAR_10000 = "253402300800"  # 10000-01-01T00:00:00Z
BEFORE_YEAR_1 = "-62135596801"  # 0000-12-31T23:59:59Z
EPOCH = "1970-01-01T00:00:00Z"


def _entry(pax_mtime: str, name: str = "f") -> tarfile.TarInfo:
    """A tar entry whose PAX ``mtime`` record is ``pax_mtime`` exactly (tarfile writes its own
    record only for a time the header cannot hold: a float, or out of the octal field)."""
    ti = tarfile.TarInfo(name)
    whole = int(pax_mtime.split(".")[0])
    ti.mtime = whole if 0 <= whole < 8**11 else float(pax_mtime)
    ti.pax_headers = {"mtime": pax_mtime}
    return ti


def _add_file(tar: tarfile.TarFile, name: str, pax_mtime: str) -> None:
    """A 2-byte file ``name`` whose PAX ``mtime`` record is ``pax_mtime``."""
    ti = _entry(pax_mtime, name)
    ti.size, ti.mode = 2, 0o644
    tar.addfile(ti, io.BytesIO(b"x\n"))


def _tar(mtimes: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mtime in mtimes.items():
            _add_file(tar, name, mtime)
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:  # the records are what we meant
        assert {ti.name: ti.pax_headers.get("mtime") for ti in tar} == mtimes
    return raw


def _read_back(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {ti.name: ti for ti in tar}


ESTARGZ = {
    # PAX mtime: eStargz modtime (None: left out)
    f"{T}": "2023-11-14T22:13:20Z",
    f"{T}.25": "2023-11-14T22:13:20Z",
    f"{T}.75": "2023-11-14T22:13:21Z",
    f"{T}.5": "2023-11-14T22:13:21Z",  # half up, as Go: round() went to the even second
    f"{T + 1}.5": "2023-11-14T22:13:22Z",
    f"{T}.4999999999": "2023-11-14T22:13:20Z",  # Go keeps 9 digits: .499999999
    "-5.25": "1969-12-31T23:59:55Z",
    "-5.5": "1969-12-31T23:59:55Z",  # half up is toward the later second before 1970 too
    "-5.75": "1969-12-31T23:59:54Z",
    "0.75": None,  # Unix() is 0: Go leaves it out
    "-0.5": EPOCH,  # Unix() is -1: written, rounded to the epoch
    "1": "1970-01-01T00:00:01Z",
    YEAR_10000: EPOCH,
    "253402300799.5": EPOCH,  # rounds into year 10000
    "253402300799": "9999-12-31T23:59:59Z",
    "-62135596800": None,  # Go's zero time
    "-62135596799": "0001-01-01T00:00:01Z",
    BEFORE_YEAR_1: EPOCH,
}

ZSTD = {
    f"{T}": "2023-11-14T22:13:20Z",
    f"{T}.5": "2023-11-14T22:13:20.5Z",
    f"{T}.123456789": "2023-11-14T22:13:20.123456789Z",
    f"{T}.1234567891": "2023-11-14T22:13:20.123456789Z",  # cut to 9 digits, as Go reads it
    f"{T}.000001": "2023-11-14T22:13:20.000001Z",
    "-5.25": "1969-12-31T23:59:54.75Z",  # floored seconds, the fraction counts up from them
    "0.75": "1970-01-01T00:00:00.75Z",
    # The epoch is a time (containers/storage's timeIfNotZero leaves out Go's zero time only):
    # without it podman's partial pull leaves the file at the time it made it.
    "0": EPOCH,
    "-62135596800": None,  # Go's zero time
    YEAR_10000: EPOCH,
    BEFORE_YEAR_1: EPOCH,
}


@pytest.mark.parametrize("pax,want", list(ESTARGZ.items()))
def test_estargz_modtime_is_gos(pax: str, want: str | None) -> None:
    assert estargz_modtime(_read_back(_tar({"f": pax}))["f"]) == want


@pytest.mark.parametrize("pax,want", list(ZSTD.items()))
def test_zstd_chunked_modtime_is_rfc3339_nano(pax: str, want: str | None) -> None:
    ns = tar_mtime_ns(_read_back(_tar({"f": pax}))["f"])
    assert (rfc3339_nano(ns) if ns != GO_ZERO_TIME_NS else None) == want


def test_a_header_time_without_a_pax_record() -> None:
    ti = tarfile.TarInfo("f")
    ti.mtime = T
    assert tar_mtime_ns(ti) == T * NS and estargz_modtime(ti) == "2023-11-14T22:13:20Z"


@given(st.integers(-62135596800 * NS, 253402300799 * NS))
def test_the_readers_parse_back_what_the_zstd_writer_writes(ns: int) -> None:
    """store/tree.py reads the fraction to the nanosecond: the lazy view has the time the
    tar entry had."""
    tree = LayerTree.__new__(LayerTree)
    tree._mtimes = {}
    assert tree.mtime_ns(rfc3339_nano(ns)) == ns


def _toc_modtimes(reader: EstargzReader) -> dict[str, str | None]:
    return {e["name"]: e.get("modtime") for e in reader.toc.entries if e["type"] == "reg"}


def test_both_writers_write_the_times_into_the_toc() -> None:
    """Out-of-range years raised ValueError ("year 10000 is out of range") from both."""
    names = {f"f{i}": pax for i, pax in enumerate(ESTARGZ)}
    raw = _tar(names)
    out = io.BytesIO()
    res = convert(io.BytesIO(raw), out)
    got = _toc_modtimes(EstargzReader(BytesBlobSource(out.getvalue()), res.toc_digest))
    assert {n: got[n] for n in names} == {n: ESTARGZ[p] for n, p in names.items()}

    names = {f"f{i}": pax for i, pax in enumerate(ZSTD)}
    out = io.BytesIO()
    z = write_zstd_chunked(io.BytesIO(_tar(names)), out)
    layer = zstd_chunked_layer(z.annotations)
    reader = EstargzReader(BytesBlobSource(out.getvalue()), zstd_chunked=layer)
    got = _toc_modtimes(reader)
    assert {n: got[n] for n in names} == {n: ZSTD[p] for n, p in names.items()}


@pytest.fixture(scope="module")
def gowrite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not gotools.available():
        pytest.skip("Go or the Debian estargz library missing (run ci/install-system-deps)")
    return gotools.build("estargz/gowrite", tmp_path_factory.mktemp("go"))


def test_estargz_modtimes_agree_with_the_go_writer(gowrite: Path, tmp_path: Path) -> None:
    """Fractional, half-second, pre-1970 and near-epoch times as the Go writer rounds them
    (not the out-of-range years: Go writes a five-digit year there that its reader cannot
    parse; we write the epoch)."""
    far = {YEAR_10000, "253402300799.5", BEFORE_YEAR_1}
    names = {f"f{i}": pax for i, pax in enumerate(ESTARGZ) if pax not in far}
    src = tmp_path / "in.tar"
    src.write_bytes(_tar(names))
    go_blob = tmp_path / "go.blob"
    proc = subprocess.run(
        [str(gowrite), str(src), str(go_blob)], capture_output=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    go = EstargzReader(BytesBlobSource(go_blob.read_bytes()), json.loads(proc.stdout)["toc_digest"])
    out = io.BytesIO()
    res = convert(src.open("rb"), out)
    ours = EstargzReader(BytesBlobSource(out.getvalue()), res.toc_digest)
    assert _toc_modtimes(ours) == _toc_modtimes(go)
    assert {n: _toc_modtimes(go)[n] for n in names} == {n: ESTARGZ[p] for n, p in names.items()}


def test_a_fraction_of_a_second_is_the_tocs_whole_second_in_the_header_too() -> None:
    """A normal pull of an eStargz blob extracts its tar headers' times; the store shows the
    TOC's, which has whole seconds only. A header that kept its fraction gave a file
    12:00:00.25 in a normal pull and 12:00:00 lazily (a directory at .7 gave 12:00:01): the
    writer writes the TOC's second in the header. The TOC is still the Go writer's."""
    files = {"f": f"{T}.25", "g": f"{T}.75", "h": "0.75", "n": "-5.25", "w": f"{T}"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, pax in files.items():
            _add_file(tar, name, pax)
        for name, kind in (("d", tarfile.DIRTYPE), ("l", tarfile.SYMTYPE)):
            ti = _entry(f"{T}.7", name)
            ti.type, ti.linkname = kind, "f" if kind == tarfile.SYMTYPE else ""
            tar.addfile(ti)
    out = io.BytesIO()
    res = convert(io.BytesIO(buf.getvalue()), out)
    reader = EstargzReader(BytesBlobSource(out.getvalue()), res.toc_digest)
    tree = LayerTree(reader.index)
    headers = {
        ti.name: tar_mtime_ns(ti)
        for ti in _read_back(gzip.decompress(out.getvalue())).values()
        if ti.name in {"f", "g", "h", "n", "w", "d", "l"}
    }
    shown = {name: tree.mtime_ns(reader.lookup(name).modtime) for name in headers}
    assert headers == shown
    assert headers["f"] == T * NS and headers["g"] == headers["d"] == (T + 1) * NS
    assert headers["h"] == 0 and headers["n"] == -5 * NS and headers["w"] == T * NS
    assert _toc_modtimes(reader)["f"] == ESTARGZ[f"{T}.25"]
