"""Presence and the per-user delivery stream, in Redis: what makes a resume gap-free.

A connected (or resumable) user has a presence hash (``keys.presence``: the stream's epoch ``e``
and last seq ``s``) and a delivery stream (``keys.deliveries``: their recent frames, ids
``<seq>-0``). The fan-out and remove scripts (``feed.timelines_redis``) append to the stream and
publish on the user's channel (``keys.channel``) in the same step as the timeline write.

Guarantees (what callers may rely on):

* **Ordered, consecutive seqs.** Within one epoch a user's frames carry seqs 1, 2, 3, ... in the
  order their items reached the timeline; the stream cursor is ``<epoch>.<seq>``
  (``feed.cursor``).
* **At-most-once Pub/Sub.** Publishing is fire-and-forget; a gateway that misses a message notices
  the ``seq`` gap and reads the delivery stream (:meth:`AsyncRedisPresence.frames_after`, bounded
  to ``stream_history`` frames).
* **A lost stream is detected.** :meth:`AsyncRedisPresence.attach` starts a new epoch (and an
  empty stream) only when no presence hash exists, so a cursor of an older epoch tells the
  gateway that Redis lost the stream (restart, eviction); :meth:`AsyncRedisPresence.refresh`
  reports the users whose presence vanished.
* **A rolled-back stream is left.** On a Redis Cluster a failover may promote a replica that
  lacks a master's newest writes: the presence survives with a lower seq, and seqs already
  pushed would be handed out again for other frames. :meth:`AsyncRedisPresence.renew` (the hub,
  after it lost a primary's connection) starts a new epoch unless someone already did.
* Presence and stream expire together ``ttl_s`` after the last attach or refresh (the resume
  window).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import cast

import redis.asyncio as aioredis

from feed import keys, scripts
from feed.interfaces import Presence

__all__ = ["AsyncRedisPresence"]


class AsyncRedisPresence(keys.KeyspaceView):
    """Presence and delivery stream of connected users (the gateway's side)."""

    def __init__(self, client: aioredis.Redis, *, ttl_s: int) -> None:
        self._redis = client
        self._ttl = ttl_s
        self._attach = client.register_script(scripts.source("attach"))

    async def attach(self, user: str) -> Presence:
        """Mark the user online (or keep them so) and return the stream's epoch and last seq."""
        attach_keys = [self._k.presence(user), self._k.deliveries(user)]
        epoch, seq = await self._attach(keys=attach_keys, args=[_new_epoch(), self._ttl])
        return Presence(_text(epoch), int(seq))

    async def renew(self, user: str, epoch: str) -> Presence:
        """:meth:`attach`, but if the stream is still at ``epoch``, start a new one (see
        ``feed.interfaces.DeliveryStream.renew``)."""
        attach_keys = [self._k.presence(user), self._k.deliveries(user)]
        new, seq = await self._attach(keys=attach_keys, args=[_new_epoch(), self._ttl, epoch])
        return Presence(_text(new), int(seq))

    async def refresh(self, users: Iterable[str]) -> list[str]:
        """Extend presence of locally connected users (called periodically).

        Returns the users whose presence hash was gone (Redis lost it: restart, eviction): the
        caller re-attaches them (a new epoch) and tells their connections.
        """
        pipe = self._redis.pipeline(transaction=False)
        names: list[str] = []
        for user in users:
            pipe.expire(self._k.presence(user), self._ttl)
            pipe.expire(self._k.deliveries(user), self._ttl)
            names.append(user)
        if not names:
            return []
        results = await pipe.execute()
        return [user for user, kept in zip(names, results[0::2], strict=True) if not kept]

    async def frames_after(self, user: str, seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Frames with delivery seq > ``seq``, oldest first, at most ``limit``."""
        entries = await self._redis.xrange(
            self._k.deliveries(user), min=f"({seq}-0", max="+", count=limit
        )
        # redis-py types stream entries loosely (``bytes | str | None``); this client decodes
        # nothing, so each is an (id, {b"f": frame}) pair of bytes.
        return [
            (int(_text(eid).split("-", 1)[0]), _raw(fields[b"f"]))
            for eid, fields in cast("list[tuple[bytes, dict[bytes, bytes]]]", entries or [])
        ]

    async def oldest_seq(self, user: str) -> int | None:
        entries = await self._redis.xrange(self._k.deliveries(user), count=1)
        if not entries:
            return None
        return int(_text(cast("bytes", entries[0][0])).split("-", 1)[0])


def _new_epoch() -> str:
    return secrets.token_hex(4)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _raw(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
