"""The durable copy of the notification feeds, in Cassandra.

Two tables, one partition per user (``feed.stores.schema_statements``): ``notify_groups`` (a
group's key, type, object, ``opened``, whether it is its key's open group, seen, read) and
``notify_items`` (a group's activities: id, actor, ``published`` µs). Everything else a group
shows (actors and their order, counts, ``first``/``last``, position) is derived from its items
when a user's feed is loaded into Redis (``feed/lua/notify.lua``, command ``load``).

* **Written after Redis decided**, as the mutations ``notify.lua`` returns, each with the write
  version it gave (``USING TIMESTAMP``): versions increase per user, so the rows converge to
  Redis's state whatever order concurrent writers' statements land in (a gateway's mark and a
  worker's new activity, or a replay's rewrite).
* **Idempotent**: a mutation written twice is the same cell at the same timestamp.
* Written and read at the configured levels (``feed.cql``; LOCAL_QUORUM both by default): a
  load after a write that returned sees it.
* **Bounded reads**: a user's partition holds at most ``FEED_NOTIFY_MAX_GROUPS`` groups of at
  most ``FEED_NOTIFY_GROUP_MAX`` activities (plus rows of dropped groups' tombstones).
"""

from __future__ import annotations

from collections.abc import Sequence

from cassandra.cluster import Session
from cassandra.concurrent import execute_concurrent
from cassandra.query import PreparedStatement

from feed import cql
from feed.notify import NotifyRows

__all__ = ["CassandraNotifyStore"]

_US = "\x1f"
_CONCURRENCY = 32


class CassandraNotifyStore(cql.TenantPartitions):
    def __init__(self, session: Session, keyspace: str) -> None:
        self.session = session
        ks = keyspace

        def prepare(query: str) -> PreparedStatement:
            return cql.prepare(session, query)

        self._put_group = prepare(
            f"INSERT INTO {ks}.notify_groups (user_id, gid, gkey, type, object, opened, open,"
            " seen, read) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self._close_group = prepare(
            f"UPDATE {ks}.notify_groups USING TIMESTAMP ? SET open = false"
            " WHERE user_id = ? AND gid = ?"
        )
        self._mark_group = prepare(
            f"UPDATE {ks}.notify_groups USING TIMESTAMP ? SET seen = ?, read = ?"
            " WHERE user_id = ? AND gid = ?"
        )
        self._del_group = prepare(
            f"DELETE FROM {ks}.notify_groups USING TIMESTAMP ? WHERE user_id = ? AND gid = ?"
        )
        self._put_item = prepare(
            f"INSERT INTO {ks}.notify_items (user_id, gid, aid, actor, ts)"
            " VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self._del_item = prepare(
            f"DELETE FROM {ks}.notify_items USING TIMESTAMP ?"
            " WHERE user_id = ? AND gid = ? AND aid = ?"
        )
        self._del_items = prepare(
            f"DELETE FROM {ks}.notify_items USING TIMESTAMP ? WHERE user_id = ? AND gid = ?"
        )
        self._get_groups = prepare(
            f"SELECT gid, gkey, type, object, opened, open, seen, read FROM {ks}.notify_groups"
            " WHERE user_id = ?"
        )
        self._get_items = prepare(
            f"SELECT gid, aid, actor, ts FROM {ks}.notify_items WHERE user_id = ?"
        )

    def write(self, changes: Sequence[tuple[str, Sequence[str]]]) -> int:
        """Apply ``notify.lua``'s mutations, per user (one string each: the kind, the version,
        the fields, joined by US); returns the statements run. Raises on the first failure (the
        caller retries: idempotent)."""
        statements: list[tuple[object, tuple[object, ...]]] = []
        for unscoped, entries in changes:
            user = self._pk(unscoped)
            for entry in entries:
                kind, v, rest = entry.split(_US, 2)
                version = int(v)
                if kind == "G":
                    gid, gkey, type_, opened, open_, seen, read, object_ = rest.split(_US, 7)
                    row = (user, gid, gkey, type_, object_, int(opened), open_ == "1")
                    statements.append((self._put_group, (*row, seen == "1", read == "1", version)))
                elif kind == "I":
                    gid, aid, actor, ts = rest.split(_US)
                    statements.append((self._put_item, (user, gid, aid, actor, int(ts), version)))
                elif kind == "X":
                    gid, aid = rest.split(_US)
                    statements.append((self._del_item, (version, user, gid, aid)))
                elif kind == "D":
                    statements.append((self._del_group, (version, user, rest)))
                    statements.append((self._del_items, (version, user, rest)))
                elif kind == "C":
                    statements.append((self._close_group, (version, user, rest)))
                elif kind == "S":
                    gid, seen, read = rest.split(_US)
                    flags = (version, seen == "1", read == "1", user, gid)
                    statements.append((self._mark_group, flags))
                else:
                    raise ValueError(f"unknown notification mutation {kind!r}")
        if statements:
            execute_concurrent(
                self.session, statements, concurrency=_CONCURRENCY, raise_on_first_error=True
            )
        return len(statements)

    def load(self, user: str) -> NotifyRows:
        """The user's groups and items (every row, paged by the driver)."""
        return self.load_many([user])[user]

    def load_many(self, users: Sequence[str]) -> dict[str, NotifyRows]:
        """Several users' rows, their queries run concurrently (a worker batch may find many
        cold recipients: one after the other, 500 of them took 2.4 s in ``feed bench notify``)."""
        statements = [(self._get_groups, (self._pk(u),)) for u in users]
        statements += [(self._get_items, (self._pk(u),)) for u in users]
        results = execute_concurrent(
            self.session, statements, concurrency=_CONCURRENCY, raise_on_first_error=True
        )
        rows = [list(result.result_or_exc) for result in results]
        loaded = {}
        for n, user in enumerate(users):
            groups = [
                (
                    r.gid,
                    r.gkey,
                    r.type or "",
                    r.object or "",
                    r.opened or 0,
                    bool(r.open),
                    bool(r.seen),
                    bool(r.read),
                )
                for r in rows[n]
                if r.gkey is not None  # a row left by a late update of a dropped group
            ]
            items = [(r.gid, r.aid, r.actor, r.ts) for r in rows[len(users) + n]]
            loaded[user] = NotifyRows(groups, items)
        return loaded
