"""Fair fan-out: a tenant's activities fanned out per second (``docs/tenants.md``, "Fair fan-out").

A tenant with a fan-out rate takes a token per record from its bucket in Redis, shared by every
worker (``feed/lua/fanout_take.lua``). The records of a batch that get no token are not applied
and not dropped: they are copied to the deferral topic (``FEED_TOPIC_DEFERRED``, keyed by the
tenant), and the batch is committed once the broker has them, like its dead letters. Every
worker also consumes the deferral topic (its own consumer group) and applies those records as
the tenant's tokens allow, pausing a deferral partition until the next token otherwise.

Why a topic, not a pause: the source partitions mix tenants, so pausing one for a tenant over
its rate would hold every other tenant's records behind it. With the spill, another tenant's
records wait at most for the flood's records of the same batch to be read and copied (a
produce, no store write), however long the flood. While a tenant has records waiting in the
deferral topic, its new records go after them (no token is taken), so its records are applied
in the order they came, give or take one batch. The processor's writes are idempotent and a
Delete or unfollow wins over an earlier Create or follow whenever each is applied, so even an
order changed by a crash stays correct.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from feed import keys, scripts
from feed.tenants import Limits

__all__ = ["FanoutQuota", "Grant"]


@dataclass(frozen=True, slots=True)
class Grant:
    """Records that may be applied now, and the seconds until the tenant's next token."""

    granted: int
    retry_after_s: float


class FanoutQuota:
    """The tenants' fan-out buckets and waiting counts, in Redis (one round trip a call)."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(scripts.source("fanout_take"))

    def take(self, tenant: str, wanted: int, limits: Limits, *, deferred: bool = False) -> Grant:
        """Take up to ``wanted`` tokens for new records (none while records of the tenant wait;
        those not granted are counted as waiting: the caller copies them to the deferral topic),
        or for ``deferred`` records read back from it (taken off the waiting count)."""
        return self._call(tenant, wanted, limits, "deferred" if deferred else "batch")

    def release(self, tenant: str, count: int, limits: Limits) -> None:
        """Take ``count`` records read back from the deferral topic off the waiting count
        without applying them (dead-lettered, or the tenant's rate was lifted)."""
        self._call(tenant, count, limits, "release")

    def _call(self, tenant: str, wanted: int, limits: Limits, mode: str) -> Grant:
        k = keys.Keyspace.for_tenant(tenant)
        taken, wait_us = self._script(
            keys=[k.rate_fanout(), k.deferred_waiting()],
            args=[limits.fanout_rate, limits.fanout_burst, wanted, mode],
        )
        return Grant(int(taken), int(wait_us) / 1e6)
