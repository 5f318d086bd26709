"""Blocks at the ends of aligned requests are kept, so neighbouring chunks' own requests do not
fetch them again (store.chunks.EdgeBlocks): the logic alone, then a layer's on-demand reads."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest
import trio
import trio.testing

from store.chunks import ChunkVerifyError, EdgeBlocks
from store.estargz.writer import convert
from store.layer import Layer
from tests.store.conftest import local_layer

DATA = random.Random(7).randbytes(1000)


class Blob:
    """Ranges of DATA; each request recorded, optionally held until ``go`` is set or failed."""

    def __init__(self) -> None:
        self.requests: list[list[tuple[int, int]]] = []
        self.go: trio.Event | None = None
        self.fail = False

    async def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.requests.append(list(ranges))
        if self.go is not None:
            await self.go.wait()
        if self.fail:
            raise OSError("the registry hung up")
        return [DATA[lo:hi] for lo, hi in ranges]


async def _get(edges: EdgeBlocks, blob: Blob, ranges: list[tuple[int, int]]) -> list[bytes]:
    return await edges.fetch(ranges, blob.read_ranges)


@pytest.mark.anyio
async def test_a_neighbours_request_skips_the_block_an_earlier_one_brought():
    edges, blob = EdgeBlocks(100, len(DATA)), Blob()
    assert await _get(edges, blob, [(100, 300)]) == [DATA[100:300]]
    # [250, 480) rounded out is [200, 500): its first block came with the first request.
    assert await _get(edges, blob, [(200, 500)]) == [DATA[200:500]]
    assert await _get(edges, blob, [(0, 100), (400, 700)]) == [DATA[0:100], DATA[400:700]]
    assert blob.requests == [[(100, 300)], [(300, 500)], [(0, 100), (500, 700)]]
    # Wholly known: no request at all.
    assert await _get(edges, blob, [(450, 500)]) == [DATA[450:500]]
    assert len(blob.requests) == 3


@pytest.mark.anyio
async def test_the_last_block_of_the_blob_is_short():
    edges, blob = EdgeBlocks(300, len(DATA)), Blob()
    assert await _get(edges, blob, [(600, 1000)]) == [DATA[600:1000]]
    assert await _get(edges, blob, [(900, 1000)]) == [DATA[900:1000]]
    assert blob.requests == [[(600, 1000)]]


@pytest.mark.anyio
async def test_a_request_waits_for_the_block_one_in_flight_brings():
    edges, blob = EdgeBlocks(100, len(DATA)), Blob()
    blob.go = trio.Event()
    out: dict[str, list[bytes]] = {}

    async def get(name: str, ranges: list[tuple[int, int]]) -> None:
        out[name] = await _get(edges, blob, ranges)

    with trio.fail_after(5):  # a waiter left waiting would hang here
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, "first", [(0, 200)])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(get, "second", [(100, 400)])
            await trio.testing.wait_all_tasks_blocked()
            assert blob.requests == [[(0, 200)], [(200, 400)]]  # both in flight, no byte twice
            blob.go.set()
    assert out == {"first": [DATA[0:200]], "second": [DATA[100:400]]}


@pytest.mark.anyio
async def test_nobody_waits_for_the_blocks_of_a_much_bigger_request(monkeypatch):
    """A request asking for over EDGE_WAIT_SLACK more than a reader's (a prefetch batch) would
    keep it waiting longer than its own request: its blocks are kept when it is answered, not
    waited for."""
    monkeypatch.setattr("store.chunks.EDGE_WAIT_SLACK", 50)
    edges, big, small = EdgeBlocks(100, len(DATA)), Blob(), Blob()
    big.go = trio.Event()
    out: list[list[bytes]] = []

    async def first() -> None:
        out.append(await _get(edges, big, [(0, 400)]))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            # 400 bytes asked for by the first, 200 by this one: more than 50 over
            assert await _get(edges, small, [(300, 500)]) == [DATA[300:500]]
            assert small.requests == [[(300, 500)]] and not out
            big.go.set()
    assert out == [[DATA[0:400]]]
    assert await _get(edges, small, [(0, 100)]) == [DATA[0:100]]
    assert len(small.requests) == 1  # block 0 was kept when the big one was answered


@pytest.mark.anyio
async def test_a_block_whose_request_failed_is_fetched_by_who_waited_for_it():
    edges, failing, other = EdgeBlocks(100, len(DATA)), Blob(), Blob()
    failing.go, failing.fail = trio.Event(), True
    out: dict[str, object] = {}

    async def get(name: str, blob: Blob, ranges: list[tuple[int, int]]) -> None:
        try:
            out[name] = await _get(edges, blob, ranges)
        except OSError as exc:
            out[name] = exc

    with trio.fail_after(5):  # a waiter left waiting would hang here
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, "first", failing, [(0, 200)])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(get, "second", other, [(100, 400)])
            await trio.testing.wait_all_tasks_blocked()
            assert "second" not in out  # waiting for block 100
            failing.go.set()
        assert isinstance(out["first"], OSError)
        assert out["second"] == [DATA[100:400]]
        assert other.requests == [[(200, 400)], [(100, 200)]]
        # Nothing of the failed request is kept or due; the block the second fetched is.
        assert await _get(edges, other, [(0, 200)]) == [DATA[0:200]]
        assert other.requests[-1] == [(0, 100)]


@pytest.mark.anyio
async def test_a_cancelled_request_wakes_its_waiters():
    edges, held, other = EdgeBlocks(100, len(DATA)), Blob(), Blob()
    held.go = trio.Event()  # never set: its request hangs until cancelled
    out: list[list[bytes]] = []
    scope = trio.CancelScope()

    async def first() -> None:
        with scope:
            await _get(edges, held, [(0, 200)])

    async def second() -> None:
        out.append(await _get(edges, other, [(100, 300)]))

    with trio.fail_after(5):  # a waiter left waiting would hang here
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert other.requests == [[(200, 300)]]  # block 100 is the first's to bring
            scope.cancel()
    assert out == [[DATA[100:300]]]
    assert other.requests == [[(200, 300)], [(100, 200)]]


@pytest.mark.anyio
async def test_at_most_limit_blocks_are_kept():
    edges, blob = EdgeBlocks(10, len(DATA), max_bytes=40), Blob()
    for lo in range(0, 200, 20):
        assert await _get(edges, blob, [(lo, lo + 20)]) == [DATA[lo : lo + 20]]
    assert len(edges._kept) == 4


# -- a layer's on-demand reads ------------------------------------------------------------


async def _layer(tmp_path: Path, sizes: list[int], chunk_size: int) -> tuple[Layer, list]:
    rnd = random.Random(len(sizes))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for i, size in enumerate(sizes):
            ti = tarfile.TarInfo(f"f{i:02d}")
            ti.size = size
            tar.addfile(ti, io.BytesIO(rnd.randbytes(size)))  # incompressible
    raw.seek(0)
    out = tmp_path / "layer.blob"
    with out.open("wb") as f:
        result = convert(raw, f, level=1)
    layer = await local_layer(
        out, result.digest, result.toc_digest, tmp_path / "cache", "edges", chunk_size=chunk_size
    )
    nodes = [n for p, n in sorted(layer.tree.walk()) if p.startswith("f")]
    return layer, nodes


def _covered_twice(requests: list[list[tuple[int, int]]], end: int) -> int:
    seen = bytearray(end)
    twice = 0
    for r in requests:
        for lo, hi in r:
            for i in range(lo, min(hi, end)):
                twice += seen[i]
                seen[i] = 1
    return twice


@pytest.mark.anyio
async def test_files_read_one_by_one_fetch_no_byte_twice(tmp_path):
    """Files of 30-70 kB read in turn, in 50,000-byte aligned requests: each request's edge
    blocks serve the next file's, and every file reads back verified."""
    sizes = [random.Random(i).randrange(30_000, 70_000) for i in range(12)]
    layer, nodes = await _layer(tmp_path, sizes, 50_000)
    data_end = layer.index.index.toc_offset
    before = len(layer.blob.requests)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(layer.run)
            for node in [*nodes[::2], *nodes[1::2]]:  # out of order: edges on both sides
                got = await layer.read_file(node, 0, node.size)
                assert len(got) == node.size
            layer.release()
    requests = layer.blob.requests[before:]
    assert _covered_twice(requests, data_end) == 0
    assert layer.stats.fetched_bytes == sum(hi - lo for r in requests for lo, hi in r)


@pytest.mark.anyio
async def test_bytes_from_a_kept_block_are_verified_and_a_bad_one_is_dropped(tmp_path):
    """A kept block is compressed bytes like any other: a chunk built from a corrupt one fails
    its digest and is not served; the block is dropped, so the next read asks the registry."""
    layer, nodes = await _layer(tmp_path, [40_000, 40_000, 40_000], 50_000)
    second = layer.index.chunks_of(nodes[1].entry)[0]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(layer.run)
            await layer.read_file(nodes[0], 0, 100)  # its request ends in the second's block
            edges = layer.source._edges
            block = second.compressed_offset // 50_000 * 50_000
            assert block in edges._kept
            kept = bytearray(edges._kept[block])
            kept[second.compressed_offset - block + 30] ^= 0xFF
            edges._kept[block] = bytes(kept)
            with pytest.raises(ChunkVerifyError):
                await layer.read_file(nodes[1], 0, 100)
            assert second.digest not in layer.cache
            before = len(layer.blob.requests)
            assert len(await layer.read_file(nodes[1], 0, 100)) == 100
            assert len(layer.blob.requests) == before + 1
            layer.release()
    assert not layer.source._edges._kept  # released with the layer
