"""Pure parts of the Redis timelines: the argument chunking of the grouped insert call."""

from __future__ import annotations

import pytest

from feed.timelines_redis import _MAX_USERS, _chunks


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
