"""The consumer-lag formulas: per-partition lag and the replicas it asks for."""

from __future__ import annotations

import pytest

from feed.lag import desired_replicas, partition_lag


def test_partition_lag() -> None:
    assert partition_lag(12, 19) == 7
    assert partition_lag(None, 19) is None
    assert partition_lag(-1001, 19) is None  # librdkafka's OFFSET_INVALID
    assert partition_lag(25, 19) == 0


@pytest.mark.parametrize(
    ("lag", "partitions", "threshold", "max_replicas", "expected"),
    [
        (0, 8, 100, 10, 0),
        (1, 8, 100, 10, 1),
        (250, 8, 100, 10, 3),
        (10_000, 8, 100, 10, 8),
        (10_000, 16, 100, 10, 10),
    ],
)
def test_desired_replicas(
    lag: int, partitions: int, threshold: int, max_replicas: int, expected: int
) -> None:
    assert (
        desired_replicas(lag, partitions, lag_threshold=threshold, max_replicas=max_replicas)
        == expected
    )
