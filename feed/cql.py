"""Consistency levels of the Cassandra stores, from the settings.

``feed.stores.open_cassandra`` puts the read level on the session's default execution profile
and the write level on a second profile, :data:`WRITE_PROFILE`: the driver's own place for
per-request settings. The stores prepare every statement through :func:`prepare`, which gives a
``SELECT`` the read level and any other statement the write level, and build their batches at
:func:`write_level`. So one pair of settings decides every statement, and no store names a
level of its own.

With the defaults (LOCAL_QUORUM for both) a read always overlaps the replicas of every
acknowledged write (R + W > RF): who owns an activity id, whether it was deleted, and a user's
timeline read back after a write, whatever node answers. Lower levels (``ONE``) trade that for
availability: with a replication factor of 2, LOCAL_QUORUM needs both replicas, so a node down
stops the writes, while ONE carries on and the node catches up from hints when it returns
(docs/operations.md, "Cassandra").
"""

from __future__ import annotations

import copy
from typing import Self

from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Session
from cassandra.query import PreparedStatement

from feed import keys

__all__ = [
    "WRITE_PROFILE",
    "TenantPartitions",
    "level",
    "prepare",
    "write_level",
]

#: The execution profile whose consistency level the stores' writes use.
WRITE_PROFILE = "feed-write"


def level(name: str) -> int:
    """The driver's value for a level's name (``"LOCAL_QUORUM"``)."""
    value: int = getattr(ConsistencyLevel, name)
    return value


def _profile_level(session: Session, name: object) -> int:
    profiles = session.cluster.profile_manager.profiles
    profile = profiles.get(name) or profiles[EXEC_PROFILE_DEFAULT]
    value: int | None = profile.consistency_level
    return ConsistencyLevel.LOCAL_ONE if value is None else value


def write_level(session: Session) -> int:
    """The level of the session's writes (its :data:`WRITE_PROFILE`; without one, the default
    profile's)."""
    return _profile_level(session, WRITE_PROFILE)


def prepare(session: Session, query: str) -> PreparedStatement:
    """``query`` prepared, at the session's read level if it is a ``SELECT``, else at its write
    level."""
    statement = session.prepare(query)
    reads = query.lstrip()[:6].upper() == "SELECT"
    statement.consistency_level = _profile_level(
        session, EXEC_PROFILE_DEFAULT if reads else WRITE_PROFILE
    )
    return statement


class TenantPartitions:
    """A Cassandra store whose partition keys are its tenant's (``docs/tenants.md``).

    The ``default`` tenant's partition keys are the ids themselves, so its rows are the rows
    written before tenants existed; another tenant's are ``<tenant>\\x1f<id>`` in the same
    tables (no schema per tenant, no migration). Clustering columns and cell values keep the
    raw ids: they are reached only through a scoped partition. A store builds every partition
    key through :meth:`_pk`, and a partition key it reads back (a table scan) through
    :meth:`_mine`."""

    #: ``""`` for the default tenant, else ``<tenant>\x1f``.
    _scope: str = ""

    def for_tenant(self, tenant: str) -> Self:
        """The same store, for ``tenant`` (already validated: ``feed.tenants``)."""
        view = copy.copy(self)
        view._scope = "" if tenant == keys.DEFAULT_TENANT else tenant + keys.SCOPE_SEPARATOR
        return view

    def _pk(self, value: str) -> str:
        return self._scope + value

    def _mine(self, key: str) -> str | None:
        """The id in a partition key read back, or None if the key is another tenant's."""
        if not self._scope:
            return None if keys.SCOPE_SEPARATOR in key else key
        return key[len(self._scope) :] if key.startswith(self._scope) else None
