"""The store's cache on a full disk, and a torn cache file after a crash, through the mount.

A full cache disk (a small tmpfs as ``--root``) must not fail reads: the verified bytes are
served uncached and no partial chunk file is left; a chunk file torn by a crash is never
served after a restart (it fails its hash, is dropped and fetched again).
"""

from __future__ import annotations

import errno
import hashlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.processes import free_port
from store.cache import WRITE_MOST_DELAY
from tests.store.conftest import StoreProcess, _mounted
from tests.store.images import push_two_layer_estargz

pytestmark = [pytest.mark.e2e]
CONFIG = "noprefetch = true\nno_background_fetch = true\n"


def _cache_files(root: Path) -> list[Path]:
    return [p for p in (root / "cache").rglob("*") if p.is_file()]


def _all_whole(root: Path) -> bool:
    """Every file in the cache is a whole chunk named by its own digest."""
    for p in _cache_files(root):
        if p.name.startswith(".") or hashlib.sha256(p.read_bytes()).hexdigest() != (
            p.parent.name + p.name
        ):
            return False
    return True


def _written_cache_files(root: Path) -> list[Path]:
    """The cache's files once the write-behind writer wrote some (store/cache.py: it writes
    after WRITE_QUIET seconds without new chunks, WRITE_MOST_DELAY at most), or [] after that."""
    deadline = time.monotonic() + WRITE_MOST_DELAY + 10
    while not (files := _cache_files(root)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return files


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs, unmounted afterwards."""
    disk = tmp_path / "store" / "root"
    disk.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_cache_disk_serves_reads_uncached(registry, layers, small_disk, tmp_path):
    ref, blobs = push_two_layer_estargz(registry.host, "disk/full", layers)
    store = StoreProcess(tmp_path / "store", CONFIG)
    try:
        store.start()
        filler = small_disk / "filler"
        with open(filler, "wb", buffering=0) as f, pytest.raises(OSError) as exc:
            while True:
                f.write(b"\0" * 4096)
        assert exc.value.errno == errno.ENOSPC
        diff = store.layer_dir(ref, blobs[0].digest) / "diff"
        # 1.2 MB through a disk with no room left: every byte right, nothing half-written.
        assert (diff / "big").read_bytes() == layers["big"]
        assert (diff / "data" / "sub" / "b").read_bytes() == b"kept\n"
        assert _all_whole(small_disk)
        assert "chunk cache write failed" in store.log.read_text()
        # Room again: the next reads are cached, whole.
        filler.unlink()
        assert (diff / "etc" / "hello").read_bytes() == b"hello from lower\n"
        assert _written_cache_files(small_disk) and _all_whole(small_disk)
    finally:
        store.stop()
    assert not _mounted(store.mnt)


def test_torn_cache_file_is_never_served_after_restart(registry, layers, tmp_path):
    ref, blobs = push_two_layer_estargz(registry.host, "disk/torn", layers)
    store = StoreProcess(tmp_path / "store", CONFIG)
    root = tmp_path / "store" / "root"
    try:
        store.start()
        diff = store.layer_dir(ref, blobs[0].digest) / "diff"
        assert (diff / "big").read_bytes() == layers["big"]
        assert _written_cache_files(root)
        store.proc.kill()  # type: ignore[union-attr]
        store.proc.wait(10)  # type: ignore[union-attr]
        # What a crash of the machine can leave: chunk files cut short, a stray temp file.
        torn = sorted(_cache_files(root), key=lambda p: p.stat().st_size)[-3:]
        for p in torn:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        (torn[0].parent / f".{torn[0].name}.999.tmp").write_bytes(b"partial")
        store.start()  # cleans the dead mount, rescans the cache
        diff = store.layer_dir(ref, blobs[0].digest) / "diff"
        assert (diff / "big").read_bytes() == layers["big"]
        assert store.log.read_text().count("does not hash to its name") >= 1
        assert _all_whole(root)
    finally:
        store.stop()


def _cache_metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("stargz_store_cache_")
    }


def test_cache_metrics_show_the_cache_after_a_restart(registry, layers, tmp_path):
    """``stargz_store_cache_{hits,misses,bytes}`` were set at each registry fetch only: a
    store restarted over a warm cache showed 0 bytes and 0 hits while it served 2 MB from
    it, and a store that only hits showed its last fetch's numbers for good."""
    ref, blobs = push_two_layer_estargz(registry.host, "disk/metrics", layers)
    port = free_port()
    store = StoreProcess(tmp_path / "store", CONFIG + f'metrics_address = ":{port}"\n')
    try:
        store.start()
        diff = store.layer_dir(ref, blobs[0].digest) / "diff"
        assert (diff / "big").read_bytes() == layers["big"]
        assert _written_cache_files(tmp_path / "store" / "root")
        store.stop()
        store.start()
        cached = store.status()["cache_bytes"]
        assert cached >= len(layers["big"])
        assert _cache_metrics(port)["stargz_store_cache_bytes"] == cached
        diff = store.layer_dir(ref, blobs[0].digest) / "diff"
        assert (diff / "big").read_bytes() == layers["big"]  # every chunk from the cache
        after = _cache_metrics(port)
        assert after["stargz_store_cache_hits"] > 0 and after["stargz_store_cache_misses"] == 0
        assert after["stargz_store_cache_bytes"] == store.status()["cache_bytes"]
    finally:
        store.stop()
