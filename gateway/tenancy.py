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
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from feed import keys
from feed.interfaces import DeliveryStream, Presence
from feed.logging import get_logger
from feed.settings import Settings
from feed.tenants import DEFAULT, Tenant, TenantCache, utcnow
from gateway.auth import AuthError, UserClaims, token_tenant, verify_user_token

if TYPE_CHECKING:
    from feed.delivery_redis import AsyncRedisPresence

__all__ = ["PrincipalPresence", "Tenancy"]

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


class Tenancy:
    """The registry's snapshot at one gateway, and what it decides: whose a token is.

    ``open_store`` opens the registry's store (blocking: run in a thread) once Cassandra is
    connected; until then, and without Cassandra, only ``default`` is known. Lookups of ids
    missing from the snapshot and the periodic reloads run in a thread, one at a time."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._cache: TenantCache | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._reloaded_at = float("-inf")  # the last reload a missed ingest token caused

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
            await asyncio.sleep(s.tenant_refresh_s / 2)
            async with self._lock:
                await asyncio.to_thread(self._cache.maybe_refresh)

    async def tenant(self, tid: str) -> Tenant | None:
        """The tenant ``tid`` (disabled ones too), or None if unknown (or no registry)."""
        cache = self._cache
        if cache is None:
            return None
        found = cache.peek(tid)
        if found is not None:
            return found
        async with self._lock:
            return await asyncio.to_thread(cache.get, tid)

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
            raise AuthError("unknown_tenant", "the token's tenant is unknown or disabled")
        return verify_user_token(
            token, tenant.jwt_secrets(utcnow()), leeway_s=s.jwt_leeway_s, tenant=tid
        )

    async def by_ingest_token(self, token: str) -> Tenant | None:
        """The tenant whose current (or still valid previous) ingest token ``token`` is.

        A token the snapshot does not know reloads it first (the registry is keyed by tenant,
        not by token), at most once per :data:`RELOAD_ON_MISS_S` whatever the requests: a
        tenant created a moment ago can ingest at once, and a flood of wrong tokens costs one
        reload a second."""
        cache = self._cache
        if cache is None:
            return None
        found = cache.by_ingest_token(token)
        if found is not None:
            return found
        async with self._lock:
            now = time.monotonic()
            if now - self._reloaded_at >= RELOAD_ON_MISS_S:
                self._reloaded_at = now
                try:
                    await asyncio.to_thread(cache.refresh)
                except Exception as exc:  # the registry's store is down: the snapshot stays
                    log.warning("tenant_refresh_failed", error=type(exc).__name__)
        return cache.by_ingest_token(token)

    def known(self) -> list[Tenant]:
        return [] if self._cache is None else self._cache.known()
