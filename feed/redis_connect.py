"""Redis clients from the settings: one server, or a Redis Cluster (``FEED_REDIS_CLUSTER``).

``auto`` (the default) asks the server that ``FEED_REDIS_URL`` names whether it runs in cluster
mode (``INFO cluster``); ``true`` and ``false`` skip the question. On a cluster the URL names any
seed node: redis-py's ``RedisCluster`` learns the slot map from it, follows ``MOVED``/``ASK``
and pipelines per node.
"""

from __future__ import annotations

import time
from typing import Any

import redis
import redis.asyncio as aioredis

from feed.logging import get_logger
from feed.settings import Settings, SettingsError, redact_url

__all__ = ["async_client", "cluster_at_start", "is_cluster", "sync_client"]


def is_cluster(settings: Settings, *, timeout_s: float = 5.0) -> bool:
    """Whether ``settings`` name a Redis Cluster. ``auto`` asks the server once; if it cannot be
    asked, :class:`SettingsError` says so (set ``true`` or ``false`` to start without asking)."""
    if settings.redis_cluster != "auto":
        return settings.redis_cluster == "true"
    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        info = client.info("cluster")
    except redis.exceptions.RedisError as exc:
        raise SettingsError(
            f"FEED_REDIS_CLUSTER: auto could not ask {redact_url(settings.redis_url)} whether it "
            f"is a cluster ({type(exc).__name__}); set true or false"
        ) from None
    finally:
        client.close()
    return bool(info.get("cluster_enabled"))


def cluster_at_start(settings: Settings, *, wait_s: float = 10.0) -> bool:
    """:func:`is_cluster` for a process starting up: ``auto`` asks for up to ``wait_s`` seconds
    (Redis may be starting too); if Redis never answers, the process starts as for one server
    and logs ``redis_cluster_unknown`` (a deployment on a cluster sets ``true`` and never
    asks)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return is_cluster(settings, timeout_s=1.0)
        except SettingsError as exc:
            if time.monotonic() >= deadline:
                get_logger("feed.redis").warning("redis_cluster_unknown", error=str(exc))
                return False
        time.sleep(0.5)  # Redis is not answering yet: ask again shortly


def sync_client(settings: Settings, *, cluster: bool | None = None, **options: Any) -> Any:
    """A blocking client (``redis.Redis`` or ``redis.RedisCluster``) with ``options``.
    ``cluster``: already known (skips :func:`is_cluster`)."""
    if cluster if cluster is not None else is_cluster(settings):
        return redis.RedisCluster.from_url(settings.redis_url, **options)
    return redis.Redis.from_url(settings.redis_url, **options)


def async_client(settings: Settings, *, cluster: bool | None = None, **options: Any) -> Any:
    """An asyncio client (``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster``) with
    ``options``; ``max_connections`` is per node on a cluster."""
    if cluster if cluster is not None else is_cluster(settings):
        return aioredis.RedisCluster.from_url(settings.redis_url, **options)
    return aioredis.Redis.from_url(settings.redis_url, **options)
