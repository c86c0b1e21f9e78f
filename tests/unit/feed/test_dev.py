"""``feed dev``'s demo traffic: plausible posts, likes and comments that notify the post's author.

Pure: :class:`feed.dev.DemoTraffic` driven by a seeded ``random.Random``; no servers.
"""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import msgspec

from feed.dev import DEMO_USERS, DemoTraffic, demo_follows
from schemas.activity import MAX_RECIPIENTS, decode_activity

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _run(seed: int, n: int, prefix: str = "t") -> list[dict[str, Any]]:
    traffic = DemoTraffic(random.Random(seed), prefix=prefix)
    return [traffic.next(NOW) for _ in range(n)]


def test_seeded_traffic_is_deterministic() -> None:
    assert _run(7, 300) == _run(7, 300)
    assert _run(7, 300) != _run(8, 300)


def test_ids_are_unique_and_prefixed() -> None:
    activities = _run(1, 500, prefix="run42")
    ids = [a["id"] for a in activities]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("run42-") for i in ids)


def test_likes_and_comments_notify_the_author_of_an_existing_post() -> None:
    authors: dict[str, str] = {}
    kinds: Counter[str] = Counter()
    for activity in _run(3, 2000):
        kinds[activity["type"]] += 1
        assert activity["actor"] in DEMO_USERS
        if activity["type"] == "Create" and activity["object"].startswith("post:"):
            assert activity["object"] not in authors, "each post is created once"
            authors[activity["object"]] = activity["actor"]
            assert "notify" not in activity
        elif activity["type"] in ("Like", "Comment"):
            post = activity["object"]
            assert post in authors, f"{activity} reacts to a post nobody created"
            assert activity["notify"] == [authors[post]]
            assert activity["actor"] not in activity["notify"]
            assert len(activity["notify"]) <= MAX_RECIPIENTS
        else:
            assert "notify" not in activity, activity
            if activity["type"] == "Share":
                assert activity["object"] in authors
    assert set(kinds) == {"Create", "Like", "Comment", "Share", "Follow"}, kinds
    assert kinds["Like"] > kinds["Comment"] > 0


def test_a_user_likes_a_post_at_most_once() -> None:
    likes = [(a["actor"], a["object"]) for a in _run(9, 3000) if a["type"] == "Like"]
    assert likes and len(likes) == len(set(likes))


def test_the_first_activity_is_a_post() -> None:
    for seed in range(20):
        first = _run(seed, 1)[0]
        assert first["type"] == "Create" and first["object"] == "post:1"


def test_reactions_gather_on_recent_posts_so_groups_form() -> None:
    """A group is type + object: the same post gets several likes from different users."""
    likers: dict[str, set[str]] = {}
    for activity in _run(5, 1000):
        if activity["type"] == "Like":
            likers.setdefault(activity["object"], set()).add(activity["actor"])
    assert max(len(users) for users in likers.values()) >= 3


def test_every_activity_passes_the_activity_schema() -> None:
    encoder = msgspec.json.Encoder()
    for activity in _run(11, 500):
        decoded = decode_activity(encoder.encode(activity), now=NOW.timestamp())
        assert decoded.id == activity["id"] and decoded.type == activity["type"]


def test_the_demo_graph_is_unchanged() -> None:
    pairs = demo_follows()
    assert len(pairs) == 3 * len(DEMO_USERS) == len(set(pairs))
    assert ("alice", "bob") in pairs and ("heidi", "alice") in pairs
    assert all(follower != followee for follower, followee in pairs)
