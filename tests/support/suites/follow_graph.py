"""The shared suite of ``feed.interfaces.FollowGraph``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from tests.support.backends import Backend

Ids = Callable[[str], str]
T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


class FollowGraphSuite:
    def test_the_later_event_wins_in_either_order(self, backend: Backend, ids: Ids) -> None:
        graph = backend.graph(100)
        a, b, c = ids("a"), ids("b"), ids("c")
        later = T0 + timedelta(seconds=1)
        graph.unfollow(a, b, later)  # applied first, happened last
        graph.follow(a, b, T0)
        assert not graph.is_following(a, b)
        graph.follow(a, c, T0)
        graph.unfollow(a, c, later)
        graph.follow(a, c, T0)  # a replay of the older event
        assert not graph.is_following(a, c)
        graph.follow(a, c, later + timedelta(seconds=1))
        assert graph.is_following(a, c)
        assert [u for page in graph.followers(c) for u in page] == [a]

    def test_lists_come_in_pages_in_order(self, backend: Backend, ids: Ids) -> None:
        graph = backend.graph(3)
        star, fan = ids("star"), ids("fan")
        fans = [f"{fan}-{n}" for n in range(7)]
        for f in reversed(fans):
            graph.follow(f, star, T0)
        pages = list(graph.followers(star))
        assert [len(p) for p in pages] == [3, 3, 1]
        assert [u for p in pages for u in p] == sorted(fans)
        ((user, many),) = graph.followers_many([star])
        assert user == star and [u for p in many for u in p] == sorted(fans)
        x, y = ids("x"), ids("y")
        graph.follow(fans[0], y, T0)
        graph.follow(fans[0], x, T0)
        assert [u for p in graph.following(fans[0]) for u in p] == sorted([star, x, y])
        assert graph.following_among(fans[0], [y, ids("nobody"), x]) == sorted([x, y])
        assert graph.following_among(fans[0], []) == []
