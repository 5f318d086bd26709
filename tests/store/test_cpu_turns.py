"""The resolver's CPU turns: one TOC build at a time, the image's base layer first."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from store.resolver import CpuTurns


@pytest.mark.anyio
async def test_turns_go_by_position_and_a_waiting_runtime_first() -> None:
    turns = CpuTurns()
    order: list[int] = []
    inside = 0

    async def build(position: int) -> None:
        nonlocal inside
        async with turns.turn(position):
            inside += 1
            assert inside == 1  # one at a time
            order.append(position)
            await trio.sleep(0.01)
            inside -= 1

    with trio.fail_after(10):
        # The first comes in and holds the turn while the others queue.
        async with trio.open_nursery() as nursery, turns.turn(9):
            for position in (3, 0, 2, -1, 1):
                nursery.start_soon(build, position)
            await trio.testing.wait_all_tasks_blocked()
    assert order == [-1, 0, 1, 2, 3]


@pytest.mark.anyio
async def test_a_cancelled_waiter_neither_blocks_nor_loses_the_turn() -> None:
    turns = CpuTurns()
    got: list[str] = []

    async def waiter(name: str, position: int, scope: trio.CancelScope | None = None) -> None:
        with scope or trio.CancelScope():
            async with turns.turn(position):
                got.append(name)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            cancelled = trio.CancelScope()
            async with turns.turn(0):
                nursery.start_soon(waiter, "cancelled", 1, cancelled)
                nursery.start_soon(waiter, "next", 2)
                await trio.testing.wait_all_tasks_blocked()
                cancelled.cancel()
                await trio.testing.wait_all_tasks_blocked()
    assert got == ["next"]
    async with turns.turn(5):  # free again
        pass
