"""The tenant registry's core: ids, scoping, quotas, credentials and their grace, the in-memory
store and the cache every process resolves tenants from (fake clocks, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

from feed.settings import Secret, Settings
from feed.tenants import (
    DEFAULT,
    MISS_INTERVAL_S,
    Credentials,
    DefaultTenantError,
    InvalidTenantId,
    Limits,
    MemoryTenants,
    Quotas,
    Tenant,
    TenantCache,
    TenantError,
    TenantExists,
    TenantNotFound,
    belongs,
    check_tenant_id,
    ingest_sha256,
    scoped,
    unscoped,
)
from schemas.activity import ID_RE
from schemas.errors import FeedError, ValidationError

T0 = datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC)


class Clocks:
    """A monotonic clock and a wall clock that move together."""

    def __init__(self) -> None:
        self.t = 100.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> datetime:
        return T0 + timedelta(seconds=self.t - 100.0)

    def advance(self, seconds: float) -> None:
        self.t += seconds


# --- ids -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tid", ["a", "0", "acme", "acme-eu-1", "9lives", "a" * 32, "a-"])
def test_valid_tenant_ids(tid: str) -> None:
    assert check_tenant_id(tid) == tid


@pytest.mark.parametrize(
    "tid",
    ["", "acme\n", "Acme", "ACME", "a" * 33, "-acme", "ac me", "ac_me", "ac.me", "é", "acme\x1f"],
)
def test_invalid_tenant_ids_name_the_field_and_the_rule(tid: str) -> None:
    with pytest.raises(InvalidTenantId) as info:
        check_tenant_id(tid, field="feed.tenant")
    error = info.value
    assert isinstance(error, ValidationError) and isinstance(error, TenantError)
    assert isinstance(error, FeedError)
    assert error.field == "feed.tenant" and error.code == "invalid_tenant"
    assert str(error).startswith("feed.tenant: must be a tenant id (1-32 lowercase letters")


def test_an_invalid_id_is_shown_short() -> None:
    with pytest.raises(InvalidTenantId) as info:
        check_tenant_id("X" * 10_000)
    assert len(str(info.value)) < 200
    with pytest.raises(InvalidTenantId):
        check_tenant_id(None)


# --- scoping ---------------------------------------------------------------------------------
def test_scoped_values_keep_default_as_it_is() -> None:
    assert scoped(DEFAULT, "u1") == "u1"
    assert scoped("acme", "u1") == "acme\x1fu1"
    for tenant in (DEFAULT, "acme", "acme-eu"):
        value = scoped(tenant, "u1")
        assert belongs(tenant, value) and unscoped(tenant, value) == "u1"
    assert not belongs(DEFAULT, "acme\x1fu1")
    assert not belongs("acme", "u1")
    assert not belongs("acme", "acme-eu\x1fu1")  # a tenant whose id extends another's
    assert not belongs("acme-eu", "acme\x1fu1")
    with pytest.raises(TenantError):
        unscoped("acme", "globex\x1fu1")
    with pytest.raises(TenantError):
        unscoped(DEFAULT, "acme\x1fu1")


def test_no_valid_id_holds_the_separator() -> None:
    # What makes a scoped value unforgeable: ids refuse every control character.
    assert ID_RE.match("u1") and not ID_RE.match("acme\x1fu1")


# --- quotas ----------------------------------------------------------------------------------
def test_effective_quotas_are_the_override_else_the_setting() -> None:
    settings = Settings.from_env(
        {
            "FEED_INGEST_RATE": "50",
            "FEED_INGEST_BURST": "60",
            "FEED_TENANT_MAX_CONNECTIONS": "1000",
            "FEED_MAX_CONNECTIONS_PER_USER": "5",
            "FEED_TIMELINE_MAX": "300",
            "FEED_TENANT_FANOUT_RATE": "70",
            "FEED_TENANT_FANOUT_BURST": "80",
        }
    )
    assert Quotas().effective(settings) == Limits(50.0, 60, 1000, 5, 300, 70.0, 80)
    quotas = Quotas(ingest_rate=1, max_connections=2, timeline_max=5)
    assert quotas.ingest_rate == 1.0 and isinstance(quotas.ingest_rate, float)
    assert quotas.effective(settings) == Limits(1.0, 60, 2, 5, 5, 70.0, 80)
    assert quotas.overrides() == ["ingest_rate", "max_connections", "timeline_max"]
    # the defaults without settings of their own: no limit on connections or fan-out
    defaults = Quotas().effective(Settings())
    assert (defaults.max_connections, defaults.fanout_rate, defaults.fanout_burst) == (0, 0, 1000)


def test_quota_changes_set_and_clear() -> None:
    quotas = Quotas(ingest_rate=5, fanout_rate=3)
    changed = quotas.with_changes({"ingest_rate": None, "ingest_burst": 9})
    assert changed == Quotas(ingest_burst=9, fanout_rate=3)
    with pytest.raises(ValidationError) as info:
        quotas.with_changes({"nope": 1})
    assert info.value.field == "nope" and info.value.code == "unknown_field"


@pytest.mark.parametrize(
    ("name", "value", "code"),
    [
        ("ingest_rate", -1, "out_of_range"),
        ("ingest_rate", float("nan"), "out_of_range"),
        ("ingest_burst", 0, "out_of_range"),
        ("ingest_burst", 1.5, "wrong_type"),
        ("max_connections", True, "wrong_type"),
        ("max_connections_per_user", 100_001, "out_of_range"),
        ("timeline_max", 0, "out_of_range"),
        ("fanout_rate", "1", "wrong_type"),
    ],
)
def test_quotas_out_of_bounds_name_the_quota_and_its_limits(
    name: str, value: object, code: str
) -> None:
    with pytest.raises(ValidationError) as info:
        Quotas(**{name: value})  # type: ignore[arg-type]
    assert info.value.field == name and info.value.code == code
    assert " to " in info.value.message


# --- tenants and credentials -----------------------------------------------------------------
def test_new_credentials_are_long_enough_and_never_print() -> None:
    a, b = Credentials.generate(), Credentials.generate()
    assert a.ingest_token != b.ingest_token and a.jwt_secret != b.jwt_secret
    assert len(a.ingest_token) >= 43 and len(a.jwt_secret.encode()) >= 64
    assert a.ingest_token not in repr(a) and a.jwt_secret not in repr(a)
    assert a.ingest_sha256 == ingest_sha256(a.ingest_token)


def test_a_tenant_repr_shows_no_secret_and_no_hash() -> None:
    creds = Credentials.generate()
    tenant = Tenant.new("acme", creds, Quotas(ingest_rate=3), T0)
    rotated = tenant.rotated(Credentials.generate(), T0, 3600)
    for shown in (repr(tenant), str(tenant), repr(rotated), repr([rotated])):
        assert creds.jwt_secret not in shown and creds.ingest_token not in shown
        assert creds.ingest_sha256.hex() not in shown and repr(creds.ingest_sha256) not in shown
        assert "acme" in shown and "ingest_rate=3.0" in shown


def test_new_tenants_are_active_at_millisecond_precision() -> None:
    tenant = Tenant.new("acme", Credentials.generate(), Quotas(), T0)
    assert tenant.enabled and tenant.state == "active"
    assert tenant.created == tenant.updated == T0.replace(microsecond=123000)
    with pytest.raises(InvalidTenantId):
        Tenant.new("Acme", Credentials.generate(), Quotas(), T0)


def test_rotation_keeps_the_old_credentials_for_the_grace_period() -> None:
    first, second, third = (Credentials.generate() for _ in range(3))
    tenant = Tenant.new("acme", first, Quotas(), T0)
    assert tenant.ingest_hashes(T0) == [first.ingest_sha256]
    assert tenant.jwt_secrets(T0) == [first.jwt_secret] and tenant.grace_until(T0) is None

    t1 = T0 + timedelta(seconds=10)
    rotated = tenant.rotated(second, t1, 60)
    assert rotated.updated > tenant.updated and rotated.created == tenant.created
    assert rotated.ingest_hashes(t1) == [second.ingest_sha256, first.ingest_sha256]
    assert rotated.jwt_secrets(t1) == [second.jwt_secret, first.jwt_secret]  # current first
    until = rotated.grace_until(t1)
    assert until is not None and abs((until - (t1 + timedelta(seconds=60))).total_seconds()) < 1e-3

    # a second rotation within the grace keeps both previous ones, newest first
    t2 = t1 + timedelta(seconds=30)
    again = rotated.rotated(third, t2, 60)
    assert again.jwt_secrets(t2) == [third.jwt_secret, second.jwt_secret, first.jwt_secret]

    # past the first grace: the first credentials are refused, and the next change prunes them
    t3 = t1 + timedelta(seconds=61)
    assert again.jwt_secrets(t3) == [third.jwt_secret, second.jwt_secret]
    assert again.ingest_hashes(t3) == [third.ingest_sha256, second.ingest_sha256]
    pruned = again.with_state("disabled", t3).rotated(Credentials.generate(), t3, 60)
    assert first.jwt_secret not in pruned.prev_jwt and first.ingest_sha256 not in pruned.prev_ingest

    # a grace of 0 drops the replaced credentials at once
    assert tenant.rotated(second, t1, 0).jwt_secrets(t1) == [second.jwt_secret]


def test_changes_within_one_millisecond_still_move_updated() -> None:
    tenant = Tenant.new("acme", Credentials.generate(), Quotas(), T0)
    a = tenant.with_quotas({"ingest_rate": 1}, T0)
    b = a.with_quotas({"ingest_rate": 2}, T0)
    assert tenant.updated < a.updated < b.updated


def test_the_default_tenant_only_takes_quotas() -> None:
    store = MemoryTenants(now=lambda: T0)
    for refused in (
        lambda: store.create(DEFAULT, Credentials.generate()),
        lambda: store.rotate(DEFAULT, Credentials.generate()),
        lambda: store.set_state(DEFAULT, "disabled"),
        lambda: store.set_state(DEFAULT, "active"),
    ):
        with pytest.raises(DefaultTenantError, match="FEED_INGEST_TOKEN and FEED_JWT_SECRET"):
            refused()
    row = store.update_quotas(DEFAULT, {"ingest_rate": 5})
    assert row.quotas == Quotas(ingest_rate=5) and row.jwt_secret == "" and row.enabled
    assert store.get(DEFAULT) == row


def test_memory_store_create_get_update_state_rotate() -> None:
    clocks = Clocks()
    store = MemoryTenants(rotate_grace_s=60, now=clocks.wall)
    creds = Credentials.generate()
    created = store.create("acme", creds, Quotas(timeline_max=5))
    assert store.get("acme") == created and store.load_all() == [created]
    with pytest.raises(TenantExists):
        store.create("acme", Credentials.generate())
    with pytest.raises(TenantNotFound):
        store.rotate("globex", Credentials.generate())
    with pytest.raises(TenantNotFound):
        store.update_quotas("globex", {"timeline_max": 1})
    clocks.advance(1)
    assert store.update_quotas("acme", {"timeline_max": None}).quotas == Quotas()
    assert not store.set_state("acme", "disabled").enabled
    assert store.set_state("acme", "active").enabled
    new = Credentials.generate()
    rotated = store.rotate("acme", new)
    assert rotated.jwt_secrets(clocks.wall()) == [new.jwt_secret, creds.jwt_secret]
    with pytest.raises(TenantError):
        store.set_state("acme", "paused")


# --- the cache -------------------------------------------------------------------------------
def _cache(store: MemoryTenants, clocks: Clocks, **kw: object) -> TenantCache:
    return TenantCache(store, 10.0, clocks.mono, now=clocks.wall, **kw)  # type: ignore[arg-type]


def test_refresh_is_bounded_by_refresh_s() -> None:
    clocks = Clocks()
    store = MemoryTenants(now=clocks.wall)
    cache = _cache(store, clocks)
    assert not cache.loaded and cache.maybe_refresh() and cache.loaded
    store.create("acme", Credentials.generate(), Quotas(ingest_rate=1))
    calls = store.calls
    clocks.advance(9.9)
    assert not cache.maybe_refresh() and store.calls == calls  # not due: no store call
    clocks.advance(0.1)
    assert cache.maybe_refresh() and store.calls == calls + 1
    assert [t.id for t in cache.known()] == [DEFAULT, "acme"]
    store.update_quotas("acme", {"ingest_rate": 2})
    clocks.advance(10)
    cache.maybe_refresh()
    tenant = cache.get("acme")
    assert tenant is not None and tenant.quotas.ingest_rate == 2


def test_a_failed_refresh_keeps_the_snapshot_and_retries_a_second_later() -> None:
    clocks = Clocks()
    store = MemoryTenants(now=clocks.wall)
    store.create("acme", Credentials.generate())
    cache = _cache(store, clocks)
    assert cache.maybe_refresh()
    clocks.advance(10)
    store.fail = ConnectionError("cassandra down")
    with capture_logs() as logs:
        assert not cache.maybe_refresh()
    assert [e["event"] for e in logs] == ["tenant_refresh_failed"]
    assert logs[0]["error"] == "ConnectionError" and logs[0]["log_level"] == "warning"
    assert cache.get("acme") is not None  # the previous snapshot
    calls = store.calls
    assert not cache.maybe_refresh()  # not on every call (a worker calls it every batch) ...
    assert store.calls == calls
    clocks.advance(1)
    with capture_logs():
        assert not cache.maybe_refresh()  # ... but a second later, not after another refresh_s
    assert store.calls == calls + 1
    store.fail = None
    clocks.advance(1)
    assert cache.maybe_refresh()


def test_a_new_tenant_is_found_before_the_next_refresh_at_most_once_per_second() -> None:
    clocks = Clocks()
    store = MemoryTenants(now=clocks.wall)
    cache = _cache(store, clocks)
    cache.maybe_refresh()
    calls = store.calls
    assert cache.get("acme") is None and store.calls == calls + 1
    for _ in range(100):
        assert cache.get("acme") is None  # remembered as missing
    assert store.calls == calls + 1
    store.create("acme", Credentials.generate())
    calls = store.calls
    clocks.advance(MISS_INTERVAL_S / 2)
    assert cache.get("acme") is None and store.calls == calls
    clocks.advance(MISS_INTERVAL_S / 2)
    found = cache.get("acme")
    assert found is not None and found.id == "acme" and store.calls == calls + 1
    assert cache.get("acme") == found and store.calls == calls + 1  # now in the snapshot
    # another unknown id has its own budget; no id is looked up
    assert cache.get("globex") is None and store.calls == calls + 2
    assert cache.get("Not-An-Id") is None and cache.get("acme\n") is None
    assert store.calls == calls + 2


def test_the_miss_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import feed.tenants

    monkeypatch.setattr(feed.tenants, "MISS_MAX", 3)
    clocks = Clocks()
    store = MemoryTenants(now=clocks.wall)
    cache = _cache(store, clocks)
    for tid in ("a", "b", "c", "d"):  # "a" is forgotten
        cache.get(tid)
    calls = store.calls
    cache.get("d")
    assert store.calls == calls
    cache.get("a")
    assert store.calls == calls + 1


def test_ingest_tokens_resolve_through_their_hash_during_grace_only() -> None:
    clocks = Clocks()
    store = MemoryTenants(rotate_grace_s=60, now=clocks.wall)
    old, new = Credentials.generate(), Credentials.generate()
    store.create("acme", old)
    store.rotate("acme", new)
    cache = _cache(store, clocks)
    cache.maybe_refresh()
    for token in (old.ingest_token, new.ingest_token):
        tenant = cache.by_ingest_token(token)
        assert tenant is not None and tenant.id == "acme"
    assert cache.by_ingest_token("nope" * 10) is None
    clocks.advance(61)
    assert cache.by_ingest_token(old.ingest_token) is None
    assert cache.by_ingest_token(new.ingest_token) is not None


def test_a_disabled_tenant_is_still_resolved_but_not_enabled() -> None:
    clocks = Clocks()
    store = MemoryTenants(now=clocks.wall)
    creds = Credentials.generate()
    store.create("acme", creds)
    store.set_state("acme", "disabled")
    cache = _cache(store, clocks)
    cache.maybe_refresh()
    tenant = cache.get("acme")
    assert tenant is not None and not tenant.enabled
    by_token = cache.by_ingest_token(creds.ingest_token)
    assert by_token is not None and not by_token.enabled


def test_default_is_always_known_with_the_settings_credentials_and_its_row_quotas() -> None:
    clocks = Clocks()
    settings = Settings(jwt_secret=Secret("j" * 40), ingest_token=Secret("i" * 20))
    store = MemoryTenants(now=clocks.wall)
    cache = _cache(store, clocks, settings=settings)
    default = cache.get(DEFAULT)
    assert default is not None and default.enabled and store.calls == 0  # before any refresh
    assert default.jwt_secrets(clocks.wall()) == ["j" * 40]
    assert cache.by_ingest_token("i" * 20) == default
    store.update_quotas(DEFAULT, {"ingest_rate": 7})
    cache.maybe_refresh()
    default = cache.get(DEFAULT)
    assert default is not None and default.quotas == Quotas(ingest_rate=7)
    assert default.jwt_secrets(clocks.wall()) == ["j" * 40]  # never the row's (empty) ones
    # without settings: no credentials at all (never an empty key that would verify anything)
    bare = _cache(MemoryTenants(now=clocks.wall), clocks).get(DEFAULT)
    assert bare is not None and bare.jwt_secrets(clocks.wall()) == []
    assert bare.ingest_hashes(clocks.wall()) == []
