"""``feed tenant purge`` as an operator runs it (a subprocess), on the session's Redis and
Cassandra: a disabled tenant's keys and partitions go, its row stays (disabled); the default
tenant's data of the same ids stays whole; an enabled tenant, one disabled a moment ago,
``default``, or a purge without ``--yes`` is refused and changes nothing."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis

from feed.cursor import order_key
from feed.graph_cassandra import CassandraFollowGraph
from feed.history_cassandra import CassandraHistory
from feed.interfaces import HistoryRecord, Insert
from feed.keys import Keyspace
from feed.settings import Settings
from feed.tenant_purge import PARTITIONS
from feed.tenants import DISABLED, Credentials
from feed.tenants_cassandra import CassandraTenants
from feed.timelines_redis import RedisTimelines
from tests.support.procs import feed_cli


def _purge(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return feed_cli(env, "tenant", "purge", *args)


def test_a_disabled_tenants_data_goes_and_the_default_tenants_stays(
    stack_env: dict[str, str],
    settings: Settings,
    redis_client: redis.Redis,
    cassandra: Any,
    ids: Callable[[str], str],
) -> None:
    tid = f"purge-{uuid.uuid4().hex[:8]}"
    registry = CassandraTenants(cassandra, settings.cassandra_keyspace)
    registry.create(tid, Credentials.generate())
    u1, u2, a = ids("u1"), ids("u2"), ids("a")
    timelines = RedisTimelines(redis_client, timeline_max=10, stream_history=10, body_ttl_s=600)
    history = CassandraHistory(cassandra, settings.cassandra_keyspace)
    graph = CassandraFollowGraph(cassandra, settings.cassandra_keyspace)
    for tenant in ("default", tid):
        timelines.for_tenant(tenant).insert([Insert(order_key(1, a), a, b"{}", [u1])])
        record = HistoryRecord(a, u2, 1, b"{}", [u1])
        history.for_tenant(tenant).put_activities([record])
        history.for_tenant(tenant).put_deliveries([record])
        history.for_tenant(tenant).mark_big(u2)
        graph.for_tenant(tenant).follow(u1, u2, datetime.now(UTC))

    # refused: still enabled; then disabled a moment ago (not every process knows yet); then
    # without --yes; and the default tenant, ever
    env = {**stack_env, "FEED_TENANT_REFRESH_S": "0.5"}
    assert _purge(env, tid, "--yes").returncode == 2
    registry.set_state(tid, DISABLED)
    early = _purge(env, tid, "--yes")
    assert early.returncode == 1 and "a moment ago" in early.stderr
    time.sleep(1.0)  # the settle time the command asks for (twice the refresh period)
    assert _purge(env, tid).returncode == 2
    assert _purge(env, "default", "--yes").returncode == 2
    prefix = Keyspace.for_tenant(tid).prefix
    before = len(list(redis_client.scan_iter(match=prefix + "*", count=1000)))
    assert before

    done = _purge(env, tid, "--yes")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tenant"] == tid and report["redis_keys"] == before
    assert set(report["cassandra_partitions"]) == {table for table, _ in PARTITIONS}
    assert report["cassandra_partitions"]["activities"] == 1
    assert report["cassandra_partitions"]["followers"] == 1
    assert report["cassandra_partitions"]["following"] == 1
    assert not list(redis_client.scan_iter(match=prefix + "*", count=1000))
    mine = history.for_tenant(tid)
    assert mine.stored(a) is None and mine.page_timeline(u1, None, 10) == []
    assert u2 not in mine.big_accounts()
    assert not graph.for_tenant(tid).is_following(u1, u2)
    kept = registry.get(tid)  # the name stays taken, disabled: never served with leftovers
    assert kept is not None and not kept.enabled

    # the default tenant's data of the same ids is whole
    assert timelines.size(u1) == 1
    assert history.activity(a) == (u2, 1, b"{}")
    assert history.page_timeline(u1, None, 10) == [order_key(1, a)]
    assert graph.is_following(u1, u2) and u2 in history.big_accounts()
