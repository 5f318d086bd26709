"""What programs see through the mounted store, compared with the same layer extracted on disk.

One registry and one store serve the module (real FUSE mount); each test pushes its own small
layer (:meth:`MountedStore.serve`) and compares what system calls answer in its ``diff`` with
what they answer in the tar extracted with ``tarfile`` into a temporary directory.
"""

from __future__ import annotations

import ctypes
import errno
import io
import mmap
import os
import random
import struct
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.store import images
from tests.store.mounted import MountedStore, mounted_store

pytestmark = pytest.mark.e2e

_SYS_GETDENTS64 = 217  # x86_64


@pytest.fixture(scope="module")
def mounted(tmp_path_factory) -> Iterator[MountedStore]:
    with mounted_store(tmp_path_factory.mktemp("posix"), "noprefetch = true\n") as store:
        yield store


def _serve(mounted: MountedStore, add, tmp_path: Path) -> tuple[Path, Path]:
    """``(diff, extracted)``: the layer ``add`` writes, through the store and on disk."""
    tar = images.make_tar(add)
    diff, _ = mounted.serve(images.to_estargz(tar).data)
    extracted = tmp_path / "extracted"
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(extracted, filter="fully_trusted")
    return diff, extracted


def getdents(path: Path, bufsize: int = 4096) -> list[tuple[bytes, int]]:
    """``(name, d_ino)`` of every entry ``getdents64`` lists in ``path``, in its order."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    buf = ctypes.create_string_buffer(bufsize)
    out = []
    try:
        while (n := libc.syscall(_SYS_GETDENTS64, fd, buf, bufsize)) > 0:
            pos = 0
            while pos < n:
                ino, _, reclen, _ = struct.unpack_from("QqHB", buf.raw, pos)
                out.append((buf.raw[pos + 19 : pos + reclen].split(b"\0")[0], ino))
                pos += reclen
        assert n == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    return out


def _tree(tar: tarfile.TarFile) -> None:
    images.add_node(tar, "d", tarfile.DIRTYPE)
    images.add_node(tar, "d/sub", tarfile.DIRTYPE)
    images.add_file(tar, "d/sub/f", b"f\n")
    for i in range(40):
        images.add_file(tar, f"d/file{i:02d}", b"%d\n" % i)


@pytest.mark.parametrize("bufsize", [64, 4096])
def test_directories_list_dot_and_dotdot_as_on_disk(mounted, tmp_path, bufsize):
    """A directory on disk lists ``.`` and ``..``; overlayfs lists a directory found in one
    lower layer only as that directory lists itself, so a container's ``ls -a`` showed
    neither. Listed with a buffer of one entry a call, too (``..`` and the first child
    across calls)."""
    diff, extracted = _serve(mounted, _tree, tmp_path)
    for rel in ("", "d", "d/sub"):
        got = getdents(diff / rel, bufsize)
        want = getdents(extracted / rel, bufsize)
        assert sorted(n for n, _ in got) == sorted(n for n, _ in want), rel
        assert [n for n, _ in got[:2]] == [b".", b".."]
        inos = dict(got)
        assert inos[b"."] == os.stat(diff / rel).st_ino
        assert inos[b".."] == os.stat(diff / rel / "..").st_ino
        # each child's d_ino is its st_ino
        for name, ino in got[2:]:
            assert ino == os.lstat(diff / rel / name.decode()).st_ino


def _direct_pread(fd: int, size: int, offset: int) -> bytes:
    """``pread`` on an ``O_DIRECT`` descriptor (an aligned buffer): past the page cache."""
    buf = mmap.mmap(-1, size)
    with buf:
        return buf[: os.preadv(fd, [buf], offset)]


def test_blob_reads_on_after_its_layer_is_released(mounted, tmp_path):
    """``podman rmi`` (the layer's release) while ``blob`` is open, or within the kernel's
    entry timeout of its lookup, made every later read of it EIO, while the files of
    ``diff`` read on: a ``podman save`` racing an ``rmi`` failed."""
    payload = random.Random(5).randbytes(1 << 20)
    data = images.to_estargz(images.make_tar(lambda t: images.add_file(t, "f", payload))).data
    diff, _ = mounted.serve(data)
    layer_dir = diff.parent
    fd = os.open(layer_dir / "blob", os.O_RDONLY | os.O_DIRECT)
    try:
        assert _direct_pread(fd, 4096, 0) == data[:4096]
        with pytest.raises(FileNotFoundError):
            os.close(os.open(layer_dir / "use", os.O_WRONLY | os.O_CREAT))  # refcount +1
        with pytest.raises(FileNotFoundError):
            os.rmdir(layer_dir)  # refcount 0: released
        assert _direct_pread(fd, 8192, 4096) == data[4096 : 4096 + 8192]
        again = os.open(layer_dir / "blob", os.O_RDONLY | os.O_DIRECT)
        try:
            assert _direct_pread(again, len(data) + 4096, 0) == data
        finally:
            os.close(again)
    finally:
        os.close(fd)


_CHANGES = {
    "mkdir": lambda p: os.mkdir(p / "new"),
    "mknod": lambda p: os.mkfifo(p / "new"),
    "symlink": lambda p: os.symlink("x", p / "new"),
    "link": lambda p: os.link(p / "f", p / "new"),
    "unlink": lambda p: os.unlink(p / "f"),
    "rmdir": lambda p: os.rmdir(p / "sub"),
    "rename": lambda p: os.rename(p / "f", p / "new"),
    "chmod": lambda p: os.chmod(p / "f", 0o600),
    "chown": lambda p: os.chown(p / "f", 1, 1),
    "utime": lambda p: os.utime(p / "f", (1, 1)),
    "truncate": lambda p: os.truncate(p / "f", 0),
    "setxattr": lambda p: os.setxattr(p / "f", "user.x", b"1"),
    "removexattr": lambda p: os.removexattr(p / "f", "user.x"),
    "open-wronly": lambda p: os.close(os.open(p / "f", os.O_WRONLY)),
    "create": lambda p: os.close(os.open(p / "new", os.O_WRONLY | os.O_CREAT, 0o644)),
}


def _changes_tree(tar: tarfile.TarFile) -> None:
    images.add_node(tar, "sub", tarfile.DIRTYPE)
    info = tarfile.TarInfo("f")
    info.size, info.pax_headers = 2, {"SCHILY.xattr.user.x": "v"}
    tar.addfile(info, io.BytesIO(b"f\n"))


@pytest.fixture(scope="module")
def changes_diff(mounted) -> Path:
    diff, _ = mounted.serve(images.to_estargz(images.make_tar(_changes_tree)).data)
    return diff


@pytest.mark.parametrize("change", sorted(_CHANGES))
def test_every_change_answers_erofs(changes_diff, change):
    """The store is read-only, but cannot be mounted ``ro`` (the kernel would answer the
    protocol's ``use`` and ``rmdir`` itself): each change must answer EROFS, as a read-only
    mount does. Unanswered, most failed with ENOSYS ("Function not implemented"), xattr
    changes with EOPNOTSUPP, link with EPERM."""
    with pytest.raises(OSError) as exc:
        _CHANGES[change](changes_diff)
    assert exc.value.errno == errno.EROFS, exc.value
    assert (changes_diff / "f").read_bytes() == b"f\n"


def _access_tree(tar: tarfile.TarFile) -> None:
    images.add_node(tar, "d", tarfile.DIRTYPE, 0o700)
    images.add_file(tar, "d/plain", b"x", 0o644)
    images.add_file(tar, "d/exe", b"x", 0o700)
    images.add_file(tar, "d/other-exe", b"x", 0o601)
    images.add_node(tar, "d/fifo", tarfile.FIFOTYPE, 0o644)
    images.add_node(tar, "d/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3)


def test_access_answers_as_a_read_only_mount_does(mounted, tmp_path):
    """``access(2)`` answered yes to everything: ``test -w`` called a layer's files
    writable (a read-only mount says EROFS) and ``test -x`` a file with no execute bit
    executable (root too is refused that; execve is)."""
    diff, extracted = _serve(mounted, _access_tree, tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", extracted, ro], check=True)
    try:
        # (not d/link: the kernel asks a FUSE filesystem nothing of a symbolic link)
        for rel in ("", "d", "d/plain", "d/exe", "d/other-exe", "d/fifo", "d/null"):
            for mode in (os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.X_OK, os.F_OK):
                got = _access(diff / rel, mode)
                assert got == _access(ro / rel, mode), (rel, mode, got)
    finally:
        subprocess.run(["umount", ro], check=True)


def _access(path: Path, mode: int) -> int:
    """``faccessat(path, mode, AT_SYMLINK_NOFOLLOW)``'s errno (0: allowed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    ok = libc.faccessat(-100, os.fsencode(path), mode, 0x100)  # AT_FDCWD, AT_SYMLINK_NOFOLLOW
    return 0 if ok == 0 else ctypes.get_errno()


@pytest.mark.parametrize("length", [255, 256, 1024])
def test_a_name_too_long_for_a_layer_is_enametoolong(changes_diff, tmp_path, length):
    """A layer holds no name over 255 bytes (statfs's ``f_namemax``), and ext4 answers a
    longer one with ENAMETOOLONG; the kernel passes FUSE names up to 1024 bytes, which
    the store answered with ENOENT."""
    want = errno.ENOENT if length <= 255 else errno.ENAMETOOLONG
    for base in (changes_diff, tmp_path):
        with pytest.raises(OSError) as exc:
            os.stat(base / ("é" * (length // 2) + "x" * (length % 2)))
        assert exc.value.errno == want, base
