"""CassandraHistory and CassandraFollowGraph against the real Cassandra of the test session."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from cassandra.query import BatchStatement

from feed.cursor import order_key
from feed.graph_cassandra import CassandraFollowGraph
from feed.history_cassandra import BATCH_BYTES, CassandraHistory
from feed.interfaces import HistoryRecord, Stored
from feed.stores import create_schema


def _record(aid: str, actor: str, ts: int, users: list[str]) -> HistoryRecord:
    return HistoryRecord(aid, actor, ts, b'{"id":"%s"}' % aid.encode(), users)


def test_activities_timelines_and_recipients(
    cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    history = CassandraHistory(cassandra, settings.cassandra_keyspace)
    actor, u2, u3, a = ids("u1"), ids("u2"), ids("u3"), ids("a")
    records = [_record(f"{a}-{n}", actor, 1000 + n, [u2, u3]) for n in range(3)]
    history.put_activities(records)
    assert history.put_deliveries(records) == 6
    history.put_deliveries(records)  # replay overwrites
    assert history.page_timeline(u2, None, 10) == [
        order_key(1000 + n, f"{a}-{n}") for n in (2, 1, 0)
    ]
    assert history.activity(f"{a}-1") == (actor, 1001, records[1].body)
    assert sorted(u for page in history.recipients(f"{a}-0") for u in page) == sorted([u2, u3])
    assert history.outbox(actor, 2) == [order_key(1002, f"{a}-2"), order_key(1001, f"{a}-1")]
    assert history.bodies([f"{a}-0", "missing"]) == {f"{a}-0": records[0].body}


def test_timeline_pages_without_gaps_including_ties(
    cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    history = CassandraHistory(cassandra, settings.cassandra_keyspace)
    user, a = ids("u"), ids("a")
    # Published times crossing digit boundaries (9, 10, 99, 100, ...), three rows each (ties
    # broken by id); the expected order is the (published, id) tuples', not the keys'.
    stamps = [10**k + d for k in range(1, 16) for d in range(-3, 3)]
    rows = [(user, stamps[n // 3], f"{a}-{n:03d}", "x") for n in range(250)]
    history.write_timeline_rows(rows)
    expected = [
        order_key(ts, aid)
        for ts, aid in sorted(((ts, aid) for _, ts, aid, _ in rows), reverse=True)
    ]
    seen: list[str] = []
    before = None
    while True:
        page = history.page_timeline(user, before, 17)
        if not page:
            break
        seen += page
        before = page[-1]
    assert seen == expected


def test_remove_and_delete(cassandra: Any, settings: Any, ids: Callable[[str], str]) -> None:
    history = CassandraHistory(cassandra, settings.cassandra_keyspace)
    actor, user, a = ids("u1"), ids("u2"), ids("a")
    record = _record(a, actor, 77, [user])
    history.put_activities([record])
    history.put_deliveries([record])
    history.add_backfilled([(a, ids("late"))])
    history.remove_from_timelines([(user, 77, a)])
    history.mark_deleted(a, actor, 77)
    # Deleted, but still owned (and its recipients still known until the delete finishes).
    assert history.stored(a) == Stored(actor, 77, None, True)
    assert history.activity(a) is None and history.bodies([a]) == {}
    assert sorted(u for page in history.recipients(a) for u in page) == sorted([user, ids("late")])
    history.finish_delete(a)
    assert history.page_timeline(user, None, 10) == []
    assert history.outbox(actor, 10) == []
    assert list(history.recipients(a)) == []
    assert history.stored(a) == Stored(actor, 77, None, True)


def test_stored_many_reads_a_batch_of_ids_in_chunks(
    cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    history = CassandraHistory(cassandra, settings.cassandra_keyspace)
    actor, a = ids("u1"), ids("a")
    records = [_record(f"{a}-{n}", actor, 1000 + n, []) for n in range(250)]
    history.put_activities(records[:200])
    got = history.stored_many([r.activity_id for r in records])
    assert got == {r.activity_id: Stored(actor, r.ts, r.body, False) for r in records[:200]}


def test_migrate_adds_the_deleted_column_to_an_old_activities_table(
    cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    """A keyspace made by the release before durable deletes: ``feed migrate`` (create_schema)
    adds the ``deleted`` column and the ``backfilled`` table, and can run again."""
    ks = ids("old").replace("-", "_")
    cassandra.execute(
        f"CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', "
        "'replication_factor': 1}",
        timeout=60,
    )
    try:
        cassandra.execute(
            f"CREATE TABLE {ks}.activities (id text PRIMARY KEY, actor text, ts bigint,"
            " body blob, recipients blob)",
            timeout=60,
        )
        cassandra.execute(
            f"INSERT INTO {ks}.activities (id, actor, ts, body) VALUES ('a', 'u', 1, 0x7b7d)"
        )
        create_schema(cassandra, ks)
        create_schema(cassandra, ks)  # idempotent
        history = CassandraHistory(cassandra, ks)
        assert history.stored("a") == Stored("u", 1, b"{}", False)
        history.mark_deleted("a", "u", 1)
        assert history.stored("a") == Stored("u", 1, None, True)
        assert list(history.recipients("a")) == []
    finally:
        cassandra.execute(f"DROP KEYSPACE {ks}", timeout=60)


def test_follow_graph_pages(cassandra: Any, settings: Any, ids: Callable[[str], str]) -> None:
    graph = CassandraFollowGraph(cassandra, settings.cassandra_keyspace, page_size=7)
    star = ids("star")
    fans = [ids("fan") + f"-{n:02d}" for n in range(30)]
    now = datetime.now(UTC)
    for fan in fans:
        graph.follow(fan, star, now)
    pages = list(graph.followers(star))
    assert len(pages) >= 5 and all(len(p) <= 7 for p in pages)
    assert sorted(f for p in pages for f in p) == sorted(fans)
    assert [f for p in graph.following(fans[0]) for f in p] == [star]
    assert graph.is_following(fans[0], star)


def test_followers_of_many_users_are_read_concurrently_and_paged(
    cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    graph = CassandraFollowGraph(cassandra, settings.cassandra_keyspace, page_size=7)
    stars = [ids("star") + f"-{n}" for n in range(40)]
    fans = {star: [f"{star}-fan-{k:02d}" for k in range(n % 20)] for n, star in enumerate(stars)}
    now = datetime.now(UTC)
    for star, star_fans in fans.items():
        for fan in star_fans:
            graph.follow(fan, star, now)
    got = {user: [f for page in pages for f in page] for user, pages in graph.followers_many(stars)}
    assert list(got) == stars
    assert {user: sorted(f) for user, f in got.items()} == {u: sorted(f) for u, f in fans.items()}


def test_follow_and_unfollow_resolve_by_event_time(
    cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    graph = CassandraFollowGraph(cassandra, settings.cassandra_keyspace)
    a, b = ids("a"), ids("b")
    t0 = datetime.now(UTC)
    # Applied out of order: the unfollow (later) first, then the follow (earlier).
    graph.unfollow(a, b, t0 + timedelta(seconds=1))
    graph.follow(a, b, t0)
    assert not graph.is_following(a, b)
    graph.follow(a, b, t0 + timedelta(seconds=2))
    assert graph.is_following(a, b)


def test_batches_stay_under_the_byte_budget_with_multi_byte_ids(
    cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    """Ids of CJK characters take 3 bytes per character: the batches built for them stay within
    ``BATCH_BYTES`` of bound values (what the driver sends, measured on the real statements),
    so Cassandra's batch size fail threshold (50 KiB by default; 2.1 has none) is never hit."""
    sent: list[object] = []

    class Recording(CassandraHistory):
        def _run(self, statements: list[tuple[object, object]]) -> None:
            sent.extend(statement for statement, _ in statements)
            super()._run(statements)

    history = Recording(cassandra, settings.cassandra_keyspace)
    wide = "\u6f22\u5b57" * 50  # 100 characters, 300 bytes in UTF-8
    tag = ids("x")
    actor, aid = f"{wide[: -len(tag)]}{tag}", f"{tag}{wide[len(tag) :]}"
    users = [f"{n:04d}{wide[4:]}" + tag for n in range(150)]
    record = HistoryRecord(aid, actor, 1000, b'{"id":"x"}', users)
    history.put_activities([record])
    assert history.put_deliveries([record]) == len(users)
    batches = [s for s in sent if isinstance(s, BatchStatement)]
    assert batches
    sizes = [
        sum(len(v) for _, _, values in batch._statements_and_parameters for v in values if v)
        for batch in batches
    ]
    assert max(sizes) <= BATCH_BYTES, sizes
    assert history.page_timeline(users[-1], None, 10) == [order_key(1000, aid)]
