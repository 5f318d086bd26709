"""A minimal FUSE server: the warm re-read baseline of ``bench_store_read.py``.

What it is for: a re-read of a cached file through a FUSE mount is served by the kernel from
the mount's page cache, never by the server (the store opens files with ``keep_cache``); its
speed is the kernel's, and that differs from ext4's (ext4 caches in large folios: a 256 MiB
file written in one write re-reads about twice as fast as through any FUSE mount on the same
machine). So the store's warm re-read is compared with this server's, which does nothing
but what the kernel needs: one directory holding one read-only file, opened with
``keep_cache``, with the store's mount options (``pyfuse3.default_options`` without
``default_permissions``, plus ``allow_other``, ``suid``, ``dev``) and its default attribute
and entry timeouts (60 s).

The file's bytes are read from a local file (``pread`` per request) or, with ``--memory``,
loaded into memory first. It runs as its own process (``python benchmarks/minifuse.py
MOUNTPOINT SOURCE [--name NAME] [--memory]``), started and stopped by :func:`mounted`: the
mount is waited for with a timeout, and on every way out of the ``with`` block it is unmounted
(``fusermount3 -u``, else ``umount``; still busy: SIGTERM, on which the server detaches it
lazily) and the process reaped (killed if it does not exit in 10 s; a mount still there is
then detached lazily). The server also unmounts itself on SIGINT, and asks for SIGTERM when
its parent dies, so an interrupted or killed benchmark leaves no mount behind either.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.store_proc import is_mounted

FSNAME = "lazybench-minifuse"
TIMEOUT = 60.0  # attr/entry timeouts, as the store's [fuse] defaults (store/config.py)
FILE_INO = 2
PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def mounted(
    mountpoint: Path,
    source: Path,
    name: str = "file",
    memory: bool = False,
    timeout: float = 20.0,
) -> Iterator[Path]:
    """Serve ``source``'s bytes as ``mountpoint/name`` for the ``with`` block; yields the
    served file's path. ``mountpoint`` is created (and removed afterwards) if it is missing.
    Raises ``RuntimeError`` (with the server's stderr) if the mount is not up in ``timeout``
    seconds; the mount and the process are gone when this returns or raises."""
    created = not mountpoint.exists()
    mountpoint.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), str(mountpoint), str(source)]
    cmd += ["--name", name, "--parent", str(os.getpid()), *(["--memory"] if memory else [])]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        try:
            deadline = time.monotonic() + timeout
            while not is_mounted(mountpoint):
                if proc.poll() is not None or time.monotonic() > deadline:
                    stderr.seek(0)
                    why = stderr.read().decode(errors="replace")[-2000:]
                    state = f"exited {proc.returncode}" if proc.poll() is not None else "running"
                    raise RuntimeError(f"minifuse did not mount in {timeout} s ({state}): {why}")
                time.sleep(0.05)
            yield mountpoint / name
        finally:
            _stop(proc, mountpoint)
            if created:
                with contextlib.suppress(OSError):
                    mountpoint.rmdir()


def _stop(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """Unmount (the server's main loop then returns and it exits) and reap the server. A mount
    still busy is left to the server, told to stop by SIGTERM (it detaches it lazily); the
    server is killed if it does not exit in time, and a mount still there detached lazily."""
    if is_mounted(mountpoint):
        r = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, timeout=30)
        if r.returncode != 0 and is_mounted(mountpoint):
            subprocess.run(["umount", str(mountpoint)], capture_output=True, timeout=30)
    if is_mounted(mountpoint) and proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    for umount in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
        if not is_mounted(mountpoint):
            break
        subprocess.run([*umount, str(mountpoint)], capture_output=True, timeout=30)


def serve(mountpoint: Path, source: Path, name: str, memory: bool) -> None:
    """Mount and serve until unmounted (or SIGTERM/SIGINT, which unmount)."""
    import pyfuse3
    import trio

    fd = os.open(source, os.O_RDONLY)
    size = os.fstat(fd).st_size
    data = Path(source).read_bytes() if memory else None
    file_name = os.fsencode(name)

    class Operations(pyfuse3.Operations):
        supports_dot_lookup = False
        enable_writeback_cache = False
        enable_acl = False

        def _entry(self, inode: int) -> pyfuse3.EntryAttributes:
            e = pyfuse3.EntryAttributes()
            e.st_ino = inode
            e.entry_timeout = e.attr_timeout = TIMEOUT
            if inode == pyfuse3.ROOT_INODE:
                e.st_mode, e.st_nlink = stat.S_IFDIR | 0o755, 2
            else:
                e.st_mode, e.st_nlink, e.st_size = stat.S_IFREG | 0o644, 1, size
                e.st_blocks = (size + 511) // 512
            e.st_blksize = 4096
            return e

        async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
            if inode not in (pyfuse3.ROOT_INODE, FILE_INO):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._entry(inode)

        async def lookup(
            self, parent_inode: int, name: bytes, ctx: Any = None
        ) -> pyfuse3.EntryAttributes:
            if parent_inode != pyfuse3.ROOT_INODE or name != file_name:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._entry(FILE_INO)

        async def opendir(self, inode: int, ctx: Any) -> int:
            if inode != pyfuse3.ROOT_INODE:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            if start_id == 0:
                pyfuse3.readdir_reply(token, file_name, self._entry(FILE_INO), 1)

        async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
            if inode != FILE_INO:
                raise pyfuse3.FUSEError(errno.EISDIR)
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
                raise pyfuse3.FUSEError(errno.EROFS)
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            return data[off : off + size] if data is not None else os.pread(fd, size, off)

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()  # unmounted from outside

    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {f"fsname={FSNAME}", "allow_other", "suid", "dev"}
    pyfuse3.init(Operations(), str(mountpoint), options)
    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)
        os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mountpoint", type=Path)
    p.add_argument("source", type=Path, help="the local file whose bytes are served")
    p.add_argument("--name", default="file", help="the served file's name")
    p.add_argument("--memory", action="store_true", help="load the bytes into memory first")
    p.add_argument("--parent", type=int, help="stop when this process (our parent) dies")
    args = p.parse_args()
    if args.parent is not None:
        # SIGTERM (so: unmount) when the benchmark that started us dies, even by SIGKILL
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != args.parent:
            sys.exit("minifuse: the parent died before we started")
    serve(args.mountpoint, args.source, args.name, args.memory)


if __name__ == "__main__":
    main()
