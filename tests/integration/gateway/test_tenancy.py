"""A tenant's quotas and its disable, through a live gateway on the session's Redis, broker and
Cassandra (the registry): its ingest rate (429, another tenant unaffected), its connections
across the deployment (close 4029, freed at close), its connections per user, and a disable that
closes its live sockets (4001) and refuses its connects and ingest, within the refresh bound.
Tenants are created in the registry directly, with quotas small enough to reach at once."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from feed.settings import Settings
from feed.tenants import DISABLED, Credentials, Quotas
from feed.tenants_cassandra import CassandraTenants
from gateway import closecodes
from gateway.auth import mint_token
from tests.support.live_gateway import LiveGateway, activity, live_gateway

TIMEOUT = 10.0
REFRESH_S = 0.5


@pytest.fixture(scope="module")
def gw(settings: Settings) -> Iterator[LiveGateway]:
    with live_gateway(dataclasses.replace(settings, tenant_refresh_s=REFRESH_S)) as live:
        yield live


@pytest.fixture
def registry(cassandra: Any, settings: Settings) -> CassandraTenants:
    return CassandraTenants(cassandra, settings.cassandra_keyspace)


def _tenant(registry: CassandraTenants, **quotas: Any) -> tuple[str, Credentials]:
    tid = f"q-{uuid.uuid4().hex[:10]}"
    credentials = Credentials.generate()
    registry.create(tid, credentials, Quotas(**quotas))
    return tid, credentials


async def _welcomed(gw: LiveGateway, token: str) -> ClientConnection:
    ws = await connect(gw.ws, additional_headers={"Authorization": f"Bearer {token}"})
    frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert '"welcome"' in str(frame), frame
    return ws


async def _closed_with(gw: LiveGateway, token: str) -> int:
    async with connect(gw.ws, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


async def _until(check: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)  # polling the gateway, bounded by the deadline


async def test_a_tenants_ingest_rate_is_its_own(
    gw: LiveGateway, registry: CassandraTenants, settings: Settings
) -> None:
    _, creds = _tenant(registry, ingest_rate=0.01, ingest_burst=2)
    _, other_creds = _tenant(registry)
    run = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(base_url=gw.base, timeout=TIMEOUT) as http:

        async def post(token: str, n: int) -> httpx.Response:
            body = activity(f"q-{run}-{n}", f"actor-{run}")
            return await http.post(
                "/v1/activities", json=body, headers={"Authorization": f"Bearer {token}"}
            )

        statuses = [(await post(creds.ingest_token, n)).status_code for n in range(3)]
        assert statuses == [202, 202, 429]
        throttled = await post(creds.ingest_token, 3)
        assert "0.01 requests/s (burst 2)" in throttled.json()["error"]["message"]
        # another tenant and the default tenant: their own buckets
        assert (await post(other_creds.ingest_token, 4)).status_code == 202
        assert settings.ingest_token is not None
        assert (await post(settings.ingest_token.reveal(), 5)).status_code == 202


async def test_a_tenants_connections_are_capped_across_the_deployment_and_freed_at_close(
    gw: LiveGateway, registry: CassandraTenants
) -> None:
    tid, creds = _tenant(registry, max_connections=2)

    def token(user: str) -> str:
        return mint_token(creds.jwt_secret, user, 600, tenant=tid)

    first = await _welcomed(gw, token("a"))
    second = await _welcomed(gw, token("b"))
    try:
        assert await _closed_with(gw, token("c")) == closecodes.RATE_LIMITED.code
        await first.close()

        async def admitted() -> bool:
            try:
                ws = await _welcomed(gw, token("c"))
            except (AssertionError, ConnectionClosed):
                return False
            await ws.close()
            return True

        await _until(admitted, "a connection admitted once one closed")
    finally:
        await second.close()


async def test_a_tenants_connections_per_user(gw: LiveGateway, registry: CassandraTenants) -> None:
    tid, creds = _tenant(registry, max_connections_per_user=1)

    def token(user: str) -> str:
        return mint_token(creds.jwt_secret, user, 600, tenant=tid)

    ws = await _welcomed(gw, token("a"))
    try:
        assert await _closed_with(gw, token("a")) == closecodes.RATE_LIMITED.code
        other = await _welcomed(gw, token("b"))  # another user of the tenant
        await other.close()
    finally:
        await ws.close()


async def test_a_disable_closes_live_sockets_and_refuses_connects_and_ingest(
    gw: LiveGateway, registry: CassandraTenants
) -> None:
    tid, creds = _tenant(registry)
    token = mint_token(creds.jwt_secret, "u", 600, tenant=tid)
    ws = await _welcomed(gw, token)
    disabled_at = time.monotonic()
    registry.set_state(tid, DISABLED)
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), REFRESH_S * 4 + 5)
    closed_s = time.monotonic() - disabled_at
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == closecodes.UNAUTHORIZED.code
    assert closed_s < REFRESH_S * 3 + 1, closed_s  # within the refresh bound
    assert await _closed_with(gw, token) == closecodes.UNAUTHORIZED.code
    async with httpx.AsyncClient(base_url=gw.base, timeout=TIMEOUT) as http:
        refused = await http.post(
            "/v1/activities",
            json=activity(f"off-{uuid.uuid4().hex[:6]}", "a"),
            headers={"Authorization": f"Bearer {creds.ingest_token}"},
        )
    assert refused.status_code == 403, refused.text


async def test_a_rotation_serves_new_credentials_at_once_and_old_ones_for_the_grace(
    gw: LiveGateway, cassandra: Any, settings: Settings
) -> None:
    grace_s = 2.0
    registry = CassandraTenants(cassandra, settings.cassandra_keyspace, rotate_grace_s=grace_s)
    tid, old = _tenant(registry)
    old_jwt = mint_token(old.jwt_secret, "u", 600, tenant=tid)
    await (await _welcomed(gw, old_jwt)).close()  # known to the gateway before the rotation
    new = Credentials.generate()
    registry.rotate(tid, new)
    rotated_at = time.monotonic()
    new_jwt = mint_token(new.jwt_secret, "u", 600, tenant=tid)
    async with httpx.AsyncClient(base_url=gw.base, timeout=TIMEOUT) as http:

        async def status(token: str, path: str = "/v1/feed") -> int:
            headers = {"Authorization": f"Bearer {token}"}
            if path == "/v1/feed":
                return (await http.get(path, headers=headers)).status_code
            body = activity(f"rot-{uuid.uuid4().hex[:8]}", "a")
            return (await http.post(path, json=body, headers=headers)).status_code

        # the new credentials at once (the gateway reloads for a credential it does not know)
        assert await status(new_jwt) == 200
        assert await status(new.ingest_token, "/v1/activities") == 202
        # the old ones through the grace period
        assert await status(old_jwt) == 200
        assert await status(old.ingest_token, "/v1/activities") == 202
        assert time.monotonic() - rotated_at < grace_s  # still within it: the checks count

        async def old_refused() -> bool:
            return await status(old_jwt) == 401 and (
                await status(old.ingest_token, "/v1/activities") == 401
            )

        await _until(old_refused, "the old credentials refused after the grace")
        assert time.monotonic() - rotated_at >= grace_s
        assert await status(new_jwt) == 200
