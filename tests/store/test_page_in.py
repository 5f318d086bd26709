"""Bytes the store holds go into the kernel's page cache (:meth:`Layer.page_in`): every chunk
verified and in memory, each once, in contiguous runs at their file offsets; nothing the store
does not hold, nothing once released. Through a mounted store (the end-to-end suite) the push
is ``pyfuse3.notify_store``, and reads served from the page cache it filled never reach the
store."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from store.layer import PAGE_IN_EVERY, PAGE_IN_PUSH
from tests.store.conftest import one_file_layer

K = 1 << 10


async def _layer(tmp_path: Path, size: int, chunk_size: int):
    return await one_file_layer(tmp_path, size, chunk_size, "pc")


async def _settled(layer) -> None:
    """Until no page-in runs (its pushes run in a worker thread, which
    ``wait_all_tasks_blocked`` counts as blocked)."""
    with trio.fail_after(5):
        await trio.testing.wait_all_tasks_blocked()
        while layer._paging:
            await trio.sleep(0.005)


def _recorder():
    pushed: list[tuple[int, bytes]] = []
    return pushed, lambda offset, data: pushed.append((offset, bytes(data)))


@pytest.mark.anyio
async def test_page_in_pushes_what_the_store_holds_each_chunk_once(tmp_path):
    """Two reads far apart cache their blocks: a page-in pushes exactly those bytes, at their
    offsets, in runs no longer than PAGE_IN_PUSH; a second look-over pushes only what came in
    since."""
    layer, node, payload = await _layer(tmp_path, 12 << 20, 64 * K)
    pushed, push = _recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(layer.run)
        await layer.read_file(node, 0, 4096)
        layer.page_in(7, node, push)
        await _settled(layer)
        first = list(pushed)
        assert first, "the first block was cached and pushed"
        await layer.read_file(node, 8 << 20, 4096)
        layer.page_in(7, node, push)  # too soon: a look-over ran less than PAGE_IN_EVERY ago
        await _settled(layer)
        assert pushed == first
        await trio.sleep(PAGE_IN_EVERY)
        layer.page_in(7, node, push)
        await _settled(layer)
        layer.release()
    covered = bytearray(len(payload))
    for offset, data in pushed:
        assert len(data) <= PAGE_IN_PUSH
        assert data == payload[offset : offset + len(data)]
        assert not any(covered[offset : offset + len(data)]), "a byte pushed twice"
        covered[offset : offset + len(data)] = b"\x01" * len(data)
    held = {c.file_offset for c in layer.index.chunks_of(node.entry) if c.digest in layer.cache}
    assert {o for o in range(0, len(payload), 64 * K) if covered[o]} == held
    assert covered[8 << 20] and covered[0]


@pytest.mark.anyio
async def test_page_in_pushes_nothing_once_released_or_when_the_kernel_refuses(tmp_path):
    """A released layer pushes nothing; a push that fails (the kernel does not know the
    inode yet) is not counted as done, so a later look-over tries those chunks again."""
    layer, node, payload = await _layer(tmp_path, 1 << 20, 64 * K)
    calls = 0

    def refuse(offset: int, data: bytes) -> None:
        nonlocal calls
        calls += 1
        raise OSError(2, "fuse_lowlevel_notify_store returned: No such file or directory")

    pushed, push = _recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(layer.run)
        await layer.read_file(node, 0, len(payload))
        layer.page_in(3, node, refuse)
        await _settled(layer)
        assert calls == 1
        await trio.sleep(PAGE_IN_EVERY)
        layer.page_in(3, node, push)
        await _settled(layer)
        assert b"".join(d for _, d in sorted(pushed)) == payload
        layer.release()
        layer.page_in(4, node, push)
        await _settled(layer)
    assert len(pushed) == 1  # one run of contiguous chunks, and nothing after the release
