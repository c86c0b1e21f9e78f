"""The grouping rules of notification feeds (``feed.notify``), on the in-memory store: the
executable spec that ``feed/lua/notify.lua`` is checked against
(``tests/integration/feed/test_notify_redis.py``)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from feed.cursor import split_order_key
from feed.interfaces import Mark, Notify, Unnotify
from feed.notify import MemoryNotifications, NotifyLimits, group_key, iso_us

S = 1_000_000
T0 = 1_764_000_000 * S


def _groups(store: MemoryNotifications, user: str = "u") -> list[dict[str, Any]]:
    book = store.book(user)
    return [msgspec.json.decode(g) for g in book.page(None, 1000).groups]


def _like(aid: str, actor: str, seconds: float, obj: str = "post:1", kind: str = "Like") -> Notify:
    return Notify("u", aid, actor, T0 + int(seconds * S), kind, obj)


def test_one_group_per_type_and_object_with_actors_newest_first() -> None:
    store = MemoryNotifications()
    store.apply([_like("a1", "ann", 0), _like("a2", "bob", 1), _like("a3", "ann", 2)])
    store.apply([_like("a4", "cy", 3, obj="post:2"), _like("a5", "cy", 4, kind="Comment")])
    groups = _groups(store)
    assert [(g["type"], g["object"]) for g in groups] == [
        ("Comment", "post:1"),
        ("Like", "post:2"),
        ("Like", "post:1"),
    ]
    likes = groups[2]
    assert likes["actors"] == ["ann", "bob"]  # ann's newest like is newer than bob's
    assert (likes["actor_count"], likes["activity_count"]) == (2, 3)
    assert (likes["first"], likes["last"]) == (iso_us(T0), iso_us(T0 + 2 * S))
    assert likes["id"] == f"{group_key('Like', 'post:1')}-{T0}"
    assert store.book("u").counts() == (3, 3)


def test_the_window_counts_from_the_first_activity_then_a_new_group_opens() -> None:
    store = MemoryNotifications(NotifyLimits(window_s=60))
    store.apply([_like("a1", "ann", 0), _like("a2", "bob", 59.999999), _like("a3", "cy", 60)])
    groups = _groups(store)
    assert [g["actors"] for g in groups] == [["cy"], ["bob", "ann"]]
    # the old group is closed for good: a late activity inside its window joins the new one
    store.apply([_like("a4", "dee", 30)])
    assert [g["actors"] for g in _groups(store)] == [["cy", "dee"], ["bob", "ann"]]


def test_a_full_group_closes_and_the_next_activity_opens_another() -> None:
    store = MemoryNotifications(NotifyLimits(group_max=2))
    store.apply([_like(f"a{i}", f"u{i}", i) for i in range(5)])
    assert [g["activity_count"] for g in _groups(store)] == [1, 2, 2]


def test_a_new_activity_makes_a_read_group_unread_and_moves_it_up() -> None:
    store = MemoryNotifications()
    store.apply([_like("a1", "ann", 0), _like("a2", "bob", 1, obj="post:2")])
    book = store.book("u")
    assert book.mark(Mark(read=True, all=True)) == (0, 0)
    store.apply([_like("a3", "cy", 2)])
    groups = _groups(store)
    assert [(g["object"], g["seen"], g["read"]) for g in groups] == [
        ("post:1", False, False),
        ("post:2", True, True),
    ]
    assert book.counts() == (1, 1)


def test_replays_change_nothing_and_deletes_fix_counts_and_drop_empty_groups() -> None:
    store = MemoryNotifications()
    store.apply([_like("a1", "ann", 0), _like("a2", "bob", 1), _like("a3", "cy", 2, obj="p2")])
    before = _groups(store)
    store.apply([_like("a1", "ann", 0), _like("a1", "zed", 9, obj="other")])
    assert _groups(store) == before
    store.book("u").mark(Mark(read=True, groups=[before[1]["id"]]))
    store.apply([Unnotify("u", "a2"), Unnotify("u", "never")])
    groups = _groups(store)
    assert (groups[1]["actors"], groups[1]["activity_count"]) == (["ann"], 1)
    assert groups[1]["last"] == iso_us(T0)
    assert (groups[1]["seen"], groups[1]["read"]) == (True, True)  # a delete marks nothing
    store.apply([Unnotify("u", "a3")])
    assert [g["object"] for g in _groups(store)] == ["post:1"]
    assert store.book("u").counts() == (0, 0)
    # the dropped group was its key's open group: the next activity opens a new one
    store.apply([_like("a4", "dee", 3, obj="p2")])
    assert _groups(store)[0]["activity_count"] == 1


def test_past_the_most_groups_the_oldest_are_dropped_with_their_activities() -> None:
    store = MemoryNotifications(NotifyLimits(max_groups=2))
    store.apply([_like(f"a{i}", "ann", i, obj=f"post:{i}") for i in range(3)])
    assert [g["object"] for g in _groups(store)] == ["post:2", "post:1"]
    store.apply([Unnotify("u", "a0")])  # forgotten with its group: nothing to remove
    store.apply([_like("old", "bob", -5, obj="post:9")])  # older than every group: dropped
    assert [g["object"] for g in _groups(store)] == ["post:2", "post:1"]
    assert store.book("u").counts() == (2, 2)


def test_marks_all_a_list_or_through_a_position_and_read_implies_seen() -> None:
    store = MemoryNotifications()
    store.apply([_like(f"a{i}", "ann", i, obj=f"post:{i}") for i in range(4)])
    book = store.book("u")
    ordered = book.ordered()
    assert book.mark(Mark(read=False, groups=[ordered[3].gid, "unknown"])) == (3, 4)
    assert book.mark(Mark(read=True, through=ordered[1].position)) == (1, 2)
    assert [(g["seen"], g["read"]) for g in _groups(store)] == [
        (True, True),
        (True, True),
        (False, False),
        (True, False),
    ]
    assert asyncio.run(store.mark("u", Mark(read=True, all=True))) == (0, 0)
    assert store.frames[-1] == ("u", b'{"type":"notification_counts","unseen":0,"unread":0}')


def test_pages_of_groups_and_of_actors_have_no_gap_and_no_repeat() -> None:
    store = MemoryNotifications()
    store.apply([_like(f"a{i}", f"actor{i % 5}", i, obj=f"post:{i % 7}") for i in range(30)])
    book = store.book("u")
    seen: list[str] = []
    before = None
    while True:
        page = book.page(before, 3)
        seen += [msgspec.json.decode(g)["id"] for g in page.groups]
        if page.next is None:
            break
        split_order_key(page.next)
        before = page.next
    assert seen == [g["id"] for g in _groups(store)] and len(seen) == 7
    gid = seen[0]
    actors: list[str] = []
    after = None
    while True:
        got = book.actors(gid, after, 1)
        assert got is not None
        actors += got.actors
        if got.next is None:
            break
        after = got.next
    assert actors == _groups(store)[0]["actors"]
    assert book.actors("no-such-group", None, 5) is None
