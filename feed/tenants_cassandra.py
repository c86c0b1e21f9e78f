"""The tenant registry in Cassandra: :class:`CassandraTenants`, a ``feed.tenants.TenantStore``.

One row per tenant in ``tenants`` (``feed.stores.schema_statements``), so every process reads the
whole registry in one query each ``FEED_TENANT_REFRESH_S``. It keeps the guarantees the protocol
states, this way:

* **First-wins create**: ``INSERT ... IF NOT EXISTS`` (a lightweight transaction).
* **No lost change**: every change reads the row at ``SERIAL`` (the latest value any
  transaction committed), computes the new row (``feed.tenants.Tenant``'s pure methods) and writes
  it with ``IF updated = <what it read>``; one that loses the race reads again and retries, at
  most :data:`ATTEMPTS` times (then :class:`~feed.tenants.TenantConflict`). ``updated`` strictly
  increases with every change, so two changes are never mistaken for each other.
* **Only the SHA-256 of an ingest token** reaches the table (``ingest_sha256``,
  ``prev_ingest``'s keys).
* Reads outside a change (``get``, ``load_all``) are at the session's read level and writes'
  Paxos commit at its write level (``feed.cql``), so with the defaults (LOCAL_QUORUM) a process's
  next reload sees a change that returned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.cluster import Session
from cassandra.query import PreparedStatement

from feed import cql
from feed.tenants import (
    DEFAULT,
    NO_QUOTAS,
    QUOTA_NAMES,
    Credentials,
    Quotas,
    Tenant,
    TenantChanges,
    TenantConflict,
    TenantExists,
    TenantNotFound,
    default_row,
    utcnow,
)

__all__ = ["ATTEMPTS", "CassandraTenants"]

#: Compare-and-set attempts of one change before it gives up (each loses only to another change
#: of the same tenant that committed, so this many in a row means a stampede of admins).
ATTEMPTS = 10

_COLUMNS = (
    "id, state, created, updated, ingest_sha256, jwt_secret, prev_ingest, prev_jwt, "
    + ", ".join(QUOTA_NAMES)
)


class CassandraTenants(TenantChanges):
    def __init__(
        self,
        session: Session,
        keyspace: str,
        *,
        rotate_grace_s: float = 3600,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self._session = session
        self._grace_s = rotate_grace_s
        self._now = now
        ks = keyspace

        def prepare(query: str) -> PreparedStatement:
            return cql.prepare(session, query)

        marks = ", ".join("?" * (8 + len(QUOTA_NAMES)))
        self._insert = prepare(
            f"INSERT INTO {ks}.tenants ({_COLUMNS}) VALUES ({marks}) IF NOT EXISTS"
        )
        quota_sets = ", ".join(f"{name} = ?" for name in QUOTA_NAMES)
        self._update = prepare(
            f"UPDATE {ks}.tenants SET state = ?, updated = ?, ingest_sha256 = ?, jwt_secret = ?,"
            f" prev_ingest = ?, prev_jwt = ?, {quota_sets} WHERE id = ? IF updated = ?"
        )
        self._get = prepare(f"SELECT {_COLUMNS} FROM {ks}.tenants WHERE id = ?")
        # A change starts from the latest committed value (also one whose Paxos round another
        # process left half-done), not from what a quorum of replicas happens to hold.
        self._get_serial = prepare(f"SELECT {_COLUMNS} FROM {ks}.tenants WHERE id = ?")
        self._get_serial.consistency_level = ConsistencyLevel.SERIAL
        self._all = prepare(f"SELECT {_COLUMNS} FROM {ks}.tenants")

    @property
    def session(self) -> Session:
        return self._session

    # --- reads -------------------------------------------------------------------------------
    def get(self, tid: str) -> Tenant | None:
        row = self._session.execute(self._get, (tid,)).one()
        return None if row is None else _tenant(row)

    def load_all(self) -> list[Tenant]:
        return [_tenant(row) for row in self._session.execute(self._all)]

    # --- changes -----------------------------------------------------------------------------
    def create(self, tid: str, credentials: Credentials, quotas: Quotas = NO_QUOTAS) -> Tenant:
        tenant = Tenant.new(tid, credentials, quotas, self._now())
        if not self._session.execute(self._insert, _row(tenant)).was_applied:
            raise TenantExists(f"tenant {tid!r} exists (feed tenant rotate makes new credentials)")
        return tenant

    def _change(self, tid: str, change: Callable[[Tenant], Tenant]) -> Tenant:
        for attempt in range(ATTEMPTS):
            row = self._session.execute(self._get_serial, (tid,)).one()
            if row is None:
                if tid != DEFAULT:
                    raise TenantNotFound(f"no tenant {tid!r} (feed tenant create makes one)")
                # default has no row until its first quota override
                changed = change(default_row(self._now()))
                applied = self._session.execute(self._insert, _row(changed)).was_applied
            else:
                current = _tenant(row)
                changed = change(current)
                _id, state, _created, *rest = _row(changed)
                applied = self._session.execute(
                    self._update, (state, *rest, tid, current.updated)
                ).was_applied
            if applied:
                return changed
            time.sleep(0.01 * (attempt + 1))  # another change of this tenant won: read again
        raise TenantConflict(f"tenant {tid!r} kept changing under {ATTEMPTS} attempts; try again")


def _utc(at: datetime) -> datetime:
    """The driver reads a timestamp as a naive datetime in UTC."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def _tenant(row: Any) -> Tenant:
    return Tenant(
        row.id,
        row.state,
        _utc(row.created),
        _utc(row.updated),
        row.ingest_sha256 or b"",
        row.jwt_secret or "",
        prev_ingest={bytes(h): _utc(u) for h, u in (row.prev_ingest or {}).items()},
        prev_jwt={s: _utc(u) for s, u in (row.prev_jwt or {}).items()},
        quotas=Quotas(**{name: getattr(row, name) for name in QUOTA_NAMES}),
    )


def _row(t: Tenant) -> tuple[object, ...]:
    """The values of ``_COLUMNS``, in order."""
    quotas = tuple(getattr(t.quotas, name) for name in QUOTA_NAMES)
    head = (t.id, t.state, t.created, t.updated, t.ingest_sha256, t.jwt_secret)
    return (*head, dict(t.prev_ingest), dict(t.prev_jwt), *quotas)
