"""The Redis stores on a real Redis Cluster (3 masters, ``infra.RedisCluster``) meet the same
shared suites as on one Redis (``test_interfaces.py``) and in memory: every call they make stays
in one hash slot, and what they promise holds across slots and nodes."""

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
from tests.support.suites.graph_versions import GraphVersionsSuite
from tests.support.suites.subscriber import SubscriberSuite
from tests.support.suites.timelines import TimelinesSuite


@pytest.fixture(params=["default", "acme"])  # the default tenant, and another (for_tenant)
async def backend(
    request: pytest.FixtureRequest, redis_cluster: Any, cassandra: Any, settings: Settings
) -> AsyncIterator[Backend]:
    client = redis.RedisCluster.from_url(redis_cluster.url)
    async_client = aioredis.RedisCluster.from_url(redis_cluster.url)
    keyspace = settings.cassandra_keyspace
    try:
        yield real_backend(client, async_client, cassandra, keyspace, request.param)
    finally:
        await async_client.aclose()
        client.close()


class TestTimelines(TimelinesSuite):
    pass


class TestDeliveryStream(DeliveryStreamSuite):
    pass


class TestGraphVersions(GraphVersionsSuite):
    pass


class TestAsyncTimelines(AsyncTimelinesSuite):
    pass


class TestSubscriber(SubscriberSuite):
    pass
