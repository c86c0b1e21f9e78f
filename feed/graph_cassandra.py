"""The follow graph in Cassandra, both directions, read in pages.

Guarantees:

* **Bounded memory.** :meth:`followers` yields pages (``page_size`` rows), so an account with a
  million followers never has to fit in memory at once.
* **Order by event time.** A follow is written, and an unfollow deleted, with the event's ``at`` as
  the Cassandra write timestamp: the later event wins whatever order the events are applied in,
  and replays are idempotent.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from cassandra.cluster import Session
from cassandra.concurrent import execute_concurrent
from cassandra.query import PreparedStatement

from feed import cql

__all__ = ["CassandraFollowGraph"]

#: First-page reads of follower lists in flight at once (:meth:`followers_many`), and ``IN``
#: queries in flight at once (:meth:`following_among`).
_READ_CONCURRENCY = 32
#: Most followees one ``IN`` query of :meth:`following_among` names.
_AMONG_CHUNK = 100


def _micros(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000)


class CassandraFollowGraph(cql.TenantPartitions):
    def __init__(self, session: Session, keyspace: str, *, page_size: int = 5000) -> None:
        self._session = session
        self._page_size = page_size
        ks = keyspace

        def prepare(query: str) -> PreparedStatement:
            return cql.prepare(session, query)

        self._add_follower = prepare(
            f"INSERT INTO {ks}.followers (user_id, follower) VALUES (?, ?) USING TIMESTAMP ?"
        )
        self._add_following = prepare(
            f"INSERT INTO {ks}.following (user_id, followee) VALUES (?, ?) USING TIMESTAMP ?"
        )
        self._del_follower = prepare(
            f"DELETE FROM {ks}.followers USING TIMESTAMP ? WHERE user_id = ? AND follower = ?"
        )
        self._del_following = prepare(
            f"DELETE FROM {ks}.following USING TIMESTAMP ? WHERE user_id = ? AND followee = ?"
        )
        self._followers = prepare(f"SELECT follower FROM {ks}.followers WHERE user_id = ?")
        self._following = prepare(f"SELECT followee FROM {ks}.following WHERE user_id = ?")
        self._is_following = prepare(
            f"SELECT followee FROM {ks}.following WHERE user_id = ? AND followee = ?"
        )
        self._following_among = prepare(
            f"SELECT followee FROM {ks}.following WHERE user_id = ? AND followee IN ?"
        )

    def follow(self, follower: str, followee: str, at: datetime) -> None:
        ts = _micros(at)
        execute_concurrent(
            self._session,
            [
                (self._add_follower, (self._pk(followee), follower, ts)),
                (self._add_following, (self._pk(follower), followee, ts)),
            ],
            raise_on_first_error=True,
        )

    def unfollow(self, follower: str, followee: str, at: datetime) -> None:
        ts = _micros(at)
        execute_concurrent(
            self._session,
            [
                (self._del_follower, (ts, self._pk(followee), follower)),
                (self._del_following, (ts, self._pk(follower), followee)),
            ],
            raise_on_first_error=True,
        )

    def is_following(self, follower: str, followee: str) -> bool:
        row = self._session.execute(self._is_following, (self._pk(follower), followee)).one()
        return row is not None

    def following_among(self, user: str, candidates: Sequence[str]) -> list[str]:
        """Which of ``candidates`` the user follows, in the graph's order (followee ascending):
        point reads of the user's partition, ``IN`` queries of at most ``_AMONG_CHUNK``
        followees run concurrently, whatever the user follows in all."""
        wanted = sorted(set(candidates))
        if not wanted:
            return []
        chunks = [wanted[i : i + _AMONG_CHUNK] for i in range(0, len(wanted), _AMONG_CHUNK)]
        results = execute_concurrent(
            self._session,
            [(self._following_among, (self._pk(user), chunk)) for chunk in chunks],
            concurrency=_READ_CONCURRENCY,
            raise_on_first_error=True,
        )
        found = {row[0] for _ok, rows in results for row in rows}
        return [c for c in wanted if c in found]

    def followers(self, user: str) -> Iterator[list[str]]:
        """The user's followers, a page at a time."""
        yield from self._pages(self._followers, user)

    def following(self, user: str) -> Iterator[list[str]]:
        """Whom the user follows, a page at a time."""
        yield from self._pages(self._following, user)

    def followers_many(self, users: Sequence[str]) -> Iterator[tuple[str, Iterator[list[str]]]]:
        """``(user, pages of followers)`` for each of ``users``: the first pages are read
        concurrently (a cold cache meets hundreds of actors in one batch), later pages on
        demand."""
        statement = self._followers
        statement.fetch_size = self._page_size
        results = execute_concurrent(
            self._session,
            [(statement, (self._pk(user),)) for user in users],
            concurrency=_READ_CONCURRENCY,
            raise_on_first_error=True,
        )
        for user, (_ok, result) in zip(users, results, strict=True):
            yield user, self._result_pages(result)

    def _pages(self, statement: object, user: str) -> Iterator[list[str]]:
        statement.fetch_size = self._page_size  # type: ignore[attr-defined]
        yield from self._result_pages(self._session.execute(statement, (self._pk(user),)))

    @staticmethod
    def _result_pages(result: Any) -> Iterator[list[str]]:
        while True:
            rows = result.current_rows
            if rows:
                yield [row[0] for row in rows]
            if not result.has_more_pages:
                return
            result.fetch_next_page()
