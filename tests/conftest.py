"""Test session fixtures: the real servers (Redis, the Kafka-protocol broker, Cassandra).

They start once per session, on free ports, under a temporary directory, only when a test asks
for them (unit tests need none), and stop at the end. Tests isolate themselves by using unique
user and activity ids (``ids`` fixture), not by restarting servers.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from feed.settings import Settings

TEST_JWT_SECRET = "test-secret-" + "s" * 40
TEST_INGEST_TOKEN = "test-ingest-token-0123456789"


def wait_for(
    predicate: Callable[[], Any],
    *,
    timeout: float,
    interval: float = 0.05,
    message: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from feed.kafka import create_topics
    from feed.stores import create_schema, open_cassandra
    from infra import LocalStack

    workdir = Path(tmp_path_factory.mktemp("stack"))
    local = LocalStack(workdir, partitions=4)
    local.start()
    try:
        settings = Settings.from_env(local.env())
        create_topics(settings)
        session = open_cassandra(settings, keyspace=False)
        create_schema(session, settings.cassandra_keyspace)
        session.cluster.shutdown()
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def stack_env(stack: Any) -> dict[str, str]:
    env = dict(stack.env())
    env.update(
        FEED_JWT_SECRET=TEST_JWT_SECRET,
        FEED_INGEST_TOKEN=TEST_INGEST_TOKEN,
        # INFRA.md: the broker's group join takes ~session.timeout/2; keep it short in tests.
        FEED_KAFKA_SESSION_TIMEOUT_MS="6000",
        FEED_KAFKA_HEARTBEAT_MS="500",
        FEED_LOG_FORMAT="json",
    )
    return env


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Redis Cluster of 3 masters (``infra.RedisCluster``), started for the first test
    that asks; its ``url`` names a seed node."""
    from infra import RedisCluster

    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"), masters=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Redis Cluster of 3 masters with one replica each, for the tests of acknowledged
    (replicated) writes; no test kills its nodes (the fault tests start their own)."""
    from infra import RedisCluster

    cluster = RedisCluster(
        tmp_path_factory.mktemp("redis-cluster-replicas"), masters=3, replicas=1
    ).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def settings(stack_env: dict[str, str]) -> Settings:
    return Settings.from_env(stack_env)


@pytest.fixture(scope="session")
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def cassandra(settings: Settings) -> Iterator[Any]:
    from feed.stores import open_cassandra

    session = open_cassandra(settings)
    yield session
    session.cluster.shutdown()


_counter = itertools.count()


@pytest.fixture
def ids() -> Callable[[str], str]:
    """Unique names for this test: ``ids("u1")`` -> ``u1-<run>-<n>``."""
    run = uuid.uuid4().hex[:8]
    n = next(_counter)
    return lambda name: f"{name}-{run}-{n}"


def pytest_configure(config: pytest.Config) -> None:
    # Child processes started by tests log JSON to files, never to the terminal.
    os.environ.setdefault("FEED_LOG_FORMAT", "json")
