"""Purging a tenant's data (``feed tenant purge``; docs/tenants.md, "Purging a tenant").

A tenant's data is wherever its names put it (``feed.keys.Keyspace``, ``feed.cql``): its Redis
keys all start with ``t:<tenant>:``, and its Cassandra rows are the partitions whose key starts
with ``<tenant>\\x1f`` in the tables below. So a purge is a ``SCAN`` of each Redis primary for
the prefix, and a scan of each table's partition keys (every row's, paged: a full read of
the table, as long as the table is large) keeping the tenant's. Both delete in bounded
batches and may be run again: a purge interrupted half-way is finished by the next one.

Only a disabled tenant is purged (its records and requests are refused by then: nothing writes
its data while it goes). Its Kafka records are not: they age out with the topics' retention.
The default tenant is never purged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis

from feed import keys

__all__ = ["PARTITIONS", "purge_cassandra", "purge_redis"]

#: Each table holding tenant data, and its partition key column.
PARTITIONS: tuple[tuple[str, str], ...] = (
    ("activities", "id"),
    ("backfilled", "id"),
    ("outbox", "actor"),
    ("timeline", "user_id"),
    ("followers", "user_id"),
    ("following", "user_id"),
    ("big_accounts", "user_id"),
    ("notify_groups", "user_id"),
    ("notify_items", "user_id"),
)
#: Keys deleted per UNLINK, partitions per read page.
_BATCH = 500


def _primaries(client: redis.Redis) -> Iterator[redis.Redis]:
    """One client per primary: each node of a Redis Cluster holds its own part of the keys."""
    if isinstance(client, redis.RedisCluster):
        for node in client.get_primaries():
            yield client.get_redis_connection(node)
    else:
        yield client


def purge_redis(client: redis.Redis, tenant: str) -> int:
    """Delete every Redis key of ``tenant`` (``t:<tenant>:*``) on every primary; how many."""
    prefix = keys.Keyspace.for_tenant(tenant).prefix
    if not prefix:
        raise ValueError("the default tenant is never purged")
    deleted = 0
    for node in _primaries(client):
        batch: list[bytes] = []
        for key in node.scan_iter(match=prefix + "*", count=1000):
            batch.append(key)
            if len(batch) >= _BATCH:
                deleted += _unlink(node, batch)
                batch = []
        if batch:
            deleted += _unlink(node, batch)
    return deleted


def _unlink(node: redis.Redis, names: list[bytes]) -> int:
    """One ``UNLINK`` per key, pipelined: a cluster node refuses one naming keys of several
    slots (``CROSSSLOT``), even slots it owns."""
    pipe = node.pipeline(transaction=False)
    for name in names:
        pipe.unlink(name)
    return sum(int(n) for n in pipe.execute())


def purge_cassandra(session: Any, keyspace: str, tenant: str) -> dict[str, int]:
    """Delete every partition of ``tenant`` in the tables of :data:`PARTITIONS`; how many per
    table."""
    if tenant == keys.DEFAULT_TENANT:
        raise ValueError("the default tenant is never purged")
    from cassandra.concurrent import execute_concurrent_with_args  # only when purging
    from cassandra.query import SimpleStatement

    scope = tenant + keys.SCOPE_SEPARATOR
    counts: dict[str, int] = {}
    for table, column in PARTITIONS:
        # Every row's partition key, not SELECT DISTINCT: Cassandra 2.1.0 pages DISTINCT
        # queries wrongly over deleted partitions (CASSANDRA-8490), skipping some: seen here,
        # a purge that left a partition behind. A partition's rows come together: one each.
        scan = SimpleStatement(f"SELECT {column} FROM {keyspace}.{table}", fetch_size=5000)
        delete = session.prepare(f"DELETE FROM {keyspace}.{table} WHERE {column} = ?")
        counts[table] = 0
        batch: list[tuple[str]] = []
        last = None
        for row in session.execute(scan):  # page by page: memory stays bounded
            key = row[0]
            if key == last:
                continue
            last = key
            if key.startswith(scope):
                batch.append((key,))
            if len(batch) >= _BATCH:
                execute_concurrent_with_args(session, delete, batch, concurrency=32)
                counts[table] += len(batch)
                batch = []
        if batch:
            execute_concurrent_with_args(session, delete, batch, concurrency=32)
            counts[table] += len(batch)
    return counts
