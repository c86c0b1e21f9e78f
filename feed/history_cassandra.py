"""Durable history in Cassandra: activities, outboxes, per-user timelines, recipients.

Guarantees:

* **The activity row is the durable owner record.** An id's row (actor, ``published``, body) is
  written once, by the first create of the id (the fan-out decides which one: a Redis claim plus
  :meth:`CassandraHistory.stored_many`, see ``fanout.processor``), and is never overwritten.
  Both are written and read at ``LOCAL_QUORUM``.
* **Deletes are durable.** A deleted activity keeps its row (actor, ``published``) with
  ``deleted = true`` and no body, so a replayed create of its id stays deleted, whatever Redis
  lost, and its owner stays its owner.
* **Idempotent.** Every other row's primary key is derived from the activity (id, published µs)
  and the user, so a replayed write overwrites the same row.
* **Ordered like Redis.** Timelines cluster by ``(ts DESC, id DESC)``, the same order as the Redis
  order keys, so a page can continue from Redis into Cassandra at the same position.
* **Batched.** Every write goes in UNLOGGED batches (INFRA.md: ~10x the throughput of single-row
  inserts), bounded in rows and in bytes (under Cassandra's default 50 KiB batch fail threshold),
  with bounded concurrency. A batch is not atomic across partitions; a failed call is retried as
  a whole, which is safe because writes are idempotent.
* **One cell for the recipients.** Who an activity reached by fan-out is one blob on the
  activity's row, not a row per follower: fan-out writes one extra cell per activity, and a Delete
  reads one. Followers who got it later, from a follow's backfill, are rows of ``backfilled``
  (one per follower, written before the backfill reaches Redis), so a Delete reaches them too.
* **Bounded reads.** Recipient lists and bodies are read in pages (``fetch_size``, chunks of
  ``BODIES_CHUNK`` ids), never a whole partition or an unbounded ``IN`` at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from cassandra.cluster import Session
from cassandra.concurrent import execute_concurrent
from cassandra.query import BatchStatement, BatchType, PreparedStatement

from feed import cql
from feed.cursor import order_key, split_order_key
from feed.interfaces import HistoryRecord, Stored

__all__ = ["BODIES_CHUNK", "CassandraHistory"]

#: Rows per UNLOGGED batch and batches in flight (INFRA.md measured 50-200 and 32 as good).
BATCH_ROWS = 100
CONCURRENCY = 32
#: Bytes of bound values per batch: below Cassandra's default batch_size_fail_threshold (50 KiB).
BATCH_BYTES = 40 * 1024
#: Ids per ``IN`` query when reading a batch's stored activities (:meth:`stored_many`): measured
#: on the 2-core reference machine (Cassandra 2.1), 500 new ids in chunks of 100 run concurrently
#: took 19-30 ms, in one query 35-100 ms.
OWNERSHIP_CHUNK = 100
#: Most ids in one ``IN`` query for bodies.
BODIES_CHUNK = 500
#: Rows per page when reading recipient rows.
RECIPIENT_PAGE = 5000


class CassandraHistory(cql.TenantPartitions):
    def __init__(self, session: Session, keyspace: str) -> None:
        self._session = session
        ks = keyspace
        self._write_level = cql.write_level(session)

        def prepare(query: str) -> PreparedStatement:
            return cql.prepare(session, query)

        self._put_activity = prepare(
            f"INSERT INTO {ks}.activities (id, actor, ts, body) VALUES (?, ?, ?, ?)"
        )
        self._mark_deleted = prepare(
            f"UPDATE {ks}.activities SET deleted = true, body = null WHERE id = ?"
        )
        self._clear_recipients = prepare(
            f"UPDATE {ks}.activities SET recipients = null WHERE id = ?"
        )
        self._put_backfilled = prepare(f"INSERT INTO {ks}.backfilled (id, user_id) VALUES (?, ?)")
        self._get_backfilled = prepare(f"SELECT user_id FROM {ks}.backfilled WHERE id = ?")
        self._del_backfilled = prepare(f"DELETE FROM {ks}.backfilled WHERE id = ?")
        self._put_outbox = prepare(f"INSERT INTO {ks}.outbox (actor, ts, id) VALUES (?, ?, ?)")
        self._put_timeline = prepare(
            f"INSERT INTO {ks}.timeline (user_id, ts, id, actor) VALUES (?, ?, ?, ?)"
        )
        self._put_recipients = prepare(f"UPDATE {ks}.activities SET recipients = ? WHERE id = ?")
        self._del_timeline = prepare(
            f"DELETE FROM {ks}.timeline WHERE user_id = ? AND ts = ? AND id = ?"
        )
        self._del_outbox = prepare(f"DELETE FROM {ks}.outbox WHERE actor = ? AND ts = ? AND id = ?")

        self._get_stored = prepare(
            f"SELECT id, actor, ts, body, deleted FROM {ks}.activities WHERE id IN ?"
        )
        self._get_bodies = prepare(f"SELECT id, body, deleted FROM {ks}.activities WHERE id IN ?")
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
    def put_activities(
        self, records: Sequence[HistoryRecord], *, new: Iterable[str] | None = None
    ) -> None:
        """Write the records' outbox rows, and the activity rows of the ids in ``new`` (all of
        them if ``new`` is None), before followers are read (see fanout). An id's activity row
        is written once, by its first create (``fanout.processor``); replays write only the
        outbox row again (same key, same values), which a write that failed half-way may lack.
        Written at the write level, read back at the read level by :meth:`stored_many` (with
        the defaults, LOCAL_QUORUM both: every worker reads the row another wrote, ``feed.cql``)."""
        fresh = None if new is None else set(new)
        rows: list[tuple[object, tuple[object, ...]]] = []
        pk = self._pk
        for r in records:
            if fresh is None or r.activity_id in fresh:
                rows.append((self._put_activity, (pk(r.activity_id), r.actor, r.ts, r.body)))
            rows.append((self._put_outbox, (pk(r.actor), r.ts, r.activity_id)))
        self._run(_batched(rows, self._write_level)[0])

    def put_deliveries(self, records: Sequence[HistoryRecord], *, timelines: bool = True) -> int:
        """Write who each activity reached and (optionally) their timeline rows.

        Returns the number of timeline rows written. Raises on the first failed statement.
        """
        scope = self._scope
        rows: list[tuple[object, tuple[object, ...]]] = [
            (self._put_recipients, ("\n".join(r.users).encode(), scope + r.activity_id))
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
                    row = (scope + user, r.ts, r.activity_id, r.actor)
                    mine = get(user)
                    if mine is None:
                        per_user[user] = [row]
                    else:
                        mine.append(row)
                count += len(r.users)
            put = self._put_timeline
            rows.extend((put, row) for mine in per_user.values() for row in mine)
        self._run(_batched(rows, self._write_level)[0])
        return count

    def write_timeline_rows(self, rows: Iterable[tuple[str, int, str, str]]) -> int:
        """Write (user, ts, activity_id, actor) timeline rows in batches."""
        pk, put = self._pk, self._put_timeline
        statements, count = _batched(
            ((put, (pk(u), ts, a, actor)) for u, ts, a, actor in rows), self._write_level
        )
        self._run(statements)
        return count

    def remove_from_timelines(self, rows: Iterable[tuple[str, int, str]]) -> None:
        """Delete (user, ts, activity_id) timeline rows."""
        pk, delete = self._pk, self._del_timeline
        statements, _ = _batched(((delete, (pk(u), ts, a)) for u, ts, a in rows), self._write_level)
        self._run(statements)

    def add_backfilled(self, rows: Iterable[tuple[str, str]]) -> None:
        """Record (activity_id, user) pairs: the user got the activity from a follow's backfill.
        A Delete reaches them as it reaches the fan-out recipients. Idempotent."""
        pk, put = self._pk, self._put_backfilled
        statements, _ = _batched(((put, (pk(a), u)) for a, u in rows), self._write_level)
        self._run(statements)

    def mark_deleted(self, activity_id: str, actor: str, ts: int) -> None:
        """First step of a delete: the row says ``deleted`` and loses its body (its owner and
        ``published`` stay, so a later create of the id stays deleted), and the outbox row goes.
        The recipients stay until :meth:`finish_delete`, so a delete that fails half-way and is
        applied again still reaches everyone. Idempotent."""
        self._run(
            [
                (self._mark_deleted, (self._pk(activity_id),)),
                (self._del_outbox, (self._pk(actor), ts, activity_id)),
            ]
        )

    def finish_delete(self, activity_id: str) -> None:
        """Last step of a delete, once every timeline is cleaned: forget the recipients."""
        self._run(
            [
                (self._clear_recipients, (self._pk(activity_id),)),
                (self._del_backfilled, (self._pk(activity_id),)),
            ]
        )

    def _run(self, statements: list[tuple[object, object]]) -> None:
        if statements:
            execute_concurrent(
                self._session, statements, concurrency=CONCURRENCY, raise_on_first_error=True
            )

    # --- reads -------------------------------------------------------------------------------
    def stored(self, activity_id: str) -> Stored | None:
        """What the id holds (owner, order time, body, deleted), or None if never created."""
        return self.stored_many([activity_id]).get(activity_id)

    def stored_many(self, activity_ids: Sequence[str]) -> dict[str, Stored]:
        """What each id holds; ids never created are left out. ``IN`` queries of at most
        ``OWNERSHIP_CHUNK`` ids, run concurrently (one round trip for a batch's ids)."""
        ids = list(dict.fromkeys(map(self._pk, activity_ids)))
        if not ids:
            return {}
        chunks = [ids[i : i + OWNERSHIP_CHUNK] for i in range(0, len(ids), OWNERSHIP_CHUNK)]
        results = execute_concurrent(
            self._session,
            [(self._get_stored, (chunk,)) for chunk in chunks],
            concurrency=CONCURRENCY,
            raise_on_first_error=True,
        )
        out: dict[str, Stored] = {}
        n = len(self._scope)
        for _ok, rows in results:
            for row in rows:
                if row.actor is not None:
                    out[row.id[n:]] = Stored(row.actor, row.ts, row.body, bool(row.deleted))
        return out

    def activity(self, activity_id: str) -> tuple[str, int, bytes] | None:
        """(actor, ts, body) of a stored, not deleted activity, or None."""
        stored = self.stored(activity_id)
        if stored is None or not stored.live:
            return None
        assert stored.body is not None
        return (stored.actor, stored.ts, stored.body)

    def recipients(self, activity_id: str, page_size: int = RECIPIENT_PAGE) -> Iterator[list[str]]:
        """Users an activity reached (by fan-out, then by backfill), in pages of at most
        ``page_size``. A user may appear in both parts."""
        row = self._session.execute(self._get_recipients, (self._pk(activity_id),)).one()
        if row is not None and row.recipients:
            users = row.recipients.decode().split("\n")
            for start in range(0, len(users), page_size):
                yield users[start : start + page_size]
        statement = self._get_backfilled
        statement.fetch_size = page_size
        result = self._session.execute(statement, (self._pk(activity_id),))
        while True:
            rows = result.current_rows
            if rows:
                yield [r.user_id for r in rows]
            if not result.has_more_pages:
                return
            result.fetch_next_page()

    def page_timeline(self, user: str, before: str | None, limit: int) -> list[str]:
        """Order keys of the user's timeline strictly older than ``before``, newest first."""
        if before is None:
            rows = self._session.execute(self._page_first, (self._pk(user), limit))
        else:
            ts, activity_id = split_order_key(before)
            rows = self._session.execute(self._page_after, (self._pk(user), ts, activity_id, limit))
        return [order_key(row.ts, row.id) for row in rows]

    def outbox(self, actor: str, limit: int, before: str | None = None) -> list[str]:
        """Order keys of the actor's newest activities (strictly older than ``before``)."""
        if before is None:
            rows = self._session.execute(self._outbox_first, (self._pk(actor), limit))
        else:
            ts, activity_id = split_order_key(before)
            rows = self._session.execute(
                self._outbox_after, (self._pk(actor), ts, activity_id, limit)
            )
        return [order_key(row.ts, row.id) for row in rows]

    def mark_big(self, user: str) -> None:
        """Record that ``user`` is fanned out at read time from now on."""
        self._session.execute(self._put_big, (self._pk(user),))

    def big_accounts(self) -> set[str]:
        """This tenant's big accounts (the table holds every tenant's: a few rows each)."""
        mine = (self._mine(row.user_id) for row in self._session.execute(self._all_big))
        return {user for user in mine if user is not None}

    def bodies(self, activity_ids: Sequence[str]) -> dict[str, bytes]:
        """Bodies by activity id; ids with no stored or a deleted activity are left out. Read in
        ``IN`` queries of at most ``BODIES_CHUNK`` ids."""
        out: dict[str, bytes] = {}
        ids = list(dict.fromkeys(map(self._pk, activity_ids)))
        n = len(self._scope)
        for start in range(0, len(ids), BODIES_CHUNK):
            rows = self._session.execute(self._get_bodies, (ids[start : start + BODIES_CHUNK],))
            out.update((row.id[n:], row.body) for row in rows if row.body and not row.deleted)
        return out


def _encoded_size(value: object) -> int:
    """Bytes ``value`` takes bound: UTF-8 bytes of a string (ids may be any Unicode: a CJK
    character is 3 bytes), the length of a blob, 8 for a number."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode())
    if isinstance(value, bytes):
        return len(value)
    return 8


def _batched(
    rows: Iterable[tuple[object, tuple[object, ...]]], consistency: int
) -> tuple[list[tuple[object, object]], int]:
    """Group (prepared statement, values) into UNLOGGED batches of at most ``BATCH_ROWS`` rows and
    ``BATCH_BYTES`` bytes of bound values (strings counted in UTF-8 bytes, not characters), at
    ``consistency``; a row larger than that on its own is sent alone (bound, at
    ``consistency``)."""
    statements: list[tuple[object, object]] = []

    def new_batch() -> BatchStatement:
        return BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=consistency)

    batch = new_batch()
    size = count = 0
    for statement, values in rows:
        row_bytes = sum(_encoded_size(v) for v in values)
        count += 1
        if row_bytes > BATCH_BYTES:
            alone = statement.bind(values)  # type: ignore[attr-defined]
            alone.consistency_level = consistency
            statements.append((alone, None))
            continue
        if len(batch) and (len(batch) >= BATCH_ROWS or size + row_bytes > BATCH_BYTES):
            statements.append((batch, None))
            batch = new_batch()
            size = 0
        batch.add(statement, values)
        size += row_bytes
    if len(batch):
        statements.append((batch, None))
    return statements, count
