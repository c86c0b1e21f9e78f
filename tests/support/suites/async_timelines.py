"""The shared suite of ``feed.interfaces.AsyncTimelines`` (the gateway's side)."""

from __future__ import annotations

from collections.abc import Callable

from feed.cursor import order_key
from tests.support.backends import Backend
from tests.support.suites.timelines import insert

Ids = Callable[[str], str]
_HOT, _REBUILD, _BUILDING = 0, 1, 2


class AsyncTimelinesSuite:
    async def test_one_rebuild_lease_and_complete_only_under_it(
        self, backend: Backend, ids: Ids
    ) -> None:
        t = backend.async_timelines()
        user, a = ids("u"), ids("a")
        assert await t.touch(user, 600, "t1") == _REBUILD
        assert await t.touch(user, 600, "t2") == _BUILDING
        members = [order_key(1, a)]
        assert not await t.rebuild(
            user, members, {a: b"{}"}, timeline_max=10, body_ttl_s=60, token="t2"
        )
        assert await t.touch(user, 600, "t3") == _BUILDING
        assert await t.rebuild(
            user, members, {a: b"{}"}, timeline_max=10, body_ttl_s=60, token="t1"
        )
        assert await t.touch(user, 600, "t4") == _HOT
        assert (await t.page(user, None, 10)).members == members

    async def test_rebuild_and_cache_leave_deleted_activities_out(
        self, backend: Backend, ids: Ids
    ) -> None:
        t = backend.async_timelines()
        user, a, b, c = ids("u"), ids("a"), ids("b"), ids("c")
        backend.timelines(10, 10, False).mark_deleted([b], 600)
        assert await t.touch(user, 600, "tok") == _REBUILD
        members = [order_key(3, c), order_key(2, b), order_key(1, a)]
        bodies = {a: b'"a"', b: b'"b"'}  # c has no body: deleted in history
        assert await t.rebuild(user, members, bodies, timeline_max=10, body_ttl_s=60, token="tok")
        page = await t.page(user, None, 10)
        assert page.members == [order_key(1, a)]
        assert await t.cache_bodies({a: b'"a2"', b: b'"b2"'}, 60) == 1
        assert await t.bodies([order_key(1, a), order_key(2, b)]) == {order_key(1, a): b'"a2"'}

    async def test_insert_for_is_idempotent_with_one_seq(self, backend: Backend, ids: Ids) -> None:
        t = backend.async_timelines()
        delivery = backend.delivery()
        user, a = ids("u"), ids("a")
        start = (await delivery.attach(user)).seq
        member = order_key(5, a)
        for expected in ((1, 1), (0, 0)):
            got = await t.insert_for(
                [user], member, b"{}", timeline_max=10, stream_history=10, body_ttl_s=60
            )
            assert got == expected
        assert [s for s, _ in await delivery.frames_after(user, start, 10)] == [start + 1]
        assert await t.remove_for([user], member, stream_history=10) == (1, 1)
        assert await t.remove_for([user], member, stream_history=10) == (0, 0)

    async def test_big_state_moves_with_every_follow_and_large_account(
        self, backend: Backend, ids: Ids
    ) -> None:
        t = backend.async_timelines()
        versions = backend.versions()
        user, star, other = ids("u"), ids("star"), ids("other")
        versions.add_big([ids("first")])
        v1, n1 = await t.big_state(user)
        assert v1 and await t.big_state(user) == (v1, n1)  # a read changes nothing
        versions.follow_changed(user, other)
        v2, n2 = await t.big_state(user)
        assert v2 != v1 and n2 == n1
        versions.add_big([star])
        assert (await t.big_state(user))[1] == n1 + 1
        assert star in await t.big_accounts() and "" not in await t.big_accounts()
        assert await t.big_among([other, star, user]) == [star]

    async def test_outbox_pages_are_cut_before_the_cursor(self, backend: Backend, ids: Ids) -> None:
        sync = backend.timelines(100, 10, False)
        t = backend.async_timelines()
        x, y, a = ids("x"), ids("y"), ids("a")
        sync.add_to_outboxes([(x, insert(ts, f"{a}-x{ts}", [])) for ts in (1, 2, 3)])
        sync.add_to_outboxes([(y, insert(ts, f"{a}-y{ts}", [])) for ts in (2,)])
        pages = await t.outbox_pages([x, y], order_key(3, f"{a}-x3"), 10)
        assert pages == {
            x: [order_key(2, f"{a}-x2"), order_key(1, f"{a}-x1")],
            y: [order_key(2, f"{a}-y2")],
        }
