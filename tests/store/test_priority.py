"""store.priority: background work waits for quiet and yields to foreground work (trio's
MockClock: the times are exact)."""

from __future__ import annotations

import trio
import trio.testing

from store.priority import Foreground


def _run(main) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _recording():
    """``(started, work)``: ``work()`` appends the time it starts at to ``started``."""
    started: list[float] = []

    async def work() -> None:
        started.append(trio.current_time())

    return started, work


def test_background_work_waits_for_the_silence_after_the_last_foreground_work() -> None:
    async def main() -> None:
        fg = Foreground(silence=5.0)
        started, work = _recording()

        async def reader() -> None:
            for _ in range(3):
                with fg.busy():
                    await trio.sleep(1.0)
                await trio.sleep(2.0)  # less than the silence: still not quiet

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.5)
            await fg.in_background(work)
        # The reads end at 1, 4 and 7 s; quiet from 7 s on.
        assert started == [12.0]

    _run(main)


def test_with_no_foreground_work_yet_background_work_starts_at_once() -> None:
    async def main() -> None:
        fg = Foreground(silence=5.0)
        started, work = _recording()

        await fg.in_background(work)
        assert started == [0.0]

    _run(main)


def test_foreground_work_interrupts_background_work_which_runs_again_after_quiet() -> None:
    async def main() -> None:
        fg = Foreground(silence=2.0)
        runs: list[tuple[float, float | None]] = []

        async def work() -> None:
            start = trio.current_time()
            runs.append((start, None))
            await trio.sleep(3.0)
            runs[-1] = (start, trio.current_time())

        async def reader() -> None:
            await trio.sleep(1.0)
            with fg.busy():  # cancels the batch under way at once
                await trio.sleep(0.5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await fg.in_background(work)
        # Interrupted at 1 s; the read ends at 1.5 s; quiet at 3.5 s; done at 6.5 s.
        assert runs == [(0.0, None), (3.5, 6.5)]

    _run(main)


def test_an_outer_cancellation_is_not_taken_for_an_interruption() -> None:
    async def main() -> None:
        fg = Foreground(silence=0.0)
        runs = 0

        async def work() -> None:
            nonlocal runs
            runs += 1
            await trio.sleep_forever()

        with trio.move_on_after(1.0) as outer:
            await fg.in_background(work)
        assert outer.cancelled_caught
        assert runs == 1
        assert not fg._background  # nothing left to cancel

    _run(main)


def test_nested_foreground_work_is_quiet_only_once_all_of_it_ends() -> None:
    async def main() -> None:
        fg = Foreground(silence=1.0)
        started, work = _recording()

        async def long_read() -> None:
            with fg.busy():
                await trio.sleep(4.0)

        async def short_read() -> None:
            with fg.busy():
                await trio.sleep(1.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_read)
            nursery.start_soon(short_read)
            await trio.sleep(0.1)
            await fg.in_background(work)
        assert started == [5.0]

    _run(main)
