"""feed.stages: the hand-written histogram exports what prometheus_client's would."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from feed.stages import LATENCY_BUCKETS, WORKER_STAGES, StageHistogram, record_ts_ms


def _samples(
    registry: CollectorRegistry, name: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            key = sample.name + (f"|le={sample.labels['le']}" if "le" in sample.labels else "")
            out[(key, labels)] = sample.value
    return out


def test_it_exports_the_same_series_as_prometheus_clients_histogram() -> None:
    values_ms = [0.2, 0.5, 0.51, 3.0, 19.9, 20.0, 20.1, 750.0, 59_999.0, 60_000.0, 61_000.0, -4.0]
    ours_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    ours = StageHistogram("x_seconds", "x", registry=ours_registry)
    reference = Histogram("x_seconds", "x", buckets=LATENCY_BUCKETS, registry=reference_registry)
    for value in values_ms:
        ours.observe_ms("", value)
        reference.observe(value / 1000)
    mine = _samples(ours_registry, "x_seconds")
    theirs = {
        k: v for k, v in _samples(reference_registry, "x_seconds").items() if "created" not in k[0]
    }
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        assert mine[key] == pytest.approx(value), key
    assert ours.count() == len(values_ms)


def test_one_series_per_label_value_and_unknown_origins_are_skipped() -> None:
    registry = CollectorRegistry()
    stages = StageHistogram(
        "s_seconds", "s", label="stage", values=WORKER_STAGES, registry=registry
    )
    stages.observe_since("durable", [1_000, None, 1_010], at_ms=1_020.0)
    samples = _samples(registry, "s_seconds")
    assert samples[("s_seconds_count", (("stage", "durable"),))] == 2
    assert samples[("s_seconds_sum", (("stage", "durable"),))] == pytest.approx(0.030)
    assert samples[("s_seconds_bucket|le=0.01", (("stage", "durable"),))] == 1
    for stage in WORKER_STAGES:
        if stage != "durable":
            assert samples[("s_seconds_count", (("stage", stage),))] == 0
    with pytest.raises(KeyError):
        stages.observe_ms("elsewhere", 1.0)


class _Message:
    def __init__(self, kind: int, value: int) -> None:
        self._ts = (kind, value)

    def timestamp(self) -> tuple[int, int]:
        return self._ts


def test_a_record_timestamp_is_read_only_when_the_broker_has_one() -> None:
    assert record_ts_ms(_Message(1, 1_765_000_000_123)) == 1_765_000_000_123  # CreateTime
    assert record_ts_ms(_Message(2, 1_765_000_000_124)) == 1_765_000_000_124  # LogAppendTime
    assert record_ts_ms(_Message(0, -1)) is None  # not available
    assert record_ts_ms(_Message(1, 0)) is None


def test_the_buckets_are_fine_where_the_goals_are() -> None:
    """p50 < 20 ms and p99 < 60 ms are read from these buckets: at most 2 ms apart below
    20 ms, at most 10 ms below 100 ms, and up to a minute (a drained backlog)."""
    bounds = list(LATENCY_BUCKETS)
    assert bounds == sorted(bounds) and bounds[-1] == 60.0
    steps = list(itertools.pairwise(bounds))
    assert max(b - a for a, b in steps if b <= 0.020) <= 0.002 + 1e-9
    assert max(b - a for a, b in steps if b <= 0.100) <= 0.010 + 1e-9


def test_a_traced_observation_is_its_buckets_exemplar_in_openmetrics_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om

    import feed.stages

    clock = [1_765_000_000.0]
    monkeypatch.setattr(feed.stages.time, "time", lambda: clock[0])
    registry = CollectorRegistry()
    ours = StageHistogram("x_seconds", "x", registry=registry)
    for value in (3.0, 19.9, 20.0):
        ours.observe_ms("", value)

    def exemplars() -> dict[str, Any]:
        return {
            sample.labels["le"]: sample.exemplar
            for family in parse_om(openmetrics(registry).decode())
            for sample in family.samples
            if sample.name == "x_seconds_bucket" and sample.exemplar is not None
        }

    ours.exemplar_ms("", 19.9, 0xA, 0xB)
    ours.exemplar_ms("", 19.95, 0xC, 0xD)  # the same bucket within a second: not taken
    assert list(exemplars()) == ["0.02"]
    assert exemplars()["0.02"].labels == {"trace_id": f"{0xA:032x}", "span_id": f"{0xB:016x}"}
    assert exemplars()["0.02"].value == pytest.approx(0.0199)
    clock[0] += 1.5  # a second later the latest one is kept
    ours.exemplar_ms("", 19.95, 0xC, 0xD)
    assert exemplars()["0.02"].labels == {"trace_id": f"{0xC:032x}", "span_id": f"{0xD:016x}"}
    assert exemplars()["0.02"].value == pytest.approx(0.01995)
    # the counts are the observations': an exemplar adds none
    assert ours.count() == 3
    assert "trace_id" not in generate_latest(registry).decode()
