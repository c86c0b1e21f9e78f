"""Rate limits: token buckets in Redis, shared by every gateway process.

A bucket holds at most ``burst`` tokens and gains ``rate`` tokens per second; a request takes one.
One Lua script (``feed/lua/token_bucket.lua``) reads, refills and takes, so the check is
**atomic**: concurrent requests on any number of gateways never take the same token twice. The
script uses the Redis server's clock (``TIME``), so gateways with skewed clocks agree. Each call
touches one key (slot-local in Redis Cluster); a bucket key expires once it would be full again,
so idle clients cost nothing.

Buckets used by the gateway (settings in ``feed.settings``):

* **HTTP ingest** (``POST /v1/activities``, ``POST``/``DELETE /v1/follows``): one bucket per
  ingest token, keyed by the token's SHA-256 (never by the token itself), checked after the token
  is verified; over the limit -> ``429`` with ``Retry-After``.
* **WebSocket connects**: one bucket per client IP, checked before the token is verified (so
  floods of bad tokens are limited too), then one per user; over either -> close ``4029``.

If Redis cannot be reached the limiter **fails open** (the request goes on) and logs it: a
limiter outage must not become an API outage, and the requests that follow need Redis anyway.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from feed import keys, scripts

__all__ = [
    "Decision",
    "Limit",
    "RedisRateLimiter",
    "connect_ip_key",
    "connect_user_key",
    "ingest_key",
    "tenant_ingest_key",
]

log = structlog.get_logger("gateway.ratelimit")


@dataclass(frozen=True, slots=True)
class Limit:
    """``rate`` tokens per second (0: unlimited), at most ``burst`` at once."""

    rate: float
    burst: int

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    #: Seconds until a token is available again (0 when allowed).
    retry_after_s: float = 0.0

    @property
    def retry_after(self) -> int:
        """Whole seconds for a ``Retry-After`` header: at least 1, rounded up."""
        return max(1, math.ceil(self.retry_after_s))


ALLOWED = Decision(True)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def ingest_key(token: str) -> str:
    """The ingest bucket of a token: its hash, never the token."""
    return keys.rate_ingest(_digest(token))


def tenant_ingest_key(tenant: str) -> str:
    """A tenant's ingest bucket: one for all its tokens (during a rotation's grace, both)."""
    return keys.Keyspace.for_tenant(tenant).rate_ingest("tenant")


def connect_user_key(user: str, tenant: str = keys.DEFAULT_TENANT) -> str:
    return keys.Keyspace.for_tenant(tenant).rate_connect_user(user)


def connect_ip_key(ip: str) -> str:
    return keys.rate_connect_ip(ip)


class RedisRateLimiter:
    """Token buckets in Redis (see the module docstring)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._script = client.register_script(scripts.source("token_bucket"))
        #: Checks that failed open because Redis was unreachable (tests, logs).
        self.failed_open = 0

    async def take(self, key: str, limit: Limit, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from the bucket ``key`` if it has them."""
        if limit.unlimited:
            return ALLOWED
        try:
            taken, wait_us = await self._script(
                keys=[key], args=[repr(float(limit.rate)), int(limit.burst), int(cost)]
            )
        except (RedisError, OSError) as exc:
            self.failed_open += 1
            log.warning("rate_limit_unavailable", bucket=key.rsplit(":", 1)[0], error=str(exc))
            return ALLOWED
        if int(taken):
            return ALLOWED
        return Decision(False, int(wait_us) / 1_000_000)
