"""End to end: notification feeds over Kafka and HTTP ingest, the HTTP API and two WebSocket
connections of one user (a phone and a laptop), against a real ``feed fanout`` and ``feed gateway``
on the test session's Redis, Kafka-protocol broker and Cassandra.

1. Likes of one post by three users (and by its author, who is never notified of their own
   activity) make one group: both connections receive ``notification`` frames, and the last one
   equals what ``GET /v1/notifications`` returns; its actors page newest first.
2. A comment through ``POST /v1/activities`` opens a second group, on top.
3. A mark from the laptop (``POST /v1/notifications/read``) returns the new counts, and the
   phone's badge clears: it receives ``notification_counts`` with them.
4. A Delete takes its like out of the group (counts and actors follow, live); deleting a group's
   only activity removes the group (``notification_removed``).
5. The same like again (a producer retry) changes nothing; the Cassandra rows are there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import websockets

from tests.conftest import wait_for
from tests.support.pipeline import Pipeline, frames_until, next_frame, shared_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pipeline(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    env = shared_env(stack_env, "notify")
    with Pipeline(env, tmp_path_factory.mktemp("notify")).running() as p:
        yield p


def _event(aid: str, actor: str, type_: str, obj: str, notify: list[str], at: datetime) -> bytes:
    return json.dumps(
        {
            "id": aid,
            "type": type_,
            "actor": actor,
            "object": obj,
            "published": at.isoformat(),
            "notify": notify,
        }
    ).encode()


def _is(kind: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f.get("type") == kind


async def test_notifications_reach_both_connections_and_marks_clear_the_other(
    pipeline: Pipeline, cassandra: Any, ids: Callable[[str], str]
) -> None:
    s = pipeline.settings
    owner, ann, bob, cy = (ids(n) for n in ("owner", "ann", "bob", "cy"))
    post = f"post:{ids('p')}"
    t0 = datetime.now(UTC) - timedelta(seconds=30)
    url = pipeline.gateway_url.replace("http", "ws") + "/v1/stream"
    auth = {"Authorization": f"Bearer {pipeline.token(owner)}"}
    async with (
        websockets.connect(url, additional_headers=auth) as phone,
        websockets.connect(url, additional_headers=auth) as laptop,
    ):
        for ws in (phone, laptop):
            assert (await next_frame(ws, 5))["type"] == "welcome"

        # 1. three likes and the author's own: one group of three actors
        likes = [ids(f"like{i}") for i in range(4)]
        for i, (aid, actor) in enumerate(zip(likes, (ann, bob, owner, cy), strict=True)):
            event = _event(aid, actor, "Like", post, [owner], t0 + timedelta(seconds=i))
            pipeline.produce(s.topic_activities, actor, event)
        for ws in (phone, laptop):
            frames = await frames_until(
                ws,
                lambda f: f.get("type") == "notification" and f["group"]["actor_count"] == 3,
                timeout=15,
            )
            last = frames[-1]
            assert (last["unseen"], last["unread"]) == (1, 1)
        group = last["group"]
        assert group["actors"] == [cy, bob, ann]
        assert (group["type"], group["object"], group["activity_count"]) == ("Like", post, 3)
        assert (group["seen"], group["read"]) == (False, False)
        status, page = pipeline.call(owner, "/v1/notifications?limit=20")
        assert status == 200, page
        assert page["groups"] == [group]
        assert (page["unseen"], page["unread"], page["next"]) == (1, 1, None)
        assert pipeline.call(owner, "/v1/notifications/counts") == (
            200,
            {"unseen": 1, "unread": 1},
        )
        status, first = pipeline.call(owner, f"/v1/notifications/{group['id']}/actors?limit=2")
        assert status == 200 and first["actors"] == [cy, bob] and first["next"], first
        status, rest = pipeline.call(
            owner, f"/v1/notifications/{group['id']}/actors?limit=2&cursor={first['next']}"
        )
        assert (status, rest) == (200, {"actors": [ann], "next": None})

        # 2. a comment over HTTP ingest: a second group, on top
        comment = ids("comment")
        token = s.ingest_token.reveal() if s.ingest_token else ""
        status, accepted = pipeline.call(
            owner,
            "/v1/activities",
            json.loads(_event(comment, ann, "Comment", post, [owner], t0 + timedelta(seconds=9))),
            token=token,
        )
        assert status == 202, accepted
        for ws in (phone, laptop):
            frames = await frames_until(
                ws,
                lambda f: f.get("type") == "notification" and f["group"]["type"] == "Comment",
                timeout=15,
            )
            assert (frames[-1]["unseen"], frames[-1]["unread"]) == (2, 2)
        status, page = pipeline.call(owner, "/v1/notifications")
        assert [g["type"] for g in page["groups"]] == ["Comment", "Like"]

        # 3. the laptop reads everything: the phone's badge clears
        assert pipeline.call(owner, "/v1/notifications/seen", {"groups": [group["id"]]}) == (
            200,
            {"unseen": 1, "unread": 2},
        )
        assert pipeline.call(owner, "/v1/notifications/read", {"all": True}) == (
            200,
            {"unseen": 0, "unread": 0},
        )
        for ws in (phone, laptop):
            frames = await frames_until(
                ws,
                lambda f: f.get("type") == "notification_counts" and f["unread"] == 0,
                timeout=10,
            )
            assert frames[-1] == {"type": "notification_counts", "unseen": 0, "unread": 0}

        # 4. deletes: bob's like leaves the group; the comment's group goes
        pipeline.produce(
            s.topic_activities,
            bob,
            _event(ids("del"), bob, "Delete", likes[1], [], t0 + timedelta(seconds=20)),
        )
        frames = await frames_until(phone, _is("notification"), timeout=15)
        changed = frames[-1]["group"]
        assert changed["id"] == group["id"]
        assert (changed["actors"], changed["activity_count"]) == ([cy, ann], 2)
        assert (changed["seen"], changed["read"]) == (True, True)  # a delete changes no mark
        pipeline.produce(
            s.topic_activities,
            ann,
            _event(ids("del"), ann, "Delete", comment, [], t0 + timedelta(seconds=21)),
        )
        frames = await frames_until(phone, _is("notification_removed"), timeout=15)
        assert frames[-1]["group"] == page["groups"][0]["id"]
        assert (frames[-1]["unseen"], frames[-1]["unread"]) == (0, 0)

        # 5. a retried like changes nothing
        pipeline.produce(s.topic_activities, ann, _event(likes[0], ann, "Like", post, [owner], t0))
        marker = ids("marker")
        pipeline.produce(
            s.topic_activities,
            cy,
            _event(marker, cy, "Share", post, [owner], t0 + timedelta(seconds=25)),
        )
        frames = await frames_until(
            phone,
            lambda f: f.get("type") == "notification" and f["group"]["type"] == "Share",
            timeout=15,
        )
        assert [f for f in frames if f.get("type") == "notification"] == frames[-1:]
    status, page = pipeline.call(owner, "/v1/notifications")
    assert [g["type"] for g in page["groups"]] == ["Share", "Like"]
    assert page["groups"][1]["activity_count"] == 2
    ks = s.cassandra_keyspace
    wait_for(
        lambda: (
            len(
                list(
                    cassandra.execute(
                        f"SELECT gid FROM {ks}.notify_groups WHERE user_id = %s", (owner,)
                    )
                )
            )
            == 2
        ),
        timeout=10,
        message="the durable groups",
    )
    assert pipeline.worker_metric("feed_notify_groups_written_total") > 0


def test_bad_requests_name_the_field(pipeline: Pipeline, ids: Callable[[str], str]) -> None:
    user = ids("user")
    status, body = pipeline.call(user, "/v1/notifications?limit=101")
    assert status == 400 and body["error"]["field"] == "limit"
    status, body = pipeline.call(user, "/v1/notifications?cursor=nope")
    assert status == 400 and body["error"]["field"] == "cursor"
    status, body = pipeline.call(user, "/v1/notifications/read", {"all": True, "groups": ["x"]})
    assert status == 400 and body["error"]["field"] == "groups"
    status, body = pipeline.call(user, "/v1/notifications/seen", {"groups": ["x"] * 501})
    assert status == 400 and body["error"]["field"] == "groups"
    status, body = pipeline.call(user, "/v1/notifications/no-such-group/actors")
    assert status == 404
    status, body = pipeline.call(user, "/v1/notifications/counts", token="not-a-jwt")
    assert status == 401
    assert pipeline.call(user, "/v1/notifications") == (
        200,
        {"groups": [], "next": None, "unseen": 0, "unread": 0},
    )
