"""Our layers through the Go reference reader (containerd/stargz-snapshotter estargz v0.12.0,
from Debian's golang-github-containerd-stargz-snapshotter-dev, installed by
ci/install-system-deps): it must open them, verify the TOC digest and every chunk the way the
snapshotter does, and see the same tree we do.

``gocheck/main.go`` is built once per session in GOPATH mode against the Debian sources. The
checker is itself checked: on the Go-written vectors it must print their listings exactly.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fmt_helpers import VECTORS, Vector, load_vectors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_properties import make_tar, trees

from store.estargz import BytesBlobSource, EstargzReader, convert
from store.estargz.listing import listing

GOPATH = Path("/usr/share/gocode")
LIBRARY = GOPATH / "src/github.com/containerd/stargz-snapshotter/estargz"
ALL = [v.name for v in load_vectors(VECTORS)] if VECTORS.is_dir() else []
LISTED = [n for n in ALL if n != "zstdchunked"]


@pytest.fixture(scope="session")
def gocheck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("go") is None or not LIBRARY.is_dir():
        pytest.skip("Go or the Debian estargz library missing (run ci/install-system-deps)")
    out = tmp_path_factory.mktemp("gocheck") / "gocheck"
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": str(GOPATH),
        "GOFLAGS": "",
        "GOCACHE": str(out.parent / "cache"),
    }
    src = Path(__file__).parent / "gocheck" / "main.go"
    subprocess.run(["go", "build", "-o", str(out), str(src)], check=True, env=env, timeout=300)
    return out


def _go_listing(gocheck: Path, blob: Path, toc_digest: str) -> list[dict]:
    proc = subprocess.run(
        [str(gocheck), str(blob), toc_digest], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.split("\n") if line]


@pytest.mark.parametrize("name", LISTED)
def test_checker_reproduces_vector_listings(
    gocheck: Path, vectors: dict[str, Vector], name: str
) -> None:
    v = vectors[name]
    assert _go_listing(gocheck, v.blob, v.meta["toc_digest"]) == v.entries


def test_checker_refuses_a_wrong_toc_digest(gocheck: Path, vectors: dict[str, Vector]) -> None:
    proc = subprocess.run(
        [str(gocheck), str(vectors["basic"].blob), "sha256:" + "0" * 64],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "verify TOC" in proc.stderr


@pytest.mark.parametrize("name", ALL)
def test_go_reads_our_conversion_of_each_vector(
    gocheck: Path, vectors: dict[str, Vector], name: str, tmp_path: Path
) -> None:
    v = vectors[name]
    kw: dict = {}
    if v.option("-chunk"):
        kw["chunk_size"] = int(v.option("-chunk"))
    if v.option("-level"):
        kw["level"] = int(v.option("-level"))
    if v.option("-prioritized"):
        kw["prioritized_files"] = v.option("-prioritized").split(",")
    blob = tmp_path / "ours.blob"
    with blob.open("wb") as out:
        res = convert(io.BytesIO(v.uncompressed_tar()), out, **kw)
    go = _go_listing(gocheck, blob, res.toc_digest)
    with blob.open("rb") as f:
        ours = list(listing(EstargzReader(BytesBlobSource(f.read()), res.toc_digest)))
    assert go == ours
    if v.entries is not None:
        assert go == v.entries


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(tree=trees(), level=st.sampled_from([0, 1, 9]))
def test_go_reads_random_trees_as_we_do(gocheck: Path, tmp_path: Path, tree, level: int) -> None:
    items, chunk = tree
    out = io.BytesIO()
    res = convert(io.BytesIO(make_tar(items)), out, chunk_size=chunk, level=level)
    blob = tmp_path / "random.blob"
    blob.write_bytes(out.getvalue())
    ours = list(listing(EstargzReader(BytesBlobSource(out.getvalue()), res.toc_digest)))
    assert _go_listing(gocheck, blob, res.toc_digest) == ours


def test_go_and_we_list_the_zstdchunked_vector_alike(
    gocheck: Path, vectors: dict[str, Vector]
) -> None:
    v = vectors["zstdchunked"]
    with v.blob.open("rb") as f:
        ours = list(listing(EstargzReader(BytesBlobSource(f.read()), v.meta["toc_digest"])))
    assert _go_listing(gocheck, v.blob, v.meta["toc_digest"]) == ours


def _duplicates_tar() -> bytes:
    import tarfile

    buf = io.BytesIO()

    def add(name: str, type_: bytes = tarfile.REGTYPE, data: bytes = b"", **kw) -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.size, ti.mode, ti.mtime = type_, len(data), kw.pop("mode", 0o644), 1_700_000_000
        for k, v in kw.items():
            setattr(ti, k, v)
        tar.addfile(ti, io.BytesIO(data) if data else None)

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add("conf", data=b"old\n")
        add("conf", data=b"new\n")
        add("d", tarfile.DIRTYPE, mode=0o755)
        add("d/x", data=b"x\n")
        add("d", tarfile.DIRTYPE, mode=0o700, uid=7)
        add("s", tarfile.SYMTYPE, linkname="conf", mode=0o777)
        add("s", data=b"now a file\n", mode=0o600)
        add("f", data=b"a file first\n")
        add("f", tarfile.SYMTYPE, linkname="conf", mode=0o777)
        add("e", data=b"")
        add("e", tarfile.DIRTYPE, mode=0o711)
        add("e/in", data=b"in\n")
    return buf.getvalue()


def test_duplicate_names_the_later_entry_wins_as_in_go(gocheck: Path, tmp_path: Path) -> None:
    """A name given twice, for every entry type: the later one wins (tar -x, the Go reader)."""
    out = io.BytesIO()
    res = convert(io.BytesIO(_duplicates_tar()), out)
    blob = tmp_path / "dups.blob"
    blob.write_bytes(out.getvalue())
    r = EstargzReader(BytesBlobSource(out.getvalue()), res.toc_digest)
    ours = list(listing(r))
    assert _go_listing(gocheck, blob, res.toc_digest) == ours
    assert r.read_file("conf") == b"new\n" and r.read_file("s") == b"now a file\n"
    assert r.lookup("d").mode == 0o700 and r.lookup("d/x") is not None
    assert r.lookup("f").type == "symlink" and r.lookup("e").type == "dir"
