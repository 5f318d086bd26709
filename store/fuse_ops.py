"""Thin pyfuse3 Operations over :class:`store.fs.StoreFS`.

Why thin: everything with a decision in it lives in ``store.fs`` (testable without a mount);
this class converts names/attributes and turns :class:`~store.fs.FSError` into
``pyfuse3.FUSEError``. Files open with ``keep_cache``: layer content never changes, so the
kernel page cache may serve re-reads across opens; the store also fills it with what it
already holds (``StoreFS.page_cache``, set to ``pyfuse3.notify_store`` once mounted; not used
while the store records an access trace). Every request that names its caller (a ``ctx``)
but ``statfs`` is first put to ``StoreFS.admit``; read and readdir name none, but follow an
open or opendir that did.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

from store.fs import BLOCK_SIZE, NAME_MAX, Attr, FSError, StoreFS

log = logging.getLogger(__name__)
T = TypeVar("T")


def _call(fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except FSError as exc:
        raise pyfuse3.FUSEError(exc.errno_value) from None
    except pyfuse3.FUSEError:
        raise
    except Exception:
        log.exception("unexpected error in %s", getattr(fn, "__name__", fn))
        raise pyfuse3.FUSEError(errno.EIO) from None


async def _acall(coro: Awaitable[T], what: str) -> T:
    """Await ``coro``; an unexpected error is logged and answered with EIO — an exception
    escaping a handler would stop pyfuse3's main loop and leave a dead mount behind."""
    try:
        return await coro
    except FSError as exc:
        raise pyfuse3.FUSEError(exc.errno_value) from None
    except Exception:
        log.exception("unexpected error in %s", what)
        raise pyfuse3.FUSEError(errno.EIO) from None


class StoreOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: StoreFS, attr_timeout: float = 1.0, entry_timeout: float = 1.0):
        super().__init__()
        self.fs = fs
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        if self.fs.is_layer_inode(a.ino):  # immutable layer content: cache as configured
            e.entry_timeout, e.attr_timeout = self.entry_timeout, self.attr_timeout
        else:  # the store's own skeleton changes (status, released layers): short
            e.entry_timeout = e.attr_timeout = 0.0 if a.ino == self.fs.status_ino else 1.0
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = BLOCK_SIZE
        e.st_blocks = a.blocks
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = a.mtime_ns
        return e

    def _admit(self, ctx: Any) -> None:
        _call(self.fs.admit, ctx.uid)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any):
        self._admit(ctx)
        attr = await _acall(self.fs.lookup(parent_inode, os.fsdecode(name)), "lookup")
        return self._entry(attr)

    async def getattr(self, inode: int, ctx: Any):
        self._admit(ctx)
        return self._entry(_call(self.fs.getattr, inode))

    async def forget(self, inode_list):
        for ino, nlookup in inode_list:
            self.fs.forget(ino, nlookup)

    async def opendir(self, inode: int, ctx: Any):
        self._admit(ctx)
        return _call(self.fs.opendir, inode)

    async def readdir(self, fh: int, start_id: int, token):
        entries = _call(self.fs.readdir, fh, start_id)
        for i in itertools.count(start_id):
            # taken inside the guard: the listing's attributes are made lazily, and an error
            # raised while making one would otherwise leave the handler
            entry = _call(next, entries, None)
            if entry is None:
                break
            name, attr = entry
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(attr), i + 1):
                break
            self.fs.readdir_counted(name, attr)

    async def releasedir(self, fh: int):
        self.fs.releasedir(fh)

    async def open(self, inode: int, flags: int, ctx: Any):
        self._admit(ctx)
        handle = _call(self.fs.open, inode, bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC)))
        if handle is not None:  # `status`: its own handle, read past the page cache
            return pyfuse3.FileInfo(fh=handle, direct_io=True)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int):
        return await _acall(self.fs.read(fh, off, size), "read")

    async def release(self, fh: int):
        self.fs.release(fh)

    async def readlink(self, inode: int, ctx: Any):
        self._admit(ctx)
        return _call(self.fs.readlink, inode)

    async def getxattr(self, inode: int, name: bytes, ctx: Any):
        self._admit(ctx)
        return _call(self.fs.getxattr, inode, name)

    async def listxattr(self, inode: int, ctx: Any):
        self._admit(ctx)
        return _call(self.fs.listxattr, inode)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any):
        self._admit(ctx)
        _call(self.fs.create, parent_inode, os.fsdecode(name))
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any):
        self._admit(ctx)
        _call(self.fs.rmdir, parent_inode, os.fsdecode(name))

    # Every other change: EROFS (StoreFS.modify), never ENOSYS.
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any):
        self._admit(ctx)
        _call(self.fs.modify, inode)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any):
        self._admit(ctx)
        _call(self.fs.modify, parent_inode)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any):
        self._admit(ctx)
        _call(self.fs.modify, parent_inode)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any):
        self._admit(ctx)
        _call(self.fs.modify, parent_inode)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any):
        self._admit(ctx)
        _call(self.fs.modify, new_parent_inode)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any):
        self._admit(ctx)
        _call(self.fs.modify, parent_inode)

    async def rename(
        self,
        parent_old: int,
        name_old: bytes,
        parent_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ):
        self._admit(ctx)
        _call(self.fs.modify, parent_old)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any):
        self._admit(ctx)
        _call(self.fs.modify, inode)

    async def removexattr(self, inode: int, name: bytes, ctx: Any):
        self._admit(ctx)
        _call(self.fs.modify, inode)

    async def access(self, inode: int, mode: int, ctx: Any):
        self._admit(ctx)
        _call(self.fs.access, inode, mode)
        return True

    async def statfs(self, ctx: Any):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = NAME_MAX
        return s
