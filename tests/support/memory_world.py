"""A fan-out processor on fresh in-memory stores (``feed.memory``), for unit tests."""

from __future__ import annotations

from dataclasses import dataclass

from fanout.followers import FollowerCache
from fanout.processor import Processor
from feed.memory import (
    MemoryFollowGraph,
    MemoryGraphVersions,
    MemoryHistory,
    MemoryRedis,
    MemoryTimelines,
)
from feed.notify import MemoryNotifications

__all__ = ["World", "make"]


@dataclass
class World:
    redis: MemoryRedis
    timelines: MemoryTimelines
    history: MemoryHistory
    graph: MemoryFollowGraph
    processor: Processor
    notifications: MemoryNotifications

    def timeline(self, user: str) -> list[str]:
        """The user's hot timeline (activity ids, newest first); history must agree."""
        hot = [m.partition(":")[2] for m in self.timelines.page(user, None, 1000).members]
        durable = [m.partition(":")[2] for m in self.history.page_timeline(user, None, 1000)]
        assert hot == durable, "the hot timeline and history disagree"
        return hot


def make(
    *,
    fanout_limit: int = 0,
    backfill: int = 3,
    history_timelines: bool = True,
    timeline_max: int = 50,
    only_active: bool = False,
) -> World:
    """Fresh stores and a processor on them (``close()`` the processor when done)."""
    redis, history, graph = MemoryRedis(), MemoryHistory(), MemoryFollowGraph()
    versions = MemoryGraphVersions(redis)
    timelines = MemoryTimelines(
        redis, timeline_max=timeline_max, stream_history=100, only_active=only_active
    )
    processor = Processor(
        timelines=timelines,
        history=history,
        graph=graph,
        versions=versions,
        followers=FollowerCache(graph, versions, history=history, fanout_limit=fanout_limit),
        history_timelines=history_timelines,
        follow_backfill=backfill,
        notifications=(notifications := MemoryNotifications()),
    )
    return World(redis, timelines, history, graph, processor, notifications)
