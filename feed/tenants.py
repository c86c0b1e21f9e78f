"""Tenants: namespaces of users, activities and everything derived from them (docs/tenants.md).

The tenant registry's core, without I/O: tenant ids, the scoping of stored values, quotas and
what they come to with the settings, a tenant's credentials and their grace after a rotation,
the :class:`TenantStore` protocol with its in-memory twin :class:`MemoryTenants` (the Cassandra
one is ``feed.tenants_cassandra.CassandraTenants``), and :class:`TenantCache`, the snapshot every
worker and gateway resolves tenants from.

Guarantees of every :class:`TenantStore`:

* **Only a hash of an ingest token is stored** (SHA-256): a token is shown once, by the command
  that created it (``feed tenant create``/``rotate``), and can never be read back. A JWT secret is
  stored as it is (HMAC needs it).
* **Create is first-wins.** Creating an id that exists raises :class:`TenantExists` and changes
  nothing.
* **No change is lost.** Every change is a compare-and-set on the row's ``updated`` time (which
  strictly increases): two rotations at once both land, one after the other, and the credentials
  each printed stay valid (the first's for the grace period).
* **A rotation keeps the old credentials for a grace period** (``FEED_TENANT_ROTATE_GRACE_S``):
  :meth:`Tenant.ingest_hashes` and :meth:`Tenant.jwt_secrets` hold them until they expire, and a
  later change prunes the expired ones.
* **The default tenant is the settings'.** ``default`` exists without a row; its credentials are
  ``FEED_INGEST_TOKEN`` and ``FEED_JWT_SECRET`` and it is always active. A row named ``default``
  only holds quota overrides: creating, rotating, disabling or enabling it is refused
  (:class:`DefaultTenantError`).
* Timestamps are kept to the millisecond (Cassandra's precision), so a tenant read back equals
  the one that was written.

Secrets never print: :class:`Tenant` and :class:`Credentials` leave them out of their ``repr``,
and no error message holds one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from feed import keys
from feed.logging import get_logger
from schemas.errors import FeedError, ValidationError

if TYPE_CHECKING:
    from feed.settings import Settings

__all__ = [
    "ACTIVE",
    "DEFAULT",
    "DISABLED",
    "HEADER",
    "MISS_INTERVAL_S",
    "MISS_MAX",
    "NO_QUOTAS",
    "QUOTA_BOUNDS",
    "QUOTA_NAMES",
    "SEP",
    "TENANT_ID",
    "Credentials",
    "DefaultTenantError",
    "InvalidTenantId",
    "Limits",
    "MemoryTenants",
    "Quotas",
    "Tenant",
    "TenantCache",
    "TenantChanges",
    "TenantConflict",
    "TenantError",
    "TenantExists",
    "TenantNotFound",
    "TenantStore",
    "UnknownTenant",
    "belongs",
    "check_quota",
    "check_tenant_id",
    "default_row",
    "default_tenant",
    "header_tenant",
    "header_value",
    "ingest_sha256",
    "resolve",
    "scoped",
    "unscoped",
    "utcnow",
]

log = get_logger("feed.tenants")

#: The tenant everything belongs to without tenants: the settings' credentials, today's keys.
DEFAULT = keys.DEFAULT_TENANT
#: A tenant id, matched with ``fullmatch`` (``match`` or ``$`` would let ``"acme\n"`` through).
TENANT_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_TENANT_RULE = "1-32 lowercase letters, digits or '-', starting with a letter or digit"
#: Between a tenant and a value in a scoped value. No valid id holds it (ids refuse every control
#: character: ``schemas.activity``), so a scoped value can never be forged from an id.
SEP = keys.SCOPE_SEPARATOR

ACTIVE = "active"
DISABLED = "disabled"
_STATES = (ACTIVE, DISABLED)


class TenantError(FeedError, ValueError):
    """A tenant id or a change of the registry was refused. The message never holds a secret."""


class InvalidTenantId(ValidationError, TenantError):
    """A tenant id that is not one (``TENANT_ID``); names the field and the rule."""


class DefaultTenantError(TenantError):
    """A change the ``default`` tenant does not take: only its quotas live in the registry."""


class TenantExists(TenantError):
    """``create`` of an id that exists."""


class TenantNotFound(TenantError, LookupError):
    """A change of an id the registry does not hold."""


class TenantConflict(TenantError):
    """A change kept losing its compare-and-set to concurrent changes of the same tenant."""


def _short(value: object) -> str:
    """A repr short enough for an error message (hostile input can be long)."""
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def check_tenant_id(value: object, field: str = "tenant") -> str:
    """``value`` if it is a tenant id, else :class:`InvalidTenantId` naming ``field``."""
    if not isinstance(value, str) or not TENANT_ID.fullmatch(value):
        raise InvalidTenantId(
            field, "invalid_tenant", f"must be a tenant id ({_TENANT_RULE}), got {_short(value)}"
        )
    return value


# --- scoping ---------------------------------------------------------------------------------
#: The Kafka record header naming a record's tenant (absent: ``default``).
HEADER = "feed.tenant"


class UnknownTenant(ValidationError, TenantError):
    """A record, request or token for a tenant the registry does not hold, or holds disabled:
    dead-lettered as ``unknown_tenant`` (field :data:`HEADER` for a Kafka record)."""

    def __init__(self, message: str, field: str = HEADER) -> None:
        super().__init__(field, "unknown_tenant", message)


def header_tenant(headers: Sequence[tuple[str, bytes | None]] | None) -> str | None:
    """The tenant id a Kafka record's headers name (:data:`HEADER`, the first one), or None
    without one. Not yet checked: see :func:`resolve`."""
    return header_value(headers, HEADER)


def header_value(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> str | None:
    """A Kafka record header's value (the first of that name, decoded leniently), or None."""
    if headers:
        for key, value in headers:
            if key == name:
                return (value or b"").decode("utf-8", errors="replace")
    return None


def resolve(cache: TenantCache, tid: str | None, field: str = HEADER) -> str:
    """The tenant ``tid`` names, if the registry holds it enabled (None: ``default``). Raises
    :class:`UnknownTenant` (naming ``field``) for an id that is not one, an unknown or a disabled
    tenant; a store error of the lookup propagates (an outage, not an unknown tenant)."""
    if tid is None or tid == DEFAULT:
        return DEFAULT
    if not TENANT_ID.fullmatch(tid):
        raise UnknownTenant(f"{_short(tid)} is no tenant id ({_TENANT_RULE})", field)
    tenant = cache.get(tid)
    if tenant is None:
        raise UnknownTenant(f"no tenant {tid!r}", field)
    if not tenant.enabled:
        raise UnknownTenant(f"tenant {tid!r} is disabled", field)
    return tid


def scoped(tenant: str, value: str) -> str:
    """``value`` as stored for ``tenant``: itself for the default tenant (today's keys and rows
    stay as they are), else ``<tenant>\\x1f<value>``."""
    return keys.principal_of(tenant, value)


def belongs(tenant: str, value: str) -> bool:
    """Whether the stored ``value`` is one of ``tenant``'s (``scoped(tenant, x)`` for some x)."""
    if tenant == DEFAULT:
        return SEP not in value
    return value.startswith(tenant + SEP)


def unscoped(tenant: str, value: str) -> str:
    """The inverse of :func:`scoped`; :class:`TenantError` if ``value`` is not ``tenant``'s."""
    if not belongs(tenant, value):
        raise TenantError(f"a stored value of another tenant than {tenant!r}")
    return value if tenant == DEFAULT else value[len(tenant) + 1 :]


# --- quotas ----------------------------------------------------------------------------------
#: Each quota's bounds, the same as its setting's (``feed.settings``). For the rates and
#: ``max_connections``, 0 means no limit.
QUOTA_BOUNDS: dict[str, tuple[type, float, float]] = {
    "ingest_rate": (float, 0, 1_000_000),
    "ingest_burst": (int, 1, 1_000_000),
    "max_connections": (int, 0, 10_000_000),
    "max_connections_per_user": (int, 1, 100_000),
    "timeline_max": (int, 1, 100_000),
    "fanout_rate": (float, 0, 1_000_000),
}
QUOTA_NAMES: tuple[str, ...] = tuple(QUOTA_BOUNDS)


def check_quota(name: str, value: object) -> float | int:
    """``value`` as quota ``name`` holds it (a float for a rate), or :class:`ValidationError`
    naming the quota and its bounds."""
    if name not in QUOTA_BOUNDS:
        raise ValidationError(name, "unknown_field", f"no such quota (one of {QUOTA_NAMES})")
    kind, lo, hi = QUOTA_BOUNDS[name]
    shown = f"{lo:.0f} to {hi:.0f}"
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if not numeric or (kind is int and not isinstance(value, int)):
        what = "a whole number" if kind is int else "a number"
        raise ValidationError(name, "wrong_type", f"must be {what} from {shown}")
    assert isinstance(value, int | float)
    if not lo <= value <= hi:  # NaN fails this too
        raise ValidationError(name, "out_of_range", f"must be from {shown}, got {value}")
    return float(value) if kind is float else int(value)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a tenant may use: each quota's override, else its setting (:meth:`Quotas.effective`).
    Rates are per second; 0 for a rate or ``max_connections`` means no limit."""

    ingest_rate: float
    ingest_burst: int
    max_connections: int
    max_connections_per_user: int
    timeline_max: int
    fanout_rate: float
    fanout_burst: int


@dataclasses.dataclass(frozen=True)
class Quotas:
    """A tenant's overrides of the settings; None keeps the setting. Checked on construction
    (:data:`QUOTA_BOUNDS`)."""

    ingest_rate: float | None = None
    ingest_burst: int | None = None
    max_connections: int | None = None
    max_connections_per_user: int | None = None
    timeline_max: int | None = None
    fanout_rate: float | None = None

    def __post_init__(self) -> None:
        for name in QUOTA_NAMES:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check_quota(name, value))

    def overrides(self) -> list[str]:
        """The names of the quotas this tenant overrides, in :data:`QUOTA_NAMES` order."""
        return [name for name in QUOTA_NAMES if getattr(self, name) is not None]

    def with_changes(self, changes: Mapping[str, float | int | None]) -> Quotas:
        """These quotas with ``changes`` applied; a None value clears the override."""
        unknown = sorted(set(changes) - set(QUOTA_NAMES))
        if unknown:
            raise ValidationError(unknown[0], "unknown_field", f"no such quota ({QUOTA_NAMES})")
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def effective(self, settings: Settings) -> Limits:
        """Each override, else its setting: ``FEED_INGEST_RATE``/``FEED_INGEST_BURST``,
        ``FEED_TENANT_MAX_CONNECTIONS``, ``FEED_MAX_CONNECTIONS_PER_USER``, ``FEED_TIMELINE_MAX``
        and ``FEED_TENANT_FANOUT_RATE``; the fan-out burst is ``FEED_TENANT_FANOUT_BURST``."""

        def pick(override: Any, setting: Any) -> Any:
            return setting if override is None else override

        s = settings
        return Limits(
            ingest_rate=pick(self.ingest_rate, s.ingest_rate),
            ingest_burst=pick(self.ingest_burst, s.ingest_burst),
            max_connections=pick(self.max_connections, s.tenant_max_connections),
            max_connections_per_user=pick(
                self.max_connections_per_user, s.max_connections_per_user
            ),
            timeline_max=pick(self.timeline_max, s.timeline_max),
            fanout_rate=pick(self.fanout_rate, s.tenant_fanout_rate),
            fanout_burst=s.tenant_fanout_burst,
        )


#: Quotas that override nothing: every limit is its setting's.
NO_QUOTAS = Quotas()


# --- credentials and tenants -----------------------------------------------------------------
def utcnow() -> datetime:
    return datetime.now(UTC)


def _ms(at: datetime) -> datetime:
    """``at`` to the millisecond, in UTC (what Cassandra keeps of a timestamp)."""
    at = at.astimezone(UTC)
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


def ingest_sha256(token: str) -> bytes:
    """What the registry keeps of an ingest token."""
    return hashlib.sha256(token.encode()).digest()


@dataclasses.dataclass(frozen=True, repr=False)
class Credentials:
    """A tenant's new ingest token and JWT secret, as ``create``/``rotate`` print them once."""

    ingest_token: str
    jwt_secret: str

    @classmethod
    def generate(cls) -> Credentials:
        """A token of 32 random bytes and a secret of 48 (64 characters: HS256 wants at least
        32 bytes, RFC 7518), both URL-safe base64."""
        return cls(secrets.token_urlsafe(32), secrets.token_urlsafe(48))

    @property
    def ingest_sha256(self) -> bytes:
        return ingest_sha256(self.ingest_token)

    def __repr__(self) -> str:
        return "Credentials('**********')"


@dataclasses.dataclass(frozen=True)
class Tenant:
    """A tenant as the registry holds it. ``prev_ingest`` and ``prev_jwt`` map the credentials a
    rotation replaced to when they stop being valid. Its ``repr`` shows no secret and no hash."""

    id: str
    state: str
    created: datetime
    updated: datetime
    ingest_sha256: bytes
    jwt_secret: str
    prev_ingest: Mapping[bytes, datetime] = dataclasses.field(default_factory=dict, hash=False)
    prev_jwt: Mapping[str, datetime] = dataclasses.field(default_factory=dict, hash=False)
    quotas: Quotas = NO_QUOTAS

    def __post_init__(self) -> None:
        if self.state not in _STATES:
            raise TenantError(f"tenant {self.id!r}: unknown state {_short(self.state)}")

    def __repr__(self) -> str:
        return (
            f"Tenant(id={self.id!r}, state={self.state!r}, created={self.created.isoformat()}, "
            f"updated={self.updated.isoformat()}, quotas={self.quotas!r}, "
            f"previous_credentials={len(self.prev_ingest) + len(self.prev_jwt)})"
        )

    @classmethod
    def new(cls, tid: str, credentials: Credentials, quotas: Quotas, now: datetime) -> Tenant:
        """A new, active tenant (``default`` is refused: its credentials are the settings')."""
        _refuse_default(check_tenant_id(tid), "created")
        at = _ms(now)
        return cls(
            tid, ACTIVE, at, at, credentials.ingest_sha256, credentials.jwt_secret, quotas=quotas
        )

    @property
    def enabled(self) -> bool:
        return self.state == ACTIVE

    def ingest_hashes(self, now: datetime) -> list[bytes]:
        """The SHA-256 of every ingest token valid at ``now``: the current one, then the ones a
        rotation replaced that are still in their grace period."""
        current = [self.ingest_sha256] if self.ingest_sha256 else []
        return current + [h for h, until in _newest_first(self.prev_ingest) if until > now]

    def jwt_secrets(self, now: datetime) -> list[str]:
        """Every JWT secret valid at ``now``: the current one first (most tokens are signed
        with it), then the replaced ones still in their grace period, newest first."""
        current = [self.jwt_secret] if self.jwt_secret else []
        return current + [s for s, until in _newest_first(self.prev_jwt) if until > now]

    def grace_until(self, now: datetime) -> datetime | None:
        """When the last replaced credential still valid at ``now`` expires (None: none is)."""
        ends = [u for u in (*self.prev_ingest.values(), *self.prev_jwt.values()) if u > now]
        return max(ends, default=None)

    # --- changes (pure: a store writes the result with a compare-and-set) ------------------
    def _changed(self, now: datetime, **fields: Any) -> Tenant:
        # Strictly after the last change, even within one millisecond: the compare-and-set on
        # `updated` must tell every change from the one before.
        updated = max(_ms(now), self.updated + timedelta(milliseconds=1))
        return dataclasses.replace(self, updated=updated, **fields)

    def rotated(self, credentials: Credentials, now: datetime, grace_s: float) -> Tenant:
        """The current credentials move to the previous ones until ``now + grace_s`` (a grace of
        0 drops them), expired previous ones are dropped, and ``credentials`` become current."""
        _refuse_default(self.id, "rotated")
        until = _ms(now + timedelta(seconds=grace_s))
        prev_ingest = {h: u for h, u in self.prev_ingest.items() if u > now}
        prev_jwt = {s: u for s, u in self.prev_jwt.items() if u > now}
        if until > now:
            prev_ingest[self.ingest_sha256] = until
            prev_jwt[self.jwt_secret] = until
        return self._changed(
            now,
            ingest_sha256=credentials.ingest_sha256,
            jwt_secret=credentials.jwt_secret,
            prev_ingest=prev_ingest,
            prev_jwt=prev_jwt,
        )

    def with_quotas(self, changes: Mapping[str, float | int | None], now: datetime) -> Tenant:
        """``changes`` applied to the overrides (None clears one)."""
        return self._changed(now, quotas=self.quotas.with_changes(changes))

    def with_state(self, state: str, now: datetime) -> Tenant:
        """``active`` or ``disabled``."""
        _refuse_default(self.id, "enabled" if state == ACTIVE else "disabled")
        if state not in _STATES:
            raise TenantError(f"unknown state {_short(state)} (one of {', '.join(_STATES)})")
        return self._changed(now, state=state)


def _newest_first(prev: Mapping[Any, datetime]) -> list[tuple[Any, datetime]]:
    return sorted(prev.items(), key=lambda item: item[1], reverse=True)


def _refuse_default(tid: str, done: str) -> None:
    if tid == DEFAULT:
        raise DefaultTenantError(
            f"the default tenant cannot be {done}: its credentials are FEED_INGEST_TOKEN and "
            "FEED_JWT_SECRET and it is always active; only its quotas can be updated"
        )


def default_tenant(settings: Settings | None, row: Tenant | None = None) -> Tenant:
    """The ``default`` tenant: always active, the settings' credentials (none without
    ``settings``), the quota overrides of its registry ``row`` if there is one."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    token = settings.ingest_token if settings is not None else None
    secret = settings.jwt_secret if settings is not None else None
    return Tenant(
        DEFAULT,
        ACTIVE,
        row.created if row is not None else epoch,
        row.updated if row is not None else epoch,
        ingest_sha256(token.reveal()) if token is not None else b"",
        secret.reveal() if secret is not None else "",
        quotas=row.quotas if row is not None else Quotas(),
    )


def default_row(now: datetime) -> Tenant:
    """A new registry row for the default tenant's quota overrides: no credentials (a store
    makes it on the first ``update_quotas`` of ``default``)."""
    at = _ms(now)
    return Tenant(DEFAULT, ACTIVE, at, at, b"", "")


# --- stores ----------------------------------------------------------------------------------
class TenantStore(Protocol):
    """The tenant registry (see the module docstring for its guarantees). Every change returns
    the tenant as written; a change of an id the registry lacks raises :class:`TenantNotFound`,
    except :meth:`update_quotas` of ``default``, which creates its row."""

    def create(self, tid: str, credentials: Credentials, quotas: Quotas = ...) -> Tenant:
        """A new active tenant; :class:`TenantExists` if the id is taken."""
        ...

    def get(self, tid: str) -> Tenant | None: ...

    def load_all(self) -> list[Tenant]:
        """Every row (``default``'s too, if it has one)."""
        ...

    def update_quotas(self, tid: str, changes: Mapping[str, float | int | None]) -> Tenant:
        """Set (a value) or clear (None) quota overrides."""
        ...

    def set_state(self, tid: str, state: str) -> Tenant:
        """``active`` or ``disabled``."""
        ...

    def rotate(self, tid: str, credentials: Credentials) -> Tenant:
        """New current credentials; the replaced ones stay valid for the store's grace."""
        ...


class TenantChanges:
    """The registry changes every :class:`TenantStore` makes the same way: each a ``_change``
    (the store's compare-and-set) of the tenant's row."""

    _grace_s: float
    _now: Callable[[], datetime]

    def _change(self, tid: str, change: Callable[[Tenant], Tenant]) -> Tenant:
        raise NotImplementedError

    def update_quotas(self, tid: str, changes: Mapping[str, float | int | None]) -> Tenant:
        check_tenant_id(tid)
        return self._change(tid, lambda t: t.with_quotas(changes, self._now()))

    def set_state(self, tid: str, state: str) -> Tenant:
        return self._change(tid, lambda t: t.with_state(state, self._now()))

    def rotate(self, tid: str, credentials: Credentials) -> Tenant:
        return self._change(tid, lambda t: t.rotated(credentials, self._now(), self._grace_s))


class MemoryTenants(TenantChanges):
    """:class:`TenantStore` in a dict, for unit tests; same guarantees, no durability."""

    def __init__(
        self, *, rotate_grace_s: float = 3600, now: Callable[[], datetime] = utcnow
    ) -> None:
        self._rows: dict[str, Tenant] = {}
        self._lock = threading.Lock()
        self._grace_s = rotate_grace_s
        self._now = now
        #: Store calls so far (tests count lookups).
        self.calls = 0
        #: When set, every call raises it (a registry outage).
        self.fail: Exception | None = None

    def _call(self) -> None:
        self.calls += 1
        if self.fail is not None:
            raise self.fail

    def create(self, tid: str, credentials: Credentials, quotas: Quotas = NO_QUOTAS) -> Tenant:
        self._call()
        tenant = Tenant.new(tid, credentials, quotas, self._now())
        with self._lock:
            if tid in self._rows:
                raise TenantExists(f"tenant {tid!r} exists")
            self._rows[tid] = tenant
        return tenant

    def get(self, tid: str) -> Tenant | None:
        self._call()
        return self._rows.get(tid)

    def load_all(self) -> list[Tenant]:
        self._call()
        return list(self._rows.values())

    def _change(self, tid: str, change: Callable[[Tenant], Tenant]) -> Tenant:
        self._call()
        with self._lock:
            current = self._rows.get(tid)
            if current is None:
                if tid != DEFAULT:
                    raise TenantNotFound(f"no tenant {tid!r}")
                current = default_row(self._now())
            self._rows[tid] = changed = change(current)
        return changed


# --- the cache every process resolves tenants from -------------------------------------------
#: Least time between two store lookups of one unknown id (:meth:`TenantCache.get`).
MISS_INTERVAL_S = 1.0
#: Unknown ids remembered for that (least recently looked up forgotten first).
MISS_MAX = 10_000


class TenantCache:
    """A snapshot of the registry, reloaded whole at most every ``refresh_s`` (the caller calls
    :meth:`maybe_refresh` from its loop), so a change reaches every process within that.

    * A failed reload keeps the previous snapshot, logs, and is tried again on the next call.
    * An id missing from the snapshot is looked up in the store, at most once per id per
      :data:`MISS_INTERVAL_S` (ids not found are remembered, at most :data:`MISS_MAX`): a tenant
      created a moment ago works before the next reload, and a flood of unknown ids costs at most
      one lookup per id per second. A store error of such a lookup propagates (an outage, not an
      unknown tenant).
    * ``default`` is always known: the settings' credentials, the quotas of its row.
    * Not thread-safe: one per event loop or worker thread.
    """

    def __init__(
        self,
        store: TenantStore,
        refresh_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        settings: Settings | None = None,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._clock = clock
        self._now = now
        self._settings = settings
        self._by_id: dict[str, Tenant] = {DEFAULT: default_tenant(settings)}
        self._by_hash: dict[bytes, Tenant] = {}
        self._loaded_at: float | None = None
        self._tried_at: float | None = None  # the last reload attempted by maybe_refresh
        self._snapshot: tuple[Tenant, ...] = tuple(self._by_id.values())
        self._misses: OrderedDict[str, float] = OrderedDict()
        self._labels: tuple[int, frozenset[str]] | None = None  # label(): (most, ids)
        self._index(self._by_id[DEFAULT])

    @property
    def loaded(self) -> bool:
        """Whether a reload ever succeeded."""
        return self._loaded_at is not None

    def maybe_refresh(self) -> bool:
        """Reload the snapshot if ``refresh_s`` passed since the last successful reload (or none
        succeeded yet), and no attempt failed within the last second. True if it reloaded;
        False if not due, or if the reload failed (logged; the previous snapshot stays)."""
        at = self._clock()
        if self._loaded_at is not None and at - self._loaded_at < self._refresh_s:
            return False
        if self._tried_at is not None and at - self._tried_at < min(self._refresh_s, 1.0):
            return False  # a failed reload is tried again a second later, not on every call
        self._tried_at = at
        try:
            self.refresh()
        except Exception as exc:  # any store error: keep serving the previous snapshot
            log.warning("tenant_refresh_failed", error=type(exc).__name__, detail=str(exc)[:300])
            return False
        return True

    def refresh(self) -> None:
        """Reload the snapshot now (a store error propagates; the previous snapshot stays)."""
        rows = self._store.load_all()
        # Built aside and swapped in whole: a reader on another thread (the gateway reloads in
        # one) sees the old snapshot or the new one, never a half-filled one.
        by_id: dict[str, Tenant] = {}
        by_hash: dict[bytes, Tenant] = {}
        for tenant in rows:
            self._add(tenant, by_id, by_hash)
        if DEFAULT not in by_id:
            self._add(default_tenant(self._settings), by_id, by_hash)
        self._by_id, self._by_hash, self._labels = by_id, by_hash, None
        self._snapshot = tuple(by_id.values())
        self._loaded_at = self._clock()

    def _add(
        self,
        tenant: Tenant,
        by_id: dict[str, Tenant] | None = None,
        by_hash: dict[bytes, Tenant] | None = None,
    ) -> None:
        by_id = self._by_id if by_id is None else by_id
        by_hash = self._by_hash if by_hash is None else by_hash
        self._labels = None
        if tenant.id == DEFAULT:
            tenant = default_tenant(self._settings, tenant)
        by_id[tenant.id] = tenant
        self._index(tenant, by_hash)
        if by_id is self._by_id:  # added to the live snapshot (a lookup): a new version of it
            self._snapshot = tuple(by_id.values())

    def _index(self, tenant: Tenant, by_hash: dict[bytes, Tenant] | None = None) -> None:
        by_hash = self._by_hash if by_hash is None else by_hash
        by_hash.update(dict.fromkeys([tenant.ingest_sha256, *tenant.prev_ingest], tenant))
        by_hash.pop(b"", None)

    def get(self, tid: str) -> Tenant | None:
        """The tenant ``tid`` (disabled ones too: check :attr:`Tenant.enabled`), or None if the
        registry does not hold it (or it is no tenant id)."""
        tenant = self._by_id.get(tid)
        if tenant is not None or not TENANT_ID.fullmatch(tid):
            return tenant
        at = self._clock()
        last = self._misses.get(tid)
        if last is not None and at - last < MISS_INTERVAL_S:
            self._misses.move_to_end(tid)
            return None
        self._misses[tid] = at
        self._misses.move_to_end(tid)
        while len(self._misses) > MISS_MAX:
            self._misses.popitem(last=False)
        found = self._store.get(tid)
        if found is not None:
            del self._misses[tid]
            self._add(found)
        return found

    def peek(self, tid: str) -> Tenant | None:
        """The snapshot's tenant ``tid``, with no store lookup (an event loop's fast path)."""
        return self._by_id.get(tid)

    def by_ingest_token(self, token: str) -> Tenant | None:
        """The tenant whose current or unexpired previous ingest token ``token`` is, or None.
        A dictionary lookup of the token's SHA-256: the time it takes depends on the hash, not
        on how much of a valid token an attacker guessed, so no constant-time compare is
        needed. Default's token is found too when the cache has the settings."""
        digest = ingest_sha256(token)
        tenant = self._by_hash.get(digest)
        if tenant is None or digest not in tenant.ingest_hashes(self._now()):
            return None
        return tenant

    def label(self, tid: str, most: int) -> str:
        """``tid`` as a metric label: ``default`` and the ``most`` oldest tenants by their id,
        any other ``other`` (``FEED_TENANT_METRICS_MAX``: the series stay bounded whatever the
        number of tenants; an unknown id is never a label)."""
        labelled = self._labels
        if labelled is None or labelled[0] != most:
            ids = frozenset(t.id for t in self.known()[: most + 1])
            labelled = self._labels = (most, ids)
        return tid if tid in labelled[1] else "other"

    def known_version(self) -> Sequence[Tenant]:
        """Every tenant of the snapshot, as one object that changes with each reload (compare
        with ``is`` to know whether anything derived from it must be computed again)."""
        return self._snapshot

    def known(self) -> list[Tenant]:
        """Every tenant of the snapshot, ``default`` first, then oldest first."""
        rest = (t for t in self._by_id.values() if t.id != DEFAULT)
        return [self._by_id[DEFAULT], *sorted(rest, key=lambda t: (t.created, t.id))]
