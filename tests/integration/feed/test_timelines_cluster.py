"""The workers' timeline writes on a real Redis Cluster (3 masters): the same outcome as on one
Redis, a delete that lands mid-write taken back, a lost script cache; writes that count only once
a replica has them (3 masters with a replica each); a stale slot map and a slot in migration
followed (``MOVED``, ``ASK``)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import redis
import redis.asyncio as aioredis

from feed import keys, timelines_cluster
from feed.cursor import order_key, split_order_key
from feed.delivery_redis import AsyncRedisPresence
from feed.interfaces import Insert
from feed.timelines_redis import RedisTimelines


@pytest.fixture
def cluster_client(redis_cluster: Any) -> Iterator[redis.RedisCluster]:
    client = redis.RedisCluster.from_url(redis_cluster.url)
    yield client
    client.close()


def _timelines(client: Any) -> RedisTimelines:
    return RedisTimelines(client, timeline_max=50, stream_history=100, body_ttl_s=600)


def _insert(ts: int, aid: str, users: list[str]) -> Insert:
    return Insert(order_key(ts, aid), aid, msgspec.json.encode({"id": aid, "n": ts}), users)


def _attach(url: str, cluster: bool, users: list[str]) -> None:
    """Mark ``users`` online through the gateway's presence store."""

    async def run() -> None:
        client: Any = (aioredis.RedisCluster if cluster else aioredis.Redis).from_url(url)
        try:
            presence = AsyncRedisPresence(client, ttl_s=600)
            for user in users:
                await presence.attach(user)
        finally:
            await client.aclose()

    asyncio.run(run())


def _flush_scripts(client: redis.RedisCluster) -> None:
    for node in client.get_nodes():
        client.execute_command("SCRIPT", "FLUSH", target_nodes=node)


async def _read_frames(url: str, cluster: bool, users: list[str]) -> dict[str, list[Any]]:
    """Each user's delivery stream, decoded, cursors left out (they hold a random epoch)."""
    client: Any = (aioredis.RedisCluster if cluster else aioredis.Redis).from_url(url)
    try:
        presence = AsyncRedisPresence(client, ttl_s=600)
        out = {}
        for user in users:
            frames = await presence.frames_after(user, 0, 100)
            decoded = [msgspec.json.decode(f) for _, f in frames]
            for frame in decoded:
                frame.pop("cursor")
            out[user] = decoded
        return out
    finally:
        await client.aclose()


def test_fanout_across_slots_is_what_one_redis_does(
    cluster_client: redis.RedisCluster,
    redis_client: redis.Redis,
    redis_cluster: Any,
    settings: Any,
    ids: Callable[[str], str],
) -> None:
    users = [ids(f"f{n}") for n in range(300)]
    online = users[::15]
    inserts = [
        _insert(10, ids("a"), users[:200]),
        _insert(12, ids("b"), users[50:]),
        _insert(11, ids("c"), online),
    ]
    outcome = {}
    for name, client, url, cluster in (
        ("one", redis_client, settings.redis_url, False),
        ("cluster", cluster_client, redis_cluster.url, True),
    ):
        _attach(url, cluster, online)
        totals = _timelines(client).insert(inserts)
        pages = {u: _timelines(client).page(u, None, 10) for u in users}
        frames = asyncio.run(_read_frames(url, cluster, online))
        outcome[name] = (totals, pages, frames)
    assert outcome["cluster"] == outcome["one"]
    totals, pages, frames = outcome["cluster"]
    assert totals == (200 + 250 + len(online), sum(len(f) for f in frames.values()))
    assert all(len(f) >= 1 for f in frames.values())


def _calls(client: redis.RedisCluster, command: str) -> int:
    """Calls of ``command`` run so far, over every primary (``INFO commandstats``)."""
    return sum(_calls_per_primary(client, command))


def _calls_per_primary(client: redis.RedisCluster, command: str) -> list[int]:
    return [
        int(
            node.redis_connection.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)
        )
        for node in client.get_primaries()
    ]


def test_a_batchs_deleted_markers_are_read_with_one_mget_on_one_node(
    cluster_client: redis.RedisCluster, ids: Callable[[str], str]
) -> None:
    t = _timelines(cluster_client)
    activities = [ids(f"m{n}") for n in range(300)]
    gone = activities[::37]
    t.mark_deleted(gone, 600)
    reader = ids("reader")
    exists, mget = _calls(cluster_client, "exists"), _calls_per_primary(cluster_client, "mget")
    t.insert([_insert(n, a, [reader]) for n, a in enumerate(activities)])
    # one read before the writes and one after, each one MGET to one node
    assert _calls(cluster_client, "exists") == exists
    after = _calls_per_primary(cluster_client, "mget")
    assert sum(after) - sum(mget) == 2
    written = {split_order_key(m)[1] for m in t.page(reader, None, 50).members}
    assert len(written) == 50 and not written & set(gone)


def test_a_deleted_marker_is_found_in_whichever_bucket_is_read_and_the_reads_go_round_the_nodes(
    cluster_client: redis.RedisCluster, ids: Callable[[str], str]
) -> None:
    t = _timelines(cluster_client)
    gone, kept = ids("gone"), ids("kept")
    t.mark_deleted([gone], 600)
    cluster = timelines_cluster.ClusterScripts(cluster_client, [])
    before = _calls_per_primary(cluster_client, "mget")
    found = [
        timelines_cluster.deleted_now(cluster, [gone, kept]) for _ in range(keys.DELETED_BUCKETS)
    ]
    assert found == [{gone}] * keys.DELETED_BUCKETS
    # one read per node for each of its buckets: 3 masters hold 8 buckets each
    reads = [b - a for a, b in zip(before, _calls_per_primary(cluster_client, "mget"), strict=True)]
    assert reads == [keys.DELETED_BUCKETS // len(reads)] * len(reads)


def test_while_most_calls_find_someone_online_they_carry_their_bodies_at_once(
    cluster_client: redis.RedisCluster, redis_cluster: Any, ids: Callable[[str], str]
) -> None:
    """A call that finds a user online runs twice (offline-first, then with the bodies): while
    most calls do, each goes with its bodies at once, and once most do not, offline-first again.
    Either way every user, online or not, gets the same writes."""
    t = _timelines(cluster_client)
    online = [ids(f"on{n}") for n in range(5)]
    slot = timelines_cluster.slot_of(keys.timeline(online[0]))
    # offline, in an online user's call (its slot)
    mate = next(
        u
        for u in (f"{online[0]}-{n}" for n in range(1 << 20))
        if timelines_cluster.slot_of(keys.timeline(u)) == slot
    )
    _attach(redis_cluster.url, True, online)
    users = [*online, mate]
    calls = len({timelines_cluster.slot_of(keys.timeline(u)) for u in users})
    sent: list[str] = []

    def batch(to: list[str]) -> int:
        """Script calls one batch to ``to`` made."""
        before = _calls(cluster_client, "evalsha")
        aid = ids("a")
        sent.append(aid)
        t.insert([_insert(len(sent), aid, to)])
        return _calls(cluster_client, "evalsha") - before

    assert batch(users) == 2 * calls  # offline-first: each call found someone, and ran again
    runs = [batch(users) for _ in range(5)]
    assert runs[-1] == calls, runs  # with the bodies at once
    members = [order_key(n, a) for n, a in enumerate(sent, 1)][::-1]
    for user in users:
        assert t.page(user, None, 10).members == members
    frames = asyncio.run(_read_frames(redis_cluster.url, True, online))
    assert all([f["activity"]["id"] for f in frames[u]] == sent for u in online)
    # most calls find no one: offline-first again (a call now runs once only if no one is on)
    offline = [ids(f"off{n}") for n in range(20)]
    for _ in range(5):
        batch(offline)
    assert batch(users) == 2 * calls
    assert all(t.page(u, None, 1).members == [order_key(len(sent), sent[-1])] for u in users)


def test_a_delete_landing_mid_write_is_taken_back(
    cluster_client: redis.RedisCluster,
    redis_cluster: Any,
    ids: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The delete sets its marker after the writer's first look and before its second: the
    writer takes back what it wrote (and tells the online user), and drops the body."""
    t = _timelines(cluster_client)
    online, offline, aid = ids("on"), ids("off"), ids("a")
    _attach(redis_cluster.url, True, [online])
    real = timelines_cluster.deleted_now
    looks: list[set[str]] = []

    def deleted_now(cluster: Any, activity_ids: Any, k: keys.Keyspace) -> set[str]:
        if looks:  # the second look: the delete has landed meanwhile
            t.mark_deleted([aid], 600)
        looks.append(real(cluster, activity_ids, k))
        return looks[-1]

    monkeypatch.setattr(timelines_cluster, "deleted_now", deleted_now)
    t.insert([_insert(5, aid, [online, offline])])
    assert looks == [set(), {aid}]
    assert t.page(online, None, 10).members == [] and t.page(offline, None, 10).members == []
    assert cluster_client.exists(keys.body(aid)) == 0
    frames = asyncio.run(_read_frames(redis_cluster.url, True, [online]))[online]
    assert [f["type"] for f in frames] == ["activity", "removed"]


def test_a_lost_script_cache_is_loaded_again(
    cluster_client: redis.RedisCluster, ids: Callable[[str], str]
) -> None:
    t = _timelines(cluster_client)
    users = [ids(f"u{n}") for n in range(40)]
    _flush_scripts(cluster_client)
    assert t.insert([_insert(3, ids("a"), users)]) == (40, 0)
    # the same with the calls online-first (mode b at once), for offline users
    t._online_share[0] = 1.0
    _flush_scripts(cluster_client)
    assert t.insert([_insert(4, ids("b"), users)]) == (40, 0)
    assert t.page(users[0], None, 10).members == [
        order_key(4, ids("b")),
        order_key(3, ids("a")),
    ]
    _flush_scripts(cluster_client)
    claims = [(ids(f"x{n}"), "actor") for n in range(30)]
    assert t.claim(claims, 60) == ["actor"] * 30
    assert t.claim([(claims[0][0], "other")], 60) == ["actor"]


# --- acknowledged means replicated; redirections -------------------------------------------------
def _replica_of(cluster: Any, client: redis.RedisCluster, key: str) -> Any:
    """The ``infra.RedisServer`` replicating the master that serves ``key``'s slot."""
    owners = client.nodes_manager.slots_cache[timelines_cluster.slot_of(key)]
    return next(node for node in cluster.nodes if node.port == owners[1].port)


def test_writes_count_only_once_a_replica_has_them(
    redis_cluster_replicas: Any, ids: Callable[[str], str]
) -> None:
    """A replica that does not answer (stopped: a hung process) makes the write fail instead of
    counting: the worker retries the batch rather than commit what a failover could lose."""
    client = redis.RedisCluster.from_url(redis_cluster_replicas.url)
    try:
        scripts = timelines_cluster.ClusterScripts(client, [], wait_replicas=1, wait_timeout_ms=200)
        key = keys.body(ids("a"))
        replica = _replica_of(redis_cluster_replicas, client, key)
        assert scripts.run([("SET", key, b"1")]) == [b"OK"]
        # acknowledged: the replica holds it already
        on_replica = redis.Redis(host=replica.host, port=replica.port)
        on_replica.execute_command("READONLY")
        assert on_replica.get(key) == b"1"
        pid = replica.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(timelines_cluster.ClusterUnavailable, match="0 of 1 replicas"):
                scripts.run([("SET", key, b"2")])
            waited = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        assert 0.2 <= waited < 1.0, waited  # the WAIT's own timeout, not a hang
        # reads do not wait; once the replica is back, writes count again
        assert scripts.run([("GET", key)], wait=False) == [b"2"]
        assert scripts.run([("SET", key, b"3")]) == [b"OK"]
        assert on_replica.get(key) == b"3"
        on_replica.close()
    finally:
        client.close()


def test_without_replicas_nothing_is_waited_for(
    cluster_client: redis.RedisCluster, ids: Callable[[str], str]
) -> None:
    scripts = timelines_cluster.ClusterScripts(cluster_client, [], wait_replicas=1)
    names = [keys.body(ids(f"k{n}")) for n in range(50)]  # every node
    assert scripts.run([("SET", name, name) for name in names]) == [b"OK"] * 50
    assert scripts.run([("GET", name) for name in names]) == [n.encode() for n in names]


def test_a_stale_slot_map_is_followed(
    cluster_client: redis.RedisCluster, ids: Callable[[str], str]
) -> None:
    """The map says another master serves the slot: its ``MOVED`` is followed, the map read
    again, and the write lands where the key lives."""
    scripts = timelines_cluster.ClusterScripts(cluster_client, [])
    key = keys.body(ids("m"))
    slot = timelines_cluster.slot_of(key)
    cache = cluster_client.nodes_manager.slots_cache
    right = cache[slot]
    wrong = next(n for n in cluster_client.get_primaries() if n.name != right[0].name)
    cache[slot] = [wrong]
    assert scripts.run([("SET", key, b"v")]) == [b"OK"]
    assert cluster_client.nodes_manager.slots_cache[slot][0].name == right[0].name
    assert cluster_client.get(key) == b"v"


def test_a_slot_in_migration_is_followed_with_asking(
    cluster_client: redis.RedisCluster, ids: Callable[[str], str]
) -> None:
    """Mid-resharding, a key that already left (or never was on) the migrating node is answered
    with ``ASK``: the command goes to the importing node after ``ASKING``."""
    scripts = timelines_cluster.ClusterScripts(cluster_client, [])
    primaries = cluster_client.get_primaries()
    # a slot of our own, with no key in it yet, and which master serves it
    while True:
        key = keys.body(f"ask-{uuid.uuid4().hex[:8]}")
        slot = timelines_cluster.slot_of(key)
        source = cluster_client.nodes_manager.slots_cache[slot][0]
        if cluster_client.cluster_countkeysinslot(slot) == 0:
            break
    target = next(n for n in primaries if n.name != source.name)

    def node_id(node: Any) -> str:
        return str(cluster_client.execute_command("CLUSTER", "MYID", target_nodes=node).decode())

    source_id, target_id = node_id(source), node_id(target)
    cluster_client.execute_command(
        "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id, target_nodes=target
    )
    cluster_client.execute_command(
        "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id, target_nodes=source
    )
    try:
        assert scripts.run([("SET", key, b"asked")]) == [b"OK"]  # absent at the source: ASK
        on_target = redis.Redis(host=target.host, port=target.port)
        on_target.execute_command("ASKING")
        assert on_target.get(key) == b"asked"
        on_target.close()
    finally:
        for node in primaries:  # the migration ends: the target owns the slot
            cluster_client.execute_command(
                "CLUSTER", "SETSLOT", slot, "NODE", target_id, target_nodes=node
            )
    cluster_client.nodes_manager.initialize()
    assert cluster_client.get(key) == b"asked"
