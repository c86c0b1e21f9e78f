"""The consistency-level settings reach every statement the stores run (real Cassandra)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.policies import TokenAwarePolicy

from feed import cql
from feed.cursor import order_key
from feed.graph_cassandra import CassandraFollowGraph
from feed.history_cassandra import CassandraHistory, _batched
from feed.notify_cassandra import CassandraNotifyStore
from feed.settings import Settings
from feed.stores import open_cassandra


def test_reads_and_writes_take_their_levels_from_the_settings(
    settings: Settings, ids: Callable[[str], str]
) -> None:
    chosen = dataclasses.replace(
        settings, cassandra_read_consistency="ONE", cassandra_write_consistency="ALL"
    )
    session = open_cassandra(chosen)
    try:
        assert isinstance(
            session.cluster.profile_manager.default.load_balancing_policy, TokenAwarePolicy
        )
        ks = settings.cassandra_keyspace
        stores: list[Any] = [
            CassandraHistory(session, ks),
            CassandraFollowGraph(session, ks),
            CassandraNotifyStore(session, ks),
        ]
        prepared = [
            value
            for store in stores
            for value in vars(store).values()
            if hasattr(value, "query_string")
        ]
        assert len(prepared) > 30
        for statement in prepared:
            reads = statement.query_string.startswith("SELECT")
            want = ConsistencyLevel.ONE if reads else ConsistencyLevel.ALL
            assert statement.consistency_level == want, statement.query_string
        history = stores[0]
        batches, _ = _batched([(history._put_backfilled, ("a", "u"))], cql.write_level(session))
        assert batches[0][0].consistency_level == ConsistencyLevel.ALL
        # A write at ALL on this one node, a read at ONE: they run.
        user = ids("lvl")
        assert history.write_timeline_rows([(user, 5, "a1", "x")]) == 1
        assert history.page_timeline(user, None, 10) == [order_key(5, "a1")]
    finally:
        session.cluster.shutdown()
