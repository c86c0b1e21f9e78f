"""CassandraTenants against the real Cassandra of the test session: the registry's guarantees
(``feed.tenants``) on the ``tenants`` table ``feed migrate`` creates."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from feed.tenants import (
    DEFAULT,
    Credentials,
    DefaultTenantError,
    Quotas,
    TenantCache,
    TenantExists,
    TenantNotFound,
)
from feed.tenants_cassandra import CassandraTenants


def _store(cassandra: Any, settings: Any, **kw: Any) -> CassandraTenants:
    return CassandraTenants(cassandra, settings.cassandra_keyspace, **kw)


def test_create_get_and_a_duplicate(
    cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    store = _store(cassandra, settings)
    tid, creds = ids("acme"), Credentials.generate()
    created = store.create(tid, creds, Quotas(ingest_rate=2.5, timeline_max=5))
    assert store.get(tid) == created  # read back equal: timestamps kept to the millisecond
    assert created.enabled and created.quotas.overrides() == ["ingest_rate", "timeline_max"]
    assert created.created.tzinfo is not None
    with pytest.raises(TenantExists, match=tid):
        store.create(tid, Credentials.generate())
    again = store.get(tid)
    assert again is not None and again.jwt_secret == creds.jwt_secret  # the first create won
    assert store.get(ids("nobody")) is None


def test_only_the_hash_of_the_ingest_token_is_stored(
    cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    store = _store(cassandra, settings)
    tid, first, second = ids("acme"), Credentials.generate(), Credentials.generate()
    store.create(tid, first)
    store.rotate(tid, second)
    ks = settings.cassandra_keyspace
    row = cassandra.execute(f"SELECT * FROM {ks}.tenants WHERE id = %s", (tid,)).one()
    stored = repr(tuple(row))
    for creds in (first, second):
        assert creds.ingest_token not in stored
        assert creds.ingest_token.encode() not in row.ingest_sha256
    assert row.ingest_sha256 == second.ingest_sha256
    assert set(row.prev_ingest) == {first.ingest_sha256}


def test_update_quotas_set_and_clear(
    cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    store = _store(cassandra, settings)
    tid = ids("acme")
    created = store.create(tid, Credentials.generate(), Quotas(ingest_rate=1))
    updated = store.update_quotas(tid, {"ingest_rate": None, "max_connections": 3})
    assert updated.quotas == Quotas(max_connections=3) and updated.updated > created.updated
    assert store.get(tid) == updated
    with pytest.raises(TenantNotFound):
        store.update_quotas(ids("nobody"), {"timeline_max": 5})


def test_rotation_grace_and_pruning(
    cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    now = [datetime.now(UTC)]
    store = _store(cassandra, settings, rotate_grace_s=60, now=lambda: now[0])
    tid = ids("acme")
    first, second, third = (Credentials.generate() for _ in range(3))
    store.create(tid, first)
    rotated = store.rotate(tid, second)
    read = store.get(tid)
    assert read == rotated
    assert read.jwt_secrets(now[0]) == [second.jwt_secret, first.jwt_secret]
    assert read.ingest_hashes(now[0]) == [second.ingest_sha256, first.ingest_sha256]
    now[0] += timedelta(seconds=61)  # the first credentials expired: the next rotation drops them
    store.rotate(tid, third)
    read = store.get(tid)
    assert read is not None and set(read.prev_jwt) == {second.jwt_secret}
    assert read.jwt_secrets(now[0]) == [third.jwt_secret, second.jwt_secret]
    with pytest.raises(TenantNotFound):
        store.rotate(ids("nobody"), Credentials.generate())


def test_concurrent_rotations_lose_none(
    cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    store = _store(cassandra, settings)
    tid = ids("acme")
    store.create(tid, Credentials.generate())
    new = [Credentials.generate() for _ in range(4)]
    errors: list[BaseException] = []

    def rotate(creds: Credentials) -> None:
        try:
            store.rotate(tid, creds)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rotate, args=(c,)) for c in new]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    tenant = store.get(tid)
    assert tenant is not None
    valid = tenant.jwt_secrets(datetime.now(UTC))
    assert {c.jwt_secret for c in new} <= set(valid)  # every printed secret still works
    assert len(valid) == 5  # the four, and the first one, in its grace


def test_disable_enable_and_load_all(
    cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    store = _store(cassandra, settings)
    a, b = ids("acme"), ids("globex")
    store.create(a, Credentials.generate())
    store.create(b, Credentials.generate())
    assert not store.set_state(a, "disabled").enabled
    assert not store.get(a).enabled  # type: ignore[union-attr]
    by_id = {t.id: t for t in store.load_all()}
    assert not by_id[a].enabled and by_id[b].enabled
    assert store.set_state(a, "active").enabled
    with pytest.raises(TenantNotFound):
        store.set_state(ids("nobody"), "disabled")


def test_the_default_row_holds_only_quotas(cassandra: Any, settings: Any) -> None:
    store = _store(cassandra, settings)
    for refused in (
        lambda: store.create(DEFAULT, Credentials.generate()),
        lambda: store.rotate(DEFAULT, Credentials.generate()),
        lambda: store.set_state(DEFAULT, "disabled"),
    ):
        with pytest.raises(DefaultTenantError):
            refused()
    try:
        row = store.update_quotas(DEFAULT, {"fanout_rate": 5})
        assert row.quotas.fanout_rate == 5 and row.jwt_secret == "" and row.ingest_sha256 == b""
        cache = TenantCache(store, 10, settings=settings)
        assert cache.maybe_refresh()
        default = cache.get(DEFAULT)
        assert default is not None and default.quotas.fanout_rate == 5
        assert default.jwt_secrets(datetime.now(UTC)) == [settings.jwt_secret.reveal()]
    finally:
        store.update_quotas(DEFAULT, {"fanout_rate": None})


def test_the_cache_finds_a_new_tenant_before_its_refresh(
    cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    store = _store(cassandra, settings)
    cache = TenantCache(store, 10, settings=settings)
    assert cache.maybe_refresh()
    tid, creds = ids("acme"), Credentials.generate()
    store.create(tid, creds)
    found = cache.get(tid)
    assert found is not None and found.id == tid
    assert cache.by_ingest_token(creds.ingest_token) == found
