"""Opening the stores from settings, and the Cassandra schema (``feed migrate``)."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from cassandra import InvalidRequest
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import (
    DCAwareRoundRobinPolicy,
    ExponentialReconnectionPolicy,
    TokenAwarePolicy,
)

from feed import cql
from feed.graph_cassandra import CassandraFollowGraph
from feed.history_cassandra import CassandraHistory
from feed.settings import Settings

__all__ = [
    "ADDED_COLUMNS",
    "CassandraFollowGraph",
    "CassandraHistory",
    "create_schema",
    "open_cassandra",
    "replication",
    "schema_statements",
]


def open_cassandra(settings: Settings, *, keyspace: bool = True, timeout: float = 10.0) -> Session:
    """Connect to the cluster named by the settings (blocking).

    Requests go to a replica of their partition first (token-aware), in the local data centre
    (``FEED_CASSANDRA_LOCAL_DC``, else the contact points'). The default execution profile
    carries the read consistency level, :data:`feed.cql.WRITE_PROFILE` the write level: the
    stores prepare their statements at those (``feed.cql``)."""

    def profile(level: str) -> ExecutionProfile:
        # One policy object per profile: the driver initialises each with the cluster's hosts.
        policy = TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=settings.cassandra_local_dc))
        return ExecutionProfile(
            load_balancing_policy=policy, request_timeout=20.0, consistency_level=cql.level(level)
        )

    kwargs: dict[str, Any] = {
        "contact_points": list(settings.cassandra_hosts),
        "port": settings.cassandra_port,
        "execution_profiles": {
            EXEC_PROFILE_DEFAULT: profile(settings.cassandra_read_consistency),
            cql.WRITE_PROFILE: profile(settings.cassandra_write_consistency),
        },
        "connect_timeout": timeout,
        # The driver's default waits up to 600 s between attempts and gives up after 64: a
        # store outage must end within seconds of Cassandra coming back, however long it lasted.
        "reconnection_policy": ExponentialReconnectionPolicy(0.5, 5.0, max_attempts=None),
        "control_connection_timeout": timeout,
        # Without it, a request larger than one TCP segment waits for the delayed ACK of its
        # first part (Nagle): measured here, an UNLOGGED batch of 19 activities took 46 ms
        # instead of ~2 ms. The driver leaves the socket option to the application.
        "sockopts": [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    }
    if settings.cassandra_protocol_version is not None:
        kwargs["protocol_version"] = settings.cassandra_protocol_version
    cluster = Cluster(**kwargs)
    session = cluster.connect(settings.cassandra_keyspace if keyspace else None)
    return session


def replication(settings: Settings) -> dict[str, str | int]:
    """The keyspace's replication map from the settings: ``SimpleStrategy`` at
    ``FEED_CASSANDRA_REPLICATION_FACTOR``, or ``NetworkTopologyStrategy`` with the factor of each
    data centre of ``FEED_CASSANDRA_DATACENTERS`` (none named: the local data centre, or
    ``datacenter1``, Cassandra's default name, at ``FEED_CASSANDRA_REPLICATION_FACTOR``)."""
    factor = settings.cassandra_replication_factor
    if settings.cassandra_replication_strategy == "SimpleStrategy":
        return {"class": "SimpleStrategy", "replication_factor": factor}
    pairs = [pair.split(":") for pair in settings.cassandra_datacenters] or [
        [settings.cassandra_local_dc or "datacenter1", str(factor)]
    ]
    return {"class": "NetworkTopologyStrategy", **{dc: int(n) for dc, n in pairs}}


def _replication_cql(spec: int | Mapping[str, str | int]) -> str:
    if isinstance(spec, int):
        spec = {"class": "SimpleStrategy", "replication_factor": spec}
    # Names are quoted CQL strings (a data centre name may hold any character but a quote).
    entries = (f"'{k}': {v!r}" if isinstance(v, int) else f"'{k}': '{v}'" for k, v in spec.items())
    return "{" + ", ".join(entries) + "}"


def schema_statements(
    keyspace: str, replication_spec: int | Mapping[str, str | int] = 1
) -> list[str]:
    """The CQL that ``feed migrate`` runs: every statement is ``IF NOT EXISTS``.
    ``replication_spec``: a ``SimpleStrategy`` factor, or a replication map
    (:func:`replication`)."""
    ks, spec = keyspace, replication_spec
    return [
        f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {_replication_cql(spec)}",
        # Each activity once, owned by its first create: the canonical JSON body, and who it
        # reached by fan-out (newline-separated user ids, one cell: a Delete reaches exactly
        # those timelines). A deleted activity keeps its row (actor, ts, deleted = true) without
        # body, so it stays deleted and owned. (Older schemas get `deleted` added: see below.)
        f"CREATE TABLE IF NOT EXISTS {ks}.activities ("
        " id text PRIMARY KEY, actor text, ts bigint, body blob, recipients blob, deleted boolean)",
        # Who got an activity later, from a follow's backfill (a Delete reaches them too).
        f"CREATE TABLE IF NOT EXISTS {ks}.backfilled ("
        " id text, user_id text, PRIMARY KEY ((id), user_id))",
        # A user's own activities, newest first (follow backfill, read-time merge).
        f"CREATE TABLE IF NOT EXISTS {ks}.outbox ("
        " actor text, ts bigint, id text, PRIMARY KEY ((actor), ts, id))"
        " WITH CLUSTERING ORDER BY (ts DESC, id DESC)",
        # Durable per-user timeline, same order as the Redis sorted set.
        f"CREATE TABLE IF NOT EXISTS {ks}.timeline ("
        " user_id text, ts bigint, id text, actor text, PRIMARY KEY ((user_id), ts, id))"
        " WITH CLUSTERING ORDER BY (ts DESC, id DESC)",
        # The follow graph in both directions. Writes carry the event time as their timestamp,
        # so follow/unfollow of one pair resolve by event time whatever the processing order.
        f"CREATE TABLE IF NOT EXISTS {ks}.followers ("
        " user_id text, follower text, PRIMARY KEY ((user_id), follower))",
        f"CREATE TABLE IF NOT EXISTS {ks}.following ("
        " user_id text, followee text, PRIMARY KEY ((user_id), followee))",
        # Accounts over FEED_FANOUT_LIMIT followers: merged at read time. Sticky.
        f"CREATE TABLE IF NOT EXISTS {ks}.big_accounts (user_id text PRIMARY KEY)",
        # Notification feeds (feed.notify_cassandra): each user's groups and their activities,
        # one partition per user; everything else a group shows is derived from these.
        f"CREATE TABLE IF NOT EXISTS {ks}.notify_groups ("
        " user_id text, gid text, gkey text, type text, object text, opened bigint,"
        " open boolean, seen boolean, read boolean, PRIMARY KEY ((user_id), gid))",
        f"CREATE TABLE IF NOT EXISTS {ks}.notify_items ("
        " user_id text, gid text, aid text, actor text, ts bigint,"
        " PRIMARY KEY ((user_id), gid, aid))",
        # The tenant registry (feed.tenants_cassandra): one row per tenant, read whole by every
        # process every FEED_TENANT_REFRESH_S. Only the SHA-256 of an ingest token is kept; the
        # credentials a rotation replaced map to when they expire; a null quota keeps the setting.
        f"CREATE TABLE IF NOT EXISTS {ks}.tenants ("
        " id text PRIMARY KEY, state text, created timestamp, updated timestamp,"
        " ingest_sha256 blob, jwt_secret text,"
        " prev_ingest map<blob, timestamp>, prev_jwt map<text, timestamp>,"
        " ingest_rate double, ingest_burst int, max_connections int,"
        " max_connections_per_user int, timeline_max int, fanout_rate double)",
    ]


#: Columns added to tables after their first release: (table, column, type). ``feed migrate``
#: adds each one that a table created by an older release lacks.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (("activities", "deleted", "boolean"),)


def create_schema(
    session: Session, keyspace: str, replication_spec: int | Mapping[str, str | int] = 1
) -> None:
    """Create the keyspace and tables if missing, and add the columns that tables created by an
    older release lack (:data:`ADDED_COLUMNS`). Safe to run any number of times, also by several
    processes at once."""
    for statement in schema_statements(keyspace, replication_spec):
        session.execute(statement, timeout=60)
    for table, column, kind in ADDED_COLUMNS:
        if _has_column(session, keyspace, table, column):
            continue
        try:
            session.execute(f"ALTER TABLE {keyspace}.{table} ADD {column} {kind}", timeout=60)
        except InvalidRequest:
            # Another migrate added it between our check and our ALTER: fine if it is there now.
            session.cluster.refresh_table_metadata(keyspace, table)
            if not _has_column(session, keyspace, table, column):
                raise


def _has_column(session: Session, keyspace: str, table: str, column: str) -> bool:
    meta = session.cluster.metadata.keyspaces.get(keyspace)
    tables = meta.tables if meta is not None else {}
    return table in tables and column in tables[table].columns
