"""The prefetch over the early download (:class:`AheadBlob`) hands each chunk on as soon as its
bytes are in: no turn under the store's limiter for bytes already on the wire, prefetch pieces
cut where the early download's pieces end, and a read waiting for a prefetched chunk whose
bytes are not on the wire yet puts them there now — never asking for a byte twice."""

from __future__ import annotations

import io
import itertools
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from store.estargz import convert
from store.estargz_view import load_layer_index
from store.layer import AheadBlob, Layer
from store.tree import LayerTree
from tests.store.conftest import FileBlob, tar_of, view_layer

K = 1 << 10
# Incompressible: a 64 KiB chunk is a ~64 KiB gzip member; the region is all three files.
FILES = {
    "first": random.Random(1).randbytes(150 * K),
    "middle": random.Random(2).randbytes(300 * K),
    "last": random.Random(3).randbytes(200 * K),
}


def _blob(tmp_path: Path) -> tuple[FileBlob, str]:
    out = io.BytesIO()
    res = convert(
        io.BytesIO(tar_of(FILES)), out, level=1, chunk_size=64 * K, prioritized_files=list(FILES)
    )
    path = tmp_path / "layer.blob"
    path.write_bytes(out.getvalue())
    return FileBlob(path), res.toc_digest


class Gated(FileBlob):
    """A FileBlob whose requests for a range inside ``held`` (a ``[lo, hi)`` blob range)
    wait for ``gate``."""

    def __init__(self, path: Path, held: tuple[int, int]) -> None:
        super().__init__(path)
        self.held = held
        self.gate = trio.Event()

    async def read_ranges(self, ranges):
        lo, hi = self.held
        if any(lo <= a and b <= hi for a, b in ranges):
            await self.gate.wait()
        return await super().read_ranges(ranges)


async def _region_end(blob: FileBlob, toc_digest: str) -> int:
    view = await load_layer_index(blob, toc_digest)
    assert view.prefetch_end
    return view.prefetch_end


async def _prefetching(
    tmp_path: Path,
    blob,
    toc_digest: str,
    nursery: trio.Nursery,
    limiter: trio.CapacityLimiter | None = None,
) -> Layer:
    """The store's chain — the early download started from ``on_verified``, the layer on it
    — with the layer's prefetch started in ``nursery`` and every task blocked.
    ``blob.verified_at``: how many requests the TOC's reading made."""

    def on_verified(end, ranges):
        blob.verified_at = len(blob.requests)
        ahead.start(end, nursery, ranges)

    ahead = AheadBlob(blob)
    view = await load_layer_index(ahead, toc_digest, on_verified)
    layer = view_layer(view, ahead, toc_digest, tmp_path / "cache", "order")
    nursery.start_soon(layer.prefetch, limiter or trio.CapacityLimiter(1), 30)
    await trio.testing.wait_all_tasks_blocked()
    return layer


def _node(layer: Layer, name: str):
    return next(n for p, n in layer.tree.walk() if p == name)


def _region(layer: Layer):
    return [c for c in layer.index.all_chunks() if c.compressed_end <= layer.index.prefetch_end]


@pytest.mark.anyio
async def test_prefetch_carried_by_the_early_download_takes_no_turn(tmp_path):
    """Another layer holds the limiter's only token: the prefetch still completes, as its
    bytes come from the early download, which runs without a turn."""
    plain, toc_digest = _blob(tmp_path)
    limiter = trio.CapacityLimiter(1)
    await limiter.acquire_on_behalf_of("another layer")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            layer = await _prefetching(tmp_path, plain, toc_digest, nursery, limiter)
            await layer.prefetch(limiter, timeout=30)  # waits for the one started
    assert _region(layer) and all(c.digest in layer.cache for c in _region(layer))


@pytest.mark.anyio
async def test_first_chunks_are_handed_on_without_waiting_for_the_next_piece(tmp_path, monkeypatch):
    """Early-download pieces of 100 KiB, chunks of 64 KiB: a prefetch piece that ran past the
    first download piece would hold ``first``'s opening chunk until the second arrived."""
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", 100 * K)
    monkeypatch.setattr("store.prefetch.FIRST_BATCH", 100 * K)
    plain, toc_digest = _blob(tmp_path)
    end = await _region_end(plain, toc_digest)
    blob = Gated(tmp_path / "layer.blob", held=(100 * K, end))  # all but the first piece
    async with trio.open_nursery() as nursery:
        layer = await _prefetching(tmp_path, blob, toc_digest, nursery)
        first = _node(layer, "first")
        with trio.fail_after(5):
            assert await layer.read_file(first, 0, 4096) == FILES["first"][:4096]
        blob.gate.set()
    assert await layer.read_file(first, 0, len(FILES["first"])) == FILES["first"]
    assert all(c.digest in layer.cache for c in _region(layer))


@pytest.mark.anyio
async def test_a_read_puts_the_piece_of_its_prefetched_chunk_on_the_wire(tmp_path, monkeypatch):
    """One early-download worker, stuck on the first piece: a read of ``last`` (at the
    region's end, its chunks claimed by the prefetch) has its pieces fetched at once and is
    served before the stuck piece comes in; no byte is asked for twice."""
    monkeypatch.setattr("store.prefetch.PREFETCH_STREAMS", 1)
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", 64 * K)
    monkeypatch.setattr("store.prefetch.FIRST_BATCH", 64 * K)
    _plain, toc_digest = _blob(tmp_path)
    blob = Gated(tmp_path / "layer.blob", held=(0, 64 * K))  # the first piece only
    async with trio.open_nursery() as nursery:
        layer = await _prefetching(tmp_path, blob, toc_digest, nursery)
        last = _node(layer, "last")
        with trio.fail_after(5):
            got = await layer.read_file(last, len(FILES["last"]) - 100, 100)
        assert got == FILES["last"][-100:]
        blob.gate.set()
    asked = sorted(r for req in blob.requests[blob.verified_at :] for r in req)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(asked)), [
        (a, b) for a, b in itertools.pairwise(asked) if a[1] > b[0]
    ]
    assert all(c.digest in layer.cache for c in _region(layer))


@pytest.mark.anyio
async def test_a_read_in_another_layer_puts_the_prefetched_chunk_on_the_wire(tmp_path, monkeypatch):
    """A file added again in a second layer shares its chunks (content-addressed) with the
    first layer's, which that layer's prefetch claimed while its one worker is stuck on the
    first piece: a read of it in the second layer hurries the first layer's download (the
    claimant's blob, its offsets) and is served at once — it neither waits for the stuck
    worker nor fetches the chunk a second time from its own blob."""
    monkeypatch.setattr("store.prefetch.PREFETCH_STREAMS", 1)
    monkeypatch.setattr("store.prefetch.PREFETCH_PIECE", 64 * K)
    monkeypatch.setattr("store.prefetch.FIRST_BATCH", 64 * K)
    _plain, toc_digest = _blob(tmp_path)
    blob = Gated(tmp_path / "layer.blob", held=(0, 64 * K))  # the first piece only
    again = io.BytesIO()
    res = convert(io.BytesIO(tar_of({"again": FILES["last"]})), again, level=1, chunk_size=64 * K)
    (tmp_path / "again.blob").write_bytes(again.getvalue())
    other_blob = FileBlob(tmp_path / "again.blob")
    async with trio.open_nursery() as nursery:
        layer = await _prefetching(tmp_path, blob, toc_digest, nursery)
        view = await load_layer_index(other_blob, res.toc_digest)
        asked_for_toc = len(other_blob.requests)
        other = Layer(
            key="again",
            digest="sha256:" + "1" * 64,
            toc_digest=res.toc_digest,
            tree=LayerTree(view.index),
            index=view,
            blob=other_blob,
            cache=layer.cache,  # one store, one chunk cache
        )
        node = _node(other, "again")
        tail = node.entry.chunks[-1]
        assert layer.cache.is_inflight(tail.digest)  # claimed by the first layer's prefetch
        with trio.fail_after(5):
            got = await other.read_file(node, len(FILES["last"]) - 100, 100)
        assert got == FILES["last"][-100:]
        blob.gate.set()
    assert other_blob.requests[asked_for_toc:] == []
