"""store.pullorder: an image's TOCs are parsed one at a time, bottom layer first — the turns
alone, and along the resolver."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import tarfile
from pathlib import Path

import pytest
import trio
import trio.testing

from store.cache import ChunkCache
from store.config import StoreConfig
from store.estargz import TOC_DIGEST_ANNOTATION, convert
from store.pullorder import Turns
from store.resolver import LayerDesc, LayerManager, RegistryAccess
from store.timeline import Timeline
from tests.store.conftest import FileBlob

REF = "127.0.0.1:5000/order/image:1"

# -- Turns -------------------------------------------------------------------------------------


def _key(*key):
    return lambda: key


@pytest.mark.anyio
async def test_turns_go_one_at_a_time_lowest_priority_first_ties_by_arrival():
    turns = Turns()
    order: list[str] = []
    inside = 0
    release = trio.Event()
    changing = {"late-riser": (9.0, 9)}

    async def holder(name: str, priority, wait: trio.Event | None = None) -> None:
        nonlocal inside
        async with turns.turn(priority):
            inside += 1
            assert inside == 1
            order.append(name)
            if wait is not None:
                await wait.wait()
            await trio.sleep(0)
            inside -= 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder, "first", _key(5.0, 9), release)
        await trio.testing.wait_all_tasks_blocked()
        for name, priority in [
            ("c", _key(1.0, 3)),
            ("a", _key(1.0, 1)),
            ("later-image", _key(2.0, 0)),
            ("b", _key(1.0, 2)),
            ("b2", _key(1.0, 2)),
            ("late-riser", lambda: changing["late-riser"]),
        ]:
            nursery.start_soon(holder, name, priority)
            await trio.testing.wait_all_tasks_blocked()
        assert turns.waiting == 6
        changing["late-riser"] = (0.5, 0)  # read when the turn is handed on, not when queued
        release.set()
    assert order == ["first", "late-riser", "a", "b", "b2", "c", "later-image"]
    assert turns.waiting == 0
    async with turns.turn(_key(0.0, 0)):  # free again: no wait
        pass


@pytest.mark.anyio
async def test_a_waiter_cancelled_before_or_after_its_turn_never_blocks_the_queue():
    turns = Turns()
    order: list[str] = []
    release = trio.Event()

    async def holder(name: str, priority, wait: trio.Event | None = None) -> None:
        async with turns.turn(priority):
            order.append(name)
            if wait is not None:
                await wait.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder, "first", _key(0.0, 0), release)
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as gone:
            gone.cancel()
            await holder("gone", _key(0.0, 1))  # cancelled while it waits: leaves the queue
        assert turns.waiting == 0
        granted_then_cancelled = trio.CancelScope()

        async def cancelled_when_granted() -> None:
            with granted_then_cancelled:
                await holder("granted", _key(0.0, 1), trio.Event())  # waits inside forever

        nursery.start_soon(cancelled_when_granted)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(holder, "last", _key(0.0, 2))
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        granted_then_cancelled.cancel()
    assert order == ["first", "granted", "last"]
    assert turns.waiting == 0


@pytest.mark.anyio
async def test_a_waiter_cancelled_just_as_it_is_granted_hands_the_turn_on():
    """The holder cancels the first waiter and leaves: the turn is granted to that waiter
    before it wakes up cancelled, and it passes the turn to the next one."""
    turns = Turns()
    order: list[str] = []
    doomed = trio.CancelScope()

    async def holder(name: str, priority) -> None:
        async with turns.turn(priority):
            order.append(name)
            if name == "first":
                await trio.testing.wait_all_tasks_blocked()
                doomed.cancel()  # its wait is aborted, but it is still in the queue

    async def doomed_waiter() -> None:
        with doomed:
            await holder("doomed", _key(0.0, 1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder, "first", _key(0.0, 0))
        await trio.sleep(0)
        nursery.start_soon(doomed_waiter)
        nursery.start_soon(holder, "next", _key(0.0, 2))
    assert order == ["first", "next"]
    assert turns.waiting == 0 and not turns._busy


# -- along the resolver ------------------------------------------------------------------------


def _layer_tar(seed: int, files: int = 40) -> bytes:
    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(files):
            data = rng.randbytes(rng.randrange(2000, 40_000))
            ti = tarfile.TarInfo(f"l{seed}/f{i:03d}")
            ti.size, ti.mtime = len(data), 1_700_000_000
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _layer(tmp_path: Path, seed: int) -> tuple[Path, str]:
    """An eStargz layer as a file: its path and TOC digest."""
    out = io.BytesIO()
    res = convert(io.BytesIO(_layer_tar(seed)), out, level=1)
    path = tmp_path / f"layer{seed}.blob"
    path.write_bytes(out.getvalue())
    return path, res.toc_digest


class _Gated(FileBlob):
    """A layer blob whose footer (its last bytes) is answered only once ``gate`` is set."""

    def __init__(self, path: Path, gate: trio.Event) -> None:
        super().__init__(path)
        self.gate = gate

    async def read_ranges(self, ranges):
        if any(hi == self.size for _, hi in ranges):
            await self.gate.wait()
        out = await super().read_ranges(ranges)
        await trio.sleep(0)
        return out


class _Registry(RegistryAccess):
    """One image of ``layers`` (path, TOC digest), bottom first, every footer behind ``gate``."""

    def __init__(self, layers: list[tuple[Path, str]], gate: trio.Event):
        self.blobs: dict[str, _Gated] = {}
        self.descs = []
        for path, toc_digest in layers:
            data = path.read_bytes()
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            self.blobs[digest] = _Gated(path, gate)
            self.descs.append(
                LayerDesc(digest, len(data), {TOC_DIGEST_ANNOTATION: toc_digest}, digest)
            )

    async def image(self, ref, on_layers=None):
        if on_layers is not None:
            on_layers(self.descs)
        return b"{}", b"{}", self.descs

    def blob(self, ref, digest, size):
        return self.blobs[digest]


@pytest.mark.anyio
async def test_tocs_waiting_together_are_parsed_looked_up_first_then_bottom_layer_first(tmp_path):
    """Five TOCs verified while the turn is taken: when it is handed on, the layer podman
    has asked for goes first (here the top one), then the others from the bottom up."""
    n = 5
    layers = [_layer(tmp_path, 10 + seed) for seed in range(n)]
    gate = trio.Event()
    reg = _Registry(layers, gate)
    path = tmp_path / "timeline.jsonl"
    timeline = Timeline(path)
    cfg = StoreConfig(noprefetch=True, no_background_fetch=True, resolve_timeout_sec=10)
    async with trio.open_nursery() as nursery:
        manager = LayerManager(
            cfg, reg, ChunkCache(tmp_path / "c", 1 << 30), nursery, timeline=timeline
        )
        await manager.image(REF)
        async with manager._parse_turns.turn(lambda: (False, -1.0, -1)):  # the test's turn
            gate.set()  # every TOC arrives at once, in no particular order
            with trio.fail_after(10):
                while manager._parse_turns.waiting < n:
                    await trio.sleep(0.01)
            nursery.start_soon(manager.get_layer, REF, reg.descs[-1].digest)
            await trio.testing.wait_all_tasks_blocked()
        for desc in reg.descs:
            await manager.get_layer(REF, desc.digest)
        nursery.cancel_scope.cancel()
    timeline.close()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    position = {d.digest: i for i, d in enumerate(reg.descs)}
    parses = sorted(
        (e["t"], e["t"] + e["dur"], e["layer"]) for e in events if e["event"] == "parse"
    )
    assert [position[layer] for _, _, layer in parses] == [4, 0, 1, 2, 3]
    for (_, a_end, _), (b_start, _, _) in itertools.pairwise(parses):
        assert a_end <= b_start, parses  # one at a time
