"""How the workers' writes are cut into one-slot calls on a Redis Cluster (no server needed)."""

from __future__ import annotations

import msgspec
import pytest

from feed import keys
from feed.cursor import order_key
from feed.interfaces import Insert, Removal
from feed.timelines_cluster import (
    MARKERS_PER_READ,
    by_slot,
    fanout_calls,
    marker_reads,
    markers_set,
    slot_of,
    with_bodies,
)
from schemas import frames

HEAD: list[str | int | bytes] = [100, 50, "0"]


def _insert(ts: int, aid: str, users: list[str], ts_ms: int | None = None) -> Insert:
    body = msgspec.json.encode({"id": aid})
    return Insert(order_key(ts, aid), aid, body, users, ts_ms=ts_ms)


def _decoded(call: object) -> tuple[list[str], dict[str, list[str]]]:
    """(the call's members, each user's members in delivery order), read as fanout.lua does in
    mode ``u``: 'u', max, only_active, then one MessagePack argument: each user's members."""
    args = call.args  # type: ignore[attr-defined]
    assert args[:3] == [b"u", HEAD[0], HEAD[2]]
    assert len(args) == 4
    lists = msgspec.msgpack.decode(args[3], type=list[list[str]])
    names = call.keys  # type: ignore[attr-defined]
    users = [k.decode().partition("{")[2].rstrip("}") for k in names[0::3]]
    assert users == call.users  # type: ignore[attr-defined]
    # each user's timeline, presence and active marker, declared (a resharding routes a call by
    # its declared keys); mode u never touches the delivery stream
    assert names == [k for u in users for k in keys.fanout_cluster_keys(u)[:3]]
    assert len(lists) == len(users)
    # the call's activities: each member any of its users receives, once, in first-seen order
    members = list(dict.fromkeys(m for mine in lists for m in mine))
    return members, dict(zip(users, lists, strict=True))


def test_each_call_holds_one_slot_and_only_its_users_activities() -> None:
    users = [f"user-{n}" for n in range(400)]
    inserts = [
        _insert(10, "a1", users[:300]),
        _insert(5, "a2", users[100:]),
        _insert(7, "a3", users[250:260], ts_ms=1234),
    ]
    calls = fanout_calls(inserts, HEAD)
    received: dict[str, list[str]] = {}
    for call in calls:
        # every key of the call is in the slot the call names (the slot it is sent by)
        assert {slot_of(k) for k in call.keys} == {call.slot}
        assert {slot_of(k) for k in with_bodies(call)[0]} == {call.slot}
        members, per_user = _decoded(call)
        # only the activities some user of the call receives, each once
        assert sorted(members) == sorted({m for ms in per_user.values() for m in ms})
        assert [i.member for i in call.activities] == members
        for user, mine in per_user.items():
            assert user not in received
            received[user] = mine
    expected = {
        u: [i.member for i in inserts if u in i.users] for u in users
    }  # insert order, per user
    assert received == expected
    # users sharing a slot share a call
    assert len(calls) == len({slot_of(keys.fanout_user_key(u)) for u in users})


def test_with_bodies_gives_mode_b_with_four_keys_the_frame_and_each_body_after_the_mode() -> None:
    k = keys.Keyspace.for_tenant("acme")
    slot = slot_of(k.fanout_user_key("u"))
    v = next(f"v{i}" for i in range(1 << 20) if slot_of(k.fanout_user_key(f"v{i}")) == slot)
    inserts = [_insert(1, "x", ["u", v]), _insert(2, "y", ["u"], ts_ms=7)]
    (call,) = fanout_calls(inserts, HEAD, k)
    names, args = with_bodies(call)
    assert names == [name for u in call.users for name in k.fanout_cluster_keys(u)]
    n = 2
    # fanout.lua's mode-b layout: head, n, the frame's parts, the prefixes, members, tails
    assert args[:4] == [*HEAD, n]
    assert args[4:7] == [frames.ACTIVITY_HEAD, frames.ACTIVITY_MIDDLE, frames.ACTIVITY_TAIL]
    assert args[7:12] == list(k.fanout_prefixes)
    assert args[12 : 12 + n] == [i.member for i in inserts]
    assert args[12 + n : 12 + 2 * n] == [b"", frames.activity_tail(7, None)]
    assert args[12 + 2 * n] == b"b"
    assert args[13 + 2 * n : 13 + 3 * n] == [i.body for i in inserts]
    # then each user's indexes into the members: u gets x and y, v gets x
    assert args[13 + 3 * n :] == [b"1 2", b"1"]


def test_removals_are_grouped_by_slot() -> None:
    users = [f"r-{n}" for n in range(200)]
    groups = by_slot([Removal("1:a", "a", users[:150]), Removal("2:b", "b", users[50:])])
    seen: set[tuple[str, str]] = set()
    for group in groups:
        slots = {slot_of(keys.timeline(u)) for _, _, us in group for u in us}
        assert len(slots) == 1
        seen |= {(m, u) for m, _, us in group for u in us}
    assert seen == {("1:a", u) for u in users[:150]} | {("2:b", u) for u in users[50:]}


def test_a_batchs_deleted_markers_are_read_with_one_mget_in_one_bucket() -> None:
    ids = [f"m-{n}" for n in range(500)]
    k = keys.Keyspace.for_tenant("acme")
    groups, reads = marker_reads([*ids, *ids[:10]], k, bucket=7)  # an id twice is read once
    assert groups == [ids]
    assert reads == [("MGET", *[k.deleted_on_cluster(a, 7) for a in ids])]
    assert len({slot_of(name) for name in reads[0][1:]}) == 1
    # what the replies found, by position
    replies = [[b"1" if a in {"m-7", "m-499"} else None for a in group] for group in groups]
    assert markers_set(groups, replies) == {"m-7", "m-499"}


def test_the_marker_reads_take_the_buckets_in_turn() -> None:
    buckets = keys.DELETED_BUCKETS
    seen = [marker_reads(["x"], keys.DEFAULT)[1][0][1] for _ in range(2 * buckets)]
    first = keys.deleted_copies("x").index(seen[0])
    assert seen == [keys.deleted_copies("x")[(first + n) % buckets] for n in range(2 * buckets)]


def test_a_huge_batchs_marker_reads_stay_short_commands() -> None:
    ids = [f"h-{n}" for n in range(MARKERS_PER_READ * 5 // 2)]
    groups, reads = marker_reads(ids, keys.DEFAULT)
    assert [len(read) - 1 for read in reads] == [MARKERS_PER_READ] * 2 + [MARKERS_PER_READ // 2]
    assert [a for group in groups for a in group] == ids
    assert len({slot_of(name) for read in reads for name in read[1:]}) == 1


def test_an_error_reply_of_a_marker_read_is_raised() -> None:
    groups, _ = marker_reads(["x"], keys.DEFAULT)
    with pytest.raises(RuntimeError, match="CLUSTERDOWN"):
        markers_set(groups, [RuntimeError("CLUSTERDOWN")])
