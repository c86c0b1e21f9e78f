"""Versions of a user's follow-graph state in Redis, for the caches built on it.

``keys.graph_version(user)`` (the user's followers: the fan-out workers' follower lists) and
``keys.following_version(user)`` (whom the user follows: the gateways' large-account lists) hold
``<changes>.<token>``: the number of changes since Redis last lost the key, then a fresh random
token. Every change sets a new value
(:data:`BUMP`), and a cache reloads an entry whose version differs from the one it was read
under.

Guarantee: a version is never repeated, so a cache never takes an old entry for current. A plain
counter did not have it: after Redis lost its data (a restart, a flush, a failover to a replica
that missed the last writes) the counter started again and could reach a value a cache already
held, with a different graph behind it. A key that is missing is not a version either (it is
missing again after every loss): a reader that finds none installs a fresh one (:func:`current`)
before reading the graph, so what it caches is tied to a value nobody can produce again.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import redis
import redis.asyncio as aioredis

from feed import scripts

__all__ = ["BUMP", "changes", "current", "current_async", "new_token"]

#: The script that sets a version anew (``feed/lua/version_bump.lua``; KEYS[1]: the version key,
#: ARGV[1]: a fresh token; returns the new number of changes). Its users register it once.
BUMP = scripts.source("version_bump")


def new_token() -> str:
    """A fresh random token (64 bits)."""
    return secrets.token_hex(8)


def changes(raw: bytes | str | None) -> int:
    """How many changes a version counts (0 for a missing key): for operators and tests."""
    if raw is None:
        return 0
    text = raw.decode() if isinstance(raw, bytes) else raw
    digits = text.partition(".")[0]
    return int(digits) if digits.isascii() and digits.isdigit() else 0


def current(
    client: redis.Redis, names: Sequence[str], values: Sequence[bytes | None]
) -> list[bytes]:
    """``values`` (the versions just read from ``names``) with every missing one replaced by a
    fresh version installed in Redis (``SET NX``; if a change got there first, its value). One
    round trip, and only when something is missing."""
    missing = [i for i, value in enumerate(values) if value is None]
    out = list(values)
    if missing:
        pipe = client.pipeline(transaction=False)
        for i in missing:
            pipe.set(names[i], f"0.{new_token()}", nx=True)
        for i in missing:  # key by key: also on a Redis Cluster (MGET takes one slot's keys)
            pipe.get(names[i])
        installed = pipe.execute()[len(missing) :]
        for i, value in zip(missing, installed, strict=True):
            out[i] = value
    return [v if v is not None else b"" for v in out]


async def current_async(client: aioredis.Redis, name: str, value: bytes | None) -> bytes:
    """:func:`current` for one key, on an asyncio client."""
    if value is not None:
        return value
    pipe = client.pipeline(transaction=False)
    pipe.set(name, f"0.{new_token()}", nx=True)
    pipe.get(name)
    installed = (await pipe.execute())[-1]
    return installed if installed is not None else b""
