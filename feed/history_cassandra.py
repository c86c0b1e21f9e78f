"""Durable history in Cassandra: activities, outboxes, per-user timelines, recipients.

Guarantees:

* **Idempotent.** Every row's primary key is derived from the activity (id, published µs) and the
  user, so a replayed write overwrites the same row.
* **Ordered like Redis.** Timelines cluster by ``(ts DESC, id DESC)``, the same order as the Redis
  order keys, so a page can continue from Redis into Cassandra at the same position.
* **Batched.** Every write goes in UNLOGGED batches (INFRA.md: ~10x the throughput of single-row
  inserts), bounded in rows and in bytes (under Cassandra's default 50 KiB batch fail threshold),
  with bounded concurrency. A batch is not atomic across partitions; a failed call is retried as
  a whole, which is safe because writes are idempotent.
* **One cell for the recipients.** Who an activity reached is one blob on the activity's row,
  not a row per follower: fan-out writes one extra cell per activity, and a Delete reads one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from cassandra.cluster import Session
from cassandra.concurrent import execute_concurrent
from cassandra.query import BatchStatement, BatchType

from feed.cursor import order_key, split_order_key

__all__ = ["CassandraHistory", "HistoryRecord"]

#: Rows per UNLOGGED batch and batches in flight (INFRA.md measured 50-200 and 32 as good).
BATCH_ROWS = 100
CONCURRENCY = 32
#: Bytes of bound values per batch: below Cassandra's default batch_size_fail_threshold (50 KiB).
BATCH_BYTES = 40 * 1024


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """One activity and the users whose timelines it reaches."""

    activity_id: str
    actor: str
    ts: int
    body: bytes
    users: Sequence[str]


class CassandraHistory:
    def __init__(self, session: Session, keyspace: str) -> None:
        self._session = session
        ks = keyspace
        prepare = session.prepare
        self._put_activity = prepare(
            f"INSERT INTO {ks}.activities (id, actor, ts, body) VALUES (?, ?, ?, ?)"
        )
        self._put_outbox = prepare(f"INSERT INTO {ks}.outbox (actor, ts, id) VALUES (?, ?, ?)")
        self._put_timeline = prepare(
            f"INSERT INTO {ks}.timeline (user_id, ts, id, actor) VALUES (?, ?, ?, ?)"
        )
        self._put_recipients = prepare(f"UPDATE {ks}.activities SET recipients = ? WHERE id = ?")
        self._del_timeline = prepare(
            f"DELETE FROM {ks}.timeline WHERE user_id = ? AND ts = ? AND id = ?"
        )
        self._del_outbox = prepare(f"DELETE FROM {ks}.outbox WHERE actor = ? AND ts = ? AND id = ?")
        self._del_activity = prepare(f"DELETE FROM {ks}.activities WHERE id = ?")

        self._get_activity = prepare(f"SELECT actor, ts, body FROM {ks}.activities WHERE id = ?")
        self._get_bodies = prepare(f"SELECT id, body FROM {ks}.activities WHERE id IN ?")
        self._get_recipients = prepare(f"SELECT recipients FROM {ks}.activities WHERE id = ?")
        self._page_first = prepare(f"SELECT ts, id FROM {ks}.timeline WHERE user_id = ? LIMIT ?")
        self._page_after = prepare(
            f"SELECT ts, id FROM {ks}.timeline WHERE user_id = ? AND (ts, id) < (?, ?) LIMIT ?"
        )
        self._outbox_first = prepare(f"SELECT ts, id FROM {ks}.outbox WHERE actor = ? LIMIT ?")
        self._outbox_after = prepare(
            f"SELECT ts, id FROM {ks}.outbox WHERE actor = ? AND (ts, id) < (?, ?) LIMIT ?"
        )
        self._put_big = prepare(f"INSERT INTO {ks}.big_accounts (user_id) VALUES (?)")
        self._all_big = prepare(f"SELECT user_id FROM {ks}.big_accounts")

    @property
    def session(self) -> Session:
        return self._session

    # --- writes ------------------------------------------------------------------------------
    def put_activities(self, records: Sequence[HistoryRecord]) -> None:
        """Write the activities and their outbox rows (before followers are read: see fanout)."""
        rows: list[tuple[object, tuple[object, ...]]] = []
        for r in records:
            rows.append((self._put_activity, (r.activity_id, r.actor, r.ts, r.body)))
            rows.append((self._put_outbox, (r.actor, r.ts, r.activity_id)))
        self._run(_batched(rows)[0])

    def put_deliveries(self, records: Sequence[HistoryRecord], *, timelines: bool = True) -> int:
        """Write who each activity reached and (optionally) their timeline rows.

        Returns the number of timeline rows written. Raises on the first failed statement.
        """
        rows: list[tuple[object, tuple[object, ...]]] = [
            (self._put_recipients, ("\n".join(r.users).encode(), r.activity_id))
            for r in records
            if r.users
        ]
        count = 0
        if timelines:
            # Grouped by user: a batch holding several rows of one partition is applied by
            # Cassandra as one mutation of that partition, not one mutation per row.
            per_user: dict[str, list[tuple[object, ...]]] = {}
            get = per_user.get
            for r in records:
                for user in r.users:
                    row = (user, r.ts, r.activity_id, r.actor)
                    mine = get(user)
                    if mine is None:
                        per_user[user] = [row]
                    else:
                        mine.append(row)
                count += len(r.users)
            put = self._put_timeline
            rows.extend((put, row) for mine in per_user.values() for row in mine)
        self._run(_batched(rows)[0])
        return count

    def write_timeline_rows(self, rows: Iterable[tuple[str, int, str, str]]) -> int:
        """Write (user, ts, activity_id, actor) timeline rows in batches."""
        statements, count = _batched((self._put_timeline, row) for row in rows)
        self._run(statements)
        return count

    def remove_from_timelines(self, rows: Iterable[tuple[str, int, str]]) -> None:
        """Delete (user, ts, activity_id) timeline rows."""
        statements, _ = _batched((self._del_timeline, row) for row in rows)
        self._run(statements)

    def delete_activity(self, activity_id: str, actor: str, ts: int) -> None:
        """Remove the activity itself (with its recipient list) and its outbox row."""
        self._run(
            [
                (self._del_outbox, (actor, ts, activity_id)),
                (self._del_activity, (activity_id,)),
            ]
        )

    def _run(self, statements: list[tuple[object, object]]) -> None:
        if statements:
            execute_concurrent(
                self._session, statements, concurrency=CONCURRENCY, raise_on_first_error=True
            )

    # --- reads -------------------------------------------------------------------------------
    def activity(self, activity_id: str) -> tuple[str, int, bytes] | None:
        """(actor, ts, body) of a stored activity, or None."""
        row = self._session.execute(self._get_activity, (activity_id,)).one()
        return None if row is None else (row.actor, row.ts, row.body)

    def recipients(self, activity_id: str, page_size: int = 5000) -> Iterator[list[str]]:
        """Users an activity reached, in pages."""
        row = self._session.execute(self._get_recipients, (activity_id,)).one()
        if row is None or not row.recipients:
            return
        users = row.recipients.decode().split("\n")
        for start in range(0, len(users), page_size):
            yield users[start : start + page_size]

    def page_timeline(self, user: str, before: str | None, limit: int) -> list[str]:
        """Order keys of the user's timeline strictly older than ``before``, newest first."""
        if before is None:
            rows = self._session.execute(self._page_first, (user, limit))
        else:
            ts, activity_id = split_order_key(before)
            rows = self._session.execute(self._page_after, (user, ts, activity_id, limit))
        return [order_key(row.ts, row.id) for row in rows]

    def outbox(self, actor: str, limit: int, before: str | None = None) -> list[str]:
        """Order keys of the actor's newest activities (strictly older than ``before``)."""
        if before is None:
            rows = self._session.execute(self._outbox_first, (actor, limit))
        else:
            ts, activity_id = split_order_key(before)
            rows = self._session.execute(self._outbox_after, (actor, ts, activity_id, limit))
        return [order_key(row.ts, row.id) for row in rows]

    def mark_big(self, user: str) -> None:
        """Record that ``user`` is fanned out at read time from now on."""
        self._session.execute(self._put_big, (user,))

    def big_accounts(self) -> set[str]:
        return {row.user_id for row in self._session.execute(self._all_big)}

    def bodies(self, activity_ids: Sequence[str]) -> dict[str, bytes]:
        """Bodies by activity id (ids with no stored activity are left out)."""
        if not activity_ids:
            return {}
        rows = self._session.execute(self._get_bodies, (list(activity_ids),))
        return {row.id: row.body for row in rows}


def _batched(
    rows: Iterable[tuple[object, tuple[object, ...]]],
) -> tuple[list[tuple[object, object]], int]:
    """Group (prepared statement, values) into UNLOGGED batches of at most ``BATCH_ROWS`` rows and
    ``BATCH_BYTES`` bytes of values; a row larger than that on its own is sent alone."""
    statements: list[tuple[object, object]] = []
    batch = BatchStatement(batch_type=BatchType.UNLOGGED)
    size = count = 0
    for statement, values in rows:
        row_bytes = sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in values)
        count += 1
        if row_bytes > BATCH_BYTES:
            statements.append((statement, values))
            continue
        if len(batch) and (len(batch) >= BATCH_ROWS or size + row_bytes > BATCH_BYTES):
            statements.append((batch, None))
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)
            size = 0
        batch.add(statement, values)
        size += row_bytes
    if len(batch):
        statements.append((batch, None))
    return statements, count
