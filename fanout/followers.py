"""Follower lists for fan-out, cached per worker and invalidated across workers.

Every change to a user's followers sets its version to a new one
(:class:`feed.interfaces.GraphVersions`; ``gv:{user}`` in Redis: never a value seen before, even
after Redis lost its data). Before using cached lists for a batch,
the worker reads the current versions of all the batch's actors in one round trip (plus one to
install a version where none exists) and reloads the lists whose version moved, so a follow
applied by another worker is seen by the next batch. Lists are read from Cassandra in pages;
cached lists are tuples of the strings the driver returned (no per-follower objects are built per
activity).

Large accounts (hybrid fan-out): an account with more than ``fanout_limit`` followers is marked
*big* — in Cassandra (durable) and in the Redis set ``big-accounts`` (what every process reads) —
and from then on is never fanned out on write: :meth:`FollowerCache.get_many` returns ``None`` for
it, without reading more than ``fanout_limit + 1`` followers. The mark is sticky: activities that
were merged at read time must stay visible, so an account never goes back to fan-out on write.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence

from feed.graph_versions_redis import BIG_SENTINEL
from feed.interfaces import FollowGraph, GraphVersions, History

__all__ = ["BIG_SENTINEL", "FollowerCache"]


class FollowerCache:
    def __init__(
        self,
        graph: FollowGraph,
        versions: GraphVersions,
        *,
        history: History | None = None,
        fanout_limit: int = 0,
        max_entries: int = 2_000_000,
    ) -> None:
        """``max_entries`` bounds the cache: each cached list costs one plus its followers
        (:attr:`size`); the least recently used lists are evicted past it."""
        self._graph = graph
        self._versions = versions
        self._history = history
        self._limit = fanout_limit
        self._max = max_entries
        self._size = 0
        self._lists: OrderedDict[str, tuple[bytes, tuple[str, ...]]] = OrderedDict()

    def get_many(self, users: Sequence[str]) -> dict[str, tuple[str, ...] | None]:
        """Current followers of each user; ``None`` for big accounts (merged at read time)."""
        if not users:
            return {}
        state = self._versions.follower_state(users, big=bool(self._limit))
        versions, big = state.versions, state.big
        if state.big_lost:
            big = self._restore_big(users)
        out: dict[str, tuple[str, ...] | None] = {}
        missing: dict[str, bytes] = {}
        for user, version, is_big in zip(users, versions, big, strict=True):
            if is_big:
                out[user] = None
                continue
            cached = self._lists.get(user)
            if cached is not None and cached[0] == version:
                self._lists.move_to_end(user)
                out[user] = cached[1]
                continue
            missing[user] = version
        if missing:
            for user, pages in self._graph.followers_many(list(missing)):
                followers = self._collect(pages)
                if followers is None:
                    self.mark_big(user)
                else:
                    self._store(user, missing[user], followers)
                out[user] = followers
        return {user: out[user] for user in users}

    def mark_big(self, user: str) -> None:
        if self._history is not None:
            self._history.mark_big(user)
        self._versions.add_big([user])
        self.invalidate([user])

    def _restore_big(self, users: Sequence[str]) -> list[bool]:
        """The store lost the large-account set (a Redis restart): reload it from history."""
        known = self._history.big_accounts() if self._history is not None else set()
        self._versions.add_big(known)
        return [u in known for u in users]

    def _collect(self, pages: Iterator[list[str]]) -> tuple[str, ...] | None:
        followers: list[str] = []
        for page in pages:
            followers.extend(page)
            if self._limit and len(followers) > self._limit:
                return None
        return tuple(followers)

    def __len__(self) -> int:
        """How many users' lists are cached."""
        return len(self._lists)

    def __contains__(self, user: object) -> bool:
        """Whether ``user``'s list is cached (whatever its version)."""
        return user in self._lists

    @property
    def size(self) -> int:
        """What the cached lists cost against ``max_entries``: one per list plus one per
        follower, so lists of no follower count too and the cap bounds the number of lists."""
        return self._size

    def invalidate(self, users: Iterable[str]) -> None:
        for user in users:
            entry = self._lists.pop(user, None)
            if entry is not None:
                self._size -= _cost(entry[1])

    def _store(self, user: str, version: bytes, followers: tuple[str, ...]) -> None:
        self.invalidate([user])
        cost = _cost(followers)
        if cost > self._max:
            return
        self._lists[user] = (version, followers)
        self._size += cost
        while self._size > self._max and self._lists:
            _, (_, evicted) = self._lists.popitem(last=False)
            self._size -= _cost(evicted)


def _cost(followers: tuple[str, ...]) -> int:
    """An entry's share of ``max_entries``: the list itself (its key, version and tuple, even
    when empty) and its followers."""
    return 1 + len(followers)
