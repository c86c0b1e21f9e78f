"""The gateway's own metrics that need no server: the event loop's lag."""

from __future__ import annotations

import asyncio
import contextlib
import time

from gateway.metrics import GatewayMetrics


def _lag(metrics: GatewayMetrics) -> tuple[float, float]:
    """(observations, sum of seconds) of ``feed_event_loop_lag_seconds``."""
    count = total = 0.0
    for family in metrics.registry.collect():
        if family.name != "feed_event_loop_lag_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return count, total


async def test_a_blocked_loop_shows_as_lag() -> None:
    metrics = GatewayMetrics()
    probe = asyncio.create_task(metrics.watch_loop(interval_s=0.01))
    try:
        deadline = time.monotonic() + 5
        while _lag(metrics)[0] < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        before = _lag(metrics)
        assert before[0] >= 3
        time.sleep(0.2)  # the loop is blocked: no task runs for 200 ms
        while _lag(metrics)[0] <= before[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        after = _lag(metrics)
        assert after[1] - before[1] >= 0.15, (before, after)
    finally:
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
