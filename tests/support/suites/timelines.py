"""The shared suite of ``feed.interfaces.Timelines`` (the workers' side of the hot timelines)."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from feed.cursor import order_key
from feed.interfaces import Insert, Removal
from tests.support.backends import Backend

Ids = Callable[[str], str]


def insert(ts: int, activity_id: str, users: list[str]) -> Insert:
    return Insert(
        order_key(ts, activity_id), activity_id, msgspec.json.encode({"id": activity_id}), users
    )


def _ids(members: list[str]) -> list[str]:
    return [m.partition(":")[2] for m in members]


class TimelinesSuite:
    async def test_insert_is_idempotent_and_pages_newest_first(
        self, backend: Backend, ids: Ids
    ) -> None:
        t = backend.timelines(100, 100, False)
        u1, u2, a = ids("u1"), ids("u2"), ids("a")
        items = [insert(ts, f"{a}-{ts}", [u1, u2]) for ts in (3, 1, 2)]
        assert t.insert(items) == (6, 0)
        assert t.insert(items) == (0, 0)
        page = t.page(u1, None, 10)
        assert _ids(page.members) == [f"{a}-3", f"{a}-2", f"{a}-1"]
        assert page.bodies[page.members[0]] == items[0].body
        assert _ids(t.page(u1, page.members[0], 10).members) == [f"{a}-2", f"{a}-1"]
        assert t.size(u2) == 3

    async def test_ties_on_published_are_broken_by_id(self, backend: Backend, ids: Ids) -> None:
        t = backend.timelines(100, 100, False)
        user = ids("u")
        t.insert([insert(7, aid, [user]) for aid in ("b", "c", "a")])
        assert _ids(t.page(user, None, 10).members) == ["c", "b", "a"]

    async def test_online_users_get_seq_in_insert_order_offline_users_none(
        self, backend: Backend, ids: Ids
    ) -> None:
        t = backend.timelines(100, 100, False)
        delivery = backend.delivery()
        on, off, a = ids("on"), ids("off"), ids("a")
        presence = await delivery.attach(on)
        assert t.insert([insert(ts, f"{a}-{ts}", [on, off]) for ts in (5, 1, 3)]) == (6, 3)
        frames = await delivery.frames_after(on, presence.seq, 10)
        assert [seq for seq, _ in frames] == [presence.seq + n for n in (1, 2, 3)]
        for (seq, frame), ts in zip(frames, (5, 1, 3), strict=True):
            decoded = msgspec.json.decode(frame)
            assert decoded == {
                "type": "activity",
                "cursor": f"{presence.epoch}.{seq}",
                "activity": {"id": f"{a}-{ts}"},
            }
        assert await delivery.frames_after(off, 0, 10) == []

    async def test_the_cap_keeps_the_newest_and_pushes_nothing_it_trims_at_once(
        self, backend: Backend, ids: Ids
    ) -> None:
        t = backend.timelines(3, 100, False)
        delivery = backend.delivery()
        user, a = ids("u"), ids("a")
        start = (await delivery.attach(user)).seq
        t.insert([insert(ts, f"{a}-{ts}", [user]) for ts in range(10, 15)])
        assert t.size(user) == 3
        assert _ids(t.page(user, None, 10).members) == [f"{a}-14", f"{a}-13", f"{a}-12"]
        _, pushed = t.insert([insert(1, f"{a}-old", [user])])  # older than the newest 3
        assert pushed == 0
        assert t.size(user) == 3
        frames = await delivery.frames_after(user, start, 100)
        assert all(f"{a}-old".encode() not in frame for _, frame in frames)

    async def test_deleted_stays_deleted(self, backend: Backend, ids: Ids) -> None:
        t = backend.timelines(100, 100, False)
        user, a = ids("u"), ids("a")
        t.mark_deleted([a], 600)
        assert t.insert([insert(1, a, [user])]) == (0, 0)
        assert t.page(user, None, 10).members == []
        assert t.add_to_outboxes([(ids("big"), insert(1, a, []))]) == 0
        assert await backend.async_timelines().bodies([order_key(1, a)]) == {}

    async def test_claims_are_first_wins_until_released(self, backend: Backend, ids: Ids) -> None:
        t = backend.timelines(100, 100, False)
        a, b, x, y = ids("a"), ids("b"), ids("x"), ids("y")
        assert t.claim([(a, x), (b, y)], 60) == [x, y]
        assert t.claim([(a, y), (b, y)], 60) == [x, y]
        t.insert([], release=[a])
        assert t.claim([(a, y)], 60) == [y]

    async def test_remove_pushes_one_removed_frame(self, backend: Backend, ids: Ids) -> None:
        t = backend.timelines(100, 100, False)
        delivery = backend.delivery()
        on, off, a = ids("on"), ids("off"), ids("a")
        await delivery.attach(on)
        t.insert([insert(1, a, [on, off])])
        seq = (await delivery.attach(on)).seq
        removal = Removal(order_key(1, a), a, (on, off))
        assert t.remove([removal]) == (2, 1)
        assert t.remove([removal]) == (0, 0)
        frames = await delivery.frames_after(on, seq, 10)
        assert len(frames) == 1
        decoded = msgspec.json.decode(frames[0][1])
        assert (decoded["type"], decoded["id"]) == ("removed", a)
        assert t.size(on) == t.size(off) == 0

    async def test_outboxes_add_once_and_remove_once(self, backend: Backend, ids: Ids) -> None:
        t = backend.timelines(2, 100, False)
        actor, a = ids("actor"), ids("a")
        items = [(actor, insert(ts, f"{a}-{ts}", [])) for ts in (1, 2, 3)]
        assert t.add_to_outboxes(items) == 3
        assert t.add_to_outboxes(items[2:]) == 0
        pages = await backend.async_timelines().outbox_pages([actor], None, 10)
        assert _ids(pages[actor]) == [f"{a}-3", f"{a}-2"]  # capped to the newest 2
        assert t.remove_from_outbox(actor, order_key(3, f"{a}-3")) == 1
        assert t.remove_from_outbox(actor, order_key(3, f"{a}-3")) == 0

    async def test_only_active_skips_users_neither_active_nor_online(
        self, backend: Backend, ids: Ids
    ) -> None:
        t = backend.timelines(100, 100, True)
        cold, warm, online, a = ids("cold"), ids("warm"), ids("online"), ids("a")
        await backend.async_timelines().touch(warm, 600)
        await backend.delivery().attach(online)
        assert t.insert([insert(1, a, [cold, warm, online])]) == (2, 1)
        assert (t.size(cold), t.size(warm), t.size(online)) == (0, 1, 1)

    async def test_bodies_are_forgotten_on_request(self, backend: Backend, ids: Ids) -> None:
        t = backend.timelines(100, 100, False)
        user, a = ids("u"), ids("a")
        t.insert([insert(1, a, [user])])
        t.delete_bodies([a])
        page = t.page(user, None, 10)
        assert _ids(page.members) == [a]
        assert page.bodies == {}
