"""Layer tarballs: from a directory tree (an overlayfs upperdir or a root filesystem) or from
file specs, with the OCI whiteout conventions.

overlayfs records a deletion as a 0:0 character device and an opaque directory as the xattr
``trusted.overlay.opaque=y``; an OCI layer says the same with ``.wh.<name>`` and
``<dir>/.wh..wh..opq`` entries. Entries are written in sorted order with PAX headers (xattrs
as ``SCHILY.xattr.*``), hardlinks as tar links, so a layer rebuilt from the same tree is the same.

Every layer starts with an entry for its root directory, ``./``, as ``tar -C DIR .`` writes it.
containers/storage 1.43 (podman 4.3) gives a layer's root a mode in two ways: its tar extraction
(full pulls) makes the layer directory 0555 and skips a ``.`` entry, while its partial pull
(zstd:chunked) assembles the layer in a fresh ``mkdtemp`` directory, 0700, renamed into place,
and only a ``./`` entry sets its mode. Without one the container's ``/`` was 0700 and a
non-root user could exec nothing ("permission denied" from runc). With it ``/`` is 0755
there and 0555 after a full pull: traversable by every user either way.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

from harness.images.recipes import FileSpec

WHITEOUT_PREFIX = ".wh."
ROOT_NAME = "."  # tarfile writes a directory named "." as "./"
OPAQUE_MARKER = ".wh..wh..opq"
_OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")


class LayerTarError(RuntimeError):
    """A tree or file spec cannot be written as a layer (names the path and why)."""


def tree_to_tar(
    root: Path,
    out: Path,
    *,
    exclude: Callable[[str, bool], bool] = lambda name, is_dir: False,
    overlay_upper: bool = False,
) -> str:
    """Write the tree under ``root`` as an uncompressed layer tar at ``out``; return its diff ID.

    ``exclude(name, is_dir)`` gets each relative name (``usr/bin/x``) and drops it (and, for
    a directory, everything below). With ``overlay_upper`` the tree is an overlayfs upperdir and
    its whiteouts and opaque directories become OCI whiteout entries. The first entry is
    ``root`` itself (its mode, owner, time and xattrs), named ``./``.
    """
    links: dict[tuple[int, int], str] = {}
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as raw:
        hasher = _HashingWriter(raw)
        with tarfile.open(fileobj=hasher, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tarinfo(root, ROOT_NAME, root.lstat(), links))
            for name, path in _walk(root, exclude):
                st = path.lstat()
                if stat.S_ISSOCK(st.st_mode):
                    continue  # sockets are runtime state; image builders drop them too
                if overlay_upper and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    head, _, base = name.rpartition("/")
                    wh = f"{head}/{WHITEOUT_PREFIX}{base}" if head else WHITEOUT_PREFIX + base
                    tar.addfile(_marker(wh))
                    continue
                info = _tarinfo(path, name, st, links)
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
                if overlay_upper and stat.S_ISDIR(st.st_mode) and _is_opaque(path):
                    tar.addfile(_marker(f"{name}/{OPAQUE_MARKER}"))
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, out)
    return "sha256:" + hasher.hash.hexdigest()


def specs_to_tar(files: Iterable[FileSpec], out: Path, *, mtime: int = 1_700_000_000) -> str:
    """Write a file-set layer; return its diff ID. Deterministic (fixed mtime).

    The first entry is the root directory (``./``, 0755 root:root), as in a tree's layer.
    """
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as raw:
        hasher = _HashingWriter(raw)
        with tarfile.open(fileobj=hasher, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            root = tarfile.TarInfo(ROOT_NAME)
            root.type, root.mode, root.mtime = tarfile.DIRTYPE, 0o755, mtime
            tar.addfile(root)
            for spec in files:
                name = spec.path.strip("/")
                if not name:
                    raise LayerTarError(f"file spec with an empty path: {spec!r}")
                info = tarfile.TarInfo(name)
                info.mtime, info.uid, info.gid, info.mode = mtime, spec.uid, spec.gid, spec.mode
                head, _, base = name.rpartition("/")
                if spec.kind == "file":
                    data = Path(spec.source).read_bytes() if spec.source else spec.data
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                elif spec.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif spec.kind == "symlink":
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, spec.target, 0o777
                    tar.addfile(info)
                elif spec.kind == "whiteout":
                    tar.addfile(
                        _marker(
                            f"{head}/{WHITEOUT_PREFIX}{base}" if head else WHITEOUT_PREFIX + base,
                            mtime,
                        )
                    )
                elif spec.kind == "opaque":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                    tar.addfile(_marker(f"{name}/{OPAQUE_MARKER}", mtime))
                else:
                    raise LayerTarError(f"{spec.path}: unknown file spec kind {spec.kind!r}")
    os.replace(tmp, out)
    return "sha256:" + hasher.hash.hexdigest()


def tar_names(path: Path) -> list[str]:
    """The entry names of an uncompressed layer tar, normalised (no ``./`` or leading ``/``;
    the root directory's entry is ``""``)."""
    with tarfile.open(path, "r:") as tar:
        return [normalize(m.name) for m in tar]


def normalize(name: str) -> str:
    """``./usr/bin/x`` and ``/usr/bin/x`` → ``usr/bin/x``; ``./`` and ``.`` → ``""``."""
    name = name.removeprefix("./").lstrip("/")
    name = name.rstrip("/")
    return "" if name == "." else name


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes what passes through (the diff ID, computed in one pass)."""

    def __init__(self, raw: io.BufferedWriter) -> None:
        self.raw, self.hash = raw, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.hash.update(data)
        return self.raw.write(data)


def _walk(root: Path, exclude: Callable[[str, bool], bool]) -> Iterable[tuple[str, Path]]:
    """(relative name, path) of everything below ``root``, parents first, siblings sorted."""
    stack = [("", root)]
    while stack:
        prefix, directory = stack.pop()
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            raise LayerTarError(f"cannot list {directory}: {exc}") from exc
        subdirs = []
        for base in names:
            name = f"{prefix}{base}"
            path = directory / base
            is_dir = path.is_dir() and not path.is_symlink()
            if exclude(name, is_dir):
                continue
            yield name, path
            if is_dir:
                subdirs.append((name + "/", path))
        stack.extend(reversed(subdirs))


def _is_opaque(path: Path) -> bool:
    for attr in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, attr, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def _marker(name: str, mtime: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime = 0o644, mtime
    return info


def _tarinfo(
    path: Path, name: str, st: os.stat_result, links: dict[tuple[int, int], str]
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid, info.mtime = st.st_uid, st.st_gid, int(st.st_mtime)
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFREG:
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in links:
            info.type, info.linkname = tarfile.LNKTYPE, links[key]
        else:
            if st.st_nlink > 1:
                links[key] = name
            info.size = st.st_size
    elif fmt == stat.S_IFDIR:
        info.type = tarfile.DIRTYPE
    elif fmt == stat.S_IFLNK:
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        info.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif fmt == stat.S_IFIFO:
        info.type = tarfile.FIFOTYPE
    else:
        raise LayerTarError(f"{path}: cannot put a socket or unknown file type in a layer")
    xattrs = {}
    try:
        for attr in os.listxattr(path, follow_symlinks=False):
            if not attr.startswith(_OVERLAY_XATTRS):
                value = os.getxattr(path, attr, follow_symlinks=False)
                xattrs["SCHILY.xattr." + attr] = value.decode("utf-8", "surrogateescape")
    except OSError:
        pass
    if xattrs:
        info.pax_headers = xattrs
    return info


def repeat_numbers(keys: Iterable[str]) -> list[int]:
    """For each layer of an image (by digest or diff ID, in manifest order), how many times
    the same layer came before it: ``[a, b, a, a]`` → ``[0, 0, 1, 2]``. A converter writes
    each repeat with its own landmark time (:func:`store.estargz.convert`'s
    ``landmark_mtime``), so no two layers of a lazy image are one blob."""
    seen: dict[str, int] = {}
    out = []
    for key in keys:
        out.append(seen.get(key, 0))
        seen[key] = out[-1] + 1
    return out
