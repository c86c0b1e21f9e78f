"""Stream-Framework 1.4.0 fan-out, run INSIDE the peer's own virtualenv (not the project's).

Started by :mod:`bench.peers` as ``<peer-venv>/bin/python peer_stream_framework.py ...``.
It imports only the standard library, ``stream_framework``, ``redis`` (2.10.6) and ``celery``, and
prints one JSON object on stdout. Nothing installed is edited: the shims PEERS.md lists are applied
here, at run time.

What is timed (PEERS.md): the README's manager pattern — a ``RedisFeed`` subclass as the timeline
feed and a user feed, defaults kept (max_length 100, 1% trim chance, 100 followers per fan-out
task), followers from an in-memory dict — and ``manager.add_user_activity(author, activity)`` for
each activity of the graph file's actor sequence. Afterwards every follower feed is checked.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.machinery
import importlib.util
import json
import re
import sys
import time
from typing import Any

_ASYNC_MODULE = "stream_framework.feed_managers.base"
#: Followers by actor (module level, so the pickled manager finds it after a round trip).
FOLLOWERS: dict[int, list[int]] = {}


# --- Shim 1: import hook renaming the ``async`` parameter -------------------------------------
# stream_framework/feed_managers/base.py uses ``async`` as a parameter name (follow_user,
# follow_many_users, ...), a keyword since Python 3.7. This finder loads that one module from its
# installed source with ``async`` renamed to ``async_`` before compiling. The file on disk is not
# touched, and no bytecode is written for it.
class _RenamedAsyncLoader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname: str) -> Any:
        path = self.get_filename(fullname)
        source = importlib.util.decode_source(self.get_data(path))
        source = re.sub(r"\basync\b", "async_", source)
        return compile(source, path, "exec", dont_inherit=True)


class _RenameAsyncFinder:
    @staticmethod
    def find_spec(fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _ASYNC_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None:
            return spec
        loader = _RenamedAsyncLoader(fullname, spec.origin)
        return importlib.util.spec_from_file_location(fullname, spec.origin, loader=loader)


def _install_shims(redis_host: str, redis_port: int, redis_db: int) -> None:
    sys.meta_path.insert(0, _RenameAsyncFinder())

    # --- Shim 2: Celery eager + pickle -------------------------------------------------------
    # The fan-out tasks run in-process, synchronously (no broker), and the library passes Python
    # objects (the manager, feed classes, activities) to its tasks: pickle serializer.
    from celery import Celery

    app = Celery("stream_framework_peer", set_as_current=True)
    app.conf.update(
        task_always_eager=True,
        task_eager_propagates=True,
        task_serializer="pickle",
        result_serializer="pickle",
        accept_content=["pickle"],
        broker_url="memory://",
        result_backend=None,
    )
    app.set_default()

    # --- Shim 3: STREAM_REDIS_CONFIG -> the bench's Redis -------------------------------------
    # Set in-process before the first connection (the pool is built lazily from these settings).
    from stream_framework import settings

    settings.STREAM_REDIS_CONFIG = {
        "default": {"host": redis_host, "port": redis_port, "db": redis_db, "password": None}
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    _install_shims(args.redis_host, args.redis_port, args.redis_db)

    from stream_framework.activity import Activity
    from stream_framework.feed_managers.base import FanoutPriority, Manager
    from stream_framework.feeds.redis import RedisFeed
    from stream_framework.storage.redis.connection import get_redis_connection
    from stream_framework.verbs import register
    from stream_framework.verbs.base import Verb

    with open(args.graph, encoding="utf-8") as handle:
        graph = json.load(handle)
    followers: dict[int, list[int]] = {int(k): v for k, v in graph["followers"].items()}
    actors: list[int] = graph["actors"][: args.activities]

    # The README's pattern: a timeline feed, a user feed, a manager reading followers. The
    # classes are published as module globals because the eager Celery tasks pickle their
    # arguments (the manager, the feed class, the activities) and pickle finds classes by name.
    class Post(Verb):  # type: ignore[misc]
        id = 42
        infinitive = "post"
        past_tense = "posted"

    register(Post)

    class TimelineFeed(RedisFeed):  # type: ignore[misc]
        key_format = "feed:normal:%(user_id)s"

    class UserFeed(TimelineFeed):
        key_format = "feed:user:%(user_id)s"

    class PeerManager(Manager):  # type: ignore[misc]
        feed_classes = dict(normal=TimelineFeed)
        user_feed_class = UserFeed

        def get_user_follower_ids(self, user_id: int) -> dict[str, list[int]]:
            return {FanoutPriority.HIGH: FOLLOWERS[user_id]}

    for cls in (Post, TimelineFeed, UserFeed, PeerManager):
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls
    FOLLOWERS.update(followers)

    manager = PeerManager()
    redis_client = get_redis_connection()
    redis_client.flushdb()

    base = datetime.datetime.utcnow() - datetime.timedelta(hours=1)
    activities = [
        Activity(actor, Post, i + 1, time=base + datetime.timedelta(milliseconds=i))
        for i, actor in enumerate(actors)
    ]
    latencies: list[float] = []
    deadline = time.monotonic() + args.max_seconds
    done = 0
    started = time.perf_counter()
    for actor, activity in zip(actors, activities, strict=True):
        t0 = time.perf_counter()
        manager.add_user_activity(actor, activity)
        latencies.append(time.perf_counter() - t0)
        done += 1
        if time.monotonic() > deadline:
            break
    seconds = time.perf_counter() - started
    inserts = sum(len(followers[a]) for a in actors[:done])

    # Correctness: every follower feed holds exactly the activities of the users it follows
    # (all of them while under max_length; at least max_length otherwise, since trims are random).
    expected: dict[int, set[int]] = {}
    for activity_index, actor in enumerate(actors[:done]):
        for follower in followers[actor]:
            expected.setdefault(follower, set()).add(activity_index + 1)
    max_length = TimelineFeed.max_length
    checked = mismatches = 0
    sample_checked = 0
    for follower, want in expected.items():
        feed = TimelineFeed(follower)
        count = feed.count()
        checked += 1
        if (len(want) <= max_length and count != len(want)) or (
            len(want) > max_length and count < max_length
        ):
            mismatches += 1
            continue
        if sample_checked < args.sample_feeds and len(want) <= max_length:
            got = {a.object_id for a in feed[: len(want)]}
            sample_checked += 1
            if got != want:
                mismatches += 1
    redis_client.flushdb()
    return {
        "peer": "stream-framework",
        "version": _version("stream_framework"),
        "redis_py": _version("redis"),
        "celery": _version("celery"),
        "python": sys.version.split()[0],
        "graph": graph["name"],
        "activities": done,
        "follower_inserts": inserts,
        "seconds": seconds,
        "inserts_per_s": inserts / seconds if seconds > 0 else 0.0,
        "activities_per_s": done / seconds if seconds > 0 else 0.0,
        "mean_followers": inserts / done if done else 0.0,
        "add_user_activity_ms": {
            "p50": 1000 * _percentile(latencies, 0.50),
            "p99": 1000 * _percentile(latencies, 0.99),
            "max": 1000 * max(latencies, default=0.0),
        },
        "correctness": {
            "feeds_checked": checked,
            "feeds_compared_in_full": sample_checked,
            "mismatches": mismatches,
            "ok": mismatches == 0,
        },
        "config": {
            "max_length": max_length,
            "trim_chance": TimelineFeed.trim_chance,
            "fanout_chunk_size": PeerManager.fanout_chunk_size,
            "celery": "task_always_eager, pickle serializer",
        },
    }


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist.replace("_", "-"))
    except Exception:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", required=True, help="graph JSON written by bench.graphs")
    parser.add_argument("--activities", type=int, required=True)
    parser.add_argument("--redis-host", default="127.0.0.1")
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--redis-db", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--sample-feeds", type=int, default=50)
    args = parser.parse_args()
    result = run(args)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
