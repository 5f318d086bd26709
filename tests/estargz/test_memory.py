"""The writer streams: peak memory stays far below the layer size (non-seekable input)."""

from __future__ import annotations

import io
import tarfile
import tracemalloc
import zlib
from collections.abc import Iterator

from store.estargz import convert

MiB = 1 << 20


class _GeneratedTar(io.RawIOBase):
    """A tar stream made on the fly: one big file of zeros, then many small files."""

    def __init__(self, big: int, small: int) -> None:
        self._parts = self._gen(big, small)
        self._buf = b""

    @staticmethod
    def _gen(big: int, small: int) -> Iterator[bytes]:
        ti = tarfile.TarInfo("big.bin")
        ti.size = big
        yield ti.tobuf(tarfile.PAX_FORMAT)
        zeros = bytes(MiB)
        for _ in range(big // MiB):
            yield zeros
        for i in range(small):
            ti = tarfile.TarInfo(f"small/{i:05d}")
            ti.size = 100
            yield ti.tobuf(tarfile.PAX_FORMAT) + b"s" * 100 + bytes(412)
        yield bytes(1024)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._parts)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class _Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.size += len(b)
        return len(b)


def test_peak_memory_is_bounded() -> None:
    big = 192 * MiB
    sink = _Sink()
    tracemalloc.start()
    try:
        res = convert(_GeneratedTar(big, 3000), sink, chunk_size=4 * MiB, level=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.uncompressed_size > big
    assert sink.size == res.size
    assert peak < 64 * MiB, f"peak traced memory {peak / MiB:.0f} MiB for a {big // MiB} MiB layer"


_INDEX_PROBE = r"""
import ctypes, gc, json, sys
from store.estargz import footer as F, LayerIndex, scan_toc, toc_json_pieces
from store.tree import LayerTree

ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX = 1, as the store runs (store/cli.py)
data = open(sys.argv[1], "rb").read()

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

footer = F.parse_footer(data[-F.ESTARGZ_FOOTER_SIZE:], len(data))
toc = data[footer.toc_offset : len(data) - F.ESTARGZ_FOOTER_SIZE]
del data
gc.collect()
base = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
scan = scan_toc(toc, footer)
index = LayerIndex.from_toc_json(
    toc_json_pieces(toc, footer), toc_offset=footer.toc_offset, compression="gzip"
)
tree = LayerTree(index)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(json.dumps({"entries": len(index.entries), "retained": rss("VmRSS") - base,
                  "peak": rss("VmHWM") - base, "base": base}))
"""


def test_index_of_100k_entries_fits_the_store_memory_budget(tmp_path) -> None:
    """The validated index + overlay view of a 100,000-entry layer, retained and at peak,
    leave room under the store's 150 MB RSS target (the store process itself is ~55 MB)."""
    import json
    import subprocess
    import sys

    from store.estargz import estargz_footer_bytes
    from store.estargz.toc import encode_toc

    entries = []
    offset = 100
    for d in range(1000):
        entries.append({"name": f"d{d:04d}/", "type": "dir", "mode": 493})
        for f in range(99):
            digest = "sha256:" + f"{d * 100 + f:064x}"
            entries.append(
                {
                    "name": f"d{d:04d}/f{f:03d}",
                    "type": "reg",
                    "size": 6,
                    "modtime": "2024-01-01T00:00:00Z",
                    "mode": 420,
                    "offset": offset,
                    "digest": digest,
                    "chunkDigest": digest,
                }
            )
            offset += 80
    raw = encode_toc(entries)
    ti = tarfile.TarInfo("stargz.index.json")
    ti.size = len(raw)
    member = ti.tobuf(tarfile.USTAR_FORMAT) + raw + bytes(-len(raw) % 512) + bytes(1024)
    blob = tmp_path / "toc.blob"
    blob.write_bytes(
        bytes(offset) + zlib.compress(member, 6, wbits=31) + estargz_footer_bytes(offset)
    )
    out = subprocess.run(
        [sys.executable, "-c", _INDEX_PROBE, str(blob)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    got = json.loads(out.stdout)
    print(f"100k-entry index: {got}")
    assert got["entries"] == 100_001
    assert got["retained"] < 80, got
    assert got["peak"] < 95, got


# -- the collector paused while an index is built ----------------------------------------------


def test_the_collector_is_paused_while_an_index_is_built_and_restored_after():
    import gc

    import pytest

    from store.estargz import InvalidEntryName, LayerIndex
    from store.estargz.index import gc_paused

    seen: list[bool] = []

    def entries() -> Iterator[dict]:
        seen.append(gc.isenabled())
        yield {"name": "etc", "type": "dir", "mode": 0o755}
        seen.append(gc.isenabled())

    assert gc.isenabled()
    LayerIndex.from_entries(entries(), toc_offset=1000, compression="gzip")
    assert seen == [False, False] and gc.isenabled()

    def pieces() -> Iterator[bytes]:
        seen.append(gc.isenabled())
        yield b'{"version": 1, "entries": [{"name": "etc", "type": "dir", "mode": 493}]}'

    seen.clear()
    LayerIndex.from_toc_json(pieces(), toc_offset=1000)  # its decode too
    assert seen == [False] and gc.isenabled()

    with gc_paused():  # nested, as from_toc_json around from_entries
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()

    def bad() -> Iterator[dict]:
        yield {"name": "../escape", "type": "reg", "size": 0}

    with pytest.raises(InvalidEntryName):
        LayerIndex.from_entries(bad(), toc_offset=1000, compression="gzip")
    assert gc.isenabled()  # restored on an error too

    gc.disable()  # disabled by someone else before: it stays so
    try:
        LayerIndex.from_entries(entries(), toc_offset=1000, compression="gzip")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_collector_pause_holds_while_any_thread_builds():
    import gc
    import threading

    from store.estargz.index import gc_paused

    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with gc_paused():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    with gc_paused():
        pass
    assert not gc.isenabled()  # the other thread is still inside
    leave.set()
    t.join(10)
    assert gc.isenabled()


def test_the_collector_is_paused_through_a_zstd_chunked_decode_too(monkeypatch):
    import gc

    import pytest

    from store import estargz_view

    seen: list[bool] = []

    def typed(*_args: object) -> None:
        seen.append(gc.isenabled())
        raise RuntimeError("stop here")

    monkeypatch.setattr(estargz_view.zstdchunked, "typed_manifest_entries", typed)
    with pytest.raises(RuntimeError, match="stop here"):
        estargz_view.zstd_chunked_index(b"", None, None)  # type: ignore[arg-type]
    assert seen == [False] and gc.isenabled()


# -- the tree is invisible to the collector, and freed without it ------------------------------


def _tree_entries() -> list[dict]:
    """Directories (named and implicit, one replaced by a file, one re-declared), files in
    one and in two chunks, a symlink, a hardlink, xattrs: every way the builder links
    entries."""
    return [
        {"name": "d/", "type": "dir", "mode": 0o755},
        {"name": "d/sub/deep/f", "type": "reg", "size": 4, "offset": 10, "chunkSize": 2},
        {"name": "d/sub/deep/f", "type": "chunk", "offset": 20, "chunkOffset": 2},
        {"name": "d/g", "type": "reg", "size": 3, "offset": 30, "xattrs": {"user.a": "Yg=="}},
        {"name": "d/h", "type": "hardlink", "linkName": "d/g"},
        {"name": "d/s", "type": "symlink", "linkName": "g"},
        {"name": "gone/x", "type": "reg", "size": 1, "offset": 40},
        {"name": "gone", "type": "reg", "size": 1, "offset": 50},
        {"name": "d/", "type": "dir", "mode": 0o700},
    ]


def test_entries_chunks_and_children_are_untracked_by_the_collector():
    import gc

    from store.estargz import LayerIndex

    idx = LayerIndex.from_entries(_tree_entries(), toc_offset=100, compression="gzip")
    d = idx.lookup("d")
    assert d is not None and d.mode == 0o700 and idx.lookup("gone").type == "reg"
    assert idx.parent(idx.lookup("d/sub/deep")) is idx.lookup("d/sub")
    for _, e in idx.walk():
        assert not gc.is_tracked(e), e.name
        if type(e.children) is dict:
            assert not gc.is_tracked(e.children), e.name
        for c in e.chunks:
            assert not gc.is_tracked(c), e.name


def test_parent_is_the_directory_holding_an_entry_in_the_final_tree():
    from store.estargz import LayerIndex

    entries = [
        {"name": "a/t", "type": "reg", "size": 1, "offset": 1},
        {"name": "b/l", "type": "hardlink", "linkName": "a/t"},
        {"name": "a/t", "type": "reg", "size": 1, "offset": 2},  # replaces the first name
    ]
    idx = LayerIndex.from_entries(entries, toc_offset=10, compression="gzip")
    linked, a, b = idx.lookup("b/l"), idx.lookup("a"), idx.lookup("b")
    assert linked is not idx.lookup("a/t")
    assert idx.parent(linked) is b  # its only name left
    assert idx.parent(idx.lookup("a/t")) is a and idx.parent(a) is idx.root
    assert idx.parent(idx.root) is None
    again = LayerIndex.from_entries(entries, toc_offset=10, compression="gzip")
    assert idx.parent(again.lookup("a/t")) is None  # another index's entry


def test_a_dropped_index_is_freed_with_the_collector_off():
    """No reference cycle holds a tree: with the collector disabled, every byte an index took
    comes back when it is dropped, by reference counting (a cycle through untracked entries
    would never be freed)."""
    import gc

    from store.estargz import LayerIndex

    entries = _tree_entries() + [
        {"name": f"many/{i // 50}/f{i}", "type": "reg", "size": 1, "offset": 60 + i}
        for i in range(5000)
    ]
    LayerIndex.from_entries(entries, toc_offset=10_000, compression="gzip")  # warm caches
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        idx = LayerIndex.from_entries(entries, toc_offset=10_000, compression="gzip")
        held = tracemalloc.get_traced_memory()[0] - before
        del idx
        # Nothing unreachable for the collector to find (its pass also empties the
        # interpreter's free lists, which keep some of the freed memory otherwise). It cannot
        # see a cycle through untracked entries: only the memory left shows one.
        unreachable = gc.collect()
        left = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        if was:
            gc.enable()
    assert held > 1_000_000  # the index really was measured
    assert unreachable == 0
    # Tens of bytes stay (measured: 32); one cycle through one small directory keeps ~2,500.
    assert left < 1024, (held, left)
