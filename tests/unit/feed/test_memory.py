"""The in-memory stores (``feed.memory``) meet the shared suite of every store protocol: the
same checks the Redis and Cassandra implementations meet in
``tests/integration/feed/test_interfaces.py``."""

from __future__ import annotations

import pytest

from tests.support.backends import Backend, memory_backend
from tests.support.suites.async_timelines import AsyncTimelinesSuite
from tests.support.suites.delivery import DeliveryStreamSuite
from tests.support.suites.follow_graph import FollowGraphSuite
from tests.support.suites.graph_versions import GraphVersionsSuite
from tests.support.suites.history import HistorySuite
from tests.support.suites.subscriber import SubscriberSuite
from tests.support.suites.timelines import TimelinesSuite


@pytest.fixture
def backend() -> Backend:
    return memory_backend()


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
