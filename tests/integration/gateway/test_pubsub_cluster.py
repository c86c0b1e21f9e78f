"""The gateway's Pub/Sub on a real Redis Cluster (3 masters): sharded Pub/Sub, one connection per
primary, each channel on the node that owns its slot; a resharding ends the link (the hub then
subscribes again on the new slot map and checks for gaps) and is not a rollback; a hung primary
(3 masters with a replica each) is noticed by its missing PONG, and the link opened after its
replica took over says its channels may have rolled back."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from feed import keys
from gateway.pubsub import RedisSubscriber, ShardedLink
from tests.support.pubsub import DEADLINE_S, Recorder


async def _until(condition: Callable[[], object], what: str, timeout: float = DEADLINE_S) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)  # polling a callback's record, bounded by the timeout
    assert condition(), what


async def _open(client: aioredis.RedisCluster, rec: Recorder) -> ShardedLink:
    link = await RedisSubscriber(client).open(
        timeout_s=5.0, on_message=rec.message, on_subscribe=rec.subscribe, on_pong=rec.pong
    )
    assert isinstance(link, ShardedLink)
    return link


@pytest.fixture
async def clients(redis_cluster: Any) -> AsyncIterator[tuple[aioredis.RedisCluster, Any]]:
    """The gateway's asyncio cluster client, and a blocking one for checks and admin."""
    client = aioredis.RedisCluster.from_url(redis_cluster.url)
    admin = redis.RedisCluster.from_url(redis_cluster.url)
    yield client, admin
    await client.aclose()
    admin.close()


def _owner(admin: redis.RedisCluster, channel: bytes) -> Any:
    return admin.nodes_manager.get_node_from_slot(key_slot(channel))


async def test_each_channel_lives_on_its_slots_node_only(
    clients: tuple[aioredis.RedisCluster, Any], ids: Callable[[str], str]
) -> None:
    client, admin = clients
    rec = Recorder()
    link = await _open(client, rec)
    try:
        channels = [keys.channel(ids(f"u{n}")).encode() for n in range(12)]
        link.subscribe(*channels)
        await _until(lambda: sorted(rec.subscribed) == sorted(channels), "all confirmed")
        for channel in channels:
            owner = _owner(admin, channel)
            for node in admin.get_primaries():
                with redis.Redis(host=node.host, port=node.port) as one:
                    counts = one.execute_command("PUBSUB", "SHARDNUMSUB", channel)
                assert counts[1] == (1 if node.name == owner.name else 0), node.name
        for n, channel in enumerate(channels):
            await client.spublish(channel, b"m%d" % n)
        await client.publish(channels[0], b"classic")  # another namespace: never delivered
        want = [(c, b"m%d" % n) for n, c in enumerate(channels)]
        await _until(lambda: sorted(rec.messages) == sorted(want), "every message once")
        link.ping()
        await _until(lambda: rec.pongs == 1, "one answer, once every primary answered")
        link.unsubscribe(channels[0])
        await client.spublish(channels[0], b"after")
        await client.spublish(channels[1], b"still")
        await _until(lambda: (channels[1], b"still") in rec.messages, "the other still heard")
        assert (channels[0], b"after") not in rec.messages
        assert not link.closed.done()  # our own sunsubscribe ends nothing
    finally:
        await link.aclose()


async def test_a_resharded_channel_ends_the_link_and_a_new_one_follows(
    clients: tuple[aioredis.RedisCluster, Any], ids: Callable[[str], str]
) -> None:
    client, admin = clients
    rec = Recorder()
    link = await _open(client, rec)
    # A slot that holds no keys (the session's cluster is shared): SETSLOT ... NODE moves only
    # an empty slot; one with keys would need MIGRATE, which this test does not exercise.
    for n in range(1000):
        channel = keys.channel(ids(f"moved{n}")).encode()
        slot = key_slot(channel)
        source = _owner(admin, channel)
        if not admin.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot, target_nodes=source):
            break
    target = next(n for n in admin.get_primaries() if n.name != source.name)
    target_id = admin.execute_command("CLUSTER", "MYID", target_nodes=target)
    try:
        link.subscribe(channel)
        await _until(lambda: rec.subscribed == [channel], "subscribed")
        # Move the (keyless) slot: what `redis-cli --cluster reshard` does, slot by slot.
        for node in [
            target,
            source,
            *[n for n in admin.get_primaries() if n not in (target, source)],
        ]:
            admin.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id, target_nodes=node)
        async with asyncio.timeout(DEADLINE_S):
            why = await link.closed
        assert "slot" in why, why
        await link.aclose()
        rec2 = Recorder()
        before, link = link, await _open(client, rec2)  # on the new slot map
        assert not link.rolled_back(channel, before)  # moved whole to another primary
        link.subscribe(channel)
        await _until(lambda: rec2.subscribed == [channel], "subscribed again")
        await client.spublish(channel, b"after the move")
        await _until(lambda: rec2.messages == [(channel, b"after the move")], "heard again")
    finally:
        # the slot goes back to its first owner (the session's cluster is shared)
        source_id = admin.execute_command("CLUSTER", "MYID", target_nodes=source)
        for node in [
            source,
            target,
            *[n for n in admin.get_primaries() if n not in (target, source)],
        ]:
            admin.execute_command("CLUSTER", "SETSLOT", slot, "NODE", source_id, target_nodes=node)
        await link.aclose()


@pytest.fixture(scope="module")
def failover_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """3 masters with a replica each, for this module only (a test makes a replica take over)."""
    from infra import RedisCluster

    cluster = RedisCluster(tmp_path_factory.mktemp("pubsub-failover"), masters=3, replicas=1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_a_hung_primary_misses_its_pong_and_its_replicas_takeover_is_a_rollback(
    failover_cluster: Any, ids: Callable[[str], str]
) -> None:
    """A primary that stops answering (SIGSTOP: no connection is lost) until its replica takes
    over: the link's PING is not answered (the hub would drop the link), and the next link says
    the primary's channels may have lost writes; the other primaries' channels did not."""
    client = aioredis.RedisCluster.from_url(failover_cluster.url)
    rec = Recorder()
    link = await _open(client, rec)
    channel = keys.channel(ids("hung")).encode()
    slot = key_slot(channel)
    by_port = {n.port: n for n in failover_cluster.nodes}
    victim_port = failover_cluster.master_port(slot)
    assert victim_port is not None
    victim = by_port[victim_port]
    witness = next(n for n in failover_cluster.masters if n is not victim)
    for n in range(1000):  # a channel on another primary
        other = keys.channel(ids(f"other{n}")).encode()
        if failover_cluster.master_port(key_slot(other)) != victim_port:
            break
    link.subscribe(channel, other)
    await _until(lambda: len(rec.subscribed) == 2, "subscribed")
    pid = victim.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        link.ping()
        await asyncio.sleep(1.0)  # the time a PONG takes is what is measured here
        assert rec.pongs == 0, "a PONG reached the hub though a primary did not answer"
        async with asyncio.timeout(30):
            while failover_cluster.master_port(slot, witness) in (None, victim_port):
                await asyncio.sleep(0.1)  # the cluster's failover: node timeout, then election
        assert not link.closed.done()  # nothing told the link: only its PING could
        await link.aclose()
        # As the hub does: open a link, PING it, and drop it if not every primary answers. The
        # slot map comes from a node picked at random, which may not have heard of the failover
        # yet: that link still names the hung primary and its PING goes unanswered. Each link is
        # asked about the one it replaces.
        before: Any = link
        async with asyncio.timeout(30):
            while True:
                rec2 = Recorder()
                try:
                    after = await _open(client, rec2)
                except redis.exceptions.RedisError:
                    await asyncio.sleep(0.2)  # the client's map may still name the hung node
                    continue
                assert not after.rolled_back(other, before)
                if after.rolled_back(channel, before):
                    break
                after.ping()
                try:
                    await _until(lambda r=rec2: r.pongs == 1, "pong", timeout=2.0)
                except TimeoutError:
                    await after.aclose()
                    before = after  # a stale map: the next link is asked about this one
                    continue
                raise AssertionError("a link on the new map did not see the rollback")
        after.ping()
        await _until(lambda: rec2.pongs == 1, "every primary answered")
        await after.aclose()
    finally:
        os.kill(pid, signal.SIGCONT)  # it rejoins as a replica of the promoted one
        await client.aclose()
