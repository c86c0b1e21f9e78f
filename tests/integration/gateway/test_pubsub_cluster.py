"""The gateway's Pub/Sub on a real Redis Cluster (3 masters): sharded Pub/Sub, one connection per
primary, each channel on the node that owns its slot; a resharding ends the link (the hub then
subscribes again on the new slot map and checks for gaps)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from feed import keys
from gateway.pubsub import RedisSubscriber, ShardedLink
from tests.support.pubsub import DEADLINE_S, Recorder


async def _until(condition: Callable[[], object], what: str) -> None:
    async with asyncio.timeout(DEADLINE_S):
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
        await _until(lambda: rec.pongs >= 3, "a pong from every primary")
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
        link = await _open(client, rec2)  # on the new slot map
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
