"""A program's first read brings its libraries in ahead of ld.so (store.libprefetch).

The image is built here from this machine's own ``/bin/ls`` and the libraries it loads: the
program in the top layer, the libraries in the base layer under a merged ``/usr`` (``lib`` a
symbolic link to ``usr/lib``), as Debian lays them out; both converted to eStargz and served
through the store's resolver and filesystem logic.
"""

from __future__ import annotations

import base64
import io
import os
import tarfile
from pathlib import Path

import pytest
import trio

from store.cache import ChunkCache
from store.config import StoreConfig
from store.elfdeps import SparseFile, parse_elf_deps
from store.estargz.writer import convert
from store.fs import StoreFS
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

    def __init__(self, tmp: Path) -> None:
        libs = _closure()
        interp = Path(os.path.realpath("/lib64/ld-linux-x86-64.so.2")).read_bytes()
        base = _tar(
            [("dir", "usr", ""), ("dir", "usr/lib", ""), ("dir", LIBDIR, "")]
            + [("file", f"{LIBDIR}/{n}", d) for n, d in sorted(libs.items())]
            + [("file", f"{LIBDIR}/ld-linux-x86-64.so.2", interp), ("link", "lib", "usr/lib")]
            + [("dir", "lib64", "")]
            + [("link", "lib64/ld-linux-x86-64.so.2", f"/{LIBDIR}/ld-linux-x86-64.so.2")]
            + [("dir", "etc", ""), ("file", "etc/ld.so.cache", b"ld.so-1.7.0" + bytes(500))]
        )
        top = _tar(
            [
                ("dir", "usr", ""),
                ("dir", "usr/bin", ""),
                ("file", "usr/bin/ls", Path("/bin/ls").read_bytes()),
            ]
        )
        self.names = [f"{LIBDIR}/{n}" for n in [*libs, "ld-linux-x86-64.so.2"]] + [
            "etc/ld.so.cache"
        ]
        self.layers: list[tuple[LayerDesc, Path]] = []
        for name, tar in (("base", base), ("top", top)):
            out = tmp / f"{name}.blob"
            with out.open("wb") as f:
                res = convert(io.BytesIO(tar), f)
            desc = LayerDesc(res.digest, res.size, {ANNOTATION: res.toc_digest}, res.diff_id)
            self.layers.append((desc, out))

    async def image(self, ref: str, on_layers=None):
        return b"{}", b"{}", [desc for desc, _ in self.layers]

    def blob(self, ref: str, digest: str, size: int):
        return FileBlob(next(p for d, p in self.layers if d.digest == digest))


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
    )
    traced: list[str] = []
    async with trio.open_nursery() as nursery:
        cache = ChunkCache(tmp_path / "cache", 1 << 30)
        manager = LayerManager(cfg, image, cache, nursery)
        fs = StoreFS(
            manager, on_read_range=lambda layer, node, off, n: traced.append(node.entry.name)
        )
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
