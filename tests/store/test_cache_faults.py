"""The chunk cache under a crash and a full disk: only whole, verified chunks are served."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from store.cache import ChunkCache


def _key(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _file(root: Path, key: str) -> Path:
    hexd = key.split(":")[1]
    return root / "sha256" / hexd[:2] / hexd[2:]


def test_torn_chunk_file_is_never_served_after_a_restart(tmp_path):
    data = os.urandom(5000)
    key = _key(data)
    ChunkCache(tmp_path, 1 << 20).put(key, data)
    # What a crash of the machine can leave: the rename reached the disk, half the data did not.
    path = _file(tmp_path, key)
    path.write_bytes(data[:2500])
    # And a temporary file of a write that never finished.
    (path.parent / f".{path.name}.123.tmp").write_bytes(data[:100])
    again = ChunkCache(tmp_path, 1 << 20)
    assert key in again  # known from the scan ...
    assert again.get(key) is None  # ... but never served
    assert key not in again and not path.exists()
    assert [p.name for p in path.parent.iterdir()] == []
    again.put(key, data)  # fetched again, cached whole
    assert ChunkCache(tmp_path, 1 << 20).get(key) == data


def test_full_disk_serves_uncached_and_leaves_no_entry(tmp_path, monkeypatch):
    cache = ChunkCache(tmp_path, 1 << 20, memory_bytes=0)
    data = os.urandom(3000)
    key = _key(data)
    real_open = open

    def enospc_open(path, mode="r", *a, **kw):  # type: ignore[no-untyped-def]
        if "w" in mode and str(path).startswith(str(tmp_path)):
            f = real_open(path, mode, *a, **kw)
            f.write(data[:10])  # a partial write, as a filling disk does
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", enospc_open)
    cache.put(key, data)  # no exception: the read that fetched it is still answered
    monkeypatch.undo()
    assert key not in cache and cache.get(key) is None
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []


@pytest.mark.anyio
async def test_finish_serves_at_once_and_the_file_follows_off_the_trio_thread(
    tmp_path, monkeypatch
):
    """A batch fetch's chunks are served (and waiters woken) before their files are written;
    the write runs in a worker thread, not on the thread that answers FUSE requests."""
    import threading

    cache = ChunkCache(tmp_path, 1 << 20)
    data = os.urandom(4000)
    key = _key(data)
    writers: list[str] = []
    real_write = ChunkCache._write_file

    def spy(k: str, p: Path, d: bytes) -> bool:
        writers.append(threading.current_thread().name)
        return real_write(k, p, d)

    monkeypatch.setattr(ChunkCache, "_write_file", staticmethod(spy))
    got: list[bytes | None] = []
    assert cache.begin(key) is not None
    async with trio.open_nursery() as nursery:

        async def waiter() -> None:
            got.append(await cache.wait_inflight(key))

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        cache.finish(key, data)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [data]  # woken before any disk write
        assert not _file(tmp_path, key).exists() and cache.get(key) == data
        await cache.write_pending()
    assert _file(tmp_path, key).read_bytes() == data
    assert writers and writers[0] != threading.main_thread().name
    assert ChunkCache(tmp_path, 1 << 20).get(key) == data


@pytest.mark.anyio
async def test_a_pending_chunk_that_fails_to_write_or_is_evicted_leaves_nothing(
    tmp_path, monkeypatch
):
    cache = ChunkCache(tmp_path, max_bytes=2500, memory_bytes=0)
    a, b, c = (os.urandom(1000) for _ in range(3))
    for d in (a, b):
        cache.begin(_key(d))
        cache.finish(_key(d), d)
    monkeypatch.setattr(ChunkCache, "_write_file", staticmethod(lambda k, p, d: False))
    await cache.write_pending()  # the disk refused both
    monkeypatch.undo()
    assert _key(a) not in cache and _key(b) not in cache and cache.total_bytes == 0
    for d in (a, b, c):  # 3000 bytes over a 2500 limit: a is evicted before it is written
        cache.begin(_key(d))
        cache.finish(_key(d), d)
    assert _key(a) not in cache and cache.get(_key(c)) == c
    await cache.write_pending()
    files = sorted(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted([b, c]) and cache.total_bytes == 2000


def test_a_claimed_fetch_counts_as_one_miss(tmp_path):
    """``stargz_store_cache_misses``: one per chunk the store set out to fetch."""
    cache = ChunkCache(tmp_path, 1 << 20)
    data = os.urandom(100)
    assert cache.begin(_key(data)) is not None
    assert cache.begin(_key(data)) is None  # already on its way: no second fetch, no miss
    cache.finish(_key(data), data)
    assert cache.get(_key(data)) == data
    assert (cache.stats.misses, cache.stats.hits) == (1, 1)
