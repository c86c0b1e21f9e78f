"""Tenants at the gateway (``docs/tenants.md``): who a request or connection belongs to, and the
stores it may reach.

* **Principals.** The hub, the delivery streams and the sessions key a connection by its
  principal: the user id for the ``default`` tenant (so a deployment without tenants keys
  everything as before), else ``<tenant>\\x1f<user>`` (``UserClaims.principal``). No valid id
  holds the separator, so no user of one tenant can name another tenant's principal.
  :class:`PrincipalPresence` and ``feed.keys.principal_channel`` turn a principal back into the
  tenant's own names.
* **Credentials.** A user JWT is verified with the secret of the tenant its ``tid`` claim names
  only (``gateway.auth.verify_user_token``); an ingest token is looked up by its hash. Both in
  :class:`Tenancy`, which holds the registry's snapshot (``feed.tenants.TenantCache``), reloaded
  every ``FEED_TENANT_REFRESH_S`` in the background. The registry lives in Cassandra: a gateway
  without Cassandra serves the ``default`` tenant only.
* **Views.** A tenant's reader, timelines and notifications are the default ones' views
  (``for_tenant``), built once per tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import redis.asyncio as aioredis

from feed import keys, scripts
from feed.interfaces import DeliveryStream, Presence
from feed.logging import get_logger
from feed.settings import Settings
from feed.tenants import DEFAULT, NO_QUOTAS, Limits, Tenant, TenantCache, utcnow
from gateway import closecodes
from gateway.auth import AuthError, UserClaims, token_tenant, verify_user_token
from gateway.errors import ConnectRejected

if TYPE_CHECKING:
    from feed.delivery_redis import AsyncRedisPresence

__all__ = ["PrincipalPresence", "Revocable", "Tenancy", "TenantConnections"]

log = get_logger("gateway.tenancy")

#: How often at most an ingest token the snapshot does not know reloads it.
RELOAD_ON_MISS_S = 1.0


class PrincipalPresence:
    """The delivery streams of principals (a :class:`~feed.interfaces.DeliveryStream` whose
    users are principals): each call goes to the principal's tenant's view of ``inner``, with
    the user id. A default principal is a user id: ``inner`` itself, one check."""

    def __init__(self, inner: AsyncRedisPresence) -> None:
        self._inner = inner
        self._views: dict[str, AsyncRedisPresence] = {}

    def _of(self, principal: str) -> tuple[DeliveryStream, str]:
        if keys.SCOPE_SEPARATOR not in principal:
            return self._inner, principal
        tenant, _, user = principal.partition(keys.SCOPE_SEPARATOR)
        view = self._views.get(tenant)
        if view is None:
            view = self._views[tenant] = self._inner.for_tenant(tenant)
        return view, user

    async def attach(self, user: str) -> Presence:
        store, uid = self._of(user)
        return await store.attach(uid)

    async def renew(self, user: str, epoch: str) -> Presence:
        store, uid = self._of(user)
        return await store.renew(uid, epoch)

    async def refresh(self, users: Iterable[str]) -> list[str]:
        """Each tenant's users in one call of its view; the principals whose presence was gone."""
        groups: dict[str, tuple[DeliveryStream, list[str], list[str]]] = {}
        for principal in users:
            store, uid = self._of(principal)
            tenant = (
                principal.partition(keys.SCOPE_SEPARATOR)[0] if store is not self._inner else ""
            )
            group = groups.get(tenant)
            if group is None:
                group = groups[tenant] = (store, [], [])
            group[1].append(principal)
            group[2].append(uid)
        lost: list[str] = []
        for store, principals, uids in groups.values():
            gone = set(await store.refresh(uids))
            lost += [p for p, u in zip(principals, uids, strict=True) if u in gone]
        return lost

    async def frames_after(self, user: str, seq: int, limit: int) -> list[tuple[int, bytes]]:
        store, uid = self._of(user)
        return await store.frames_after(uid, seq, limit)

    async def oldest_seq(self, user: str) -> int | None:
        store, uid = self._of(user)
        return await store.oldest_seq(uid)


class Revocable(Protocol):
    """A connection whose credentials a disabled tenant revokes (``StreamConnection``)."""

    def revoke(self, reason: str) -> None: ...


class TenantConnections:
    """A gateway's connections that a tenant quota or a disable concerns: every connection of a
    tenant other than ``default``, and the default's while it has a connection quota.

    A tenant's connection quota holds across gateways: each admission is a lease in the
    tenant's sorted set in Redis (``feed/lua/conn_admit.lua``), taken at connect, renewed by
    every gateway for its own connections every :data:`RENEW_S`, ended at close; the leases of a
    gateway that died lapse after :data:`LEASE_MS`. A tenant without a quota costs no Redis call.
    """

    #: How long an admission holds without a renewal (a dead gateway's connections: then).
    LEASE_MS = 60_000
    #: How often the leases are renewed.
    RENEW_S = 20.0

    def __init__(self, client: aioredis.Redis | None) -> None:
        self._script = (
            None if client is None else client.register_script(scripts.source("conn_admit"))
        )
        #: tenant -> connection id -> (connection, whether it holds a lease)
        self._live: dict[str, dict[str, tuple[Revocable, bool]]] = {}
        self._ending: set[asyncio.Task[Any]] = set()

    async def admit(self, tenant: str, conn: Revocable, quota: int) -> str | None:
        """Admit ``conn`` (ConnectRejected 4029 past the quota); its id for :meth:`end`, or
        None if nothing needs tracking (the default tenant without a quota)."""
        if tenant == DEFAULT and quota <= 0:
            return None
        cid = secrets.token_hex(8)
        leased = quota > 0 and self._script is not None
        if leased:
            assert self._script is not None
            name = keys.Keyspace.for_tenant(tenant).connections()
            if not await self._script(keys=[name], args=["admit", self.LEASE_MS, quota, cid]):
                raise ConnectRejected(
                    closecodes.RATE_LIMITED,
                    f"the tenant has {quota} connections, its quota; retry later",
                )
        self._live.setdefault(tenant, {})[cid] = (conn, leased)
        return cid

    def end(self, tenant: str, cid: str | None) -> None:
        """The connection closed: its lease ends (in the background; it lapses anyway)."""
        if cid is None:
            return
        mine = self._live.get(tenant)
        held = None if mine is None else mine.pop(cid, None)
        if mine is not None and not mine:
            del self._live[tenant]
        if held is not None and held[1] and self._script is not None:
            name = keys.Keyspace.for_tenant(tenant).connections()
            task = asyncio.ensure_future(self._script(keys=[name], args=["end", 0, 0, cid]))
            self._ending.add(task)
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._ending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("tenant_lease_end_failed", error=type(task.exception()).__name__)

    async def renew(self) -> None:
        """Renew this gateway's leases: one call per tenant."""
        if self._script is None:
            return
        for tenant, conns in list(self._live.items()):
            ids = [cid for cid, (_, leased) in conns.items() if leased]
            if ids:
                name = keys.Keyspace.for_tenant(tenant).connections()
                await self._script(keys=[name], args=["renew", self.LEASE_MS, 0, *ids])

    def revoke(self, tenant: str, reason: str) -> int:
        """Close every connection of ``tenant`` here with 4001; how many."""
        conns = list(self._live.get(tenant, {}).values())
        for conn, _ in conns:
            conn.revoke(reason)
        return len(conns)

    def tenants(self) -> list[str]:
        return list(self._live)


class Tenancy:
    """The registry's snapshot at one gateway, and what it decides: whose a token is.

    ``open_store`` opens the registry's store (blocking: run in a thread) once Cassandra is
    connected; until then, and without Cassandra, only ``default`` is known. Lookups of ids
    missing from the snapshot and the periodic reloads run in a thread, one at a time."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._cache: TenantCache | None = None
        #: The connections a quota or a disable concerns (set by the gateway once Redis is).
        self.connections = TenantConnections(None)
        self._default_limits = NO_QUOTAS.effective(settings)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._reloaded_at = float("-inf")  # the last reload a missed credential caused

    @property
    def enabled(self) -> bool:
        """Whether the registry is open (else only ``default`` exists)."""
        return self._cache is not None

    def start(self, open_store: Callable[[], Any]) -> None:
        """Open the registry in the background and keep reloading it."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(open_store), name="tenant-registry")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, open_store: Callable[[], Any]) -> None:
        s = self._settings
        delay = 1.0
        while self._cache is None:
            try:
                store = await asyncio.to_thread(open_store)
                cache = TenantCache(store, s.tenant_refresh_s, settings=s)
                await asyncio.to_thread(cache.refresh)
                self._cache = cache
            except Exception as exc:  # no table yet (feed migrate not run), Cassandra down
                log.warning(
                    "tenant_registry_unavailable", error=type(exc).__name__, retry_in_s=delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        log.info("tenant_registry_loaded", tenants=len(self._cache.known()))
        while True:
            # a reload every half refresh period: a change is here within it, whenever it came
            await asyncio.sleep(s.tenant_refresh_s / 2)
            async with self._lock:
                try:
                    await asyncio.to_thread(self._cache.refresh)
                except Exception as exc:  # the store is down: the snapshot stays
                    log.warning("tenant_refresh_failed", error=type(exc).__name__)
            self._revoke_disabled()

    async def renew_leases(self) -> None:
        """Renew this gateway's connection leases every ``RENEW_S``, for as long as it runs."""
        while True:
            await asyncio.sleep(TenantConnections.RENEW_S)
            try:
                await self.connections.renew()
            except Exception as exc:  # Redis down: the leases lapse, as a dead gateway's do
                log.warning("tenant_lease_renew_failed", error=type(exc).__name__)

    def _revoke_disabled(self) -> None:
        """Close the connections of tenants disabled since (their connects are refused too)."""
        for tid in self.connections.tenants():
            tenant = self.peek(tid)
            if tid != DEFAULT and (tenant is None or not tenant.enabled):  # disabled, or gone
                closed = self.connections.revoke(tid, "the tenant is disabled")
                log.info("tenant_disabled_connections_closed", tenant=tid, connections=closed)

    def limits(self, tid: str) -> Limits:
        """The tenant's quotas: its overrides over the settings (the settings' without a
        registry)."""
        tenant = self.peek(tid)
        if tenant is None:
            return self._default_limits
        return tenant.quotas.effective(self._settings)

    async def tenant(self, tid: str) -> Tenant | None:
        """The tenant ``tid`` (disabled ones too), or None if unknown (or no registry). An id
        the snapshot lacks reloads it (:meth:`_reload_on_miss`: once a second at most, whatever
        the ids): ids named by unverified tokens never cost a lookup each."""
        found = self.peek(tid)
        if found is None and await self._reload_on_miss():
            found = self.peek(tid)
        return found

    def peek(self, tid: str) -> Tenant | None:
        """The snapshot's tenant ``tid``, without a lookup (None: unknown or no registry)."""
        return None if self._cache is None else self._cache.peek(tid)

    async def authenticate(self, token: str) -> UserClaims:
        """The verified claims of a user JWT, of whichever tenant signed it (AuthError: 401).

        The default tenant's secret is tried first (a deployment without tenants pays nothing
        more); a token it does not verify whose ``tid`` names an enabled tenant is verified with
        that tenant's secrets only."""
        s = self._settings
        try:
            return verify_user_token(token, s.require_jwt(), leeway_s=s.jwt_leeway_s)
        except AuthError as exc:
            if exc.reason != "bad_signature" or self._cache is None:
                raise
            tid = token_tenant(token)
            if tid is None or tid == DEFAULT:
                raise
        tenant = await self.tenant(tid)
        if tenant is None or not tenant.enabled:
            # the same answer as a wrong secret: tenant ids are not told to who has no token
            raise AuthError("bad_signature", "the token signature does not verify")
        try:
            return verify_user_token(
                token, tenant.jwt_secrets(utcnow()), leeway_s=s.jwt_leeway_s, tenant=tid
            )
        except AuthError as exc:
            # signed with a secret this snapshot does not have yet (a rotation a moment ago)?
            if exc.reason != "bad_signature" or not await self._reload_on_miss():
                raise
        tenant = self.peek(tid)
        if tenant is None or not tenant.enabled:
            raise AuthError("bad_signature", "the token signature does not verify")
        return verify_user_token(
            token, tenant.jwt_secrets(utcnow()), leeway_s=s.jwt_leeway_s, tenant=tid
        )

    async def _reload_on_miss(self) -> bool:
        """Reload the snapshot for a credential it does not know (a tenant created or rotated a
        moment ago). Single-flight and at most once per :data:`RELOAD_ON_MISS_S`: a caller
        waits for the next reload (up to that long) or shares one that began after it asked,
        so a flood of unknown credentials costs one reload a second. True once reloaded."""
        cache = self._cache
        if cache is None:
            return False
        asked = time.monotonic()
        async with self._lock:
            if self._reloaded_at >= asked:
                return True  # a reload that started after this call asked: it is fresh enough
            wait = self._reloaded_at + RELOAD_ON_MISS_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # the rate limit itself, bounded by RELOAD_ON_MISS_S
            self._reloaded_at = time.monotonic()
            try:
                await asyncio.to_thread(cache.refresh)
            except Exception as exc:  # the registry's store is down: the snapshot stays
                log.warning("tenant_refresh_failed", error=type(exc).__name__)
                return False
        return True

    async def by_ingest_token(self, token: str) -> Tenant | None:
        """The tenant whose current (or still valid previous) ingest token ``token`` is.

        A token the snapshot does not know reloads it first (the registry is keyed by tenant,
        not by token; :meth:`_reload_on_miss`): a tenant created or rotated a moment ago can
        ingest at once."""
        cache = self._cache
        if cache is None:
            return None
        found = cache.by_ingest_token(token)
        if found is None and await self._reload_on_miss():
            found = cache.by_ingest_token(token)
        return found

    def known(self) -> list[Tenant]:
        return [] if self._cache is None else self._cache.known()
