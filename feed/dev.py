"""``feed dev``: the whole stack on one machine, with a demo follow graph and live traffic.

Starts Redis, the Kafka-protocol broker and Cassandra (``infra``), runs ``feed migrate``, starts
``--workers`` fan-out workers and one gateway as child processes, publishes a demo graph and then
activities at ``--rate`` per second (:class:`DemoTraffic`: posts, and likes and comments that
notify the post's author). Prints the stack's ``FEED_*`` settings (one ``NAME=value`` per
line), the page URL and a development token. Ctrl-C (or SIGTERM) stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from confluent_kafka import Producer

from feed.settings import Settings

__all__ = ["DEMO_USERS", "DemoTraffic", "demo_follows", "run_dev"]

DEMO_USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
_OBJECTS = ["post", "photo", "video", "article", "comment"]


def demo_follows() -> list[tuple[str, str]]:
    """A small deterministic graph: each user follows the next three users."""
    pairs = []
    for i, follower in enumerate(DEMO_USERS):
        for step in (1, 2, 3):
            pairs.append((follower, DEMO_USERS[(i + step) % len(DEMO_USERS)]))
    return pairs


class DemoTraffic:
    """The demo's activities, one at a time: users write posts and the others react to them.

    * ``Create`` of ``post:<n>`` (``n`` counts up from 1) by a random demo user; the generator
      remembers the last :attr:`RECENT` posts and their authors.
    * ``Like`` and ``Comment`` of one of those recent posts by a user other than its author, with
      ``"notify": [<author>]``: the author gets a notification, grouped by type and post, so a
      popular post reads "alice and 3 others liked post:9". The actor is never in ``notify``. A
      user likes a post at most once (a post everyone has liked gets a comment instead).
    * The rest keeps the older mix: a ``Share`` of a recent post, a ``Follow`` of another demo
      user, or a ``Create`` of some other object (``photo:<k>``, ``video:<k>``, ...); none of these
      notifies anyone.

    Every choice comes from ``rng``, and ids are ``<prefix>-<sequence>``: a seeded ``rng`` and a
    fixed prefix give the same activities every time (apart from ``published``, the caller's).
    """

    #: How many of the newest posts are liked and commented on (few, so that groups form).
    RECENT = 8
    #: Shares of each kind of activity (weights for ``rng.choices``).
    WEIGHTS = {"post": 3, "like": 4, "comment": 2, "other": 2}

    def __init__(self, rng: random.Random, prefix: str = "demo") -> None:
        self._rng = rng
        self._prefix = prefix
        #: The recent posts: (object, author, users who liked it).
        self._posts: deque[tuple[str, str, set[str]]] = deque(maxlen=self.RECENT)
        self._post_count = 0
        self._sent = 0

    def next(self, published: datetime) -> dict[str, Any]:
        """The next activity as a JSON-ready dict (the contract's activity fields)."""
        rng = self._rng
        kind = rng.choices(list(self.WEIGHTS), weights=list(self.WEIGHTS.values()))[0]
        if not self._posts:
            kind = "post"  # nothing to react to yet
        actor = rng.choice(DEMO_USERS)
        activity: dict[str, Any] = {"id": f"{self._prefix}-{self._sent}", "actor": actor}
        self._sent += 1
        if kind == "post":
            self._post_count += 1
            post = f"post:{self._post_count}"
            self._posts.append((post, actor, set()))
            activity.update(type="Create", object=post)
        elif kind in ("like", "comment"):
            post, author, likers = rng.choice(self._posts)
            others = [u for u in DEMO_USERS if u != author]
            if kind == "like" and len(likers) < len(others):
                actor = rng.choice([u for u in others if u not in likers])
                likers.add(actor)
                verb = "Like"
            else:
                actor = rng.choice(others)
                verb = "Comment"
            activity.update(actor=actor, type=verb, object=post, notify=[author])
        else:
            verb = rng.choice(["Share", "Follow", "Create"])
            if verb == "Share":
                obj = rng.choice(self._posts)[0]
            elif verb == "Follow":
                obj = "user:" + rng.choice([u for u in DEMO_USERS if u != actor])
            else:
                obj = f"{rng.choice([o for o in _OBJECTS if o != 'post'])}:{rng.randrange(1000)}"
            activity.update(type=verb, object=obj)
        activity["published"] = published.isoformat()
        return activity


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_http(url: str, deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _metric(url: str, name: str) -> float:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def run_dev(args: argparse.Namespace) -> int:
    from infra import LocalStack
    from infra.servers import free_port

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="feed-dev-"))
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    port = args.port if args.port and _port_free(args.port) else free_port()
    stop = {"now": False}

    def request_stop(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, request_stop)
    children: list[subprocess.Popen[bytes]] = []
    redis = "a Redis Cluster (3 masters)" if args.redis_cluster else "Redis"
    print(
        f"starting {redis}, Kafka-protocol broker and Cassandra in {workdir} ...", file=sys.stderr
    )
    with LocalStack(workdir / "stack", redis_cluster=args.redis_cluster) as stack:
        env = dict(os.environ)
        env.update(stack.env())
        if args.redis_cluster:
            env["FEED_REDIS_CLUSTER"] = "true"
        env.setdefault("FEED_JWT_SECRET", "dev-only-secret-" + "x" * 32)
        env.setdefault("FEED_INGEST_TOKEN", "dev-ingest-token-0123456789")
        env["FEED_GATEWAY_PORT"] = str(port)
        env["FEED_DEV_MODE"] = "true"
        env.setdefault("FEED_LOG_FORMAT", "json")
        settings = Settings.from_env(env)
        subprocess.run(
            [sys.executable, "-m", "feed.cli", "migrate"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        metrics_urls = []
        try:
            for n in range(max(1, args.workers)):
                worker_env = dict(env, FEED_WORKER_METRICS_PORT=str(free_port()))
                metrics_urls.append(
                    f"http://127.0.0.1:{worker_env['FEED_WORKER_METRICS_PORT']}/metrics"
                )
                children.append(_spawn(["fanout"], worker_env, logs / f"fanout-{n}.log"))
            children.append(_spawn(["gateway"], env, logs / "gateway.log"))
            url = f"http://127.0.0.1:{port}/"
            if not _wait_http(url + "healthz", 60):
                print(f"gateway did not start; see {logs / 'gateway.log'}", file=sys.stderr)
                return 1
            for name in (
                "FEED_KAFKA_BOOTSTRAP",
                "FEED_REDIS_URL",
                "FEED_REDIS_CLUSTER",
                "FEED_CASSANDRA_HOSTS",
                "FEED_CASSANDRA_PORT",
                "FEED_CASSANDRA_KEYSPACE",
                "FEED_CASSANDRA_PROTOCOL_VERSION",
                "FEED_JWT_SECRET",
                "FEED_INGEST_TOKEN",
                "FEED_GATEWAY_HOST",
                "FEED_GATEWAY_PORT",
                "FEED_KAFKA_GROUP",
            ):
                value = env.get(name) or settings.env().get(name, "")
                print(f"{name}={value}")
            from gateway.auth import mint_token

            assert settings.jwt_secret is not None  # set above
            print(f"page: {url}")
            print(f"token (alice): {mint_token(settings.jwt_secret, 'alice', 86_400)}")
            print(f"logs: {logs}", flush=True)
            _demo_traffic(settings, args, metrics_urls, stop)
        except KeyboardInterrupt:
            pass
        finally:
            print("stopping ...", file=sys.stderr)
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in children:
                try:
                    child.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
    print("stopped.", file=sys.stderr)
    return 0


def _spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "feed.cli", *command],
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _demo_traffic(
    settings: Settings, args: argparse.Namespace, metrics_urls: list[str], stop: dict[str, bool]
) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 5})
    encoder = msgspec.json.Encoder()
    now = datetime.now(UTC).isoformat()
    for follower, followee in demo_follows():
        event = {"type": "follow", "follower": follower, "followee": followee, "at": now}
        producer.produce(settings.topic_follows, key=follower.encode(), value=encoder.encode(event))
    producer.flush(10)
    traffic = DemoTraffic(random.Random(), prefix=f"demo-{int(time.time() * 1000)}")
    interval = 1.0 / max(0.1, args.rate)
    started = time.monotonic()
    next_report = started + 10
    sent = 0
    last_inserts = 0.0
    last_rows = 0.0
    last_time = started
    last_sent = 0
    while not stop["now"]:
        if args.duration and time.monotonic() - started > args.duration:
            break
        activity = traffic.next(datetime.now(UTC))
        producer.produce(
            settings.topic_activities,
            key=activity["actor"].encode(),
            value=encoder.encode(activity),
        )
        producer.poll(0)
        sent += 1
        now_m = time.monotonic()
        if now_m >= next_report:
            inserts = sum(_metric(u, "feed_timeline_inserts_total") for u in metrics_urls)
            rows = sum(_metric(u, "feed_history_rows_total") for u in metrics_urls)
            span = now_m - last_time
            print(
                f"[dev] published {sent} activities ({(sent - last_sent) / span:.1f}/s); "
                f"fan-out {(inserts - last_inserts) / span:.1f} Redis timeline inserts/s "
                f"(active users), {(rows - last_rows) / span:.1f} history rows/s",
                file=sys.stderr,
                flush=True,
            )
            last_inserts, last_rows, last_time, last_sent = inserts, rows, now_m, sent
            next_report = now_m + 10
        time.sleep(interval)
    producer.flush(10)
