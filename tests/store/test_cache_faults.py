"""The chunk cache under a crash and a full disk: only whole, verified chunks are served."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from store.cache import WRITE_QUIET, ChunkCache
from tests.store.conftest import one_file_layer


def _key(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _cache_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


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


def test_files_in_the_cache_dir_that_are_not_chunks_are_left_alone(tmp_path):
    # What a long-lived cache directory gathers besides chunks: a file copied in, an
    # editor's backup, a directory named like a chunk, a temp directory named like a
    # crash's. They were counted as chunks, and the first eviction raised ValueError ("cache
    # key must be sha256:<64 hex>") at start and in every read that admitted a chunk.
    sub = tmp_path / "sha256" / "ab"
    sub.mkdir(parents=True)
    strays = [sub / "notes.txt", sub / ("c" * 62 + "~"), tmp_path / "sha256" / "zz" / ("d" * 62)]
    strays[2].parent.mkdir()
    for p in strays:
        p.write_bytes(b"x" * 100)
        os.utime(p, (0, 0))  # the oldest: evicted first, if they were counted
    (sub / ("e" * 62)).mkdir()
    (sub / ".crashed.tmp").mkdir()
    cache = ChunkCache(tmp_path, 150)
    assert cache.total_bytes == 0
    data = [os.urandom(100) for _ in range(2)]
    for d in data:
        cache.put(_key(d), d)  # the second evicts the first: the chunk, not a stray
    assert not _file(tmp_path, _key(data[0])).exists() and cache.total_bytes == 100
    assert cache.get(_key(data[1])) == data[1]
    assert all(p.read_bytes() == b"x" * 100 for p in strays)
    assert ChunkCache(tmp_path, 50).total_bytes == 0  # a start over the limit evicts
    assert all(p.exists() for p in strays)


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


def test_a_full_disk_is_warned_of_once_a_minute_not_once_per_chunk(tmp_path, caplog, monkeypatch):
    # A lazy pull of 80 MB onto a full cache disk logged 430 warnings, one per chunk; a store
    # left on a full disk for days floods its journal.
    cache = ChunkCache(tmp_path, 1 << 30, memory_bytes=0)
    real_open = open

    def full_open(path, mode="r", *a, **kw):  # type: ignore[no-untyped-def]
        if "w" in mode and str(path).startswith(str(tmp_path)):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", full_open)
    clock = [1000.0]
    monkeypatch.setattr("time.monotonic", lambda: clock[0])
    chunks = [os.urandom(100) for _ in range(300)]
    with caplog.at_level("WARNING", logger="store.cache"):
        for d in chunks[:200]:
            cache.put(_key(d), d)  # served uncached: no exception, no entry
        clock[0] += 61
        for d in chunks[200:]:
            cache.put(_key(d), d)
    warnings = [r.getMessage() for r in caplog.records if "write failed" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "No space left" in warnings[0] and "(1 chunk file(s) not written" in warnings[0]
    assert "(200 chunk file(s) not written" in warnings[1] and str(tmp_path) in warnings[1]
    assert cache.total_bytes == 0


@pytest.mark.anyio
async def test_on_a_full_disk_a_file_read_in_pieces_fetches_each_chunk_once(tmp_path, monkeypatch):
    # The kernel reads a file in 128 KiB pieces. A chunk whose file the disk refused was
    # forgotten, memory cache included, so each piece of it fetched it again: on a full cache
    # disk a lazy pull's run fetched 3.6-6.3 times its layers' blobs. Held in memory, each
    # chunk comes once (and, counted nowhere on disk, it never evicts a cached file).
    layer, node, payload = await one_file_layer(tmp_path, 4 << 20, 1 << 20)
    real_open = open
    cache_dir = str(layer.cache.root)

    def full_open(path, mode="r", *a, **kw):  # type: ignore[no-untyped-def]
        if "w" in mode and str(path).startswith(cache_dir):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", full_open)
    await _read_in_kernel_pieces_fetching_the_blob_once(layer, node, payload)
    assert layer.cache.total_bytes == 0 and _cache_files(layer.cache.root) == []
    assert all(c.digest in layer.cache for c in layer.index.all_chunks())


async def _read_in_kernel_pieces_fetching_the_blob_once(layer, node, payload: bytes) -> None:
    """Read ``node`` in the kernel's 128 KiB pieces: its bytes are ``payload`` and the blob
    was fetched about once (at most 1.1 times its size) for all of them."""
    got = bytearray()
    for offset in range(0, node.size, 128 << 10):
        got += await layer.read_file(node, offset, 128 << 10)
    assert bytes(got) == payload
    fetched = sum(hi - lo for request in layer.blob.requests for lo, hi in request)
    assert fetched <= 1.1 * layer.blob.size, (fetched, layer.blob.size)


@pytest.mark.anyio
async def test_a_chunk_over_the_cache_limit_is_fetched_once_for_all_its_pieces(tmp_path):
    # Eviction dropped a chunk's bytes from the memory cache with its file. A chunk that alone
    # passes ``cache_max_bytes`` (4 MiB chunks, a 1 MiB limit) was evicted as it was admitted,
    # so each 128 KiB piece the kernel read of it fetched it again: 33 requests, 141 MB for a
    # 4 MiB file (through the mount, 180 MB for an 8 MiB file of 4 MiB chunks).
    layer, node, payload = await one_file_layer(tmp_path, 4 << 20, 4 << 20)
    layer.cache.max_bytes = 1 << 20
    await _read_in_kernel_pieces_fetching_the_blob_once(layer, node, payload)
    await layer.cache.write_pending()
    assert layer.cache.total_bytes == 0 and _cache_files(layer.cache.root) == []


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

    def spy(k: str, p: Path, d: bytes) -> OSError | None:
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
    monkeypatch.setattr(
        ChunkCache, "_write_file", staticmethod(lambda k, p, d: OSError(errno.EIO, "I/O error"))
    )
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


@pytest.mark.anyio
async def test_a_cache_filling_its_own_disk_evicts_its_oldest_for_the_newest(tmp_path, monkeypatch):
    # Below cache_max_bytes (10 GiB by default) on a smaller disk, the cache's own files
    # filled it and nothing was evicted: the oldest chunks stayed on disk for good and no new
    # one was cached (a restarted store fetched the most recent images again, not the oldest).
    capacity = 2500  # the disk: room for two 1000-byte chunk files
    real = ChunkCache._write_file

    def small_disk(key: str, path: Path, data: bytes) -> OSError | None:
        used = sum(p.stat().st_size for p in _cache_files(tmp_path))
        if used + len(data) > capacity:
            return OSError(errno.ENOSPC, "No space left on device")
        return real(key, path, data)

    monkeypatch.setattr(ChunkCache, "_write_file", staticmethod(small_disk))
    cache = ChunkCache(tmp_path, 1 << 30, memory_bytes=0)
    a, b, c = (os.urandom(1000) for _ in range(3))
    for d in (a, b, c):
        cache.begin(_key(d))
        cache.finish(_key(d), d)
        await cache.write_pending()
    assert sorted(p.read_bytes() for p in _cache_files(tmp_path)) == sorted([b, c])
    assert cache.total_bytes == 2000 and cache.get(_key(c)) == c and _key(a) not in cache


def test_a_claimed_fetch_counts_as_one_miss(tmp_path):
    """``stargz_store_cache_misses``: one per chunk the store set out to fetch."""
    cache = ChunkCache(tmp_path, 1 << 20)
    data = os.urandom(100)
    assert cache.begin(_key(data)) is not None
    assert cache.begin(_key(data)) is None  # already on its way: no second fetch, no miss
    cache.finish(_key(data), data)
    assert cache.get(_key(data)) == data
    assert (cache.stats.misses, cache.stats.hits) == (1, 1)


def _admit(cache: ChunkCache, data: bytes) -> str:
    key = _key(data)
    assert cache.begin(key) is not None
    cache.finish(key, data)
    return key


def _run_with_writer(cache: ChunkCache, body, **writer) -> None:  # type: ignore[no-untyped-def]
    """``body(cache, clock)`` beside the cache's writer task, on a clock that moves only when
    ``body`` moves it (:func:`_advance`: threads' writes take no time on it); the writer is
    cancelled when it returns."""
    clock = trio.testing.MockClock()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(cache.run_writer, **writer))
            await body(cache, clock)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)


async def _settle(cache: ChunkCache) -> None:
    """Every task blocked and no file being written (threads run in real time)."""
    deadline = time.monotonic() + 10
    while True:
        await trio.testing.wait_all_tasks_blocked()
        if not cache._writing:
            return
        assert time.monotonic() < deadline, "a cache write did not finish"
        await trio.lowlevel.checkpoint()


async def _advance(cache: ChunkCache, clock: trio.testing.MockClock, seconds: float) -> None:
    """Move the clock ``seconds`` in steps of 1/16 s (exact in binary: the sums land on the
    deadlines, not a rounding error before them), letting the writer act at each."""
    for _ in range(round(seconds * 16)):
        await _settle(cache)
        clock.jump(1 / 16)
    await _settle(cache)


def _spy_writes(cache: ChunkCache) -> list[tuple[float, int]]:
    """(clock, pending bytes) at each write_pending call that has something to write."""
    calls: list[tuple[float, int]] = []
    real = cache.write_pending

    async def spy(keys=None) -> None:  # type: ignore[no-untyped-def]
        if cache.pending_bytes:
            calls.append((trio.current_time(), cache.pending_bytes))
        await real(keys)

    cache.write_pending = spy  # type: ignore[method-assign]
    return calls


def test_chunks_left_behind_are_written_once_none_came_for_a_while(tmp_path):
    cache = ChunkCache(tmp_path, 1 << 20)
    a, b = os.urandom(3000), os.urandom(3000)
    writes = _spy_writes(cache)

    async def body(cache: ChunkCache, clock: trio.testing.MockClock) -> None:
        start = trio.current_time()
        ka = _admit(cache, a)
        await cache.write_behind([ka])  # wakes the writer, writes nothing itself
        assert not _file(tmp_path, ka).exists() and cache.get(ka) == a
        await _advance(cache, clock, 0.625)
        kb = _admit(cache, b)  # within the quiet period: it starts again
        await cache.write_behind([kb])
        await _advance(cache, clock, 0.625)
        assert not _file(tmp_path, ka).exists() and cache.pending_bytes == 6000
        await _advance(cache, clock, 0.625)
        assert cache.pending_bytes == 0
        # Written together, a quiet period after the last chunk.
        assert [(t - start, n) for t, n in writes] == [(0.625 + WRITE_QUIET, 6000)]
        assert _file(tmp_path, ka).read_bytes() == a and _file(tmp_path, kb).read_bytes() == b

    _run_with_writer(cache, body)
    assert ChunkCache(tmp_path, 1 << 20).get(_key(b)) == b


def test_a_read_served_a_prefetched_chunk_leaves_its_file_to_the_writer(tmp_path):
    """A read served a pending chunk of another read's fetch writes its file before it
    returns; one fetched ahead of reads (prefetch, background fetch) stays the writer's, which
    writes it after the quiet period (store.cache module doc)."""
    cache = ChunkCache(tmp_path, 1 << 20)
    ahead, rider = os.urandom(3000), os.urandom(3000)

    async def body(cache: ChunkCache, clock: trio.testing.MockClock) -> None:
        kahead, krider = _admit(cache, ahead), _admit(cache, rider)
        await cache.write_behind([kahead], ahead=True)
        await cache.write_behind([krider])
        await cache.write_served([kahead, krider])
        assert _file(tmp_path, krider).read_bytes() == rider
        assert not _file(tmp_path, kahead).exists() and cache.get(kahead) == ahead
        assert cache.pending_bytes == 3000
        await _advance(cache, clock, WRITE_QUIET)
        assert _file(tmp_path, kahead).read_bytes() == ahead and cache.pending_bytes == 0

    _run_with_writer(cache, body)


def test_a_steady_trickle_is_written_by_the_most_delay(tmp_path):
    cache = ChunkCache(tmp_path, 1 << 20)
    writes = _spy_writes(cache)

    async def body(cache: ChunkCache, clock: trio.testing.MockClock) -> None:
        start = trio.current_time()
        for _ in range(30):  # a chunk every 0.5 s: never quiet for 1 s
            await cache.write_behind([_admit(cache, os.urandom(100))])
            await _advance(cache, clock, 0.5)
        # At most 4.75 s after the first chunk left to it, then after the next one's.
        assert [(t - start, n) for t, n in writes] == [(4.75, 1000), (9.75, 1000), (14.75, 1000)]

    _run_with_writer(cache, body, most=4.75)
    assert cache.pending_bytes == 0 and len(_cache_files(tmp_path)) == 30


def test_the_writer_writes_at_half_the_memory_cache_and_what_is_left_when_cancelled(
    tmp_path,
):
    cache = ChunkCache(tmp_path, 1 << 20, memory_bytes=10_000)
    big, late = os.urandom(6000), os.urandom(100)

    async def body(cache: ChunkCache, clock: trio.testing.MockClock) -> None:
        kbig = _admit(cache, big)
        await cache.write_behind([kbig])
        await _settle(cache)  # no quiet period waited for: the clock did not move
        assert cache.pending_bytes == 0 and _file(tmp_path, kbig).read_bytes() == big
        await cache.write_behind([_admit(cache, late)])  # then the store stops, not quiet yet

    _run_with_writer(cache, body)
    assert cache.pending_bytes == 0 and _file(tmp_path, _key(late)).read_bytes() == late


def test_reads_own_chunks_are_written_now_and_past_the_memory_cache_behind_ones_too(tmp_path):
    # Under half the memory cache pending (3000) until `more`: the writer waits for quiet.
    cache = ChunkCache(tmp_path, 1 << 20, memory_bytes=6000)
    ahead, own, more = os.urandom(1500), os.urandom(1000), os.urandom(5000)

    async def body(cache: ChunkCache, clock: trio.testing.MockClock) -> None:
        kahead = _admit(cache, ahead)
        await cache.write_behind([kahead])
        kown = _admit(cache, own)
        await cache.write_pending([kown])  # a read's fetch: its own chunk, not the other
        assert _file(tmp_path, kown).read_bytes() == own and not _file(tmp_path, kahead).exists()
        kmore = _admit(cache, more)  # 6500 pending > 6000: this fetcher writes its own
        await cache.write_behind([kmore])
        assert _file(tmp_path, kmore).read_bytes() == more

    _run_with_writer(cache, body)
    alone = ChunkCache(tmp_path / "alone", 1 << 20)
    key = _admit(alone, ahead)
    trio.run(alone.write_behind, [key])  # no writer: at once
    assert _file(tmp_path / "alone", key).read_bytes() == ahead and alone.pending_bytes == 0

    async def twice() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(alone.run_writer)
            with pytest.raises(RuntimeError, match="already runs"):
                await alone.run_writer()
            nursery.cancel_scope.cancel()

    trio.run(twice)


@pytest.mark.anyio
async def test_a_chunk_evicted_or_admitted_again_while_written_keeps_the_books_right(
    tmp_path, monkeypatch
):
    cache = ChunkCache(tmp_path, max_bytes=1500, memory_bytes=0)
    a, b = os.urandom(1000), os.urandom(1000)
    ka, kb = _key(a), _key(b)
    real = ChunkCache._write_file
    meanwhile: list = []

    def slow(k: str, p: Path, d: bytes) -> OSError | None:
        ok = real(k, p, d)
        while meanwhile:  # once, after the first write
            trio.from_thread.run_sync(meanwhile.pop(0))
        return ok

    monkeypatch.setattr(ChunkCache, "_write_file", staticmethod(slow))
    # Evicted while written (b pushes a out): no file, no entry.
    _admit(cache, a)
    meanwhile[:] = [lambda: _admit(cache, b)]
    await cache.write_pending([ka])
    assert ka not in cache and not _file(tmp_path, ka).exists()
    assert cache.total_bytes == 1000 and cache.pending_bytes == 1000
    # Evicted (its file unlinked) and fetched again while written: written again.
    meanwhile[:] = [lambda: _admit(cache, a), lambda: _admit(cache, b)]
    await cache.write_pending([kb])
    monkeypatch.undo()
    assert kb in cache and cache.pending_bytes == 0 and cache.total_bytes == 1000
    assert _cache_files(tmp_path) == [_file(tmp_path, kb)]
    assert _file(tmp_path, kb).read_bytes() == b
    assert ChunkCache(tmp_path, 1500).get(kb) == b
