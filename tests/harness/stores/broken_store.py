"""A layer store that mounts but never gives podman a layer: the runtime must fall back.

``python broken_store.py {empty|eio|hang} --config C --root R MOUNTPOINT`` mounts an
Additional Layer Store-shaped FUSE filesystem (the command line of ``stargz-store``) whose root
is an empty directory: ``empty`` answers ENOENT for every image directory podman looks up (a
store that serves no layer), ``eio`` answers EIO (a store whose every layer errors), ``hang``
never answers a lookup (a hung store: the looking process waits in the kernel, where SIGKILL
does not end it, until the store dies). It logs each lookup
to stdout, and unmounts cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio


class Broken(pyfuse3.Operations):
    def __init__(self, failure: int) -> None:
        super().__init__()
        self.failure = failure

    async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = stat.S_IFDIR | 0o755
        attr.st_nlink = 2
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        attr.attr_timeout = attr.entry_timeout = 0
        return attr

    async def lookup(self, parent_inode: int, name: bytes, ctx: object = None) -> None:
        if self.failure == 0:  # hang
            print(f"lookup {name.decode(errors='replace')}: never answered", flush=True)
            await trio.sleep_forever()
        what = errno.errorcode[self.failure]
        print(f"lookup {name.decode(errors='replace')}: {what}", flush=True)
        raise pyfuse3.FUSEError(self.failure)

    async def opendir(self, inode: int, ctx: object) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: object) -> None:
        return None

    async def releasedir(self, fh: int) -> None:
        return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("empty", "eio", "hang"))
    parser.add_argument("--config")
    parser.add_argument("--root")
    parser.add_argument("mountpoint")
    args = parser.parse_args()
    failure = {"empty": errno.ENOENT, "eio": errno.EIO, "hang": 0}[args.kind]
    pyfuse3.init(Broken(failure), args.mountpoint, {"fsname=broken-store", "ro"})
    print(f"mounted {args.mountpoint} ({args.kind})", flush=True)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
