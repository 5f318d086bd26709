"""Our writer over the Go library's option space, read by the Go reader (containerd/
stargz-snapshotter estargz v0.12, Debian's sources): chunk sizes from 1 byte to more than any
file, gzip levels 0 (stored blocks), 1 and 9, prioritized files (a hardlink, a directory, none:
the no-prefetch landmark), and input tars with every entry type (PAX and
GNU headers, sparse files). For each, the Go reader opens our blob, verifies its TOC digest and
every chunk, and lists the tree our reader lists — the tree the Go writer makes of the same tar
with the same options.

Not here: our zstd:chunked writer, which writes containers/storage's layout (no
``chunkDigest`` on a file of one chunk, as skopeo writes it), which the Go v0.12 reader
refuses to verify ("some ChunkDigest not found in TOC JSON"), as the Go store does
(``tests/store/test_e2e_zstd.py``).
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from store.estargz import (
    BytesBlobSource,
    EstargzReader,
    InvalidLayerTar,
    convert,
)
from store.estargz.listing import listing
from tests import gotools
from tests.layertars import every_type_tar, sparse_tar

pytestmark = pytest.mark.skipif(
    not gotools.available(), reason="Go or the Debian estargz library missing"
)

ALL = every_type_tar()
SMALL = every_type_tar(big=2000, zeros=1000)  # 1-byte chunks: the Go reader is quadratic in them
GNU = every_type_tar(tarfile.GNU_FORMAT)
HUGE = 64 << 20  # the most our writer takes (check_chunk_size): one chunk per file here


@pytest.fixture(scope="module")
def go(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("go")
    return {n: gotools.build(f"estargz/{n}", d) for n in ("gocheck", "gowrite")}


def _go_listing(gocheck: Path, blob: Path, toc_digest: str) -> list[dict]:
    proc = subprocess.run(
        [str(gocheck), str(blob), toc_digest], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line]


def _go_write(gowrite: Path, src: Path, out: Path, *flags: str, prioritized=()) -> dict:
    proc = subprocess.run(
        [str(gowrite), *flags, str(src), str(out), *prioritized],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


CASES = {
    "chunk-1": (SMALL, {"chunk_size": 1}),
    "chunk-1k-level-0": (ALL, {"chunk_size": 1024, "level": 0}),
    "chunk-1k-level-9": (ALL, {"chunk_size": 1024, "level": 9}),
    "chunk-huge-level-1": (ALL, {"chunk_size": HUGE, "level": 1}),
    "default": (ALL, {}),
    "gnu-headers": (GNU, {"chunk_size": 1024}),
    "prioritized": (ALL, {"chunk_size": 1024, "prioritized_files": ["d/big", "d/small"]}),
    "prioritized-hardlink": (ALL, {"chunk_size": 1024, "prioritized_files": ["d/hard-big"]}),
    "prioritized-directory": (ALL, {"chunk_size": 1024, "prioritized_files": ["d/sub", "opq"]}),
    # ours skips a prioritized file the tar lacks, as the Go writer with
    # WithAllowPrioritizeNotFound (without it, Go refuses the tar)
    "prioritized-missing": (ALL, {"chunk_size": 1024, "prioritized_files": ["nope", "d/one"]}),
    # no bytes at all: Go's tar reader takes it as an archive of no entries, and so do we
    "empty-input": (b"", {}),
}


def _go_flags(kw: dict) -> list[str]:
    flags = []
    if "chunk_size" in kw:
        flags += ["-chunk", str(kw["chunk_size"])]
    if "level" in kw:
        flags += ["-level", str(kw["level"])]
    if kw.get("prioritized_files"):
        flags.append("-allow-missing")
    return flags


@pytest.mark.parametrize("case", list(CASES))
def test_go_reads_our_estargz_as_it_reads_its_own(
    go: dict[str, Path], tmp_path: Path, case: str
) -> None:
    tar, kw = CASES[case]
    src = tmp_path / "in.tar"
    src.write_bytes(tar)
    ours_blob = tmp_path / "ours.blob"
    with ours_blob.open("wb") as out:
        res = convert(io.BytesIO(tar), out, **kw)
    data = ours_blob.read_bytes()
    ours = list(listing(EstargzReader(BytesBlobSource(data), res.toc_digest)))
    assert _go_listing(go["gocheck"], ours_blob, res.toc_digest) == ours
    go_blob = tmp_path / "go.blob"
    go_res = _go_write(
        go["gowrite"], src, go_blob, *_go_flags(kw), prioritized=kw.get("prioritized_files", ())
    )
    assert _go_listing(go["gocheck"], go_blob, go_res["toc_digest"]) == ours


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_a_sparse_file_is_refused_by_name(go: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    """GNU tar's sparse encodings: our writer refuses them naming the file, as the Go
    library's ``estargz.Build`` fails on them (PAX: "unexpected EOF"; GNU: "unsupported input
    tar entry 'S'"). Only its streaming ``Writer.AppendTar`` expands the PAX one (the store
    serves that layer: ``tests/store/test_e2e_go_layers.py``)."""
    tar = sparse_tar(tmp_path, fmt)
    with pytest.raises(InvalidLayerTar, match="'holes': sparse tar entries are not supported"):
        convert(io.BytesIO(tar), io.BytesIO(), chunk_size=4096)
    src = tmp_path / "in.tar"
    src.write_bytes(tar)
    proc = subprocess.run(
        [str(go["gowrite"]), str(src), str(tmp_path / "go.blob")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    go_says = {"posix": '"holes": unexpected EOF', "gnu": "unsupported input tar entry 'S'"}
    assert proc.returncode != 0 and go_says[fmt] in proc.stderr, proc.stderr
