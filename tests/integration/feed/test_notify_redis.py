"""Notification feeds on the real Redis and Cassandra against the reference model
(``feed.notify.NotifyBook``), step by step.

Random sequences of notify activities (with duplicates of ids: replays), deletes, seen/read marks
(all, a list of groups, through a position) and evictions of a user's Redis copy (the next call
loads it from Cassandra) run through :class:`feed.notify_redis.NotifyRedis` (the workers' side)
and :class:`feed.notify_redis.AsyncNotifyRedis` (the gateway's side). After every step each
user's groups, read page by page, each group's actors, read page by page, and the counts must
equal the model's. Small bounds (3 activities per group, 4 groups, a 2 s window) make every
bound happen often.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from cassandra import OperationTimedOut
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feed import keys, scripts
from feed.interfaces import Mark, Notify, Unnotify
from feed.notify import MemoryNotifications, NotifyLimits
from feed.notify_cassandra import CassandraNotifyStore
from feed.notify_redis import AsyncNotifyRedis, NotifyRedis
from feed.settings import Settings
from tests.support.notify import LIMITS, S, read_all

USERS = 2
IDS = 8

attrs = st.tuples(
    st.sampled_from(["ann", "bob", "cy"]),  # actor
    st.integers(0, 4).map(lambda s: 1_700_000_000 * S + s * S),  # published µs
    st.sampled_from(["Like", "Comment"]),
    st.sampled_from(["post:1", "post:1", "post:2"]),
)
step = st.one_of(
    st.tuples(st.just("add"), st.integers(0, USERS - 1), st.integers(0, IDS - 1)),
    st.tuples(st.just("add"), st.integers(0, USERS - 1), st.integers(0, IDS - 1)),
    st.tuples(st.just("del"), st.integers(0, USERS - 1), st.integers(0, IDS - 1)),
    st.tuples(
        st.just("mark"),
        st.integers(0, USERS - 1),
        st.tuples(st.booleans(), st.sampled_from(["all", "groups", "through"]), st.integers(0, 9)),
    ),
    st.tuples(st.just("evict"), st.integers(0, USERS - 1), st.just(0)),
    # several operations in one call (a worker batch): the bound holds after each of them
    st.tuples(
        st.just("batch"),
        st.just(0),
        st.lists(
            st.tuples(st.booleans(), st.integers(0, USERS - 1), st.integers(0, IDS - 1)),
            min_size=2,
            max_size=4,
        ),
    ),
)


def _evict(client: redis.Redis, user: str) -> None:
    client.delete(*keys.notify_keys(user)[:4])


def _read_both(
    settings: Settings, durable: CassandraNotifyStore, model: MemoryNotifications, user: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The user's feed as the gateway reads it from Redis (loading from Cassandra if it must),
    and as the model holds it."""

    async def read() -> tuple[dict[str, Any], dict[str, Any]]:
        client = aioredis.Redis.from_url(settings.redis_url)
        gateway = AsyncNotifyRedis(client, lambda: durable, needs_durable=True, ttl_s=600)
        try:
            return await read_all(gateway, user), await read_all(model, user)
        finally:
            await client.aclose()

    return asyncio.run(read())


@pytest.fixture
def stores(redis_client: redis.Redis, cassandra: Any, settings: Settings) -> Any:
    durable = CassandraNotifyStore(cassandra, settings.cassandra_keyspace)
    worker = NotifyRedis(redis_client, durable, limits=LIMITS, ttl_s=600)
    return worker, durable


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    table=st.lists(attrs, min_size=IDS, max_size=IDS), steps=st.lists(step, min_size=4, max_size=30)
)
def test_redis_and_cassandra_match_the_model_after_every_step(
    stores: Any,
    redis_client: redis.Redis,
    settings: Settings,
    table: list[tuple[str, int, str, str]],
    steps: list[tuple[str, int, Any]],
) -> None:
    worker, durable = stores
    run = uuid.uuid4().hex[:8]
    users = [f"n{u}-{run}" for u in range(USERS)]
    aids = [f"a{i}-{run}" for i in range(IDS)]
    model = MemoryNotifications(LIMITS)

    async def scenario() -> None:
        client = aioredis.Redis.from_url(settings.redis_url)
        gateway = AsyncNotifyRedis(client, lambda: durable, needs_durable=True, ttl_s=600)
        try:
            for number, (kind, u, arg) in enumerate(steps):
                user = users[u]
                if kind == "add":
                    actor, ts, type_, object_ = table[arg]
                    ops: list[Any] = [Notify(user, aids[arg], actor, ts, type_, object_)]
                    worker.apply(ops)
                    model.apply(ops)
                elif kind == "del":
                    ops = [Unnotify(user, aids[arg])]
                    worker.apply(ops)
                    model.apply(ops)
                elif kind == "batch":
                    ops = []
                    for add, b_user, b_arg in arg:
                        if add:
                            actor, ts, type_, object_ = table[b_arg]
                            ops.append(
                                Notify(users[b_user], aids[b_arg], actor, ts, type_, object_)
                            )
                        else:
                            ops.append(Unnotify(users[b_user], aids[b_arg]))
                    worker.apply(ops)
                    model.apply(ops)
                elif kind == "mark":
                    read, mode, pick = arg
                    ordered = model.book(user).ordered()
                    if mode == "all" or not ordered:
                        mark = Mark(read=read, all=True)
                    elif mode == "groups":
                        mark = Mark(read=read, groups=[g.gid for g in ordered[pick % 2 :: 2]])
                    else:
                        mark = Mark(read=read, through=ordered[pick % len(ordered)].position)
                    got = await gateway.mark(user, mark)
                    assert got == await model.mark(user, mark), (number, steps)
                else:
                    _evict(redis_client, user)
                for other in users:
                    real = await read_all(gateway, other)
                    expected = await read_all(model, other)
                    assert real == expected, (number, steps)
            # and Cassandra alone holds the same: evict everyone, read again
            for user in users:
                _evict(redis_client, user)
                assert await read_all(gateway, user) == await read_all(model, user), steps
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_group_id_used_again_after_its_group_emptied_counts_every_actor(
    stores: Any, settings: Settings
) -> None:
    """The emptied group's actor counters go with it (they were left behind, and a new group
    of the same id then missed an actor)."""
    worker, durable = stores
    run = uuid.uuid4().hex[:8]
    user = f"reuse-{run}"
    t0 = 1_700_000_000 * S
    model = MemoryNotifications(LIMITS)
    steps: list[list[Any]] = [
        [Notify(user, f"a1-{run}", "A", t0, "Like", "post:1")],
        [Unnotify(user, f"a1-{run}")],
        [Notify(user, f"a2-{run}", "B", t0, "Like", "post:1")],
        [Notify(user, f"a3-{run}", "A", t0 + S, "Like", "post:1")],
    ]
    for ops in steps:
        worker.apply(ops)
        model.apply(ops)
    got, expected = _read_both(settings, durable, model, user)
    assert got == expected
    assert got["groups"][0]["actors"] == ["A", "B"]


def test_two_callers_loading_one_cold_user_both_succeed(
    stores: Any, redis_client: redis.Redis, settings: Settings
) -> None:
    """A load that finds the user loaded by someone else only renews the TTL (it raised)."""
    worker, _ = stores
    user = f"twice-{uuid.uuid4().hex[:8]}"
    worker.apply([Notify(user, f"a-{user}", "A", 1_700_000_000 * S, "Like", "post:1")])
    script = redis_client.register_script(scripts.source("notify"))
    args = ["load", 86_400, 8_640, keys.channel(user), 0]
    assert script(keys=keys.notify_keys(user), args=args) == 0  # loaded already: no error
    _evict(redis_client, user)
    assert script(keys=keys.notify_keys(user), args=args) == 1
    assert script(keys=keys.notify_keys(user), args=args) == 0
    assert redis_client.ttl(keys.notify_data(user)) > 0


def test_the_group_bound_holds_after_each_operation_of_a_batch(
    redis_client: redis.Redis, cassandra: Any, settings: Settings
) -> None:
    """A batch that opens a group and then adds to the old one: the bound applies after the
    first operation, as in the reference (it was applied once, at the end of the call)."""
    durable = CassandraNotifyStore(cassandra, settings.cassandra_keyspace)
    limits = NotifyLimits(window_s=100, group_max=10, max_groups=1)
    worker = NotifyRedis(redis_client, durable, limits=limits, ttl_s=600)
    model = MemoryNotifications(limits)
    run = uuid.uuid4().hex[:8]
    user, t0 = f"bound-{run}", 1_700_000_000 * S
    batches: list[list[Any]] = [
        [Notify(user, f"a1-{run}", "A", t0, "Like", "p1")],
        [
            Notify(user, f"a2-{run}", "B", t0 + 2 * S, "Like", "p2"),
            Notify(user, f"a3-{run}", "C", t0 + 3 * S, "Like", "p1"),
        ],
    ]
    for ops in batches:
        worker.apply(ops)
        model.apply(ops)
    got, expected = _read_both(settings, durable, model, user)
    assert got == expected
    assert [(g["actors"], g["activity_count"]) for g in got["groups"]] == [(["C"], 1)]


class _FailsOnce:
    """The durable store, with its first write failing (a Cassandra timeout)."""

    def __init__(self, store: CassandraNotifyStore) -> None:
        self.store = store
        self.failed = False

    def write(self, changes: Any) -> int:
        if not self.failed:
            self.failed = True
            raise OperationTimedOut("injected: the write timed out")
        return self.store.write(changes)

    def load(self, user: str) -> Any:
        return self.store.load(user)

    def load_many(self, users: Any) -> Any:
        return self.store.load_many(users)


def test_a_failed_cassandra_write_is_made_again_by_the_retry(
    stores: Any, redis_client: redis.Redis, settings: Settings
) -> None:
    """Redis changes first: a retry after the Cassandra write failed changes nothing there, but
    still writes what is pending, so a delete, a closed group and a mark reach Cassandra (they
    were lost: a reload brought the deleted notification back)."""
    worker, durable = stores
    run = uuid.uuid4().hex[:8]
    user, t0 = f"retry-{run}", 1_700_000_000 * S
    model = MemoryNotifications(LIMITS)
    first = [
        Notify(user, f"a1-{run}", "A", t0, "Like", "post:1"),
        Notify(user, f"a2-{run}", "B", t0 + S, "Like", "post:1"),
    ]
    worker.apply(first)
    model.apply(first)
    flaky = NotifyRedis(redis_client, _FailsOnce(durable), limits=LIMITS, ttl_s=600)  # type: ignore[arg-type]
    delete = [
        Unnotify(user, f"a1-{run}"),
        Notify(user, f"a3-{run}", "C", t0 + 9 * S, "Like", "post:1"),
    ]
    with pytest.raises(OperationTimedOut):
        flaky.apply(delete)
    flaky.apply(delete)  # the worker's retry of the batch
    model.apply(delete)
    assert redis_client.llen(keys.notify_pending(user)) == 0  # confirmed

    async def check() -> None:
        client = aioredis.Redis.from_url(settings.redis_url)
        flaky_store = _FailsOnce(durable)
        marks = AsyncNotifyRedis(client, lambda: flaky_store, needs_durable=True, ttl_s=600)  # type: ignore[arg-type, return-value]
        gateway = AsyncNotifyRedis(client, lambda: durable, needs_durable=True, ttl_s=600)
        try:
            mark = Mark(read=True, all=True)
            with pytest.raises(OperationTimedOut):
                await marks.mark(user, mark)
            assert await marks.mark(user, mark) == await model.mark(user, mark)  # the retry
            _evict(redis_client, user)  # what Cassandra alone holds
            assert await read_all(gateway, user) == await read_all(model, user)
        finally:
            await client.aclose()

    asyncio.run(check())


def test_a_group_emptied_and_opened_again_in_one_batch_is_written_whole(
    stores: Any, redis_client: redis.Redis, settings: Settings
) -> None:
    """One call empties a group and opens one with the same id: Cassandra gets the new group's
    whole row after the drop (it got only its flags, and a reload lost the group)."""
    worker, durable = stores
    run = uuid.uuid4().hex[:8]
    user, t0 = f"reopen-{run}", 1_700_000_000 * S
    model = MemoryNotifications(LIMITS)
    for ops in (
        [Notify(user, f"a1-{run}", "A", t0, "Like", "post:1")],
        [Unnotify(user, f"a1-{run}"), Notify(user, f"a2-{run}", "B", t0, "Like", "post:1")],
    ):
        worker.apply(ops)
        model.apply(ops)
    _evict(redis_client, user)
    got, expected = _read_both(settings, durable, model, user)
    assert got == expected
    assert [g["actors"] for g in got["groups"]] == [["B"]]
