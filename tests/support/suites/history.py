"""The shared suite of ``feed.interfaces.History`` (durable history)."""

from __future__ import annotations

from collections.abc import Callable

from feed.cursor import order_key
from feed.interfaces import HistoryRecord, Stored
from tests.support.backends import Backend

Ids = Callable[[str], str]


def record(activity_id: str, actor: str, ts: int, users: list[str]) -> HistoryRecord:
    return HistoryRecord(activity_id, actor, ts, b'{"id":"%s"}' % activity_id.encode(), users)


class HistorySuite:
    def test_the_first_create_owns_the_row_for_good(self, backend: Backend, ids: Ids) -> None:
        history = backend.history()
        a, owner, other = ids("a"), ids("owner"), ids("other")
        history.put_activities([record(a, owner, 10, [])], new=[a])
        history.put_activities([record(a, other, 20, [])], new=[])  # not new: outbox row only
        assert history.stored(a) == Stored(owner, 10, record(a, owner, 10, []).body, False)
        assert history.stored_many([a, ids("never")]) == {a: history.stored(a)}
        assert history.activity(a) == (owner, 10, record(a, owner, 10, []).body)

    def test_deletes_are_durable_and_keep_the_owner(self, backend: Backend, ids: Ids) -> None:
        history = backend.history()
        a, b, actor, u = ids("a"), ids("b"), ids("actor"), ids("u")
        records = [record(a, actor, 1, [u]), record(b, actor, 2, [u])]
        history.put_activities(records)
        history.put_deliveries(records)
        history.mark_deleted(a, actor, 1)
        assert history.stored(a) == Stored(actor, 1, None, True)
        assert history.activity(a) is None
        assert history.bodies([a, b]) == {b: records[1].body}
        assert history.outbox(actor, 10) == [order_key(2, b)]
        assert [x for page in history.recipients(a) for x in page] == [u]  # until finished
        history.finish_delete(a)
        assert [x for page in history.recipients(a) for x in page] == []
        history.mark_deleted(a, actor, 1)  # idempotent
        assert history.stored(a) == Stored(actor, 1, None, True)

    def test_pages_continue_at_the_cursor_with_no_gap_or_repeat(
        self, backend: Backend, ids: Ids
    ) -> None:
        history = backend.history()
        user, actor = ids("u"), ids("actor")
        s = ids("a")
        ties = [(user, 2, f"x-{s}", actor), (user, 2, f"y-{s}", actor)]
        rows = [(user, 1, f"x-{s}", actor), *ties, (user, 3, f"z-{s}", actor)]
        assert history.write_timeline_rows(rows) == 4
        everything = history.page_timeline(user, None, 100)
        assert everything == sorted(everything, reverse=True) and len(everything) == 4
        paged: list[str] = []
        before: str | None = None
        for _ in range(len(everything) + 1):  # bounded: a page that repeats must not loop
            page = history.page_timeline(user, before, 2)
            if not page:
                break
            paged += page
            before = page[-1]
        assert paged == everything
        history.remove_from_timelines([(user, 3, f"z-{s}")])
        assert len(history.page_timeline(user, None, 100)) == 3

    def test_recipients_come_in_pages_fan_out_then_backfill(
        self, backend: Backend, ids: Ids
    ) -> None:
        history = backend.history()
        a, actor = ids("a"), ids("actor")
        users = [f"{ids('u')}-{n}" for n in range(7)]
        r = record(a, actor, 5, users)
        history.put_activities([r])
        assert history.put_deliveries([r], timelines=False) == 0
        assert history.page_timeline(users[0], None, 10) == []
        late = ids("late")
        history.add_backfilled([(a, late)])
        pages = list(history.recipients(a, page_size=3))
        assert [len(p) for p in pages] == [3, 3, 1, 1]
        assert [u for p in pages[:3] for u in p] == users and pages[3] == [late]
        assert history.put_deliveries([r]) == 7
        assert history.page_timeline(users[3], None, 10) == [order_key(5, a)]

    def test_outbox_pages_and_large_accounts(self, backend: Backend, ids: Ids) -> None:
        history = backend.history()
        actor, a = ids("actor"), ids("a")
        history.put_activities([record(f"{a}-{ts}", actor, ts, []) for ts in range(5)])
        first = history.outbox(actor, 2)
        assert first == [order_key(4, f"{a}-4"), order_key(3, f"{a}-3")]
        assert history.outbox(actor, 10, first[-1]) == [
            order_key(ts, f"{a}-{ts}") for ts in (2, 1, 0)
        ]
        history.mark_big(actor)
        history.mark_big(actor)
        assert actor in history.big_accounts()
