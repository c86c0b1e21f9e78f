"""``Idempotency-Key`` for HTTP ingest: a retried request produces its records once.

Guarantees: a key is remembered with the sha256 of the body and the response for
``IDEMPOTENCY_TTL_S`` (24 h) in Redis (``feed.keys.idempotency``); a later request with the same
key and body gets the stored response and produces nothing; with another body it gets 422; while
the first request is still producing, 409. A request that crashed holds its key for
``IDEMPOTENCY_PENDING_TTL_S`` at most, so its retries are not blocked for a day.
"""

from __future__ import annotations

import contextlib
import hashlib
import re

import msgspec
import redis.asyncio as aioredis
import structlog

from feed import keys
from gateway.errors import REDIS_ERRORS, GatewayError
from gateway.responses import encode_json

__all__ = ["IDEMPOTENCY_PENDING_TTL_S", "IDEMPOTENCY_TTL_S", "Idempotency"]

log = structlog.get_logger("gateway")

#: How long an ``Idempotency-Key`` is remembered, and how long a request may hold it unfinished.
IDEMPOTENCY_TTL_S = 24 * 3600
IDEMPOTENCY_PENDING_TTL_S = 120
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


class Idempotency:
    """One request's ``Idempotency-Key``: key -> (sha256 of body, response), kept in Redis.

    ``begin`` claims the key with SET NX (a pending marker with a short TTL, so a crashed request
    does not block its retries for a day); a later request with the same key and body gets the
    stored response and produces nothing; with another body it gets 422; while the first request
    is still producing, 409.
    """

    def __init__(
        self, client: aioredis.Redis, key: str, body: bytes, tenant: str = keys.DEFAULT_TENANT
    ) -> None:
        if not _IDEMPOTENCY_KEY.fullmatch(key):
            raise GatewayError(
                400,
                "invalid",
                "must be 1-255 printable ASCII characters without spaces",
                field="Idempotency-Key",
            )
        self._redis = client
        # per tenant: two tenants' requests with one key are two requests
        self._name = keys.Keyspace.for_tenant(tenant).idempotency(
            hashlib.sha256(key.encode()).hexdigest()
        )
        self._digest = hashlib.sha256(body).hexdigest()

    async def begin(self) -> tuple[int, bytes] | None:
        pending = encode_json({"h": self._digest, "s": 0, "b": ""})
        for _ in range(3):
            if await self._redis.set(self._name, pending, nx=True, ex=IDEMPOTENCY_PENDING_TTL_S):
                return None
            raw = await self._redis.get(self._name)
            if raw is None:
                continue  # expired between the two calls: claim it again
            stored = msgspec.json.decode(raw)
            if stored.get("h") != self._digest:
                raise GatewayError(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different body",
                    field="Idempotency-Key",
                )
            if not stored.get("s"):
                raise GatewayError(
                    409,
                    "idempotency_in_progress",
                    "a request with this Idempotency-Key is still being processed",
                    field="Idempotency-Key",
                    headers={"Retry-After": "1"},
                )
            return int(stored["s"]), str(stored["b"]).encode()
        raise GatewayError(409, "idempotency_in_progress", "retry", field="Idempotency-Key")

    async def finish(self, status: int, content: bytes) -> None:
        """Remember the response. The records are in Kafka already: if Redis fails now, the
        request still succeeded (answering 503 would make the client send them again); the
        pending marker expires and a retry after that produces again, which the activities'
        ids make harmless downstream."""
        value = encode_json({"h": self._digest, "s": status, "b": content.decode()})
        try:
            await self._redis.set(self._name, value, ex=IDEMPOTENCY_TTL_S)
        except REDIS_ERRORS as exc:
            log.warning("idempotency_not_recorded", error=f"{type(exc).__name__}: {exc}"[:300])

    async def abandon(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            await self._redis.delete(self._name)
