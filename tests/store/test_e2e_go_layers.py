"""Every kind of layer the Go eStargz library (v0.12, Debian's sources) writes, served by our
store and by the Go store side by side, and read by our reader and by the Go reader.

``tests/estargz/gowrite`` writes each layer with one point of the library's option space:
``estargz.Build`` with tiny, default and huge chunk sizes, gzip levels 0 and 9, prioritized
files (a hardlink, a directory, a missing one with ``WithAllowPrioritizeNotFound``, none: the
no-prefetch landmark), zstd frames with the zstd:chunked footer; the streaming
``estargz.Writer`` (``AppendTar``, ``AppendTarLossLess``: no landmarks, what ``stargzify``
wrote), and either with the legacy 47-byte stargz footer. The source tars hold every tar type:
hardlinks to chunked files, PAX and GNU long names and link targets, xattrs (binary values
too), devices, FIFOs, empty files, set-ID bits, large ids, sparse files.

For each layer: the ``diff`` tree through our mount is the Go store's (bytes, modes, owners,
times, link counts, xattrs, link targets), both are the source tar's, and our reader's listing
is the Go reader's on the same blob. Runs against one registry and the two mounted stores
(about a minute).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from store.estargz import BytesBlobSource, EstargzReader, estargz_footer_bytes, zstd_chunked_layer
from store.estargz.listing import listing
from tests import gotools
from tests.layertars import every_type_tar, sparse_tar
from tests.store import images
from tests.store.conftest import StoreProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("docker-registry") is None, reason="no docker-registry"),
    pytest.mark.skipif(not gotools.available(), reason="Go or the Debian estargz library missing"),
]

# -- the Go writer and the two stores --


@dataclass
class GoLayer:
    blob: images.Blob
    path: Path
    toc_digest: str
    missed: list[str]


LEGACY_FOOTER_SIZE = 47


def legacy_footer(toc_offset: int) -> bytes:
    """The 47-byte footer of the original stargz format (no ``SG`` subfield header): a gzip
    header whose extra field is ``%016xSTARGZ``, then an empty stored block."""
    extra = b"%016xSTARGZ" % toc_offset
    header = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + len(extra).to_bytes(2, "little") + extra
    out = header + b"\x01\x00\x00\xff\xff" + b"\x00" * 8
    assert len(out) == LEGACY_FOOTER_SIZE
    return out


def _uncompressed_size(data: bytes, zstd: bool) -> int:
    """Counted while streaming (``gzip.decompress`` copies the rest of the blob at each of
    its members: hours for a blob of 1-byte chunks)."""
    if zstd:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
    else:
        reader = gzip.GzipFile(fileobj=io.BytesIO(data))
    with reader:
        return sum(len(piece) for piece in iter(lambda: reader.read(1 << 20), b""))


class Lab:
    def __init__(self, work: Path, gowrite: Path, registry: object, ours: StoreProcess,
                 go: StoreProcess) -> None:  # fmt: skip
        self.work, self.gowrite, self.registry = work, gowrite, registry
        self.ours, self.go = ours, go
        self.count = 0  # layers written
        self.pushes = 0  # images pushed

    def write(self, tar: bytes, *flags: str, prioritized: tuple[str, ...] = (),
              legacy: bool = False, measure: bool = True) -> GoLayer:  # fmt: skip
        """The Go writer's layer of ``tar``; ``measure=False`` leaves out the (optional)
        uncompressed-size annotation instead of inflating the blob for it."""
        self.count += 1
        src, out = self.work / f"in{self.count}.tar", self.work / f"out{self.count}.blob"
        src.write_bytes(tar)
        proc = subprocess.run(
            [str(self.gowrite), *flags, str(src), str(out), *prioritized],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        res = json.loads(proc.stdout)
        data = out.read_bytes()
        zstd = "-zstd" in flags
        if legacy:
            footer = estargz_footer_bytes(0)
            assert not zstd and len(data) > len(footer)
            toc_offset = int(data[-len(footer) :][16:32], 16)
            data = data[: -len(footer)] + legacy_footer(toc_offset)
            out.write_bytes(data)
        size = _uncompressed_size(data, zstd) if measure else 0
        annotations = None  # eStargz: push() writes the TOC digest and size annotations
        if zstd or not measure:
            annotations = dict(res["annotations"])
            if measure:
                annotations[images.USIZE_ANN] = str(size)
        blob = images.Blob(
            data,
            res["diff_id"],
            res["toc_digest"],
            size,
            images.LAYER_ZSTD if zstd else images.LAYER_GZIP,
            annotations,
        )
        return GoLayer(blob, out, res["toc_digest"], res["missed"] or [])

    def serve(self, layer: GoLayer) -> tuple[Path, Path]:
        """Push the layer as a one-layer image; its ``diff`` in our mount and in the Go one."""
        self.pushes += 1
        repo = f"golayers/i{self.pushes}"
        images.push(self.registry.host, repo, "1", [layer.blob])
        ref = f"{self.registry.host}/{repo}:1"
        return (
            self.ours.layer_dir(ref, layer.blob.digest) / "diff",
            self.go.layer_dir(ref, layer.blob.digest) / "diff",
        )


@contextlib.contextmanager
def _lab(work: Path, go_store_binary: Path, config: str) -> Iterator[Lab]:
    """A registry and the two stores, both with ``config``."""
    from harness.registry_server import RegistryServer

    if os.geteuid() != 0:
        pytest.skip("device nodes in a FUSE mount and foreign owners need root")
    gowrite = gotools.build("estargz/gowrite", work)
    with RegistryServer(storage_dir=work / "registry") as reg:
        ours = StoreProcess(work / "ours", config).start()
        try:
            go = StoreProcess(work / "go", config, impl="go", go_binary=go_store_binary).start()
            try:
                yield Lab(work, gowrite, reg, ours, go)
            finally:
                go.stop()
        finally:
            ours.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, go_store_binary: Path) -> Iterator[Lab]:
    # prefetch on: the landmark cases fetch their prioritized region
    with _lab(tmp_path_factory.mktemp("golayers"), go_store_binary, "") as lab:
        yield lab


@pytest.fixture(scope="module")
def gocheck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gotools.build("estargz/gocheck", tmp_path_factory.mktemp("gocheck"))


# -- what a mounted tree says --


def _getxattr(path: Path, key: str) -> bytes | str:
    try:
        return os.getxattr(path, key, follow_symlinks=False)
    except OSError as exc:
        return errno.errorcode[exc.errno]


def mounted_tree(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with what a container sees of it; hardlinked files name the
    first path of their inode."""
    out: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    root.lstat()  # a layer not served raises here (os.walk would list nothing)
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in ["", *sorted(dirs + files)] if dirpath == str(root) else sorted(dirs + files):
            p = Path(dirpath) / name if name else root
            st = p.lstat()
            rel = str(p.relative_to(root)) if name else ""
            xattrs = tuple(
                sorted((k, _getxattr(p, k)) for k in os.listxattr(p, follow_symlinks=False))
            )
            body: object = None
            if stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(p.read_bytes()).hexdigest()
                if st.st_nlink > 1:
                    body = (body, inodes.setdefault(st.st_ino, rel))
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                body = (os.major(st.st_rdev), os.minor(st.st_rdev))
            out[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                int(st.st_mtime),
                st.st_nlink,
                body,
                xattrs,
            )
    return out


def _norm(name: str) -> str:
    return "" if name in ("", ".", "./", "/") else name.removeprefix("./").strip("/")


def tar_truth(tar_bytes: bytes) -> dict[str, tuple]:
    """What the source tar says of each file it names (the later entry of a name wins):
    ``(mode with type bits, uid, gid, sha256 | link target | device, xattrs)``."""
    out: dict[str, tuple] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = tar.getmembers()
        by_name = {_norm(m.name): m for m in members}
        for m in members:
            name = _norm(m.name)
            base = name.rpartition("/")[2]
            if base.startswith(".wh."):
                continue
            src = m
            if m.islnk():
                src = by_name[_norm(m.linkname)]
            xattrs = tuple(
                sorted(
                    (k.removeprefix("SCHILY.xattr."), v.encode("utf-8", "surrogateescape"))
                    for k, v in src.pax_headers.items()
                    if k.startswith("SCHILY.xattr.")
                )
            )
            if src.isreg():
                body: object = hashlib.sha256(tar.extractfile(src).read()).hexdigest()
                kind = stat.S_IFREG
            elif src.issym():
                body, kind = src.linkname, stat.S_IFLNK
            elif src.ischr() or src.isblk():
                body = (src.devmajor, src.devminor)
                kind = stat.S_IFCHR if src.ischr() else stat.S_IFBLK
            elif src.isfifo():
                body, kind = None, stat.S_IFIFO
            else:
                body, kind = None, stat.S_IFDIR
            out[name] = (kind | src.mode, src.uid, src.gid, body, xattrs)
    return out


def _truth_of(row: tuple) -> tuple:
    mode, uid, gid, _size, _mtime, _nlink, body, xattrs = row
    if isinstance(body, tuple) and stat.S_ISREG(mode):
        body = body[0]
    if stat.S_ISLNK(mode):
        return (stat.S_IFLNK | 0o777, uid, gid, body, ())
    return (mode, uid, gid, body, tuple(x for x in xattrs if not x[0].startswith("trusted.")))


GO_ZERO_TIME = -62135596800  # Go's time.Time{}: a TOC entry without a modtime


def _go_as_ours(path: str, row: tuple) -> tuple:
    """The Go store's row with the differences we keep on purpose (README) taken out: a layer
    root is 0555 root:root as containers/storage makes it (Go: the ``./`` entry's, and an
    nlink one short), a time the TOC leaves out is the epoch (Go: year 1, what no normal pull
    shows), an opaque directory answers ``trusted.overlay.opaque`` only (the default
    ``overlay_opaque_type``; Go answers ``user.`` too)."""
    mode, uid, gid, size, mtime, nlink, body, xattrs = row
    if path == "":
        mode, uid, gid, nlink = stat.S_IFDIR | 0o555, 0, 0, None
    if stat.S_ISDIR(mode):
        nlink = None  # Go counts a directory named twice twice; ours: mounted_tree checks
    if mtime == GO_ZERO_TIME:
        mtime = 0
    xattrs = tuple(x for x in xattrs if x[0] != "user.overlay.opaque")
    return (mode, uid, gid, size, mtime, nlink, body, xattrs)


def _no_diff(a: dict, b: dict, an: str, bn: str) -> None:
    problems = [
        f"/{p}: {an} {a.get(p)} != {bn} {b.get(p)}"
        for p in sorted(set(a) | set(b))
        if a.get(p) != b.get(p)
    ]
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def check_layer(lab: Lab, gocheck: Path, layer: GoLayer, source: bytes | None) -> None:
    """Our mount serves the Go store's tree, both say what the source tar says, and our reader
    lists what the Go reader lists."""
    ours_diff, go_diff = lab.serve(layer)
    go_tree = mounted_tree(go_diff)
    ours_tree = mounted_tree(ours_diff)
    for path, row in ours_tree.items():
        if stat.S_ISDIR(row[0]):
            subdirs = sum(
                1
                for p, r in ours_tree.items()
                if p and p.rpartition("/")[0] == path and stat.S_ISDIR(r[0])
            )
            assert row[5] == 2 + subdirs, f"/{path}: nlink {row[5]}, {subdirs} subdirectories"
            ours_tree[path] = (*row[:5], None, *row[6:])
    _no_diff(ours_tree, {p: _go_as_ours(p, row) for p, row in go_tree.items()}, "ours", "go")
    if source is not None:
        truth = tar_truth(source)
        truth.pop("", None)  # the root: see _go_as_ours
        seen = {p: _truth_of(ours_tree[p]) for p in truth if p in ours_tree}
        _no_diff(seen, truth, "served", "tar")
    proc = subprocess.run(
        [str(gocheck), str(layer.path), layer.toc_digest],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    go_listing = [json.loads(line) for line in proc.stdout.splitlines() if line]
    data = layer.path.read_bytes()
    zstd = None
    if layer.blob.annotations is not None:
        zstd = zstd_chunked_layer(layer.blob.annotations)
    if zstd is not None:
        reader = EstargzReader(BytesBlobSource(data), zstd_chunked=zstd)
    else:
        reader = EstargzReader(BytesBlobSource(data), layer.toc_digest)
    assert list(listing(reader)) == go_listing


# -- the option space --

ALL = every_type_tar()
SMALL = every_type_tar(big=2000, zeros=1000)  # 1-byte chunks: the Go reader is quadratic in them
GNU = every_type_tar(tarfile.GNU_FORMAT)
EMPTY = b"\0" * 1024  # no entries: estargz.Build writes the no-prefetch landmark only

CASES: dict[str, Callable[[Lab], tuple[GoLayer, bytes | None]]] = {
    "build-default": lambda lab: (lab.write(ALL), ALL),
    "build-chunk-1": lambda lab: (lab.write(SMALL, "-chunk", "1"), SMALL),
    "build-chunk-1k": lambda lab: (lab.write(ALL, "-chunk", "1024"), ALL),
    "build-chunk-huge": lambda lab: (lab.write(ALL, "-chunk", str(1 << 40)), ALL),
    "build-level-0": lambda lab: (lab.write(ALL, "-level", "0", "-chunk", "4096"), ALL),
    "build-level-9-chunk-1k": lambda lab: (lab.write(ALL, "-level", "9", "-chunk", "1024"), ALL),
    "build-gnu-names": lambda lab: (lab.write(GNU, "-chunk", "1024"), GNU),
    "prioritized": lambda lab: (
        lab.write(ALL, "-chunk", "1024", prioritized=("d/small", "d/big", "dev/null")),
        ALL,
    ),
    "prioritized-hardlink-first": lambda lab: (
        lab.write(ALL, "-chunk", "1024", prioritized=("d/hard-big", "other/hard-small")),
        ALL,
    ),
    "prioritized-directory": lambda lab: (
        lab.write(ALL, "-chunk", "1024", prioritized=("d/sub", "opq/.wh..wh..opq")),
        ALL,
    ),
    "prioritized-with-missing": lambda lab: (
        lab.write(ALL, "-allow-missing", "-chunk", "1024", prioritized=("nope", "d/one")),
        ALL,
    ),
    "prioritized-only-missing": lambda lab: (
        lab.write(ALL, "-allow-missing", prioritized=("nope", "also/nope")),
        ALL,
    ),
    "zstd": lambda lab: (lab.write(ALL, "-zstd"), ALL),
    "zstd-chunk-1k-prioritized": lambda lab: (
        lab.write(ALL, "-zstd", "-chunk", "1024", prioritized=("d/big", "d/hard-empty")),
        ALL,
    ),
    "append": lambda lab: (lab.write(ALL, "-writer", "append", "-chunk", "1024"), ALL),
    "lossless": lambda lab: (lab.write(ALL, "-writer", "lossless", "-chunk", "1024"), ALL),
    "lossless-gnu": lambda lab: (lab.write(GNU, "-writer", "lossless"), GNU),
    "append-zstd": lambda lab: (lab.write(ALL, "-writer", "append", "-zstd"), ALL),
    "legacy-stargz": lambda lab: (
        lab.write(ALL, "-writer", "append", "-chunk", "1024", legacy=True),
        ALL,
    ),
    "legacy-footer-build": lambda lab: (lab.write(ALL, "-chunk", "1024", legacy=True), ALL),
    "empty-tar": lambda lab: (lab.write(EMPTY), EMPTY),
}


@pytest.mark.parametrize("case", list(CASES))
def test_go_written_layer_is_served_as_the_go_store_serves_it(
    lab: Lab, gocheck: Path, case: str
) -> None:
    layer, source = CASES[case](lab)
    check_layer(lab, gocheck, layer, source)


def test_sparse_files(lab: Lab, gocheck: Path, tmp_path: Path) -> None:
    """GNU tar's PAX sparse file: the streaming Go writer expands it into a regular file
    (``estargz.Build`` fails on it: "unexpected EOF"; the old GNU 'S' type neither writes)."""
    tar = sparse_tar(tmp_path, "posix")
    layer = lab.write(tar, "-writer", "append", "-chunk", "4096")
    check_layer(lab, gocheck, layer, tar)


@pytest.mark.slow
def test_a_file_over_8_gib(tmp_path: Path, go_store_binary: Path) -> None:
    """A 9 GiB file (its tar size in a PAX record: the octal field stops at 8 GiB), written
    by the streaming Go writer from a sparse tar in 4 MiB chunks (~1 min): both stores give
    its size and the same bytes at its start, across a chunk boundary and at its end. No
    prefetch or background fetch (each would inflate 9 GiB into its cache)."""
    size = 9 * (1 << 30) + 12_345 + len(TAIL)
    src = tmp_path / "huge"
    with src.open("wb") as f:
        f.seek(size - len(TAIL))
        f.write(TAIL)
    tar = tmp_path / "huge.tar"
    subprocess.run(
        [
            "tar",
            "--sparse",
            "--format=posix",
            "--owner=0",
            "--group=0",
            "-C",
            str(tmp_path),
            "-cf",
            str(tar),
            "huge",
        ],
        check=True,
        timeout=60,
    )
    config = "noprefetch = true\nno_background_fetch = true\n"
    with _lab(tmp_path / "lab", go_store_binary, config) as lab:
        layer = lab.write(tar.read_bytes(), "-writer", "append", "-level", "1", measure=False)
        ours, go = lab.serve(layer)
        _read_huge(ours, go, size)


def _read_huge(ours: Path, go: Path, size: int) -> None:
    chunk = 4 << 20
    for diff in (ours, go):
        assert (diff / "huge").stat().st_size == size
        with (diff / "huge").open("rb") as f:
            assert f.read(10) == bytes(10)
            f.seek(1000 * chunk - 5)
            assert f.read(10) == bytes(10)
            f.seek(size - len(TAIL) - 3)
            assert f.read(100) == bytes(3) + TAIL


TAIL = b"the end of a file over 8 GiB"


@pytest.mark.parametrize("first", ["zstd:chunked", "eStargz"])
def test_one_zstd_blob_under_both_annotations(lab: Lab, first: str) -> None:
    """The Go library's zstd blob carries two TOC digests: eStargz's (its TOC JSON's, which
    the Go store verifies) and zstd:chunked's manifest checksum (the compressed TOC's, which
    containers/storage reads). Two images holding the one blob, each annotating it one way
    (tools differ in what they keep): whichever is looked up first, both are served — the
    blob's TOC was verified under both digests."""
    # a blob of its own per order (the lab's stores outlive a test)
    layer = lab.write(every_type_tar(big=3000 + order_id(first)), "-zstd", "-chunk", "1024")
    both = dict(layer.blob.annotations or {})
    ways = {
        "zstd:chunked": {k: v for k, v in both.items() if k != images.TOC_ANN},
        "eStargz": {images.TOC_ANN: both[images.TOC_ANN], images.USIZE_ANN: both[images.USIZE_ANN]},
    }
    order = [first, *(w for w in ways if w != first)]
    trees = []
    for way in order:
        layer.blob = dataclasses.replace(layer.blob, annotations=ways[way])
        ours, go = lab.serve(layer)
        trees.append(mounted_tree(ours))
        if way == "eStargz":
            assert mounted_tree(go) is not None  # the Go store serves this one
    assert trees[0] == trees[1]
    # A third image naming another TOC digest is still refused.
    wrong = "sha256:" + "5" * 64
    for way in ({images.TOC_ANN: wrong}, {**ways["zstd:chunked"], ZSTD_CHECKSUM_ANN: wrong}):
        layer.blob = dataclasses.replace(layer.blob, annotations=way)
        ours, _ = lab.serve(layer)
        with pytest.raises(OSError) as refused:
            ours.lstat()
        assert refused.value.errno == errno.EIO


ZSTD_CHECKSUM_ANN = "io.containers.zstd-chunked.manifest-checksum"  # the Go library's key


def order_id(first: str) -> int:
    return ["zstd:chunked", "eStargz"].index(first)
