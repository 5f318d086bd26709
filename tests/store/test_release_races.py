"""A layer released (podman rmi, an early load expiring, the store stopping) while its work is
in flight: readers get a clear error, never an exception that ends the FUSE loop."""

from __future__ import annotations

import hashlib
import io
import os
import random

import pyfuse3
import pytest
import trio
import trio.testing

import store.blobfile as blobfile
from store.blobfile import VerifiedBlob
from store.estargz import convert
from store.estargz_view import load_layer_index
from store.fuse_ops import _acall
from tests.store.conftest import FileBlob, tar_of, view_layer

K = 1 << 10
FILES = {
    "first": random.Random(1).randbytes(300 * K),
    "second": random.Random(2).randbytes(300 * K),
}


class GatedRelease(FileBlob):
    """Requests of more than 100 KiB wait for ``gate``; the first of them calls ``hook`` as
    its response comes in (before the chunks are inflated and checked)."""

    def __init__(self, path):
        super().__init__(path)
        self.gate = trio.Event()
        self.hook = None

    async def read_ranges(self, ranges):
        big = any(hi - lo > 100 * K for lo, hi in ranges)
        if big:
            await self.gate.wait()
        out = await super().read_ranges(ranges)
        if big and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return out


@pytest.mark.anyio
async def test_a_read_waiting_on_a_prefetch_cancelled_mid_delivery_gets_eio(tmp_path):
    """The prefetch's piece arrives, the layer is released before its chunks are checked: the
    nursery inflating them is cancelled, and its group of ``Cancelled`` was handed to the read
    waiting on the claim — out of the FUSE handler, ending the mount."""
    out = io.BytesIO()
    res = convert(
        io.BytesIO(tar_of(FILES)), out, level=1, chunk_size=64 * K, prioritized_files=list(FILES)
    )
    path = tmp_path / "layer.blob"
    path.write_bytes(out.getvalue())
    blob = GatedRelease(path)
    view = await load_layer_index(blob, res.toc_digest)
    layer = view_layer(view, blob, res.toc_digest, tmp_path / "cache")
    node = next(n for p, n in layer.tree.walk() if p == "first")
    outcome: list[object] = []

    async def reader() -> None:
        try:
            outcome.append(len(await _acall(layer.read_file(node, 0, 4096), "read")))
        except pyfuse3.FUSEError as exc:
            outcome.append(exc.errno)
        except BaseException as exc:  # what would end pyfuse3.main
            outcome.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(layer.run)
            layer.start_prefetch(trio.CapacityLimiter(1), 30)
            await trio.testing.wait_all_tasks_blocked()  # the region claimed, its piece out
            blob.hook = layer.release
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()  # the read waits on the claim
            blob.gate.set()
    assert len(outcome) == 1 and isinstance(outcome[0], int), outcome


class _Memory:
    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    async def read_ranges(self, ranges):
        return [self.data[lo:hi] for lo, hi in ranges]


@pytest.mark.anyio
async def test_a_release_while_the_blob_is_written_is_the_released_error(tmp_path, monkeypatch):
    """close() ran on the trio thread while the worker thread wrote a window: the thread then
    hashed into ``None`` (AttributeError, a traceback and EIO)."""
    data = os.urandom(1 << 16)
    whole = VerifiedBlob(_Memory(data), "sha256:" + hashlib.sha256(data).hexdigest(), tmp_path)
    pwrite = os.pwrite

    def released_meanwhile(fd, buf, offset):
        trio.from_thread.run_sync(whole.close)
        return pwrite(fd, buf, offset)

    monkeypatch.setattr(blobfile.os, "pwrite", released_meanwhile)
    with pytest.raises(blobfile.LayerFetchError, match="released"):
        await whole.read(0, 10)
