"""The worker's follower-list cache stays bounded, whatever the lists hold (no servers: only the
cache's bookkeeping is exercised)."""

from __future__ import annotations

from typing import Any, cast

from fanout.followers import FollowerCache


def _cache(max_entries: int) -> FollowerCache:
    # The graph and Redis client are not touched by storing and evicting lists.
    return FollowerCache(cast(Any, None), cast(Any, None), max_entries=max_entries)


def test_actors_without_followers_are_bounded_too() -> None:
    """One activity per fresh actor id, none of them followed: every actor's (empty) list is
    cached, and the cap must still bound how many are kept."""
    cache = _cache(1000)
    for n in range(100_000):
        cache._store(f"actor-{n}", b"0.v", ())
    assert len(cache) <= 1000
    assert 0 < cache.size <= 1000
    assert "actor-99999" in cache  # the newest is kept
    assert "actor-0" not in cache  # the oldest were evicted


def test_cost_counts_lists_and_followers_and_evicts_least_recent() -> None:
    cache = _cache(10)
    cache._store("a", b"1", ("f1", "f2", "f3"))  # cost 4
    cache._store("b", b"1", ("f1",))  # cost 2
    cache._store("c", b"1", ())  # cost 1
    assert cache.size == 7 and len(cache) == 3
    cache._store("d", b"1", ("f1", "f2", "f3", "f4"))  # cost 5: "a" goes
    assert "a" not in cache and len(cache) == 3 and cache.size == 8
    cache._store("e", b"1", tuple(f"f{n}" for n in range(10)))  # cost 11 > 10: never cached
    assert "e" not in cache and cache.size == 8
    cache.invalidate(["b", "c", "d"])
    assert cache.size == 0 and len(cache) == 0
