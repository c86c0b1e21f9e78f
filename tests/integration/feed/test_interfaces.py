"""The Redis and Cassandra stores meet the shared suite of every store protocol: the same checks
the in-memory stores (``feed.memory``) meet in ``tests/unit/feed/test_memory.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from feed.settings import Settings
from tests.support.backends import Backend, real_backend
from tests.support.suites.async_timelines import AsyncTimelinesSuite
from tests.support.suites.delivery import DeliveryStreamSuite
from tests.support.suites.follow_graph import FollowGraphSuite
from tests.support.suites.graph_versions import GraphVersionsSuite
from tests.support.suites.history import HistorySuite
from tests.support.suites.subscriber import SubscriberSuite
from tests.support.suites.timelines import TimelinesSuite


@pytest.fixture
async def backend(
    redis_client: redis.Redis, cassandra: Any, settings: Settings
) -> AsyncIterator[Backend]:
    async_client = aioredis.Redis.from_url(settings.redis_url)
    try:
        yield real_backend(redis_client, async_client, cassandra, settings.cassandra_keyspace)
    finally:
        await async_client.aclose()


class TestTimelines(TimelinesSuite):
    pass


class TestAsyncTimelines(AsyncTimelinesSuite):
    pass


class TestDeliveryStream(DeliveryStreamSuite):
    pass


class TestHistory(HistorySuite):
    pass


class TestFollowGraph(FollowGraphSuite):
    pass


class TestGraphVersions(GraphVersionsSuite):
    pass


class TestSubscriber(SubscriberSuite):
    pass
