"""bench.e2e's arithmetic: stage percentiles from scraped histograms, and the sweep's verdict."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bench.e2e import P99_BOUND_MS, _histogram_delta, _max_rate_within, _overwhelmed
from bench.load import percentile_from_buckets
from feed.stages import WORKER_STAGES, StageHistogram


def _row(rate: float, p99: float | None, **extra: Any) -> dict[str, Any]:
    return {"history": False, "rate": rate, "latency_ms": {"p99": p99}, "lost": 0, **extra}


def test_the_highest_rate_is_where_the_sweep_first_breaks_the_bound() -> None:
    runs = [_row(50, 12.0), _row(100, 30.0), _row(250, P99_BOUND_MS), _row(500, 40.0)]
    assert _max_rate_within(runs, history=False) == 100  # 500 does not count past a failure
    assert _max_rate_within([_row(50, 12.0, lost=1)], history=False) is None
    assert _max_rate_within([_row(50, 12.0, duplicates=2)], history=False) is None
    assert _max_rate_within(runs, history=True) is None
    skipped = [_row(50, 1.0), {"history": False, "rate": 100, "skipped": True}]
    assert _max_rate_within(skipped, history=False) == 50


def test_an_overwhelmed_rate_ends_its_sweep() -> None:
    assert _overwhelmed(_row(500, 2_500.0))
    assert _overwhelmed(_row(500, 20.0, lost=3))
    assert _overwhelmed(_row(500, None))
    assert not _overwhelmed(_row(500, 400.0))


def _scrape(histogram: StageHistogram, registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_stage_percentiles_come_from_the_difference_of_two_scrapes() -> None:
    registry = CollectorRegistry()
    stages = StageHistogram(
        "feed_stage_latency_seconds", "s", label="stage", values=WORKER_STAGES, registry=registry
    )
    for _ in range(1000):  # before the window: slow, must not count
        stages.observe_ms("published", 900.0)
    before = _scrape(stages, registry)
    for value in range(1, 101):  # 1..100 ms in the window
        stages.observe_ms("published", float(value))
        stages.observe_ms("consumed", 0.4)
    after = _scrape(stages, registry)
    delta = _histogram_delta([before], [after], "feed_stage_latency_seconds", "published")
    assert delta[-1][1] == 100
    p50 = percentile_from_buckets(delta, 0.50)
    p99 = percentile_from_buckets(delta, 0.99)
    assert p50 is not None and p99 is not None
    assert p50 * 1000 == pytest.approx(50.0, abs=1.0)  # 1 ms buckets below 10, 5 ms at 50
    assert p99 * 1000 == pytest.approx(99.0, abs=1.5)
    consumed = _histogram_delta(before, after, "feed_stage_latency_seconds", "consumed")
    assert consumed[-1][1] == 100 and (percentile_from_buckets(consumed, 0.99) or 1) <= 0.0005
