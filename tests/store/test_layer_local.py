"""The tree and data path over the Go-written vectors: listings and contents must agree."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import stat
import tarfile
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from store.cache import ChunkCache
from store.estargz_view import TocMismatchError, landmark_offset_hint, load_layer_index
from store.layer import (
    READ_BLOCK,
    READAHEAD_MIN,
    AheadBlob,
    ChunkVerifyError,
    Layer,
    LayerFetchError,
)
from store.priority import Foreground
from tests.store.conftest import FileBlob, local_layer, one_file_layer

VECTORS = [
    "basic",
    "basic-legacy-footer",
    "chunked-1m",
    "chunked-default-level1",
    "special",
    "whiteout",
    "prioritized",
    "no-compression",
]
TYPES = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "reg",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
}


async def open_layer(vectors_dir: Path, name: str, tmp_path: Path) -> Layer:
    meta = json.loads((vectors_dir / f"{name}.json").read_text())
    path = vectors_dir / f"{name}.blob"
    return await local_layer(path, meta["digest"], meta["toc_digest"], tmp_path / "cache", name)


@pytest.mark.anyio
@pytest.mark.parametrize("name", VECTORS)
async def test_tree_and_contents_match_go_listing(vectors_dir, tmp_path, name):
    layer = await open_layer(vectors_dir, name, tmp_path)
    expected = [
        json.loads(line)
        for line in (vectors_dir / f"{name}.entries.jsonl").read_text().splitlines()
    ]
    got = {path: node for path, node in layer.tree.walk()}
    # A hardlinked file shows its last link header's mode and owner, as extraction applies
    # them to the shared inode (the Go listing shows the target's own header).
    raw = gzip.decompress((vectors_dir / f"{name}.blob").read_bytes())
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        meta = {
            ti.linkname: {"mode": ti.mode, "uid": ti.uid, "gid": ti.gid} for ti in tar if ti.islnk()
        }
    for exp in expected:
        path = exp["name"]
        base = path.rsplit("/", 1)[-1]
        if base.startswith(".wh.") or path in (".prefetch.landmark", ".no.prefetch.landmark"):
            assert path not in got
            continue
        node = got[path]
        if exp["type"] == "hardlink":
            assert node == got[exp["linkName"]]
            continue
        assert TYPES[stat.S_IFMT(node.mode)] == exp["type"], path
        m = meta.get(path, exp)
        if path:  # a layer root is 0555 root:root here (as containers/storage makes it)
            assert stat.S_IMODE(node.mode) == m["mode"] & 0o7777, path
        assert (node.uid, node.gid) == (m["uid"], m["gid"]), path
        if exp["type"] == "reg":
            assert node.size == exp["size"]
            data = await layer.read_file(node, 0, node.size + 10)
            assert hashlib.sha256(data).hexdigest() == exp["sha256"], path
        if exp["type"] == "symlink":
            assert node.target.decode() == exp["linkName"]
            assert node.size == len(exp["linkName"].encode())


@pytest.mark.anyio
async def test_whiteouts_and_opaque(vectors_dir, tmp_path):
    layer = await open_layer(vectors_dir, "whiteout", tmp_path)
    expected = [
        json.loads(line)
        for line in (vectors_dir / "whiteout.entries.jsonl").read_text().splitlines()
    ]
    got = dict(layer.tree.walk())
    for exp in expected:
        base = exp["name"].rsplit("/", 1)[-1]
        parent = exp["name"].rsplit("/", 1)[0] if "/" in exp["name"] else ""
        if base == ".wh..wh..opq":
            assert got[parent].getxattr(b"trusted.overlay.opaque") == b"y"
            assert got[parent].getxattr(b"user.overlay.opaque") == b"y"
            assert got[parent].getxattr(b"trusted.overlay.redirect") is None
        elif base.startswith(".wh."):
            target = (parent + "/" + base[4:]).lstrip("/")
            node = got[target]
            assert stat.S_ISCHR(node.mode) and node.rdev == 0


@pytest.mark.anyio
async def test_hardlink_nlink_and_random_reads(vectors_dir, tmp_path):
    layer = await open_layer(vectors_dir, "chunked-1m", tmp_path)
    big = max((n for _, n in layer.tree.walk() if stat.S_ISREG(n.mode)), key=lambda n: n.size)
    whole = await layer.read_file(big, 0, big.size)
    for off, size in [(0, 1), (1 << 20, 4096), ((1 << 20) - 5, 10), (big.size - 3, 100)]:
        assert await layer.read_file(big, off, size) == whole[off : off + size]


@pytest.mark.anyio
async def test_toc_digest_mismatch_is_refused(vectors_dir):
    blob = FileBlob(vectors_dir / "basic.blob")
    with pytest.raises(TocMismatchError):
        await load_layer_index(blob, "sha256:" + "0" * 64)


@pytest.mark.anyio
async def test_concurrent_readers_share_one_fetch_and_corruption_is_refused(vectors_dir, tmp_path):
    layer = await open_layer(vectors_dir, "chunked-1m", tmp_path)
    big = max((n for _, n in layer.tree.walk() if stat.S_ISREG(n.mode)), key=lambda n: n.size)
    before = len(layer.blob.requests)
    outs = []

    async def reader():
        outs.append(await layer.read_file(big, 0, 1000))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(reader)
    assert len(set(outs)) == 1
    assert len(layer.blob.requests) == before + 1

    # Corrupt a chunk of another file: the read fails, nothing wrong is returned.
    other = await open_layer(vectors_dir, "chunked-1m", tmp_path / "fresh")
    node = max((n for _, n in other.tree.walk() if stat.S_ISREG(n.mode)), key=lambda n: n.size)
    chunk = other.index.chunks_of(node.entry)[1]
    data = bytearray(other.blob.data)
    mid = (chunk.compressed_offset + chunk.compressed_end) // 2
    data[mid] ^= 0xFF
    other.blob.data = bytes(data)
    with pytest.raises(ChunkVerifyError):
        await other.read_file(node, chunk.file_offset, 10)
    assert chunk.digest not in other.cache


@pytest.mark.anyio
async def test_readers_waiting_on_a_fetch_the_registry_fails_get_its_error_at_once(tmp_path):
    """Eight reads of one chunk while the registry refuses connections: the first read's
    fetch fails, and the seven waiting on its claim answer with that failure. Each waiter
    asked the registry again, one after another, every ask waiting for the one before it: 8
    readers of one 4 MiB chunk of a mounted store got EIO after 9 to 50 s, with
    ``fetching_timeout_sec = 20`` bounding a read."""
    layer, node, _ = await one_file_layer(tmp_path, 4 << 20, 4 << 20, "gone")
    asks: list[float] = []

    async def refused(ranges):  # type: ignore[no-untyped-def]
        asks.append(trio.current_time())
        await trio.sleep(0.5)  # a round of retries
        raise OSError("cannot connect to 127.0.0.1:5000: connection refused")

    layer.blob.read_ranges = refused  # type: ignore[method-assign]
    failed: list[float] = []

    async def reader(i: int) -> None:
        with pytest.raises(LayerFetchError, match="connection refused"):
            await layer.read_file(node, i * (512 << 10), 4096)
        failed.append(trio.current_time())

    start = trio.current_time()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(reader, i)
    assert len(asks) == 1, asks
    assert len(failed) == 8 and max(failed) - start < 1.0, [t - start for t in failed]


@pytest.mark.anyio
async def test_a_reader_waiting_on_another_layers_failed_fetch_fetches_its_own(tmp_path):
    """Two layers holding the same chunk, one cache: the first layer's registry refuses, and
    a read of the second layer waiting on the first one's claim gets its bytes from its own
    blob, not the other registry's failure."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, node_a, payload = await one_file_layer(tmp_path / "a", 1 << 20, 1 << 20, "a")
    b, node_b, _ = await one_file_layer(tmp_path / "b", 1 << 20, 1 << 20, "b")
    b.cache = b.source.cache = a.cache

    async def refused(ranges):  # type: ignore[no-untyped-def]
        await trio.sleep(0.3)
        raise OSError("cannot connect to 127.0.0.1:5000: connection refused")

    a.blob.read_ranges = refused  # type: ignore[method-assign]
    got: list[bytes] = []

    async def read_a() -> None:
        with pytest.raises(LayerFetchError, match="connection refused"):
            await a.read_file(node_a, 0, 4096)

    async def read_b() -> None:
        got.append(await b.read_file(node_b, 4096, 4096))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_a)
            await trio.testing.wait_all_tasks_blocked()  # a's fetch claimed the chunk
            nursery.start_soon(read_b)
    assert got == [payload[4096:8192]]


@pytest.mark.anyio
async def test_a_reader_waiting_on_a_fetch_given_back_unfetched_fetches_its_own(tmp_path):
    """A claim given back without the registry's answer (a background batch a read cancelled,
    a prefetch stopped) is no answer to report: the waiting read fetches the chunk itself."""
    layer, node, payload = await one_file_layer(tmp_path, 1 << 20, 1 << 20, "abandoned")
    chunk = layer.index.chunks_of(node.entry)[0]
    assert layer.cache.begin(chunk.digest, owner=layer.source) is not None
    before = len(layer.blob.requests)
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await layer.read_file(node, 0, 4096))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            layer.cache.finish(chunk.digest, None, LayerFetchError("prefetch stopped"))
    assert got == [payload[:4096]]
    assert len(layer.blob.requests) == before + 1


@pytest.mark.anyio
async def test_prefetch_fetches_landmark_region_in_single_range_pieces(vectors_dir, tmp_path):
    layer = await open_layer(vectors_dir, "prioritized", tmp_path)
    end = layer.index.prefetch_end
    assert end
    prefetched = [c for c in layer.index.all_chunks() if c.compressed_end <= end]
    before = len(layer.blob.requests)
    await layer.prefetch(trio.CapacityLimiter(1), timeout=30)
    new = layer.blob.requests[before:]
    assert len(new) == 1 and new[0] == [(prefetched[0].compressed_offset, end)]
    assert prefetched and all(c.digest in layer.cache for c in prefetched)
    await layer.prefetch(trio.CapacityLimiter(1), timeout=30)  # once only
    assert len(layer.blob.requests) == before + 1


@pytest.mark.anyio
async def test_prefetch_pieces_cover_the_region_and_feed_waiting_readers(
    vectors_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", 1)  # one chunk per request
    layer = await open_layer(vectors_dir, "prioritized", tmp_path)
    end = layer.index.prefetch_end
    prefetched = [c for c in layer.index.all_chunks() if c.compressed_end <= end]
    assert len(prefetched) >= 2
    files = [n for _, n in layer.tree.walk() if stat.S_ISREG(n.mode) and n.size]
    last_chunk = prefetched[-1]
    target = next(n for n in files if last_chunk in layer.index.chunks_of(n.entry))
    before = len(layer.blob.requests)
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(layer.prefetch, trio.CapacityLimiter(1), 30.0)
        while not layer._prefetch_started:  # the pieces are claimed before its first await
            await trio.sleep(0)
        got.append(await layer.read_file(target, last_chunk.file_offset, 16))
    new = layer.blob.requests[before:]
    assert sorted(r[0] for r in new) == [
        (c.compressed_offset, c.compressed_end) for c in prefetched
    ]
    assert got[0] and all(c.digest in layer.cache for c in prefetched)


@pytest.mark.anyio
async def test_background_fetch_completes_and_status_reaches_100(vectors_dir, tmp_path):
    layer = await open_layer(vectors_dir, "chunked-1m", tmp_path)
    assert layer.status()["percent"] < 100
    await layer._background(trio.CapacityLimiter(1))
    assert layer.status()["percent"] == 100.0
    before = len(layer.blob.requests)
    for _, node in layer.tree.walk():
        if stat.S_ISREG(node.mode):
            await layer.read_file(node, 0, node.size)
    assert len(layer.blob.requests) == before  # all served from the cache


@pytest.mark.anyio
async def test_background_fetch_outlasts_a_registry_outage(tmp_path, monkeypatch):
    """The registry away while the background fetch runs: each batch failed, was skipped, and
    the fetch ended marked done with nothing cached, never resumed once the registry came
    back (a 45 s outage after a pull left its layers at 0% for good)."""
    monkeypatch.setattr("store.prefetch.BACKGROUND_RETRY", 0.05, raising=False)
    monkeypatch.setattr("store.prefetch.BACKGROUND_BATCH", 256 << 10)  # several batches
    layer, node, payload = await one_file_layer(tmp_path, 2 << 20, 64 << 10)
    blob, outage = layer.blob, [4]  # its first four requests fail, then it answers
    read_ranges = blob.read_ranges

    async def flaky(ranges):  # type: ignore[no-untyped-def]
        if outage[0]:
            outage[0] -= 1
            raise OSError("cannot connect to 127.0.0.1:5000: connection refused")
        return await read_ranges(ranges)

    monkeypatch.setattr(blob, "read_ranges", flaky)
    with trio.fail_after(20):
        await layer.prefetcher.run(trio.CapacityLimiter(1), None, background=True)
    assert layer.status()["percent"] == 100.0 and layer.stats.background_done
    assert await layer.read_file(node, 0, node.size) == payload


async def _start_background(nursery, layer, started) -> None:
    """Run ``layer`` in ``nursery`` with its background fetch; return once ``started()``."""
    await nursery.start(layer.run)
    nursery.start_soon(layer._background, trio.CapacityLimiter(1))
    while not started():
        await trio.sleep(0.01)


@pytest.mark.anyio
async def test_a_read_interrupts_the_background_fetch_and_fetches_its_chunk_itself(tmp_path):
    """Store-wide foreground before background (store.priority): the background batch under
    way is cancelled by a read (whose chunk it had claimed: the read fetches it itself, at
    once), and runs again once the reads have been quiet for the silence period."""
    fg = Foreground(silence=0.3)
    layer, node, payload = await one_file_layer(tmp_path, 8 << 20, 1 << 20, "bg", foreground=fg)
    stall = trio.Event()
    real = layer.blob.read_ranges
    background_asks: list[float] = []

    async def read_ranges(ranges):
        if len(ranges) == 1 and ranges[0][1] - ranges[0][0] > (2 << 20):  # a batch
            background_asks.append(trio.current_time())
            if not stall.is_set():
                await trio.sleep_forever()  # the first batch hangs until cancelled
        return await real(ranges)

    layer.blob.read_ranges = read_ranges  # type: ignore[method-assign]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await _start_background(nursery, layer, lambda: bool(background_asks))
            start = trio.current_time()
            assert await layer.read_file(node, 0, 4096) == payload[:4096]
            assert trio.current_time() - start < 2  # not held up by the stalled batch
            stall.set()
            read_done = trio.current_time()
            while layer.status()["percent"] < 100.0:
                await trio.sleep(0.01)
            assert len(background_asks) >= 2
            assert background_asks[1] - read_done >= 0.3  # after the silence
            nursery.cancel_scope.cancel()
    assert layer.status()["percent"] == 100.0


@pytest.mark.anyio
async def test_a_read_that_interrupts_a_batch_fetches_its_small_chunks_in_one_request(tmp_path):
    """A read of eight 16 KiB chunks a stalled background batch had claimed: once the read
    cancels the batch, the chunks it waited on come in one request, not one round trip each."""
    fg = Foreground(silence=30.0)
    layer, node, payload = await one_file_layer(tmp_path, 4 << 20, 16 << 10, "small", foreground=fg)
    real = layer.blob.read_ranges
    asked: list[list[tuple[int, int]]] = []
    batch_on_wire = trio.Event()

    async def read_ranges(ranges):
        if sum(hi - lo for lo, hi in ranges) > (1 << 20):  # the batch: hangs until cancelled
            batch_on_wire.set()
            await trio.sleep_forever()
        asked.append(list(ranges))
        return await real(ranges)

    layer.blob.read_ranges = read_ranges  # type: ignore[method-assign]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await _start_background(nursery, layer, batch_on_wire.is_set)
            assert await layer.read_file(node, 0, 128 << 10) == payload[: 128 << 10]
            nursery.cancel_scope.cancel()
    read = layer.index.chunks_of(node.entry)[:8]

    def covering(c) -> list[int]:
        return [
            i
            for i, ranges in enumerate(asked)
            if any(lo <= c.compressed_offset and c.compressed_end <= hi for lo, hi in ranges)
        ]

    # The eight together; the block's chunks the batch had not claimed yet came as riders,
    # in a request of their own, as before.
    assert len({i for c in read for i in covering(c)}) == 1


@pytest.mark.anyio
async def test_a_read_the_cache_answers_whole_leaves_the_background_fetch_alone(tmp_path):
    """Only a read that needs a chunk not cached is foreground work (as in the Go store, where
    only reads of the blob are prioritized): re-reading cached bytes cancels no batch."""
    fg = Foreground(silence=0.0)
    layer, node, payload = await one_file_layer(tmp_path, 8 << 20, 1 << 20, "cached", foreground=fg)
    assert await layer.read_file(node, 0, 4096) == payload[:4096]  # its chunk is cached now
    real = layer.blob.read_ranges
    batches_started = 0
    release = trio.Event()

    async def read_ranges(ranges):
        nonlocal batches_started
        batches_started += 1
        await release.wait()
        return await real(ranges)

    layer.blob.read_ranges = read_ranges  # type: ignore[method-assign]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await _start_background(nursery, layer, lambda: batches_started > 0)
            for _ in range(3):
                assert await layer.read_file(node, 0, 4096) == payload[:4096]
            await trio.sleep(0.1)
            assert batches_started == 1
            assert not next(iter(fg._background)).cancel_called
            release.set()
            nursery.cancel_scope.cancel()


def test_cache_lru_eviction_and_restart(tmp_path):
    # No memory cache: an evicted chunk's bytes stay there (ChunkCache._evict).
    cache = ChunkCache(tmp_path, max_bytes=250, memory_bytes=0)
    datas = [bytes([i]) * 100 for i in range(4)]
    keys = ["sha256:" + hashlib.sha256(d).hexdigest() for d in datas]
    for k, d in zip(keys[:3], datas, strict=False):
        cache.put(k, d)
    assert keys[0] not in cache and keys[1] in cache and cache.total_bytes == 200
    cache.get(keys[1])
    cache.put(keys[3], datas[3])
    assert keys[2] not in cache and keys[1] in cache
    again = ChunkCache(tmp_path, max_bytes=250)
    assert again.total_bytes == 200 and again.get(keys[3]) == datas[3]


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["basic", "chunked-1m"])
async def test_toc_load_reads_a_small_tail_then_the_toc_only_if_needed(
    vectors_dir, name, monkeypatch
):
    """A small first read (not 1 MiB per layer); a TOC beyond it costs exactly one more read."""
    import store.estargz_view as view_mod

    meta = json.loads((vectors_dir / f"{name}.json").read_text())
    small = FileBlob(vectors_dir / f"{name}.blob")
    index = await load_layer_index(small, meta["toc_digest"])
    ((lo, hi),) = small.requests[0]
    assert hi == small.size and hi - lo <= max(view_mod.TAIL_GUESS, 1 << 10)
    expected = sorted(name for name, _ in index.index.names())
    monkeypatch.setattr(view_mod, "TAIL_GUESS", 0)  # footer only: the TOC needs its own read
    tiny = FileBlob(vectors_dir / f"{name}.blob")
    again = await load_layer_index(tiny, meta["toc_digest"])
    assert len(tiny.requests) == 2
    assert sorted(name for name, _ in again.index.names()) == expected


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["prioritized", "basic"])
async def test_landmark_hint_from_raw_toc_equals_parsed_prefetch_end(vectors_dir, name):
    meta = json.loads((vectors_dir / f"{name}.json").read_text())
    hints: list[int | None] = []
    index = await load_layer_index(
        FileBlob(vectors_dir / f"{name}.blob"),
        meta["toc_digest"],
        lambda end, ranges: hints.append(end),
    )
    assert hints == [index.prefetch_end]
    assert (index.prefetch_end is not None) == (name == "prioritized")


def test_landmark_hint_needs_the_landmark_entry():
    toc = b'{"version":1,"entries":[{"name":"a","type":"reg","offset":7},'
    assert landmark_offset_hint(toc + b'{"name":"b","type":"reg","offset":9}]}') is None
    entry = b'{"name":".prefetch.landmark","type":"reg","size":1,"offset":4242}]}'
    assert landmark_offset_hint(toc + entry) == 4242


@pytest.mark.anyio
async def test_ahead_blob_serves_its_region_from_one_early_download(
    vectors_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", 4096)
    blob = FileBlob(vectors_dir / "chunked-1m.blob")
    ahead = AheadBlob(blob)
    end = min(blob.size - 1, 3 * 4096 + 100)
    async with trio.open_nursery() as nursery:
        ahead.start(end, nursery)
        ahead.start(end, nursery)  # once only
    early = list(blob.requests)
    assert sorted(r[0] for r in early) == [(0, 4096), (4096, 8192), (8192, 12288), (12288, end)]
    # Inside the region: no new request, bytes equal; across its end: the registry.
    assert await ahead.read_ranges([(100, 9000), (5, 6)]) == [blob.data[100:9000], blob.data[5:6]]
    assert blob.requests == early
    assert await ahead.read_ranges([(end - 10, end + 10)]) == [blob.data[end - 10 : end + 10]]
    assert blob.requests[-1] == [(end - 10, end + 10)]
    ahead.drop()
    assert await ahead.read_ranges([(0, 10)]) == [blob.data[:10]]
    assert blob.requests[-1] == [(0, 10)]


@pytest.mark.anyio
async def test_ahead_blob_failed_piece_falls_back_to_the_registry(vectors_dir, monkeypatch):
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", 4096)
    blob = FileBlob(vectors_dir / "chunked-1m.blob")
    real = blob.read_ranges
    calls = 0

    async def flaky(ranges):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("connection reset")
        return await real(ranges)

    blob.read_ranges = flaky
    ahead = AheadBlob(blob)
    async with trio.open_nursery() as nursery:
        ahead.start(8192, nursery)
    assert await ahead.read_ranges([(0, 8192)]) == [blob.data[:8192]]


@pytest.mark.anyio
async def test_ahead_blob_dropped_mid_download_wakes_readers_and_ends_quietly(
    vectors_dir, monkeypatch
):
    """A layer released (or its prefetch timed out) while pieces are on the wire: nothing
    raises, a waiting reader gets its bytes from the registry, no task is left behind."""
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", 4096)
    blob = FileBlob(vectors_dir / "chunked-1m.blob")
    gate = trio.Event()
    real = blob.read_ranges

    async def slow(ranges):
        if ranges[0][1] <= 3 * 4096:  # the early pieces hang until the gate opens
            await gate.wait()
        return await real(ranges)

    blob.read_ranges = slow
    ahead = AheadBlob(blob)
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        ahead.start(3 * 4096, nursery)

        async def reader() -> None:
            got.append((await ahead.read_ranges([(100, 5000)]))[0])

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        ahead.drop()
        gate.set()  # the registry answers the fallback read (and the cancelled pieces)
    assert got == [blob.data[100:5000]]
    assert ahead._region is None


@pytest.mark.anyio
async def test_release_cancels_the_layers_nursery_with_all_its_work(vectors_dir, tmp_path):
    """A layer's prefetch, background fetch and read-ahead run in its own nursery (started
    with ``nursery.start``); release cancels all of it at once and nothing starts after."""
    layer = await open_layer(vectors_dir, "chunked-1m", tmp_path)
    stalled = trio.Event()

    async def stall(ranges):
        stalled.set()
        await trio.sleep_forever()

    layer.blob.read_ranges = stall  # type: ignore[method-assign]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(layer.run)
            layer.start_background(
                prefetch=True,
                background=True,
                limiter=trio.CapacityLimiter(1),
                prefetch_timeout=30,
            )
            await stalled.wait()
            layer.release()
    assert layer._nursery is None
    layer.start_prefetch(trio.CapacityLimiter(1), 30)  # released: a no-op
    assert not layer.stats.background_done


@pytest.mark.anyio
async def test_sequential_reads_of_small_chunks_read_ahead_in_few_large_requests(tmp_path):
    """128 KiB sequential reads of a 16 MiB file in 16 KiB chunks: the read-ahead window grows
    to READAHEAD_MAX and runs beside the reads, so requests are far fewer than chunks."""
    layer, node, payload = await one_file_layer(tmp_path, 16 << 20, 16 << 10)
    got = bytearray()
    async with trio.open_nursery() as nursery:
        await nursery.start(layer.run)
        for off in range(0, node.size, 128 << 10):
            got += await layer.read_file(node, off, 128 << 10)
        layer.release()
    assert bytes(got) == payload
    assert len(layer.blob.requests) <= 64  # 1024 chunks; one request per read would be 128
    assert layer.stats.fetched_bytes <= layer.blob.size + (1 << 20)


@pytest.mark.anyio
async def test_random_reads_fetch_their_block_and_little_more(tmp_path):
    """Reads far apart (mmap'ed page faults) fetch their READ_BLOCK in one request each, and
    keep the read-ahead window at READAHEAD_MIN."""
    layer, node, payload = await one_file_layer(tmp_path, 16 << 20, 16 << 10)
    before = len(layer.blob.requests)
    async with trio.open_nursery() as nursery:
        await nursery.start(layer.run)
        for off in (9 << 20, 1 << 20, 13 << 20, 5 << 20):
            assert await layer.read_file(node, off + 100, 4096) == payload[off + 100 : off + 4196]
        await trio.testing.wait_all_tasks_blocked()
        layer.release()
    assert len(layer.blob.requests) - before == 4  # 64 chunks per block: one request each
    fetched_plain = sum(c.size for c in layer.index.all_chunks() if c.digest in layer.cache)
    assert fetched_plain <= 4 * (READ_BLOCK + READAHEAD_MIN)


@pytest.mark.anyio
async def test_a_read_returns_with_its_chunks_on_disk_and_leaves_its_riders_behind(tmp_path):
    """With the cache's writer running (as in the store), a read's own chunks are on disk when
    it returns, the free riders of its block wait for the writer, and a later read served a
    still-pending rider writes that rider's file before it returns (store.cache module doc)."""
    layer, node, payload = await one_file_layer(tmp_path, 1 << 20, 16 << 10)
    chunks = layer.index.chunks_of(node.entry)
    cache = layer.cache

    def on_disk(c):
        return cache._path(c.digest).exists()

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(cache.run_writer, quiet=3600, most=3600))
        await nursery.start(layer.run)
        assert await layer.read_file(node, 0, 100) == payload[:100]
        assert on_disk(chunks[0])
        riders = [c for c in chunks[1:] if c.digest in cache]
        assert riders and not any(on_disk(c) for c in riders)  # left to the writer
        rider = riders[len(riders) // 2]
        assert (
            await layer.read_file(node, rider.file_offset, 10)
            == payload[rider.file_offset : rider.file_offset + 10]
        )
        assert on_disk(rider)
        layer.release()
        nursery.cancel_scope.cancel()  # the writer writes what is left
    assert all(on_disk(c) for c in riders)


@pytest.mark.anyio
async def test_a_corrupt_chunk_in_the_block_fails_only_its_own_reads(tmp_path):
    """The rest of a read's block rides along with it; a rider that fails verification is
    never served and never cached, and fails no read of other chunks."""
    layer, node, payload = await one_file_layer(tmp_path, 1 << 20, 16 << 10)
    chunks = layer.index.chunks_of(node.entry)
    bad = chunks[len(chunks) // 2]
    data = bytearray(layer.blob.data)
    data[bad.compressed_offset + 20] ^= 0xFF
    layer.blob.data = bytes(data)
    async with trio.open_nursery() as nursery:
        await nursery.start(layer.run)
        assert await layer.read_file(node, 0, 4096) == payload[:4096]
        assert bad.digest not in layer.cache
        with pytest.raises(ChunkVerifyError):
            await layer.read_file(node, bad.file_offset, 16)
        layer.release()


@pytest.mark.anyio
async def test_ahead_blob_read_fetches_a_piece_no_worker_has_started(vectors_dir, monkeypatch):
    """The workers fetch the region in blob order; a read further on does not wait for them
    to get there: it fetches its piece itself, at once."""
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", 4096)
    monkeypatch.setattr("store.prefetch.PREFETCH_STREAMS", 1)
    blob = FileBlob(vectors_dir / "chunked-1m.blob")
    gate = trio.Event()
    real = blob.read_ranges

    async def slow_front(ranges):
        if ranges[0][0] < 4096:  # the first piece hangs
            await gate.wait()
        return await real(ranges)

    blob.read_ranges = slow_front
    ahead = AheadBlob(blob)
    async with trio.open_nursery() as nursery:
        ahead.start(8 * 4096, nursery)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            got = await ahead.read_ranges([(6 * 4096 + 10, 6 * 4096 + 20)])
        assert got == [blob.data[6 * 4096 + 10 : 6 * 4096 + 20]]
        assert blob.requests[-1] == [(6 * 4096, 7 * 4096)]  # its piece, not the registry's
        gate.set()
    # Each piece was asked for once.
    asked = sorted(r[0] for r in blob.requests)
    assert asked == [(i * 4096, (i + 1) * 4096) for i in range(8)]


def _optimized_blob(tmp_path, prioritized: list[str], big: int) -> tuple[FileBlob, int]:
    import io
    import os
    import tarfile

    from store.estargz import BytesBlobSource, EstargzReader, convert

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("big", os.urandom(big)), ("small", b"s" * 100)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    out = tmp_path / "blob"
    with out.open("wb") as f:
        res = convert(io.BytesIO(buf.getvalue()), f, prioritized_files=prioritized)
    blob = FileBlob(out)
    end = EstargzReader(BytesBlobSource(blob.data), res.toc_digest).index.prefetch_end_offset
    return blob, end


@pytest.mark.anyio
async def test_ahead_blob_speculates_on_a_region_before_the_toc(tmp_path, monkeypatch):
    """The head says prioritized files come first: the region downloads before the TOC is
    known, in growing pieces one at a time; the TOC's end then completes it."""
    monkeypatch.setattr("store.prefetch.SPECULATE_FIRST", 64 << 10)
    monkeypatch.setattr("store.prefetch.SPECULATE_BYTES", 256 << 10)
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", 128 << 10)
    blob, end = _optimized_blob(tmp_path, ["big"], 1 << 20)
    assert end > 1 << 20
    ahead = AheadBlob(blob)
    async with trio.open_nursery() as nursery:
        ahead.speculate(nursery)
        await trio.testing.wait_all_tasks_blocked()
        k = 1 << 10
        assert blob.requests == [
            [(0, 12 * k)],
            [(0, 64 * k)],
            [(64 * k, 192 * k)],
            [(192 * k, 448 * k)],
        ]
        ahead.start(end, nursery)
    fetched = sorted(r[0] for r in blob.requests[1:])
    assert fetched[0] == (0, 64 << 10) and fetched[-1][1] == end
    assert all(a[1] == b[0] for a, b in itertools.pairwise(fetched))  # no gap
    before = len(blob.requests)
    assert await ahead.read_ranges([(100, end)]) == [blob.data[100:end]]
    assert len(blob.requests) == before  # all from the early download


@pytest.mark.anyio
async def test_ahead_blob_does_not_speculate_without_prioritized_files(tmp_path):
    blob, end = _optimized_blob(tmp_path, [], 256 << 10)
    assert not end
    ahead = AheadBlob(blob)
    async with trio.open_nursery() as nursery:
        ahead.speculate(nursery)
        await trio.testing.wait_all_tasks_blocked()
        ahead.start(end, nursery)
    assert blob.requests == [[(0, 12 << 10)]]  # the head probe only


@pytest.mark.anyio
async def test_ahead_blob_speculation_stops_where_the_toc_says(tmp_path, monkeypatch):
    """A region shorter than the guess: at most the piece in flight is past its end."""
    monkeypatch.setattr("store.prefetch.SPECULATE_FIRST", 64 << 10)
    monkeypatch.setattr("store.prefetch.SPECULATE_BYTES", 4 << 20)
    blob, _ = _optimized_blob(tmp_path, ["big"], 1 << 20)
    gate = trio.Event()
    real = blob.read_ranges

    async def gated(ranges):
        if ranges[0][0] >= 64 << 10:
            await gate.wait()
        return await real(ranges)

    blob.read_ranges = gated
    ahead = AheadBlob(blob)
    async with trio.open_nursery() as nursery:
        ahead.speculate(nursery)
        await trio.testing.wait_all_tasks_blocked()
        ahead.start(100 << 10, nursery)  # as if the TOC said the region is 100 KiB
        gate.set()
    assert blob.requests == [[(0, 12 << 10)], [(0, 64 << 10)], [(64 << 10, 192 << 10)]]
