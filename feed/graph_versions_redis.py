"""Follow-graph versions, the large-account set and the follow-changed notice, in Redis.

The Redis implementation of :class:`feed.interfaces.GraphVersions` (its guarantees are stated
there). Keys: ``gv:{user}`` (the user's followers), ``fv:{user}`` (whom the user follows), both
``<changes>.<token>`` set by :data:`feed.versions.BUMP`; the set ``big-accounts`` with the
sentinel :data:`BIG_SENTINEL`; the notice is ``feed.keys.CONTROL_FOLLOWING`` published on the
follower's channel (``feed.keys.channel``).

On a Redis Cluster (``feed.timelines_cluster``) the versions are read key by key in one pipeline
(one round trip per node: ``MGET`` takes one slot's keys), the scripts run through
:class:`feed.timelines_cluster.ClusterScripts` (loaded again after a ``NOSCRIPT``), and the notice
is published on its own, by sharded Pub/Sub (``SPUBLISH``: a cluster pipeline carries no
Pub/Sub command).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import redis

from feed import keys, timelines_cluster
from feed.interfaces import FollowerState
from feed.versions import BUMP, current, new_token

__all__ = ["BIG_SENTINEL", "RedisGraphVersions"]

#: Member kept in ``big-accounts`` so that "no big account" and "Redis lost the set" differ.
BIG_SENTINEL = ""


class RedisGraphVersions(keys.KeyspaceView):
    """:class:`feed.interfaces.GraphVersions` on a synchronous Redis client (the workers')."""

    def __init__(
        self, client: redis.Redis, *, wait_replicas: int = 1, wait_timeout_ms: int = 1000
    ) -> None:
        self._redis = client
        self._bump = client.register_script(BUMP)
        self._cluster: timelines_cluster.ClusterScripts | None = None
        if isinstance(client, redis.RedisCluster):
            self._cluster = timelines_cluster.ClusterScripts(
                client, [BUMP], wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms
            )

    def follower_state(self, users: Sequence[str], *, big: bool) -> FollowerState:
        """One round trip (MGET, and with ``big`` SMISMEMBER and SCARD), plus one to install a
        version where none exists (``feed.versions.current``)."""
        if not users:
            return FollowerState([], [], False)
        names = [self._k.graph_version(u) for u in users]
        pipe = self._redis.pipeline(transaction=False)
        if self._cluster is None:
            pipe.mget(names)
        else:
            for name in names:
                pipe.get(name)
        if big:
            pipe.smismember(self._k.big_accounts, list(users))
            pipe.scard(self._k.big_accounts)
        results = pipe.execute()
        if self._cluster is not None:
            results = [results[: len(names)], *results[len(names) :]]
        versions = current(self._redis, names, results[0])
        if not big:
            return FollowerState(versions, [False] * len(users), False)
        return FollowerState(versions, [bool(b) for b in results[1]], results[2] == 0)

    def add_big(self, users: Iterable[str]) -> None:
        self._redis.sadd(self._k.big_accounts, BIG_SENTINEL, *users)

    def follow_changed(self, follower: str, followee: str) -> bool:
        """One pipeline (one round trip): both bumps, SISMEMBER, PUBLISH."""
        if self._cluster is not None:
            replies = self._cluster.run(
                [
                    ("EVALSHA", self._bump.sha, 1, self._k.graph_version(followee), new_token()),
                    (
                        "EVALSHA",
                        self._bump.sha,
                        1,
                        self._k.following_version(follower),
                        new_token(),
                    ),
                    ("SISMEMBER", self._k.big_accounts, followee),
                ]
            )
            timelines_cluster.raise_first(replies)
            # sharded Pub/Sub: to the node that owns the follower's channel only
            self._redis.spublish(self._k.channel(follower), keys.CONTROL_FOLLOWING)
            return bool(replies[2])
        pipe = self._redis.pipeline(transaction=False)
        # New versions (never a value seen before, even after Redis lost its data): every
        # cache of the followee's followers or of the follower's followees reloads.
        self._bump(keys=[self._k.graph_version(followee)], args=[new_token()], client=pipe)
        self._bump(keys=[self._k.following_version(follower)], args=[new_token()], client=pipe)
        pipe.sismember(self._k.big_accounts, followee)
        # Gateways holding the follower re-read whose actor channels to follow (never forwarded).
        pipe.publish(self._k.channel(follower), keys.CONTROL_FOLLOWING)
        return bool(pipe.execute()[2])
