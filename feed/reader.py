"""Reading a timeline: the hot part from Redis, continuing into Cassandra history.

A page is read from Redis first; if Redis runs out before ``limit`` items (the timeline is capped
at ``timeline_max``), the rest of the page comes from Cassandra strictly after the last order key
seen, so paging crosses the boundary with no gap and no repeat. Bodies missing from Redis (expired)
are read from Cassandra and cached again; an entry whose body is gone everywhere (a deleted
activity) is skipped.

Hot and cold users (``FEED_ACTIVE_DAYS``): only users seen recently (or online) have a Redis
timeline; fan-out writes the others to Cassandra only. A read or a connect marks the user active;
the first one after a quiet period rebuilds the Redis timeline from Cassandra. The rebuild is
single-flight (one builder across all gateways, by an atomic Redis lease; one task per process),
and until it has completed reads are served from Cassandra: no error, no empty feed, no gap.
Redis losing its data (a restart) loses the markers too: the next read or connect starts a new
rebuild, and a rebuild that was in flight then does not mark the timeline complete (its lease is
gone); this process rebuilds again with the new lease. A builder that died is taken over once
its lease expires.

Deletes: Cassandra never returns a deleted activity's body, so a deleted entry left in some
timeline is skipped. A rebuild and the re-caching of bodies read from Cassandra write Redis
through scripts that check each activity's deleted marker atomically, so one that read Cassandra
just before a Delete does not write the activity back (``feed.timelines_redis``).

Large accounts (``FEED_FANOUT_LIMIT``): their activities are not fanned out on write. A page is
the merge of the user's own timeline page and, for each large account the user follows, that
account's outbox page (Redis, then Cassandra) — all in the same order and cut at the same cursor,
so paging stays gap-free and repeat-free.

The stores are protocols (``feed.interfaces``: :class:`~feed.interfaces.AsyncTimelines`,
:class:`~feed.interfaces.History`, :class:`~feed.interfaces.FollowGraph`): the gateway passes
Redis and Cassandra, unit tests the in-memory stores of ``feed.memory``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from typing import Any

import msgspec

from feed.cursor import decode_position, encode_position, split_order_key
from feed.interfaces import AsyncTimelines, FollowGraph, History
from feed.logging import get_logger
from schemas.http import FeedItem, FeedPage

__all__ = ["FeedReader"]

log = get_logger("reader")
_HOT, _REBUILD, _BUILDING = 0, 1, 2
#: Users whose large followees are cached (each entry holds only large accounts: few).
_FOLLOWING_CACHE = 10_000
#: Most large accounts looked up one by one in a user's followees (:meth:`big_followees`).
_BIG_CHECK_MAX = 1000


def _aid(member: str) -> str:
    return split_order_key(member)[1]


class FeedReader:
    def __init__(
        self,
        timelines: AsyncTimelines,
        history: History | None,
        *,
        body_ttl_s: int,
        active_ttl_s: int = 0,
        timeline_max: int = 800,
        graph: FollowGraph | None = None,
    ) -> None:
        self._timelines = timelines
        self._history = history
        self._graph = graph
        self._ttl = body_ttl_s
        self._active_ttl = active_ttl_s
        self._max = timeline_max
        self._rebuilds: dict[str, asyncio.Task[None]] = {}
        self._rebuild_again: dict[str, str] = {}  # user -> newer lease, for the task in flight
        self._big: OrderedDict[str, tuple[tuple[bytes, int], tuple[str, ...]]] = OrderedDict()

    @property
    def timeline_max(self) -> int:
        return self._max

    def for_tenant(self, tenant: str, timeline_max: int | None = None) -> FeedReader:
        """A reader of ``tenant``'s feeds: its views of the same stores (``for_tenant``, which
        the Redis and Cassandra stores have), its timeline cap, its own rebuild and cache state."""

        def view(store: Any) -> Any:
            return None if store is None else store.for_tenant(tenant)

        return FeedReader(
            view(self._timelines),
            view(self._history),
            body_ttl_s=self._ttl,
            active_ttl_s=self._active_ttl,
            timeline_max=self._max if timeline_max is None else timeline_max,
            graph=view(self._graph),
        )

    # --- activity and rebuilds ---------------------------------------------------------------
    async def touch(self, user: str) -> bool:
        """Mark ``user`` active (call on every read and connect). True if Redis can serve them."""
        if self._active_ttl <= 0 or self._history is None:
            return True
        token = secrets.token_hex(8)
        state = await self._timelines.touch(user, self._active_ttl, token)
        if state == _REBUILD:
            if user in self._rebuilds:
                # The lease of the rebuild in flight was lost (Redis restarted, or it expired):
                # that rebuild's data may predate writes Redis skipped. Rebuild again after it.
                self._rebuild_again[user] = token
            else:
                task = asyncio.create_task(self._rebuild(user, token))
                self._rebuilds[user] = task
                task.add_done_callback(lambda _t: self._rebuilds.pop(user, None))
        return state == _HOT

    async def wait_rebuilds(self) -> None:
        """Wait for this process's rebuilds in flight (tests, shutdown)."""
        if self._rebuilds:
            await asyncio.gather(*self._rebuilds.values(), return_exceptions=True)

    async def _rebuild(self, user: str, token: str) -> None:
        assert self._history is not None
        try:
            while True:
                members = await asyncio.to_thread(
                    self._history.page_timeline, user, None, self._max
                )
                bodies = await asyncio.to_thread(self._history.bodies, [_aid(m) for m in members])
                done = await self._timelines.rebuild(
                    user,
                    members,
                    bodies,
                    timeline_max=self._max,
                    body_ttl_s=self._ttl,
                    token=token,
                )
                log.info(
                    "timeline_rebuilt",
                    user_id=user,
                    entries=len(members),
                    complete=done,
                )
                again = self._rebuild_again.pop(user, None)
                if again is None:
                    return
                token = again
        except Exception as exc:
            # The lease expires and the next read or connect rebuilds; reads stay on Cassandra.
            self._rebuild_again.pop(user, None)
            log.warning(
                "timeline_rebuild_failed",
                user_id=user,
                error=type(exc).__name__,
                detail=str(exc)[:200],
            )

    # --- large accounts ----------------------------------------------------------------------
    async def big_followees(self, user: str) -> list[str]:
        """The large accounts ``user`` follows (merged at read time, pushed via actor channels),
        in followee order.

        Large accounts are few by design, so this is {large accounts} ∩ {followed by ``user``}
        computed from the small side: each large account is looked up in ``user``'s partition of
        the follow graph (``IN`` queries of 100), never the whole list of whom ``user`` follows.
        Should there be more than ``_BIG_CHECK_MAX`` large accounts, the followees are paged
        instead and each page is looked up in the set; either way no Redis command names more
        than 1,000 members. Cached per user under (the user's following version, the size of
        the large-account set, which only grows): any follow, unfollow or newly marked large
        account recomputes it.
        """
        graph = self._graph
        if graph is None:
            return []
        version, big_count = await self._timelines.big_state(user)
        if big_count <= 1:  # only the sentinel (or nothing): no large account anywhere
            return []
        state = (version, big_count)
        cached = self._big.get(user)
        if cached is not None and cached[0] == state:
            self._big.move_to_end(user)
            return list(cached[1])
        if big_count - 1 <= _BIG_CHECK_MAX:
            big = await self._timelines.big_accounts()
            found = await asyncio.to_thread(graph.following_among, user, big)
        else:
            found = []
            pages = graph.following(user)
            while (page := await asyncio.to_thread(next, pages, None)) is not None:
                found += await self._timelines.big_among(page)
        self._big[user] = (state, tuple(found))
        while len(self._big) > _FOLLOWING_CACHE:
            self._big.popitem(last=False)
        return found

    # --- pages -------------------------------------------------------------------------------
    async def page(self, user: str, cursor: str | None, limit: int) -> FeedPage:
        """One page of ``user``'s timeline, newest first. Raises CursorError on a bad cursor."""
        before = decode_position(cursor) if cursor else None
        members, bodies = await self._timeline_page(user, before, limit)
        big = await self.big_followees(user)
        if big:
            merged = set(members)
            pages = await self._timelines.outbox_pages(big, before, limit)
            for actor, part in pages.items():
                if len(part) < limit and self._history is not None:
                    after = part[-1] if part else before
                    part = part + await asyncio.to_thread(
                        self._history.outbox, actor, limit - len(part), after
                    )
                merged.update(part)
            members = sorted(merged, reverse=True)[:limit]
            wanted = [m for m in members if _aid(m) not in bodies]
            bodies.update({_aid(m): b for m, b in (await self._timelines.bodies(wanted)).items()})
        missing = [_aid(m) for m in members if _aid(m) not in bodies]
        if missing and self._history is not None:
            fetched = await asyncio.to_thread(self._history.bodies, missing)
            bodies.update(fetched)
            await self._timelines.cache_bodies(fetched, self._ttl)
        items = [
            FeedItem(cursor=encode_position(m), activity=msgspec.Raw(bodies[_aid(m)]))
            for m in members
            if _aid(m) in bodies
        ]
        next_cursor = encode_position(members[-1]) if len(members) >= limit else None
        return FeedPage(items=items, next=next_cursor)

    async def _timeline_page(
        self, user: str, before: str | None, limit: int
    ) -> tuple[list[str], dict[str, bytes]]:
        members: list[str] = []
        bodies: dict[str, bytes] = {}
        if await self.touch(user):
            hot = await self._timelines.page(user, before, limit)
            members = list(hot.members)
            bodies = {_aid(m): b for m, b in hot.bodies.items()}
        if len(members) < limit and self._history is not None:
            after = members[-1] if members else before
            members += await asyncio.to_thread(
                self._history.page_timeline, user, after, limit - len(members)
            )
        return members, bodies
