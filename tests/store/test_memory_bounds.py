"""What a layer compresses well is not held inflated all at once: the byte budget, the batches
cut by uncompressed size, and the chunk source handing each group to the cache as it is done.
(The early download's pieces, released as they are processed: ``test_prefetch_order``'s
neighbours below; the store process's peak RSS: ``test_hostile_bounds``.)"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import trio
import trio.testing

from store.budget import ByteBudget
from store.chunks import inflate_groups
from store.estargz import Chunk, convert
from store.prefetch import batches
from tests.store.conftest import local_layer

M = 1 << 20


def _chunk(offset: int, packed: int, size: int) -> Chunk:
    return Chunk("f", 0, size, offset, offset + packed, 0, f"sha256:{offset:064x}", "gzip")


# -- the byte budget ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_budget_serves_takers_in_order_and_a_big_one_alone():
    budget = ByteBudget(10)
    got: list[str] = []

    async def take(name: str, n: int, hold: trio.Event) -> None:
        await budget.acquire(n)
        got.append(name)
        await hold.wait()
        budget.release(n)

    holds = {name: trio.Event() for name in "abcd"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "a", 6, holds["a"])
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "b", 30, holds["b"])  # over the limit: waits until alone
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "c", 1, holds["c"])  # would fit, but b asked first
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["a"] and budget.used == 6
        holds["a"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["a", "b"] and budget.used == 30
        holds["b"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["a", "b", "c"]
        holds["c"].set()
    assert budget.used == 0


@pytest.mark.anyio
async def test_budget_a_cancelled_waiter_gives_its_place_up():
    budget = ByteBudget(10)
    await budget.acquire(8)
    with trio.move_on_after(0.01):
        await budget.acquire(5)
    assert budget.used == 8 and not budget._waiting
    budget.release(8)
    async with budget.taking(10):
        assert budget.used == 10
    assert budget.used == 0
    with pytest.raises(ValueError):
        ByteBudget(0)


# -- batches cut by uncompressed bytes -----------------------------------------------------------


def test_inflate_groups_cut_by_uncompressed_bytes():
    # 10 chunks of 1 KiB compressed each: by compressed bytes alone 4 groups; 64 MiB each
    # inflated, so one chunk a group at a limit of 8 MiB.
    chunks = [_chunk(i * 1024, 1024, 64 * M) for i in range(10)]
    packed = [b"x" * 1024] * 10
    assert inflate_groups(chunks, packed, most=8 * M) == [[i] for i in range(10)]
    small = [_chunk(i * 1024, 1024, 1 * M) for i in range(10)]
    assert inflate_groups(small, packed, most=4 * M) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert inflate_groups(small, packed, most=2 * M) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert inflate_groups([], []) == []


def test_batches_cut_by_compressed_or_uncompressed_bytes():
    bombs = [_chunk(i * 64, 64, 64 * M) for i in range(5)]  # 64 bytes, 64 MiB each
    assert [len(b) for b in batches(bombs, 4 * M, 16 * M)] == [1, 1, 1, 1, 1]
    plain = [_chunk(i * M, M, 3 * M) for i in range(10)]  # 1 MiB, 3 MiB each
    assert [len(b) for b in batches(plain, 4 * M, 16 * M)] == [4, 4, 2]
    assert [len(b) for b in batches(plain, 4 * M, 5 * M)] == [2, 2, 2, 2, 2]
    assert list(batches([], 1, 1)) == []


# -- the chunk source hands each group to the cache as it is done --------------------------------


async def _zeros_layer(tmp_path: Path, chunks: int, chunk_size: int):
    """A local layer of one file of ``chunks`` chunks of zeros (each its last byte marked):
    a few KiB compressed, ``chunks * chunk_size`` bytes inflated."""
    payload = bytearray(chunks * chunk_size)
    for i in range(chunks):
        payload[(i + 1) * chunk_size - 1] = i % 251 + 1
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        ti = tarfile.TarInfo("zeros")
        ti.size = len(payload)
        tar.addfile(ti, io.BytesIO(bytes(payload)))
    raw.seek(0)
    out = tmp_path / "layer.blob"
    with out.open("wb") as f:
        result = convert(raw, f, chunk_size=chunk_size, level=9)
    return await local_layer(out, result.digest, result.toc_digest, tmp_path / "cache", "zeros")


@pytest.mark.anyio
async def test_background_fetch_holds_a_bounded_number_of_inflated_chunks(tmp_path, monkeypatch):
    """32 MiB of zeros in 1 MiB chunks, ~100 KiB compressed: one background batch by compressed
    bytes. Inflated but not yet handed to the cache never exceeds the cache's inflate budget,
    and each chunk is in the cache as soon as its group is done."""
    monkeypatch.setattr("store.chunks.INFLATE_GROUP", 2 * M)
    layer = await _zeros_layer(tmp_path, 32, M)
    cache = layer.cache
    cache.inflating = ByteBudget(4 * M)
    live = peak = total = 0
    decompress, finish = layer.source.index.decompress, cache.finish

    def counting_decompress(chunk, data):
        nonlocal live, peak, total
        out = decompress(chunk, data)
        live += len(out)
        total += len(out)
        peak = max(peak, live)
        return out

    def counting_finish(key, data, error=None):
        nonlocal live
        if data is not None:
            live -= len(data)
        finish(key, data, error)

    monkeypatch.setattr(layer.source.index, "decompress", counting_decompress)
    monkeypatch.setattr(cache, "finish", counting_finish)
    await layer._background(trio.CapacityLimiter(1))
    assert total == sum(c.size for c in layer.index.all_chunks()) >= 32 * M and live == 0
    assert peak <= 4 * M, peak
    assert cache.inflating.used == 0
    assert all(c.digest in cache for c in layer.index.all_chunks())
    assert layer.stats.fetch_requests <= 2  # still batched by compressed bytes


@pytest.mark.anyio
async def test_a_read_gets_its_chunks_whatever_the_groups(tmp_path, monkeypatch):
    monkeypatch.setattr("store.chunks.INFLATE_GROUP", 1)  # one chunk a group
    layer = await _zeros_layer(tmp_path, 8, 256 << 10)
    node = next(n for p, n in layer.tree.walk() if p == "zeros")
    data = await layer.read_file(node, 0, 8 * (256 << 10))
    assert len(data) == 8 * (256 << 10) and data[(256 << 10) - 1] == 1
    assert layer.cache.inflating.used == 0
