"""Pure fan-out logic: argument chunking, recipients, lag formulas."""

from __future__ import annotations

import msgspec
import pytest

from fanout.processor import _recipients
from feed.lag import desired_replicas, partition_lag
from feed.timelines_redis import _MAX_USERS, _chunks
from schemas.activity import decode_activity


@pytest.mark.parametrize("sizes", [[1], [0, 3], [10_000], [5000, 5000, 5000], [1] * 3000])
def test_chunks_keep_every_user_once_and_stay_bounded(sizes: list[int]) -> None:
    groups = [
        ((f"m{g}", f"b{g}"), [f"u{g}-{n}" for n in range(size)]) for g, size in enumerate(sizes)
    ]
    calls = _chunks(groups)
    assert all(sum(len(users) for _, users in call) <= _MAX_USERS for call in calls)
    flat = [(fixed, list(users)) for call in calls for fixed, users in call]
    users = [u for _, us in flat for u in us]
    assert users == [u for _, us in groups for u in us]
    assert all(us and all(us) for _, us in flat)
    assert all(
        fixed == (f"m{u[0][1 : u[0].index('-')]}", f"b{u[0][1 : u[0].index('-')]}")
        for fixed, u in flat
    )


def test_recipients_are_followers_then_extra_to() -> None:
    activity = decode_activity(
        msgspec.json.encode(
            {
                "id": "a",
                "type": "Create",
                "actor": "u1",
                "object": "o",
                "published": "2026-01-01T00:00:00Z",
                "to": ["u9", "u2", "u9"],
            }
        )
    )
    assert _recipients(activity.to, ("u2", "u3")) == ("u2", "u3", "u9")
    assert _recipients([], ("u2",)) == ("u2",)


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
