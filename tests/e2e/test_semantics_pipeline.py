"""The feed-semantics property, through the real pipeline: hypothesis sequences of follow,
unfollow, post, delete and duplicate deliveries are produced to Kafka, applied by a `feed fanout`
process and read over HTTP from a `feed gateway` process. After the pipeline drains, every user's
feed (paged) equals the reference model of tests/integration/fanout/test_processor_semantics.py.

The worker runs with FEED_FANOUT_LIMIT=1, so most posting actors take the read-time-merge path;
the processor-level test covers both paths side by side with many more examples.

Of the no-op operations of the model's sequences, ``redup`` (a re-stamped second create),
``xdelete`` (another actor's delete) and ``delete_then_post`` (a delete before its create) are
produced here too; ``steal`` (another actor's create of a posted id) is not: it is keyed by the
other actor, so it lands on another partition and may be applied before the original create —
then it is the first create and rightly wins, which the order-free model cannot know.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from feed.kafka import create_topics
from tests.support.feed_model import T0, USERS, Model, ops
from tests.support.pipeline import Pipeline, isolated_env
from tests.support.procs import http_get

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pipeline(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    env = isolated_env(stack_env, "prop", FEED_FANOUT_LIMIT="1")
    p = Pipeline(env, tmp_path_factory.mktemp("prop"))
    create_topics(p.settings)
    with p.running():
        yield p


def _feed(pipeline: Pipeline, user: str) -> list[str]:
    seen: list[str] = []
    cursor = ""
    for _ in range(50):
        query = f"?limit=3&cursor={cursor}" if cursor else "?limit=3"
        status, body = http_get(
            f"{pipeline.gateway_url}/v1/feed{query}",
            headers={"Authorization": f"Bearer {pipeline.token(user)}"},
        )
        assert status == 200, body
        page = json.loads(body)
        seen += [item["activity"]["id"] for item in page["items"]]
        if page["next"] is None:
            return seen
        cursor = page["next"]
    raise AssertionError("paging did not end")


def _produce(pipeline: Pipeline, model: Model, sequence: list[tuple[Any, ...]], ns: str) -> None:
    s = pipeline.settings
    posted: list[dict[str, Any]] = []
    clock = 0
    for n, op in enumerate(sequence):
        kind = op[0]
        if kind in ("follow", "unfollow"):
            follower, followee = op[1], op[2]
            if follower == followee:
                continue
            clock += 1
            event = {
                "type": kind,
                "follower": f"{ns}-u{follower}",
                "followee": f"{ns}-u{followee}",
                "at": (T0 + timedelta(seconds=clock)).isoformat(),
            }
            pipeline.producer.produce(
                s.topic_follows, key=event["follower"].encode(), value=json.dumps(event).encode()
            )
            if kind == "follow":
                model.following.add((follower, followee))
            else:
                model.following.discard((follower, followee))
        elif kind in ("post", "delete_then_post"):
            actor, to, minute = op[1], frozenset(op[2] - {op[1]}), op[3]
            if kind == "delete_then_post":  # same key: applied before the create, to the DLQ
                early = {
                    "id": f"{ns}-e{n}",
                    "type": "Delete",
                    "actor": f"{ns}-u{actor}",
                    "object": f"{ns}-a{n}",
                    "published": T0.isoformat(),
                }
                pipeline.producer.produce(
                    s.topic_activities,
                    key=early["actor"].encode(),
                    value=json.dumps(early).encode(),
                )
            published = T0 + timedelta(minutes=minute)
            body = {
                "id": f"{ns}-a{n}",
                "type": "Create",
                "actor": f"{ns}-u{actor}",
                "object": f"post:{n}",
                "published": published.isoformat(),
                "to": [f"{ns}-u{u}" for u in sorted(to)],
            }
            pipeline.producer.produce(
                s.topic_activities, key=body["actor"].encode(), value=json.dumps(body).encode()
            )
            posted.append(body)
            model.posts[body["id"]] = (actor, int(published.timestamp() * 1_000_000), to)
        elif kind == "dup" and posted:
            body = posted[op[1] % len(posted)]
            pipeline.producer.produce(
                s.topic_activities, key=body["actor"].encode(), value=json.dumps(body).encode()
            )
        elif kind == "redup" and posted:
            again = dict(
                posted[op[1] % len(posted)],
                object=f"post:edited-{n}",
                to=[f"{ns}-u{u}" for u in range(USERS)],
                published=(T0 + timedelta(minutes=op[2], seconds=7)).isoformat(),
            )
            pipeline.producer.produce(
                s.topic_activities, key=again["actor"].encode(), value=json.dumps(again).encode()
            )
        elif kind == "xdelete" and posted:
            target = posted[op[1] % len(posted)]
            other = f"{ns}-u{op[2]}"
            if other != target["actor"]:
                xdelete = {
                    "id": f"{ns}-x{n}",
                    "type": "Delete",
                    "actor": other,
                    "object": target["id"],
                    "published": T0.isoformat(),
                }
                pipeline.producer.produce(
                    s.topic_activities, key=other.encode(), value=json.dumps(xdelete).encode()
                )
        elif kind == "delete" and posted:
            target = posted[op[1] % len(posted)]
            delete = {
                "id": f"{ns}-d{n}",
                "type": "Delete",
                "actor": target["actor"],
                "object": target["id"],
                "published": T0.isoformat(),
            }
            pipeline.producer.produce(
                s.topic_activities, key=target["actor"].encode(), value=json.dumps(delete).encode()
            )
            model.deleted.add(target["id"])
    assert pipeline.producer.flush(10) == 0


@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=ops)
def test_pipeline_feeds_equal_the_model(
    sequence: list[tuple[Any, ...]], pipeline: Pipeline
) -> None:
    ns = f"k{uuid.uuid4().hex[:8]}"
    model = Model()
    _produce(pipeline, model, sequence, ns)
    deadline = time.monotonic() + 30
    for user in range(USERS):
        expected = model.timeline(user)
        while True:
            got = _feed(pipeline, f"{ns}-u{user}")
            if got == expected:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"user {user}: {got} != {expected}; sequence={sequence}")
            time.sleep(0.2)
