"""Helpers of the notification-feed tests on real servers (one Redis and a Redis Cluster)."""

from __future__ import annotations

from typing import Any

import msgspec

from feed.notify import NotifyLimits

__all__ = ["LIMITS", "S", "read_all"]

#: Small bounds (3 activities per group, 4 groups, a 2 s window): every bound happens often.
LIMITS = NotifyLimits(window_s=2, group_max=3, max_groups=4)
#: Microseconds per second (``published`` is in µs).
S = 1_000_000


async def read_all(store: Any, user: str) -> dict[str, Any]:
    """Every group (pages of 2), each group's actors (pages of 2), the counts."""
    groups: list[Any] = []
    before = None
    counts = None
    for _ in range(20):
        page = await store.page(user, before, 2)
        counts = (page.unseen, page.unread)
        groups += [msgspec.json.decode(g) for g in page.groups]
        before = page.next
        if before is None:
            break
    actors = {}
    for group in groups:
        names: list[str] = []
        after = None
        for _ in range(20):
            got = await store.actors(user, group["id"], after, 2)
            assert got is not None, group["id"]
            names += got.actors
            after = got.next
            if after is None:
                break
        actors[group["id"]] = names
    return {"groups": groups, "actors": actors, "counts": counts, "n": await store.counts(user)}
