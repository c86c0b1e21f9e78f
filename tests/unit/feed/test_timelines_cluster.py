"""How the workers' writes are cut into one-slot calls on a Redis Cluster (no server needed)."""

from __future__ import annotations

import msgspec

from feed import keys
from feed.cursor import order_key
from feed.interfaces import Insert, Removal
from feed.timelines_cluster import by_slot, claim_calls, fanout_calls, slot_of, with_bodies

HEAD: list[str | int | bytes] = [100, 50, "0"]


def _insert(ts: int, aid: str, users: list[str], ts_ms: int | None = None) -> Insert:
    body = msgspec.json.encode({"id": aid})
    return Insert(order_key(ts, aid), aid, body, users, ts_ms=ts_ms)


def _decoded(call: object) -> tuple[list[str], dict[str, list[str]]]:
    """(the call's members, each user's members in delivery order), read as fanout.lua does."""
    args = call.args  # type: ignore[attr-defined]
    n = int(args[3])
    members = [str(m) for m in args[12 : 12 + n]]
    assert args[12 + 2 * n] == b"u"
    values = args[13 + 2 * n :]
    names = call.keys  # type: ignore[attr-defined]
    users = [k.decode().partition("{")[2].rstrip("}") for k in names[0::4]]
    # each user's four keys, declared (a resharding routes a call by its declared keys)
    assert names == [k for u in users for k in keys.fanout_cluster_keys(u)]
    assert len(values) == len(users)
    return members, {
        u: [members[int(i) - 1] for i in v.split()] for u, v in zip(users, values, strict=True)
    }


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
        assert len({slot_of(k) for k in call.keys}) == 1
        members, per_user = _decoded(call)
        # only the activities some user of the call receives, each once
        assert sorted(members) == sorted({m for ms in per_user.values() for m in ms})
        assert len(call.bodies) == len(members)
        for user, mine in per_user.items():
            assert user not in received
            received[user] = mine
    expected = {
        u: [i.member for i in inserts if u in i.users] for u in users
    }  # insert order, per user
    assert received == expected
    # users sharing a slot share a call
    assert len(calls) == len({slot_of(keys.fanout_user_key(u)) for u in users})


def test_with_bodies_puts_each_body_after_the_mode() -> None:
    inserts = [_insert(1, "x", ["u"]), _insert(2, "y", ["u"], ts_ms=7)]
    (call,) = fanout_calls(inserts, HEAD)
    args = with_bodies(call)
    n = 2
    assert args[12 + 2 * n] == b"b"
    assert args[13 + 2 * n : 13 + 3 * n] == [i.body for i in inserts]
    assert args[13 + 3 * n :] == call.args[13 + 2 * n :]
    assert args[: 12 + 2 * n] == call.args[: 12 + 2 * n]


def test_removals_and_claims_are_grouped_by_slot() -> None:
    users = [f"r-{n}" for n in range(200)]
    groups = by_slot([Removal("1:a", "a", users[:150]), Removal("2:b", "b", users[50:])])
    seen: set[tuple[str, str]] = set()
    for group in groups:
        slots = {slot_of(keys.timeline(u)) for _, _, us in group for u in us}
        assert len(slots) == 1
        seen |= {(m, u) for m, _, us in group for u in us}
    assert seen == {("1:a", u) for u in users[:150]} | {("2:b", u) for u in users[50:]}

    claims = [(f"id-{n}", f"actor-{n % 3}") for n in range(100)]
    calls = claim_calls(claims)
    assert sorted(p for positions, _ in calls for p in positions) == list(range(100))
    for positions, names in calls:
        assert len({slot_of(n) for n in names}) == 1
        assert names == [keys.claim(claims[p][0]) for p in positions]
