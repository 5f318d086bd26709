"""What a layer compresses well is not held inflated all at once: the byte budget, the batches
cut by uncompressed size, and the chunk source handing each group to the cache as it is done.
(The early download's pieces, released as they are processed: ``test_prefetch_order``'s
neighbours below; the store process's peak RSS: ``test_hostile_bounds``.)"""

from __future__ import annotations

import io
import itertools
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


@pytest.mark.anyio
async def test_budget_an_urgent_taker_goes_first():
    """A read (urgent) takes what fits at once, past waiting work, and otherwise waits at
    the head of the line."""
    budget = ByteBudget(10)
    await budget.acquire(6)
    got: list[str] = []

    async def take(name: str, n: int, urgent: bool) -> None:
        await budget.acquire(n, urgent=urgent)
        got.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "ahead", 8, False)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "read", 4, True)  # fits: goes past "ahead"
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["read"] and budget.used == 10
        nursery.start_soon(take, "read2", 5, True)  # does not fit: first in line
        await trio.testing.wait_all_tasks_blocked()
        budget.release(6)
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["read", "read2"]
        budget.release(9)
    assert got == ["read", "read2", "ahead"] and budget.used == 8


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


# -- the early download keeps a piece only until the prefetch has processed it -------------------


def _region_blob(tmp_path: Path, files: int, size: int):
    """An optimized layer of ``files`` incompressible files of ``size`` bytes, all before the
    landmark, in 64 KiB chunks: ``(FileBlob, toc_digest)``."""
    import random

    from tests.store.conftest import FileBlob, tar_of

    contents = {f"f{i}": random.Random(i).randbytes(size) for i in range(files)}
    out = io.BytesIO()
    res = convert(
        io.BytesIO(tar_of(contents)),
        out,
        level=1,
        chunk_size=64 << 10,
        prioritized_files=list(contents),
    )
    path = tmp_path / "layer.blob"
    path.write_bytes(out.getvalue())
    return FileBlob(path), res.toc_digest


async def _prefetch_through_ahead(tmp_path: Path, blob, toc_digest: str, watch):
    """The store's chain (the early download started at verification, the layer on it),
    its prefetch run to the end; ``watch(ahead)`` is called after every piece arrives."""
    from store.estargz_view import load_layer_index
    from store.prefetch import AheadBlob
    from tests.store.conftest import view_layer

    async with trio.open_nursery() as nursery:
        ahead = AheadBlob(blob)
        fetch = ahead._fetch

        async def watched(region, *pieces):
            await fetch(region, *pieces)
            watch(ahead)

        ahead._fetch = watched  # type: ignore[method-assign]
        view = await load_layer_index(ahead, toc_digest, lambda e, r: ahead.start(e, nursery, r))
        layer = view_layer(view, ahead, toc_digest, tmp_path / "cache", "region")
        await layer.prefetch(trio.CapacityLimiter(1), 30)
    return layer, ahead


@pytest.mark.anyio
async def test_the_early_download_keeps_a_bounded_part_of_the_region(tmp_path, monkeypatch):
    """A 6 MiB region, room for 512 KiB: the pieces the prefetch has cached are let go
    and the download waits for room, so no more than the room (and the requests on the
    wire when it was last checked) is ever kept; every chunk still comes from the early
    download, once."""
    monkeypatch.setattr("store.prefetch.AHEAD_HELD", 512 << 10)
    blob, toc_digest = _region_blob(tmp_path, 6, M)
    held: list[int] = []
    layer, ahead = await _prefetch_through_ahead(
        tmp_path, blob, toc_digest, lambda a: held.append(a._held)
    )
    from store.prefetch import PREFETCH_PIECE, PREFETCH_STREAMS

    region = [c for c in layer.index.all_chunks() if c.compressed_end <= layer.index.prefetch_end]
    assert sum(c.size for c in region) >= 6 * M
    assert all(c.digest in layer.cache for c in region)
    assert max(held) <= (512 << 10) + PREFETCH_STREAMS * PREFETCH_PIECE, max(held)
    asked = sorted(r for req in blob.requests for r in req if r[1] <= layer.index.prefetch_end)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(asked))  # none twice
    assert ahead._held == 0  # dropped at the end


@pytest.mark.anyio
async def test_a_chunk_bigger_than_the_room_does_not_stall_the_early_download(
    tmp_path, monkeypatch
):
    """Room for 128 KiB, pieces of 64 KiB, one incompressible chunk of ~1 MiB: the prefetch
    piece waiting for it fetches the rest of its pieces itself instead of waiting for room
    its own first pieces hold."""
    monkeypatch.setattr("store.prefetch.AHEAD_HELD", 128 << 10)
    monkeypatch.setattr("store.prefetch.AHEAD_PIECE", 64 << 10)
    import random

    from tests.store.conftest import FileBlob, tar_of

    contents = {"big": random.Random(7).randbytes(M)}
    out = io.BytesIO()
    res = convert(
        io.BytesIO(tar_of(contents)), out, level=1, chunk_size=4 * M, prioritized_files=["big"]
    )
    (tmp_path / "layer.blob").write_bytes(out.getvalue())
    blob = FileBlob(tmp_path / "layer.blob")
    with trio.fail_after(10):
        layer, _ = await _prefetch_through_ahead(tmp_path, blob, res.toc_digest, lambda a: None)
    assert all(c.digest in layer.cache for c in layer.index.all_chunks() if c.size > 1)
    assert layer.stats.fetched_bytes <= len(blob.data)  # nothing read twice


@pytest.mark.anyio
async def test_expect_lets_go_of_pieces_nobody_takes_and_reads_hold_theirs():
    from store.prefetch import AheadBlob

    class Mem:
        size = 4 * M
        data = bytes(range(256)) * (4 * M // 256)

        async def read_ranges(self, ranges):
            return [self.data[lo:hi] for lo, hi in ranges]

    async with trio.open_nursery() as nursery:
        ahead = AheadBlob(Mem())
        ahead.start(M, nursery)  # pieces growing from 64 KiB to 256 KiB
        await trio.testing.wait_all_tasks_blocked()
        region = ahead._region
        assert region is not None and all(d is not None for d in region.data)
        assert ahead._held == M
        ahead.expect([(0, 1000), (300_000, 400_000)])
        kept = [i for i, d in enumerate(region.data) if d is not None]
        assert kept == sorted({*region.overlapping(0, 1000), *region.overlapping(300_000, 400_000)})
        assert ahead._held == sum(hi - lo for lo, hi in (region.pieces[i] for i in kept))
        assert await ahead.read_ranges([(10, 20)]) == [Mem.data[10:20]]  # kept piece
        ahead.done_with(0, 1000)
        assert region.data[0] is None
        assert await ahead.read_ranges([(10, 20)]) == [Mem.data[10:20]]  # from the blob
        ahead.done_with(300_000, 400_000)
        assert ahead._held == 0


# -- end to end: the store process's peak RSS over a large prefetch region ------------------------

REGION_MB = 256


def _large_region_layer(total_mb: int, chunk: int = 4 * M) -> tuple[bytes, str]:
    """``(blob, toc_digest)``: one file of ``total_mb`` MiB of incompressible bytes in stored
    gzip members of ``chunk`` bytes, then the ``.prefetch.landmark``: the whole file is the
    prefetch region (built by hand: converting 256 MiB at any gzip level takes seconds)."""
    import json
    import os
    import zlib

    from store.estargz import estargz_footer_bytes
    from tests.store.mounted import toc_digest_of

    def sha(data: bytes) -> str:
        import hashlib

        return "sha256:" + hashlib.sha256(data).hexdigest()

    block = os.urandom(chunk)
    head = bytearray()
    entries: list[dict] = []
    n = (total_mb * M) // chunk
    for i in range(n):
        payload = block[:-8] + i.to_bytes(8, "big")
        entry = {"offset": len(head), "chunkOffset": i * chunk, "chunkSize": chunk}
        entry["chunkDigest"] = sha(payload)
        if i == 0:
            entry.update(name="big", type="reg", mode=0o644, size=n * chunk)
        else:
            entry.update(name="big", type="chunk")
        entries.append(entry)
        head += zlib.compress(payload, 0, wbits=31)
    landmark = {"name": ".prefetch.landmark", "type": "reg", "size": 1, "offset": len(head)}
    landmark["chunkDigest"] = landmark["digest"] = sha(b"\x0f")
    entries.append(landmark)
    head += zlib.compress(b"\x0f", 0, wbits=31)
    toc_json = json.dumps({"version": 1, "entries": entries}).encode()
    ti = tarfile.TarInfo("stargz.index.json")
    ti.size = len(toc_json)
    toc_member = zlib.compress(ti.tobuf(tarfile.GNU_FORMAT) + toc_json, 6, wbits=31)
    blob = bytes(head) + toc_member + estargz_footer_bytes(len(head))
    return blob, toc_digest_of(blob)


def _vm(pid: int) -> dict[str, int]:
    """The process's VmRSS and VmHWM (its peak), in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) >> 10
    return out


@pytest.mark.e2e
def test_a_large_prefetch_region_keeps_the_store_rss_bounded(registry, tmp_path):
    """A 256 MiB prefetch region through the real registry and the mounted store: the store
    prefetches all of it, and its peak RSS stays well under the region's size (it held the
    region whole, and more: 300 MB of region made 471 MB of RSS). The bound: the memory
    cache (64 MiB), pending cache writes (64 MiB), the inflate budget (64 MiB) and the
    early download's room, over the store's RSS before the lookup."""
    import hashlib
    import os
    import time

    from tests.store import images
    from tests.store.conftest import StoreProcess

    data, toc_digest = _large_region_layer(REGION_MB)
    blob = images.Blob(data, "sha256:" + hashlib.sha256(b"region").hexdigest(), toc_digest)
    images.push(registry.host, "region", "1", [blob])
    config = "no_background_fetch = true\nprefetch_timeout_sec = 60\n"
    store = StoreProcess(tmp_path / "store", config).start()
    try:
        assert store.proc is not None
        pid = store.proc.pid
        before = _vm(pid)["VmRSS"]
        diff = store.layer_dir(f"{registry.host}/region:1", blob.digest) / "diff"
        assert "big" in os.listdir(diff)
        deadline = time.monotonic() + 25
        while True:
            (layer,) = store.status()["layers"].values()
            if layer["prefetch_done"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        peak = _vm(pid)["VmHWM"]
    finally:
        store.stop()
    assert layer["prefetch_done"] and layer["cached_bytes"] >= REGION_MB * M, layer
    assert layer["fetched_bytes"] <= len(data), layer  # the region fetched once
    assert peak - before < 200, f"store RSS {before} MiB before the lookup, peak {peak} MiB"
