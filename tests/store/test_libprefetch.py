"""A program's first read brings its libraries in ahead of ld.so (store.libprefetch).

The image is built here from this machine's own ``/bin/ls`` and the libraries it loads: the
program in the top layer, the libraries in the base layer under a merged ``/usr`` (``lib`` a
symbolic link to ``usr/lib``), as Debian lays them out; both converted to eStargz and served
through the store's resolver and filesystem logic.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import tarfile
from pathlib import Path

import pytest
import trio

from store import libprefetch
from store.cache import ChunkCache
from store.config import StoreConfig
from store.elfdeps import SparseFile, parse_elf_deps
from store.estargz.writer import convert
from store.fs import StoreFS
from store.libprefetch import LibraryPrefetcher
from store.resolver import LayerDesc, LayerManager, RegistryAccess
from tests.store.conftest import FileBlob
from tests.store.test_fs_logic import _path

REF = "127.0.0.1:5000/lib/ls:1"
LIBDIR = "usr/lib/x86_64-linux-gnu"
ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"

pytestmark = pytest.mark.skipif(
    not Path(f"/{LIBDIR}/libc.so.6").exists(), reason="needs a Debian-style x86_64 /usr/lib"
)


def _closure() -> dict[str, bytes]:
    """``/bin/ls``'s libraries on this machine, transitively: soname → bytes."""
    out: dict[str, bytes] = {}
    todo = [Path("/bin/ls").read_bytes()]
    while todo:
        data = todo.pop()
        f = SparseFile(len(data))
        f.add(0, data)
        deps = parse_elf_deps(f, "/usr/bin")
        assert deps is not None
        for name in deps.needed:
            if name not in out:
                out[name] = Path(os.path.realpath(f"/{LIBDIR}/{name}")).read_bytes()
                todo.append(out[name])
    return out


def _tar(members: list[tuple[str, str, bytes | str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, name, data in members:
            ti = tarfile.TarInfo(name)
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif kind == "link":
                ti.type, ti.linkname = tarfile.SYMTYPE, str(data)
                tf.addfile(ti)
            else:
                assert isinstance(data, bytes)
                ti.size, ti.mode = len(data), 0o755
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


class _Image(RegistryAccess):
    """Two eStargz layers written to ``tmp``: base (libraries) and top (the program)."""

    def __init__(self, tmp: Path, config: dict | None = None, optimized: bool = False) -> None:
        self.config = json.dumps({"config": config or {}}).encode()
        libs = _closure()
        interp = Path(os.path.realpath("/lib64/ld-linux-x86-64.so.2")).read_bytes()
        base = _tar(
            [("dir", "usr", ""), ("dir", "usr/lib", ""), ("dir", LIBDIR, "")]
            + [("file", f"{LIBDIR}/{n}", d) for n, d in sorted(libs.items())]
            + [("file", f"{LIBDIR}/ld-linux-x86-64.so.2", interp), ("link", "lib", "usr/lib")]
            + [("dir", "lib64", "")]
            + [("link", "lib64/ld-linux-x86-64.so.2", f"/{LIBDIR}/ld-linux-x86-64.so.2")]
            + [("dir", "etc", ""), ("file", "etc/ld.so.cache", b"ld.so-1.7.0" + bytes(500))]
            + [("file", "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")]
            + [("file", "etc/group", b"root:x:0:\n")]
        )
        top = _tar(
            [
                ("dir", "usr", ""),
                ("dir", "usr/bin", ""),
                ("file", "usr/bin/ls", Path("/bin/ls").read_bytes()),
                ("file", "usr/bin/entry", b"#!/usr/bin/env ls\nexit 1\n"),
                ("file", "usr/bin/env", Path("/usr/bin/env").read_bytes()),
            ]
        )
        self.names = [f"{LIBDIR}/{n}" for n in [*libs, "ld-linux-x86-64.so.2"]] + [
            "etc/ld.so.cache"
        ]
        self.layers: list[tuple[LayerDesc, Path]] = []
        for name, tar in (("base", base), ("top", top)):
            out = tmp / f"{name}.blob"
            # Optimized: the program is a prioritized file of the top layer.
            first = ["usr/bin/ls"] if optimized and name == "top" else []
            with out.open("wb") as f:
                res = convert(io.BytesIO(tar), f, prioritized_files=first)
            desc = LayerDesc(res.digest, res.size, {ANNOTATION: res.toc_digest}, res.diff_id)
            self.layers.append((desc, out))

    async def image(self, ref: str, on_layers=None):
        return b"{}", self.config, [desc for desc, _ in self.layers]

    def blob(self, ref: str, digest: str, size: int):
        return FileBlob(next(p for d, p in self.layers if d.digest == digest))


def _store(cfg, image, tmp_path, nursery, traced):
    """The store's manager and filesystem logic over ``image``; ``traced`` gets the name of
    every file read through it."""
    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    manager = LayerManager(cfg, image, cache, nursery)
    fs = StoreFS(manager, on_read_range=lambda layer, node, off, n: traced.append(node.entry.name))
    return manager, fs, cache


@pytest.mark.anyio
@pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])
async def test_the_first_read_of_a_program_fetches_its_libraries_unread(tmp_path, enabled):
    image = _Image(tmp_path)
    (base, _), (top, _) = image.layers
    cfg = StoreConfig(
        noprefetch=True,
        no_background_fetch=True,
        resolve_timeout_sec=10,
        prefetch_libraries=enabled,
        prefetch_entrypoint=False,
    )
    traced: list[str] = []
    async with trio.open_nursery() as nursery:
        manager, fs, cache = _store(cfg, image, tmp_path, nursery, traced)
        b64 = base64.b64encode(REF.encode()).decode()
        await _path(fs, b64, base.digest, "diff")
        ls = await _path(fs, b64, top.digest, "diff", "usr", "bin", "ls")
        base_layer = await manager.get_layer(REF, base.digest)

        def cached(name: str) -> bool:
            node = base_layer.tree.lookup_path(name)
            assert node is not None
            return all(c.digest in cache for c in base_layer.index.chunks_of(node.entry))

        assert not any(cached(n) for n in image.names)
        assert (await fs.read(ls, 0, 4096)).startswith(b"\x7fELF")
        with trio.move_on_after(10):
            while enabled and not all(cached(n) for n in image.names):
                await trio.sleep(0.01)
        await trio.sleep(0.1)
        assert [n for n in image.names if cached(n)] == (image.names if enabled else [])
        assert traced == ["usr/bin/ls"]  # fetched, never read: no access trace, no read count
        assert base_layer.stats.on_demand_reads == 0
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("config", "libraries", "optimized", "expected"),
    [
        ({"Cmd": ["ls", "-l"]}, True, False, "all"),
        ({"Entrypoint": ["/usr/bin/entry"], "Env": ["PATH=/nowhere:/usr/bin"]}, True, False, "all"),
        ({"Cmd": ["ls"]}, False, False, "program"),
        ({"Cmd": ["missing"]}, True, False, "start"),
        ({}, True, False, "start"),
        (None, True, False, "passwd"),  # prefetch_entrypoint off: only the read's own file
        # The program in the prioritized region: the prefetch brings it, and what it loads
        # is left to the recorded order (its libraries stay where they are).
        ({"Cmd": ["ls"]}, True, True, "program"),
    ],
    ids=["cmd", "script", "no-libraries", "not-found", "no-cmd", "off", "optimized"],
)
async def test_a_containers_first_passwd_read_fetches_what_its_start_reads_next(
    tmp_path, config, libraries, optimized, expected
):
    """The runtime's read of /etc/passwd starts the look-ahead: /etc/group, the image's
    program and its libraries come without being read (nothing before that read)."""
    image = _Image(tmp_path, config, optimized)
    (base, _), (top, _) = image.layers
    cfg = StoreConfig(
        noprefetch=not optimized,  # noprefetch leaves the look-ahead on: a read starts it
        no_background_fetch=True,
        resolve_timeout_sec=10,
        prefetch_libraries=libraries,
        prefetch_entrypoint=config is not None,
        chunk_size=1,  # exact ranges: no neighbouring file rides along
    )
    start = ["etc/passwd", "etc/group"]
    want = {
        "all": [*start, "usr/bin/ls", *image.names],
        "program": [*start, "usr/bin/ls"],
        "start": start,
        "passwd": ["etc/passwd"],
    }[expected]
    traced: list[str] = []
    async with trio.open_nursery() as nursery:
        manager, fs, cache = _store(cfg, image, tmp_path, nursery, traced)
        b64 = base64.b64encode(REF.encode()).decode()
        await _path(fs, b64, top.digest, "diff")  # the lookup loads every layer of the image
        layers = {d: await manager.get_layer(REF, d) for d in (base.digest, top.digest)}

        def cached(name: str) -> bool:
            for layer in layers.values():
                node = layer.tree.lookup_path(name)
                if node is not None:
                    chunks = layer.index.chunks_of(node.entry)
                    return all(c.digest in cache for c in chunks)
            raise AssertionError(name)

        every = [*start, "usr/bin/ls", "usr/bin/entry", "usr/bin/env", *image.names]
        await trio.sleep(0.2)
        if not optimized:
            assert not any(cached(n) for n in every)  # a pull alone fetches nothing
        passwd = await _path(fs, b64, base.digest, "diff", "etc", "passwd")
        assert (await fs.read(passwd, 0, 4096)).startswith(b"root:")
        with trio.move_on_after(10):
            while not all(cached(n) for n in want):
                await trio.sleep(0.01)
        await trio.sleep(0.1)
        got = [n for n in every if cached(n)]
        if config is not None and "Entrypoint" in config:
            want += ["usr/bin/entry", "usr/bin/env"]  # the script, then env, then ls
        assert sorted(got) == sorted(want)
        assert traced == ["etc/passwd"]  # the rest fetched, never read: no trace, no count
        assert sum(layer.stats.on_demand_reads for layer in layers.values()) == 1
        nursery.cancel_scope.cancel()


class _BigProgram(RegistryAccess):
    """One layer holding ``usr/bin/big``: 9 MiB (three 4 MiB chunks), run by the config."""

    def __init__(self, tmp: Path) -> None:
        self.data = b"\x7fELF" + random.Random(9).randbytes(9 * MIB - 4)
        tar = _tar(
            [
                ("dir", "usr", ""),
                ("dir", "usr/bin", ""),
                ("file", "usr/bin/big", self.data),
                ("dir", "etc", ""),
                ("file", "etc/passwd", b"root:x:0:0::/:/bin/sh\n"),
            ]
        )
        out = tmp / "big.blob"
        with out.open("wb") as f:
            res = convert(io.BytesIO(tar), f)
        self.desc = LayerDesc(res.digest, res.size, {ANNOTATION: res.toc_digest}, res.diff_id)
        self.blob_ = FileBlob(out)

    async def image(self, ref: str, on_layers=None):
        return b"{}", json.dumps({"config": {"Entrypoint": ["/usr/bin/big"]}}).encode(), [self.desc]

    def blob(self, ref: str, digest: str, size: int):
        return self.blob_


MIB = 1 << 20


@pytest.mark.anyio
@pytest.mark.parametrize("program_max", [16 * MIB, 4 * MIB], ids=["whole", "capped"])
async def test_the_images_program_comes_block_by_block_side_by_side(
    tmp_path, monkeypatch, program_max
):
    """Its first block is waited for and the others requested beside it, one request each
    (PROGRAM_MAX bounds how far), before anything reads it."""
    monkeypatch.setattr(libprefetch, "PROGRAM_MAX", program_max)
    image = _BigProgram(tmp_path)
    cfg = StoreConfig(
        noprefetch=True,
        no_background_fetch=True,
        resolve_timeout_sec=10,
        prefetch_entrypoint=True,
    )
    async with trio.open_nursery() as nursery:
        manager, fs, cache = _store(cfg, image, tmp_path, nursery, traced := [])
        b64 = base64.b64encode(REF.encode()).decode()
        await _path(fs, b64, image.desc.digest, "diff")
        layer = await manager.get_layer(REF, image.desc.digest)
        node = layer.tree.lookup_path("usr/bin/big")
        assert node is not None
        chunks = layer.index.chunks_of(node.entry)
        assert len(chunks) == 3
        passwd = await _path(fs, b64, image.desc.digest, "diff", "etc", "passwd")
        assert (await fs.read(passwd, 0, 4096)).startswith(b"root:")
        want = [True, program_max > 4 * MIB, program_max > 8 * MIB]
        with trio.fail_after(10):
            while [c.digest in cache for c in chunks] != want:
                await trio.sleep(0.01)
        await trio.sleep(0.1)
        assert [c.digest in cache for c in chunks] == want
        program = [  # the requests for its chunks (not the tail's, which ends the last one)
            r
            for r in image.blob_.requests
            if any(a <= c.compressed_offset < b for a, b in r for c in chunks)
        ]
        assert len(program) == sum(want)  # one per block, none for a file read
        assert traced == ["etc/passwd"] and layer.stats.on_demand_reads == 1
        nursery.cancel_scope.cancel()


class _FailingOnce(FileBlob):
    """Fails the first request for file data: the first not reaching the blob's end (which
    the footer's and TOC's read does)."""

    failed = False

    async def read_ranges(self, ranges):
        if not self.failed and ranges[-1][1] < self.size:
            self.failed = True
            raise OSError("connection reset")
        return await super().read_ranges(ranges)


@pytest.mark.anyio
async def test_a_looked_at_program_starts_no_second_look_ahead_unless_it_failed(
    tmp_path, monkeypatch
):
    """The image's look-ahead claims the program and its libraries, so ld.so's first reads of
    them start none of their own; a program whose fetch failed is given back, and its own
    first read then looks ahead (its libraries come)."""
    started: list[str] = []
    look_ahead = LibraryPrefetcher._look_ahead

    async def counted(self, ref, layer, node, head):
        started.append(node.entry.name)
        await look_ahead(self, ref, layer, node, head)

    monkeypatch.setattr(LibraryPrefetcher, "_look_ahead", counted)
    await _ls_then_libc(tmp_path / "ok", started, fail=False)
    await _ls_then_libc(tmp_path / "failed", started, fail=True)


async def _ls_then_libc(tmp: Path, started: list[str], *, fail: bool) -> None:
    """Load ``ls``'s image (its program's fetch failing once when ``fail``), then read ``ls``
    and ``libc`` as exec and ld.so do; ``started`` gets the look-aheads their reads start."""
    tmp.mkdir()
    image = _Image(tmp, {"Cmd": ["ls"]})
    (base, base_path), (top, top_path) = image.layers
    if fail:  # the top layer's blob fails once: the program's fetch fails
        blobs = {top.digest: _FailingOnce(top_path), base.digest: FileBlob(base_path)}
        image.blob = lambda ref, digest, size: blobs[digest]  # type: ignore[method-assign]
    cfg = StoreConfig(
        noprefetch=True,
        no_background_fetch=True,
        resolve_timeout_sec=10,
        chunk_size=1,  # exact ranges: a file's request ends before the TOC, at the blob's end
        prefetch_entrypoint=True,
    )
    started.clear()
    async with trio.open_nursery() as nursery:
        manager, fs, cache = _store(cfg, image, tmp, nursery, [])
        b64 = base64.b64encode(REF.encode()).decode()
        await _path(fs, b64, top.digest, "diff")  # the runtime looks every layer up
        passwd = await _path(fs, b64, base.digest, "diff", "etc", "passwd")
        assert (await fs.read(passwd, 0, 4096)).startswith(b"root:")  # the container starts
        base_layer = await manager.get_layer(REF, base.digest)
        libc = base_layer.tree.lookup_path(f"{LIBDIR}/libc.so.6")
        assert libc is not None

        def libc_cached() -> bool:
            chunks = base_layer.index.chunks_of(libc.entry)
            return all(c.digest in cache for c in chunks)

        with trio.fail_after(10):
            while not fail and not libc_cached():
                await trio.sleep(0.01)
        await trio.sleep(0.2)
        assert libc_cached() is not fail
        ls = await _path(fs, b64, top.digest, "diff", "usr", "bin", "ls")
        assert (await fs.read(ls, 0, 4096)).startswith(b"\x7fELF")
        with trio.fail_after(10):  # ld.so opens libc once ls is mapped: its look-ahead is on
            while not libc_cached():
                await trio.sleep(0.01)
        libc_ino = await _path(fs, b64, base.digest, "diff", *LIBDIR.split("/"), "libc.so.6")
        assert (await fs.read(libc_ino, 0, 832)).startswith(b"\x7fELF")
        await trio.sleep(0.1)
        assert started == (["usr/bin/ls"] if fail else [])
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.parametrize("whole", [True, False], ids=["once", "not-all-layers"])
async def test_a_start_is_looked_ahead_once_and_only_with_every_layer_served(
    tmp_path, monkeypatch, whole
):
    """A second start file read starts no second look-ahead; an image with a layer the store
    does not serve (here one that is not eStargz) gets none: no view of it to go by."""
    started: list[str] = []
    image_look_ahead = LibraryPrefetcher._image_look_ahead

    async def counted(self, ref, config, layers):
        started.append(ref)
        await image_look_ahead(self, ref, config, layers)

    monkeypatch.setattr(LibraryPrefetcher, "_image_look_ahead", counted)
    image = _Image(tmp_path, {"Cmd": ["ls"]})
    (base, _), (top, _) = image.layers
    if not whole:  # a third layer, pulled whole by the runtime (no TOC)
        plain = LayerDesc("sha256:" + "0" * 64, 100, {}, "sha256:" + "1" * 64)
        descs = [base, top, plain]
        monkeypatch.setattr(image, "image", _returning(b"{}", image.config, descs))
    cfg = StoreConfig(no_background_fetch=True, resolve_timeout_sec=10)
    async with trio.open_nursery() as nursery:
        manager, fs, _cache = _store(cfg, image, tmp_path, nursery, [])
        b64 = base64.b64encode(REF.encode()).decode()
        await _path(fs, b64, top.digest, "diff")
        await manager.get_layer(REF, base.digest)
        for name in ("passwd", "group", "passwd"):
            ino = await _path(fs, b64, base.digest, "diff", "etc", name)
            assert (await fs.read(ino, 0, 4096)).startswith(b"root:")
        await trio.sleep(0.2)
        assert started == ([REF] if whole else [])
        nursery.cancel_scope.cancel()


def _returning(*value):
    async def image(ref: str, on_layers=None):
        return value

    return image
