"""The layer-store directory tree of DESIGN.md §3, as plain objects (no FUSE here).

``<mnt>/<base64(ref)>/<digest>/{diff,info,blob,use}``, ``<mnt>/<base64(ref)>/{manifest,config}``
and ``<mnt>/status``. :class:`StoreFS` answers lookups, attributes, reads and the two
reference-counting signals; :mod:`store.fuse_ops` only translates pyfuse3 calls to these.

Inode numbers: one monotonically increasing 64-bit counter hands out numbers and never gives
one back, so a number is never reused (in particular not before the kernel's ``forget``, which
matters because c/image looks layers up in parallel). A resolved layer takes a contiguous
block of numbers, ``base + node.index``, so its 100,000 nodes cost no per-inode dict entries;
each image that reaches a shared layer gets its own block (see :meth:`StoreFS._mount_layer`).
Synthetic nodes (ref/layer directories, ``info``, ``blob`` …) live in a dict until forgotten.

Errors are :class:`FSError` carrying an errno. Resolution errors map so that the runtime falls
back to a normal pull: not eStargz / unknown digest → ENOENT (fast), anything else → EIO, and
a resolution exceeding the bounded wait → EIO while it continues in the background.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import errno
import itertools
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from store.layer import BlobVerifyError, ChunkVerifyError, Layer, LayerFetchError
from store.resolver import (
    LayerManager,
    LayerRefused,
    NotEstargzError,
    ResolveError,
    ResolveTimeout,
)
from store.tree import OPAQUE_XATTRS, Node

log = logging.getLogger(__name__)

ROOT_INO = 1
DIFF, INFO, BLOB, USE = "diff", "info", "blob", "use"
DIR_MODE = stat.S_IFDIR | 0o500
FILE_MODE = stat.S_IFREG | 0o400


@dataclass
class _DirHandle:
    """An open directory: its inode, and (after the first listing) its children by name."""

    ino: int
    listing: list[tuple[bytes, Node]] | None = None
    slot: _LayerSlot | None = None  # the directory's layer view, with the listing
    dots: list[tuple[str, Attr]] = field(default_factory=list)  # ``.`` and ``..``, with it


class FSError(OSError):
    """An errno to answer the kernel with."""

    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(err, why or errno.errorcode.get(err, str(err)))
        self.errno_value = err


BLOCK_SIZE = 4096  # the st_blksize of every node
NAME_MAX = 255  # bytes in a layer's names (the index refuses longer); statfs's f_namemax
FAST_SYMLINK_MAX = 59  # ext4 keeps a symbolic link's target up to this long in its inode


@dataclass
class Attr:
    """What ``stat`` shows for one inode."""

    ino: int
    mode: int
    size: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    rdev: int = 0
    mtime_ns: int = 0

    @property
    def blocks(self) -> int:
        """``st_blocks`` (512-byte units), as a normal pull extracted on a filesystem of
        :data:`BLOCK_SIZE` blocks (ext4's, xfs's default) shows it: whole blocks, none for a
        symbolic link whose target fits in the inode (ext4's fast symlink), so ``du`` and
        ``ls -s`` of a lazily pulled tree agree with it. (The Go stargz-store v0.12,
        fs/layer/node.go ``entryToAttr``, counts 4 KiB blocks as 512-byte units.) Holes are
        not in the TOC: a sparse file counts whole."""
        if stat.S_ISLNK(self.mode) and self.size <= FAST_SYMLINK_MAX:
            return 0
        return -(-self.size // BLOCK_SIZE) * (BLOCK_SIZE // 512)


@dataclass
class Synth:
    """A node of the store's own skeleton: kind is root|ref|layerdir|info|blob|bytes."""

    ino: int
    kind: str
    ref: str = ""
    digest: str = ""
    data: bytes = b""
    layer: Layer | None = None
    lookups: int = 0
    key: tuple[int, str] | None = None  # (parent ino, name) for the name cache


@dataclass
class _LayerSlot:
    """One image's view of a layer: its own block of inode numbers over the shared tree."""

    layer: Layer
    base: int
    ref: str
    lookups: int = 0
    parent: int = ROOT_INO  # the layer directory's inode: what ``diff/..`` lists as


@dataclass
class StoreFS:
    """The store's filesystem logic over a :class:`~store.resolver.LayerManager`.

    ``on_read_range(layer, node, offset, size)`` is told of every read of a layer file that
    returned data (``size`` bytes from file offset ``offset``); the access trace records it.
    It runs on the FUSE loop: it must be O(1). With it set, ``page_cache`` is not used: the
    kernel would answer reads of the bytes handed to it, and the observer never see them.
    """

    manager: LayerManager
    on_read_range: Callable[[Layer, Node, int, int], None] | None = None
    # ``page_cache(ino, offset, data)`` puts verified bytes into the kernel's page cache for
    # ``ino`` (``pyfuse3.notify_store`` once mounted; :meth:`Layer.page_in`)
    page_cache: Callable[[int, int, bytes], None] | None = None
    _next_ino: int = ROOT_INO + 1
    _synth: dict[int, Synth] = field(default_factory=dict)
    _names: dict[tuple[int, str], int] = field(default_factory=dict)
    _bases: list[int] = field(default_factory=list)
    _slots: dict[int, _LayerSlot] = field(default_factory=dict)
    _views: dict[tuple[str, str], _LayerSlot] = field(default_factory=dict)  # (ref, digest)
    _opaque: tuple[bytes, ...] = ()  # from the config's overlay_opaque_type
    # Open handles of ``status`` with their JSON (:meth:`open`): numbered above every inode
    # number the store hands out (inodes count up from 2).
    _snapshots: dict[int, bytes] = field(default_factory=dict)
    _next_handle: int = 1 << 62
    # Open directory handles (:meth:`opendir`): the directory's inode, and its sorted listing
    # once the first :meth:`readdir` made it, until :meth:`releasedir`.
    _dirs: dict[int, _DirHandle] = field(default_factory=dict)
    # The store's own effective uid: its callers besides root (:meth:`admit`).
    own_uid: int = field(default_factory=os.geteuid)
    _refused: set[int] = field(default_factory=set)  # callers refused so far (logged once)

    def __post_init__(self) -> None:
        self._synth[ROOT_INO] = Synth(ROOT_INO, "root", lookups=1)
        self._opaque = self.manager.config.opaque_xattrs
        self.manager.on_released = self._released

    def _released(self, layer: Layer) -> None:
        """The manager released ``layer``: drop its trees the kernel holds no inode of (the
        rest go at their last :meth:`forget`)."""
        for slot in [s for s in self._slots.values() if s.layer is layer]:
            self._maybe_unmount(slot)

    # -- who is served ------------------------------------------------------------------------

    def admit(self, uid: int) -> None:
        """Serve a request of the caller ``uid`` (its fsuid as the mount's user namespace
        sees it: pyfuse3's ``ctx.uid``) only if it is root or the store's own user, unless
        the config's ``serve_all_users`` serves everyone. Raises :class:`FSError` (EACCES).

        Why: the mount has ``allow_other`` (root must reach a store mounted by a user, and
        overlayfs reads with its mounter's credentials) and no ``default_permissions``
        (:meth:`access`), so without this every local user could read every file of every
        layer, its ``blob`` too, whatever its mode, where a normal pull keeps them under
        ``/var/lib/containers/storage`` (0700). Those who use the mount are root (rootful
        podman, CRI-O: overlayfs reads its lower layers as the mounter, root), uid 0 of the
        user namespace a rootless store runs in (``podman unshare``: podman and its
        overlayfs there are uid 0 too), and the user a store runs as: about what FUSE
        itself allows without ``allow_other`` (the mounter's user), with root let in. The
        Go stargz-store v0.12 serves every user (``AllowOther: true`` in its
        ``store/fs.go``, no check of the caller: ``nobody`` reads a 0600 file and ``blob``
        through it). The kernel answers from its caches without asking: another user may
        ``stat`` a name root looked up less than ``[fuse] entry_timeout`` ago, but opens
        and listings always reach the store."""
        if uid != 0 and uid != self.own_uid and not self.manager.config.serve_all_users:
            if uid not in self._refused:
                self._refused.add(uid)
                log.warning(
                    "uid %d refused (EACCES): the store serves root and uid %d only; set "
                    "serve_all_users = true in the config for a store shared on purpose",
                    uid,
                    self.own_uid,
                )
            raise FSError(errno.EACCES, f"uid {uid}: the layer store serves root and its user")

    # -- inode bookkeeping -------------------------------------------------------------------

    def _alloc(self, count: int = 1) -> int:
        ino = self._next_ino
        self._next_ino += count
        return ino

    def _new_synth(self, parent: int, name: str, **kw: Any) -> Synth:
        node = Synth(self._alloc(), key=(parent, name), **kw)
        self._synth[node.ino] = node
        self._names[(parent, name)] = node.ino
        return node

    def _mount_layer(self, layer: Layer, ref: str, parent: int) -> _LayerSlot:
        """The inode block of ``layer`` as image ``ref`` sees it, below the layer directory
        of inode ``parent``.

        Why one block per image and not per layer: images sharing a layer share its tree, but
        if its directories had one inode number the kernel would see one directory under
        several parents, and concurrent lookups through two images' paths then fail with
        ESTALE (``d_splice_alias`` cannot move the alias). The Go store numbers each image's
        layer apart too (``layerMap`` in ``store/fs.go``).
        """
        key = (ref, layer.digest)
        slot = self._views.get(key)
        if slot is not None and slot.layer is layer and slot.base in self._slots:
            slot.parent = parent  # the layer directory's node may have been forgotten
            return slot
        slot = _LayerSlot(layer, self._alloc(len(layer.tree.nodes)), ref, parent=parent)
        bisect.insort(self._bases, slot.base)
        self._slots[slot.base] = slot
        self._views[key] = slot
        return slot

    def _layer_of(self, ino: int) -> tuple[_LayerSlot, Node] | None:
        i = bisect.bisect_right(self._bases, ino) - 1
        if i < 0:
            return None
        slot = self._slots[self._bases[i]]
        idx = ino - slot.base
        if idx >= len(slot.layer.tree.nodes):
            return None
        return slot, slot.layer.tree.nodes[idx]

    def _layer_dir(self, ino: int) -> tuple[_LayerSlot, Node]:
        """The layer view and directory node of ``ino``: ENOENT/ENOTDIR otherwise."""
        found = self._layer_of(ino)
        if found is None:
            raise FSError(errno.ENOENT)
        if found[1].children is None:
            raise FSError(errno.ENOTDIR)
        return found

    def _counted(self, attr: Attr) -> Attr:
        """Count one kernel lookup of the returned inode (balanced by :meth:`forget`)."""
        synth = self._synth.get(attr.ino)
        if synth is not None:
            synth.lookups += 1
        else:
            found = self._layer_of(attr.ino)
            if found is not None:
                found[0].lookups += 1
        return attr

    def forget(self, ino: int, nlookup: int) -> None:
        synth = self._synth.get(ino)
        if synth is not None:
            synth.lookups -= nlookup
            if synth.lookups <= 0 and ino != ROOT_INO:
                del self._synth[ino]
                if synth.key is not None and self._names.get(synth.key) == ino:
                    del self._names[synth.key]
            return
        found = self._layer_of(ino)
        if found is not None:
            slot = found[0]
            slot.lookups -= nlookup
            self._maybe_unmount(slot)

    def _maybe_unmount(self, slot: _LayerSlot) -> None:
        """Drop a released layer's tree once the kernel holds none of its inodes."""
        if slot.layer.released and slot.lookups <= 0:
            base = slot.base
            self._slots.pop(base, None)
            for key, view in list(self._views.items()):
                if view is slot:
                    del self._views[key]
            i = bisect.bisect_left(self._bases, base)
            if i < len(self._bases) and self._bases[i] == base:
                del self._bases[i]
            log.info("layer %s unmounted (memory freed)", slot.layer.key)

    def is_layer_inode(self, ino: int) -> bool:
        return ino not in self._synth and self._layer_of(ino) is not None

    @property
    def status_ino(self) -> int:
        return self._names.get((ROOT_INO, "status"), -1)

    def mounted_layers(self) -> int:
        return len(self._slots)

    # -- attributes --------------------------------------------------------------------------

    def getattr(self, ino: int) -> Attr:
        synth = self._synth.get(ino)
        if synth is not None:
            return self._synth_attr(synth)
        found = self._layer_of(ino)
        if found is None:
            raise FSError(errno.ENOENT, f"inode {ino} unknown")
        return self._node_attr(found[0], found[1])

    def _synth_attr(self, s: Synth) -> Attr:
        if s.kind in ("root", "ref", "layerdir"):
            return Attr(s.ino, DIR_MODE, nlink=2)
        if s.kind == "blob":
            assert s.layer is not None
            return Attr(s.ino, FILE_MODE, size=s.layer.blob.size)
        if s.kind == "status":
            return Attr(s.ino, FILE_MODE, size=len(self.status_bytes()))
        return Attr(s.ino, FILE_MODE, size=len(s.data))

    @staticmethod
    def _node_attr(slot: _LayerSlot, node: Node) -> Attr:
        return Attr(
            ino=slot.base + node.index,
            mode=node.mode,
            size=node.size,
            uid=node.uid,
            gid=node.gid,
            nlink=node.nlink,
            rdev=node.rdev,
            mtime_ns=node.mtime_ns,
        )

    # -- lookup ------------------------------------------------------------------------------

    async def lookup(self, parent: int, name: str) -> Attr:
        """Resolve ``name`` in ``parent``; the returned inode's lookup count goes up by one."""
        if self.manager.timeline is not None and parent in self._synth:
            return self._counted(await self._timed_lookup(parent, name))
        return self._counted(await self._lookup(parent, name))

    async def _timed_lookup(self, parent: int, name: str) -> Attr:
        """:meth:`_lookup` of a runtime request on the store's own tree, on the timeline
        (:mod:`store.timeline`: ``request``, and a layer's first ``lookup`` and ``ready``)."""
        tl = self.manager.timeline
        assert tl is not None
        synth = self._synth[parent]
        fields: dict[str, Any] = {"what": "ref" if name != "status" else "status"}
        if synth.kind == "ref":
            fields = {"what": name if name in ("manifest", "config") else "layerdir"}
            fields["ref"] = synth.ref
            if fields["what"] == "layerdir":
                fields["name"] = name
                tl.once(("lookup", synth.ref, name), "lookup", ref=synth.ref, name=name)
        elif synth.kind == "layerdir":
            fields = {"what": name, "ref": synth.ref, "name": synth.digest}
        start = time.monotonic()
        try:
            attr = await self._lookup(parent, name)
        except FSError as exc:
            tl.event("request", start=start, error=errno.errorcode.get(exc.errno_value), **fields)
            raise
        if synth.kind == "root" and (image := self._synth.get(attr.ino)) is not None:
            fields["ref"] = image.ref
        tl.event("request", start=start, **fields)
        if fields["what"] == DIFF and (found := self._layer_of(attr.ino)) is not None:
            layer = found[0].layer
            key = ("ready", synth.ref, layer.digest)
            tl.once(key, "ready", layer=layer.digest, ref=synth.ref, nodes=len(layer.tree.nodes))
            tl.flush()
        return attr

    async def _lookup(self, parent: int, name: str) -> Attr:
        synth = self._synth.get(parent)
        if synth is None:
            slot, node = self._layer_dir(parent)
            key = name.encode("utf-8", "surrogateescape")
            if len(key) > NAME_MAX:  # the kernel passes names up to 1024 bytes to FUSE
                raise FSError(errno.ENAMETOOLONG)
            child = node.children.get(key)
            if child is None:
                raise FSError(errno.ENOENT)
            return self._node_attr(slot, child)
        known = self._synth.get(self._names.get((parent, name), 0))
        if known is not None and not (known.layer is not None and known.layer.released):
            # A released layer's ``blob`` is looked up afresh: the layer is loaded again (a
            # pull after `podman rmi`), and the old node would answer EIO until forgotten.
            return self._synth_attr(known)
        if synth.kind == "root":
            return self._lookup_root(name)
        if synth.kind == "ref":
            return await self._lookup_ref(synth, name)
        if synth.kind == "layerdir":
            return await self._lookup_layerdir(synth, name)
        raise FSError(errno.ENOTDIR)

    def _lookup_root(self, name: str) -> Attr:
        if name == "status":
            return self._synth_attr(self._new_synth(ROOT_INO, name, kind="status"))
        try:
            ref = base64.b64decode(name.encode(), validate=True).decode()
        except (binascii.Error, UnicodeError):  # UnicodeEncodeError: a name not UTF-8
            raise FSError(errno.EINVAL, f"{name!r} is not base64") from None
        if not self.manager.valid_ref(ref):
            raise FSError(errno.EINVAL, f"{ref!r} is not an image reference")
        return self._synth_attr(self._new_synth(ROOT_INO, name, kind="ref", ref=ref))

    async def _lookup_ref(self, ref: Synth, name: str) -> Attr:
        if name in ("manifest", "config"):
            image = await self._resolve(self.manager.image(ref.ref))
            data = image.manifest_bytes if name == "manifest" else image.config_bytes
            return self._synth_attr(self._new_synth(ref.ino, name, kind="bytes", data=data))
        if not self.manager.valid_digest(name):
            raise FSError(errno.EINVAL, f"{name!r} is not a digest")
        return self._synth_attr(
            self._new_synth(ref.ino, name, kind="layerdir", ref=ref.ref, digest=name)
        )

    async def _lookup_layerdir(self, d: Synth, name: str) -> Attr:
        if name == INFO:
            info = await self._resolve(self.manager.layer_info(d.ref, d.digest))
            data = (json.dumps(info) + "\n").encode()
            return self._synth_attr(self._new_synth(d.ino, name, kind="bytes", data=data))
        if name in (DIFF, BLOB):
            layer = await self._resolve(self.manager.get_layer(d.ref, d.digest))
            if name == BLOB:
                blob = self._new_synth(
                    d.ino, name, kind="blob", ref=d.ref, digest=d.digest, layer=layer
                )
                return self._synth_attr(blob)
            return self._node_attr(self._mount_layer(layer, d.ref, d.ino), layer.tree.root)
        raise FSError(errno.ENOENT)  # includes "use": it never exists

    async def _resolve(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except NotEstargzError as exc:
            log.info("not served (normal pull fallback): %s", exc)
            raise FSError(errno.ENOENT, str(exc)) from None
        except LayerRefused as exc:  # logged once, with its cause, when it was refused
            raise FSError(errno.EIO, str(exc)) from None
        except ResolveTimeout as exc:
            log.warning("resolution exceeded the bounded wait: %s", exc)
            raise FSError(errno.EIO, str(exc)) from None
        except ResolveError as exc:
            log.warning("resolution failed: %s", exc)
            raise FSError(errno.EIO, str(exc)) from None

    # -- reference counting ------------------------------------------------------------------

    def create(self, parent: int, name: str) -> None:
        """``open(O_CREAT)`` of ``use`` counts a reference; every create answers ENOENT."""
        synth = self._synth.get(parent)
        if synth is not None and synth.kind == "layerdir" and name == USE:
            count = self.manager.use(synth.ref, synth.digest)
            log.info("layer %s/%s in use (refcount %d)", synth.ref, synth.digest, count)
            raise FSError(errno.ENOENT)
        if synth is None and self._layer_of(parent) is not None:
            raise FSError(errno.EROFS)
        raise FSError(errno.ENOENT)

    def rmdir(self, parent: int, name: str) -> None:
        """``rmdir`` of a layer directory drops a reference; it always answers ENOENT."""
        synth = self._synth.get(parent)
        if synth is not None and synth.kind == "ref" and self.manager.valid_digest(name):
            count = self.manager.release(synth.ref, name)
            log.info("layer %s/%s released (refcount %d)", synth.ref, name, count)
            raise FSError(errno.ENOENT)
        if synth is None and self._layer_of(parent) is not None:
            raise FSError(errno.EROFS)
        raise FSError(errno.ENOENT)

    def modify(self, ino: int) -> None:
        """Any other change to inode ``ino`` or a directory's entries (mkdir, mknod, symlink,
        link, unlink, rename, chmod/chown/utimes/truncate, setxattr, removexattr): EROFS, as
        a read-only mount answers. The store cannot be mounted read-only (the kernel would
        answer ``use`` and ``rmdir`` itself); unanswered, these failed with ENOSYS
        ("Function not implemented") or EOPNOTSUPP."""
        raise FSError(errno.EROFS, f"inode {ino}: the layer store is read-only")

    def access(self, ino: int, mode: int) -> None:
        """``access(2)`` and ``chdir`` of inode ``ino`` (``mode``: ``os.R_OK | os.W_OK |
        os.X_OK``), answered as root is answered on a read-only mount: writing a file or
        directory is EROFS, executing a non-directory with no execute bit EACCES. (The
        kernel asks nothing of a symbolic link: it allows all.)
        Owners and other permission bits are not checked (the mount has no
        ``default_permissions``: rootless podman reading a shared store, ``serve_all_users``,
        reads layers owned by uid 0 as another user); who may ask at all is :meth:`admit`'s
        rule. Raises :class:`FSError`."""
        node_mode = self.getattr(ino).mode
        kind = stat.S_IFMT(node_mode)
        if mode & os.W_OK and kind in (stat.S_IFREG, stat.S_IFDIR):
            raise FSError(errno.EROFS, f"inode {ino}: the layer store is read-only")
        if mode & os.X_OK and kind != stat.S_IFDIR and not node_mode & 0o111:
            raise FSError(errno.EACCES, f"inode {ino}: no execute bit")

    # -- contents ----------------------------------------------------------------------------

    def opendir(self, ino: int) -> int:
        """A handle to list directory ``ino`` with (:meth:`readdir`) until :meth:`releasedir`.
        Raises :class:`FSError` (ENOENT) for an inode the store does not know."""
        self.getattr(ino)
        self._next_handle += 1
        self._dirs[self._next_handle] = _DirHandle(ino)
        return self._next_handle

    def readdir(self, fh: int, start: int = 0) -> Iterator[tuple[str, Attr]]:
        """Entries of the directory open as ``fh`` (:meth:`opendir`): ``.`` and ``..``, then
        its children by name, from the ``start``-th on; each child's attributes are made as
        it is taken. ``.`` and ``..`` are listed as every directory on disk lists them (a
        directory only in lower layers is listed by overlayfs as its lower directory lists
        itself: without them, ``ls -a`` in a container showed neither). The listing is
        sorted once per handle: the kernel lists a directory in calls of a page of entries
        each, and sorting (and making the attributes of) every entry on every call made
        listing a 16,000-entry directory take 30 s. The store's skeleton lists nothing else:
        it is lookup-only. Raises :class:`FSError` (EBADF for an unknown handle, ENOTDIR)."""
        handle = self._dirs.get(fh)
        if handle is None:
            raise FSError(errno.EBADF)
        if handle.listing is None:
            synth = self._synth.get(handle.ino)
            if synth is not None:
                parent = synth.key[0] if synth.key is not None else ROOT_INO
                handle.dots = [(".", self._synth_attr(synth)), ("..", Attr(parent, DIR_MODE))]
                handle.listing = []
            else:
                handle.slot, node = slot, node = self._layer_dir(handle.ino)
                up = slot.layer.tree.index.parent(node.entry)
                handle.dots = [
                    (".", self._node_attr(slot, node)),
                    (
                        "..",
                        Attr(slot.parent, DIR_MODE)
                        if up is None
                        else self._node_attr(slot, slot.layer.tree.nodes[up.ino]),
                    ),
                ]
                handle.listing = sorted(node.children.items())
        dots, listing, slot = handle.dots, handle.listing, handle.slot
        first = max(start - len(dots), 0)
        return itertools.chain(
            dots[start:],
            (
                (
                    listing[i][0].decode("utf-8", "surrogateescape"),
                    self._node_attr(slot, listing[i][1]),
                )
                for i in range(first, len(listing))
            ),
        )

    def releasedir(self, fh: int) -> None:
        """Forget directory handle ``fh`` and its listing."""
        self._dirs.pop(fh, None)

    def readdir_counted(self, name: str, attr: Attr) -> Attr:
        """Count the lookup the kernel counts for an entry :meth:`readdir` handed it: one
        for each but ``.`` and ``..`` (readdirplus links no inode for those)."""
        return attr if name in (".", "..") else self._counted(attr)

    def readlink(self, ino: int) -> bytes:
        found = self._layer_of(ino)
        if found is None or not stat.S_ISLNK(found[1].mode):
            raise FSError(errno.EINVAL)
        return found[1].target

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """An xattr of a layer node. An opaque directory answers ``y`` only for the names
        ``overlay_opaque_type`` selects (store/config.py); the other opaque name is answered
        from the entry's own xattrs, as a normal pull would have extracted them."""
        found = self._layer_of(ino)
        if found is None:
            raise FSError(errno.ENODATA)
        node = found[1]
        if name in OPAQUE_XATTRS and node.opaque:
            value = b"y" if name in self._opaque else node.xattr(name)
        else:
            value = node.getxattr(name)
        if value is None:
            raise FSError(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        found = self._layer_of(ino)
        if found is None:
            return []
        node = found[1]
        names = list(node.xattrs or ())
        if node.opaque:
            names += [n for n in self._opaque if n not in names]
        return names

    def open(self, ino: int, write: bool) -> int | None:
        """Check that ``ino`` opens read-only. For ``status``, a file handle to read with (its
        JSON as of this open, whole, until :meth:`release`): its size and mtime need not
        change when its content does, so it is read past the kernel's page cache, and one
        open must not read the start of one state and the end of another. None for every
        other file: its handle is its inode number, its content fixed. Raises
        :class:`FSError`."""
        if write:
            raise FSError(errno.EROFS)
        if ino in self._synth:
            kind = self._synth[ino].kind
            if kind in ("root", "ref", "layerdir"):
                raise FSError(errno.EISDIR)
            if kind == "status":
                self._next_handle += 1
                self._snapshots[self._next_handle] = self.status_bytes()
                return self._next_handle
            return None
        found = self._layer_of(ino)
        if found is None:
            raise FSError(errno.ENOENT)
        if not stat.S_ISREG(found[1].mode):
            raise FSError(errno.EINVAL)
        self._page_in(ino, found[0].layer, found[1])
        return None

    def _page_in(self, ino: int, layer: Layer, node: Node) -> None:
        """The file's bytes the store holds go into the kernel's page cache
        (:meth:`Layer.page_in`), when the store is mounted and no read observer
        (``on_read_range``) must see every read."""
        push = self.page_cache
        if push is not None and self.on_read_range is None:
            layer.page_in(ino, node, lambda offset, data: push(ino, offset, data))

    def release(self, fh: int) -> None:
        """Forget what :meth:`open` kept for handle ``fh`` (nothing for most files)."""
        self._snapshots.pop(fh, None)

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of the file ``ino`` names, an inode number or a
        handle :meth:`open` gave."""
        snapshot = self._snapshots.get(ino)
        if snapshot is not None:
            return snapshot[offset : offset + size]
        synth = self._synth.get(ino)
        found = None
        try:
            if synth is not None:
                if synth.kind == "blob":
                    return await self._read_blob(synth, offset, size)
                data = self.status_bytes() if synth.kind == "status" else synth.data
                return data[offset : offset + size]
            found = self._layer_of(ino)
            if found is None:
                raise FSError(errno.ENOENT)
            layer = found[0].layer
            if self.manager.timeline is not None:
                key = ("read", layer.digest)
                self.manager.timeline.once(key, "first_read", layer=layer.digest)
            if self.manager.libraries is not None:
                self.manager.libraries.before_read(found[0].ref, found[1], offset)
            data = await layer.read_file(found[1], offset, size)
            if self.on_read_range is not None:
                self.on_read_range(layer, found[1], offset, len(data))
            if offset == 0 and self.manager.libraries is not None:
                self.manager.libraries.on_read(found[0].ref, layer, found[1], offset, data)
            self._page_in(ino, layer, found[1])  # what arrived since the open, too
            return data
        except (ChunkVerifyError, BlobVerifyError) as exc:
            site = self._read_site(synth, found, offset)
            log.error("refusing unverified data: %s (read of %s)", exc, site)
            raise FSError(errno.EIO, str(exc)) from None
        except LayerFetchError as exc:
            site = self._read_site(synth, found, offset)
            log.error("read failed: %s (read of %s)", exc, site)
            raise FSError(errno.EIO, str(exc)) from None

    @staticmethod
    def _read_site(synth: Synth | None, found: tuple[_LayerSlot, Node] | None, offset: int) -> str:
        """Where a failed read was, for its log line: the image, the layer, the file and the
        offset (a file's, or the blob's for a layer's ``blob``)."""
        if synth is not None:
            return f"{synth.ref}, layer {synth.digest}, blob at offset {offset}"
        if found is None:
            return f"offset {offset}"
        slot, node = found
        path = slot.layer.tree.path_of(node)
        return f"{slot.ref}, layer {slot.layer.digest}, {path!r} at offset {offset}"

    async def _read_blob(self, synth: Synth, offset: int, size: int) -> bytes:
        """Bytes of a layer directory's ``blob``. Its layer may have been released since the
        lookup (the runtime removed the image while the file was open, or the kernel still
        caches the name): the blob is read through the layer loaded afresh, as a new lookup
        would, not refused — its bytes are the same."""
        assert synth.layer is not None
        if synth.layer.released:
            synth.layer = await self._resolve(self.manager.get_layer(synth.ref, synth.digest))
        return await synth.layer.read_blob(offset, size)

    def status_bytes(self) -> bytes:
        return (json.dumps(self.manager.status(), indent=1, sort_keys=True) + "\n").encode()
