"""Feed semantics against a reference model, on the real Redis and Cassandra.

Random sequences of follow, unfollow, post (with ``to``), delete and duplicate deliveries are
applied by the fan-out Processor; every user's feed, read page by page through the FeedReader,
must equal what a simple model computes. The sequences also hold what must change nothing: a
second create of a posted id with another ``published`` and object (a producer retry that
re-stamps), another actor's create of a posted id (``id_conflict``), another actor's delete
(``forbidden``), and a delete that arrives before its create (``not_found``; the create that
follows is delivered). Each sequence runs twice, with fan-out on write for
everyone (``FEED_FANOUT_LIMIT`` unlimited) and with a tiny limit (most actors merged at read time):
both must equal the model, so the feed is the same whichever path an account takes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings

from fanout.followers import FollowerCache
from fanout.processor import Processor
from feed.graph_cassandra import CassandraFollowGraph
from feed.graph_versions_redis import RedisGraphVersions
from feed.history_cassandra import CassandraHistory
from feed.reader import FeedReader
from feed.timelines_redis import AsyncRedisTimelines, RedisTimelines
from schemas.activity import Activity, decode_activity
from schemas.follow import FollowEvent
from tests.support.feed_model import T0, USERS, Model, ops


class Pipeline:
    def __init__(
        self,
        redis_client: Any,
        cassandra: Any,
        keyspace: str,
        limit: int,
        async_redis: aioredis.Redis,
    ) -> None:
        graph = CassandraFollowGraph(cassandra, keyspace)
        history = CassandraHistory(cassandra, keyspace)
        self.processor = Processor(
            timelines=RedisTimelines(
                redis_client, timeline_max=4, stream_history=10, body_ttl_s=600
            ),
            history=history,
            graph=graph,
            versions=RedisGraphVersions(redis_client),
            followers=FollowerCache(
                graph, RedisGraphVersions(redis_client), history=history, fanout_limit=limit
            ),
            follow_backfill=200,
        )
        self.reader = FeedReader(
            AsyncRedisTimelines(async_redis), history, body_ttl_s=600, timeline_max=4, graph=graph
        )

    async def feed(self, user: str) -> list[str]:
        seen: list[str] = []
        cursor = None
        for _ in range(50):
            page = await self.reader.page(user, cursor, 3)
            seen += [msgspec.json.decode(item.activity)["id"] for item in page.items]
            cursor = page.next
            if cursor is None:
                return seen
        raise AssertionError("paging did not end")


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _apply(pipeline: Pipeline, model: Model, sequence: list[tuple[Any, ...]], ns: str) -> None:
    clock = 0
    posted: list[Activity] = []

    def uid(n: int) -> str:
        return f"{ns}-u{n}"

    def tick() -> datetime:
        nonlocal clock
        clock += 1
        return T0 + timedelta(seconds=clock)

    for n, op in enumerate(sequence):
        kind = op[0]
        if kind in ("follow", "unfollow"):
            follower, followee = op[1], op[2]
            if follower == followee:
                continue
            pipeline.processor.apply([(n, FollowEvent(kind, uid(follower), uid(followee), tick()))])
            if kind == "follow":
                model.following.add((follower, followee))
            else:
                model.following.discard((follower, followee))
        elif kind in ("post", "delete_then_post"):
            actor, to, minute = op[1], op[2], op[3]
            aid = f"{ns}-a{n}"
            to = frozenset(to - {actor})
            if kind == "delete_then_post":
                early = pipeline.processor.apply([(n, _delete(f"{ns}-e{n}", uid(actor), aid))])
                assert [r.code for _, r in early.rejected] == ["not_found"]
            published = T0 + timedelta(minutes=minute)  # ties on purpose: ordered by id
            activity = decode_activity(
                msgspec.json.encode(
                    {
                        "id": aid,
                        "type": "Create",
                        "actor": uid(actor),
                        "object": f"post:{n}",
                        "published": published.isoformat(),
                        "to": [uid(u) for u in sorted(to)],
                    }
                )
            )
            assert pipeline.processor.apply([(n, activity)]).rejected == []
            posted.append(activity)
            model.posts[aid] = (actor, int(published.timestamp() * 1_000_000), to)
        elif kind == "dup" and posted:
            pipeline.processor.apply([(n, posted[op[1] % len(posted)])])
        elif kind == "redup" and posted:
            original = posted[op[1] % len(posted)]
            again = decode_activity(
                msgspec.json.encode(
                    {
                        "id": original.id,
                        "type": "Create",
                        "actor": original.actor,
                        "object": f"post:edited-{n}",
                        "to": [uid(u) for u in range(USERS)],
                        "published": (T0 + timedelta(minutes=op[2], seconds=7)).isoformat(),
                    }
                )
            )
            assert pipeline.processor.apply([(n, again)]).rejected == []
        elif kind == "steal" and posted:
            original = posted[op[1] % len(posted)]
            thief = uid(op[2])
            if thief != original.actor:
                stolen = decode_activity(
                    msgspec.json.encode(
                        {
                            "id": original.id,
                            "type": "Create",
                            "actor": thief,
                            "object": f"post:stolen-{n}",
                            "published": T0.isoformat(),
                            "to": [uid(u) for u in range(USERS)],
                        }
                    )
                )
                rejected = pipeline.processor.apply([(n, stolen)]).rejected
                assert [r.code for _, r in rejected] == ["id_conflict"]
        elif kind == "xdelete" and posted:
            target = posted[op[1] % len(posted)]
            if uid(op[2]) != target.actor:
                rejected = pipeline.processor.apply(
                    [(n, _delete(f"{ns}-x{n}", uid(op[2]), target.id))]
                ).rejected
                assert [r.code for _, r in rejected] == ["forbidden"]
        elif kind == "delete" and posted:
            target = posted[op[1] % len(posted)]
            pipeline.processor.apply([(n, _delete(f"{ns}-d{n}", target.actor, target.id))])
            model.deleted.add(target.id)


def _delete(aid: str, actor: str, target: str) -> Activity:
    return decode_activity(
        msgspec.json.encode(
            {
                "id": aid,
                "type": "Delete",
                "actor": actor,
                "object": target,
                "published": T0.isoformat(),
            }
        )
    )


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sequence=ops)
def test_feeds_equal_the_model_with_and_without_read_time_merge(
    sequence: list[tuple[Any, ...]],
    redis_client: Any,
    cassandra: Any,
    settings: Any,
    loop: asyncio.AbstractEventLoop,
) -> None:
    async_redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        for limit in (0, 1):  # 0: unlimited fan-out on write; 1: anyone with 2+ followers is big
            ns = f"m{uuid.uuid4().hex[:8]}"
            pipeline = Pipeline(
                redis_client, cassandra, settings.cassandra_keyspace, limit, async_redis
            )
            model = Model()
            _apply(pipeline, model, sequence, ns)
            for user in range(USERS):
                got = loop.run_until_complete(pipeline.feed(f"{ns}-u{user}"))
                assert got == model.timeline(user), f"limit={limit} user={user} sequence={sequence}"
    finally:
        loop.run_until_complete(async_redis.aclose())
