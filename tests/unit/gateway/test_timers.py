"""The gateway's coarse timers: due order, at most a tick late, cancellation releases what a
timer held, compaction, and one failing callback does not stop the others (no server)."""

from __future__ import annotations

import asyncio

from gateway.timers import TICK_S, Timers


def test_timers_run_in_due_order_not_early_and_at_most_a_tick_late() -> None:
    async def scenario() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        timers = Timers()
        fired: list[tuple[str, float]] = []
        start = loop.time()
        for name, delay in (("c", 0.3), ("a", 0.05), ("b", 0.1), ("now", -1.0)):
            timers.call_later(delay, lambda n: fired.append((n, loop.time() - start)), name)
        assert len(timers) == 4
        await asyncio.sleep(0.3 + 2 * TICK_S)
        assert len(timers) == 0
        return fired

    fired = asyncio.run(scenario())
    assert [name for name, _ in fired] == ["now", "a", "b", "c"]
    due = {"now": 0.0, "a": 0.05, "b": 0.1, "c": 0.3}
    for name, at in fired:
        assert due[name] - 0.006 <= at <= due[name] + TICK_S + 0.1, (name, at)


def test_cancelled_timers_do_not_run_and_release_what_they_held() -> None:
    async def scenario() -> None:
        timers = Timers()
        fired: list[str] = []
        held = object()
        keep = timers.call_later(0.05, fired.append, "kept")
        drop = timers.call_later(0.05, fired.append, held)
        drop.cancel()
        drop.cancel()  # twice is harmless
        assert drop.arg is None and drop.fn is None
        assert len(timers) == 1
        await asyncio.sleep(0.05 + 2 * TICK_S)
        assert fired == ["kept"]
        assert keep.fn is None  # a timer that ran holds nothing either

    asyncio.run(scenario())


def test_many_cancelled_timers_are_compacted_away() -> None:
    async def scenario() -> None:
        timers = Timers()
        far = [timers.call_later(3600.0, print, i) for i in range(1000)]
        for timer in far[:900]:
            timer.cancel()
        assert len(timers) == 100
        assert len(timers._heap) < 300  # not 1000 until an hour from now

    asyncio.run(scenario())


def test_a_failing_callback_does_not_stop_the_others() -> None:
    async def scenario() -> list[int]:
        timers = Timers()
        fired: list[int] = []

        def boom(_arg: object) -> None:
            raise RuntimeError("boom")

        timers.call_later(0.0, boom, None)
        timers.call_later(0.0, fired.append, 1)
        timers.call_later(0.01, fired.append, 2)
        await asyncio.sleep(3 * TICK_S)
        return fired

    assert asyncio.run(scenario()) == [1, 2]
