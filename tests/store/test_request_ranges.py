"""On-demand requests: aligned to chunk_size, then cut to the chunks they deliver, so that each
chunk comes whole in one request and neighbouring requests do not overlap (store.chunks)."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest
import trio

from store.estargz.writer import convert
from store.layer import Layer
from tests.store.conftest import local_layer


async def _layer(tmp_path: Path, sizes: list[int]) -> tuple[Layer, list]:
    """A layer of files ``f00``, ``f01``… of ``sizes`` incompressible bytes, blob order."""
    rnd = random.Random(len(sizes))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for i, size in enumerate(sizes):
            ti = tarfile.TarInfo(f"f{i:02d}")
            ti.size = size
            tar.addfile(ti, io.BytesIO(rnd.randbytes(size)))
    raw.seek(0)
    out = tmp_path / "layer.blob"
    with out.open("wb") as f:
        result = convert(raw, f, level=1)
    layer = await local_layer(out, result.digest, result.toc_digest, tmp_path / "cache")
    nodes = [n for p, n in sorted(layer.tree.walk()) if p.startswith("f")]
    return layer, nodes


@pytest.mark.anyio
async def test_files_read_one_by_one_come_whole_and_no_byte_twice(tmp_path):
    """Files of 30-70 kB read out of order, in 50,000-byte aligned requests: every block
    boundary falls inside some file, yet no byte is asked for twice and each file's chunk comes
    whole in exactly one request."""
    sizes = [random.Random(i).randrange(30_000, 70_000) for i in range(12)]
    layer, nodes = await _layer(tmp_path, sizes)
    chunks = [c for n in nodes for c in layer.index.chunks_of(n.entry)]
    assert len(chunks) == len(nodes)
    straddling = [c for c in chunks if c.compressed_offset // 50_000 < c.compressed_end // 50_000]
    assert len(straddling) >= len(chunks) // 2  # the old rounding would fetch their parts twice
    before = len(layer.blob.requests)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(layer.run)
            for node in [*nodes[::2], *nodes[1::2]]:  # both neighbours of a file come later
                assert len(await layer.read_file(node, 0, node.size)) == node.size
            layer.release()
    requests = [r for req in layer.blob.requests[before:] for r in req]
    seen: set[int] = set()
    for lo, hi in requests:
        assert seen.isdisjoint(range(lo, hi))
        seen.update(range(lo, hi))
    for node in nodes:
        (c,) = layer.index.chunks_of(node.entry)
        whole = [r for r in requests if r[0] <= c.compressed_offset and c.compressed_end <= r[1]]
        touching = [r for r in requests if r[0] < c.compressed_end and c.compressed_offset < r[1]]
        assert len(whole) == 1 and touching == whole, node.entry.name
    assert layer.stats.fetched_bytes == sum(hi - lo for lo, hi in requests)
    assert layer.stats.verify_failures == 0


@pytest.mark.anyio
async def test_small_neighbours_still_ride_along(tmp_path):
    """Files of 1 kB: the first read's aligned block holds its neighbours whole, which come
    with it, so reading them asks for nothing more."""
    layer, nodes = await _layer(tmp_path, [1000] * 10)
    before = len(layer.blob.requests)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(layer.run)
            for node in nodes:
                assert len(await layer.read_file(node, 0, node.size)) == node.size
            layer.release()
    assert len(layer.blob.requests) - before == 1
    assert layer.stats.verify_failures == 0
