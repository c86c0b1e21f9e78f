"""``feed bench notify``: what a notification feed costs beside a timeline (issue 17).

Four parts, in-process against the bench's stack except the HTTP reads:

1. **Redis CPU per insert, notification vs timeline** (``redis_cpu``). Same Redis, the two kinds
   of phases alternated (two halves each), Cassandra out of the timing: timeline inserts through
   :meth:`feed.timelines_redis.RedisTimelines.insert` (batches of 200 activities, each fanned out
   to 10-100 active followers), and notification inserts through
   :meth:`feed.notify_redis.NotifyRedis.apply` with a store that writes nothing (batches of 500
   activities, each notifying 1-3 users; most activities join an open group of one of their
   recipient's few hot posts, a share opens a new group). Every feed is loaded before its
   phase, so neither phase pays a first-touch load. Redis's own CPU comes from ``INFO cpu``
   (``used_cpu_sys`` + ``used_cpu_user``) before and after each phase, and the scripts' time
   from ``INFO commandstats`` (``evalsha`` usec, which includes the commands the scripts call).
   Reported as
   µs per inserted entry and the ratio notification / timeline; the issue's goal is ≤ 2.
2. **Through the real Processor, with Cassandra** (``processor``). The same activities shape
   (Likes and Comments of posts, fanned out to 10-100 followers) through
   :class:`fanout.processor.Processor` with history rows on and ``notifications`` a
   :class:`~feed.notify_redis.NotifyRedis` backed by
   :class:`~feed.notify_cassandra.CassandraNotifyStore`: once without ``notify``, once with
   (alternated, two rounds each), giving timeline inserts/s and notification inserts/s of one
   phase and what ``notify`` costs the pipeline.
3. **Cold recipients** (``cold_inserts``). One batch notifying users whose feeds are in
   Cassandra only (expired from Redis: the worker loads each before it writes), then the same
   batch shape once they are hot.
4. **Reads** (``reads``). Readers whose feeds hold 50-200 groups (written through the worker's
   code, with Cassandra). Against a live ``feed gateway`` on 127.0.0.1, one request at a time
   on one keep-alive connection: ``GET /v1/notifications`` (first page, limit 20) and ``GET
   /v1/notifications/counts`` p50/p99; a cold ``GET /v1/notifications`` (the user's Redis keys
   deleted first, so the gateway loads the feed from Cassandra). In-process, with
   :class:`~feed.notify_redis.AsyncNotifyRedis`: Redis CPU µs of one ``counts`` call and of one
   first-page call.

The helpers that turn ``INFO`` replies into figures and build the workloads are pure (unit
tests in ``tests/unit/bench/test_notify.py``). Everything started (the gateway) is stopped by pid.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from feed import keys
from feed.cursor import order_key
from feed.interfaces import Insert, Notify

__all__ = [
    "GOAL_RATIO",
    "NotifyActivity",
    "command_breakdown",
    "command_stats",
    "cpu_seconds",
    "notify_workload",
    "per_entry_us",
    "processor_cpu_split",
    "ratio",
    "run",
    "stat_delta",
]


class _NoWrites:
    """A durable notification store that keeps nothing (the Redis-only phase)."""

    def write(self, changes: Any) -> int:
        return 0

    def load_many(self, users: Any) -> dict[str, Any]:
        return {}


def _timelines(client: Any, s: Any) -> Any:
    """The worker's timelines, as the settings configure them (only active users written)."""
    from feed.timelines_redis import RedisTimelines

    return RedisTimelines(
        client,
        timeline_max=s.timeline_max,
        stream_history=s.stream_history,
        body_ttl_s=s.body_ttl_days * 86_400,
        only_active=True,
    )


#: The issue's goal: a notification insert costs at most this many timeline inserts, Redis CPU.
GOAL_RATIO = 2.0
T0 = datetime(2026, 1, 1, tzinfo=UTC)
_T0_US = int(T0.timestamp()) * 1_000_000
_TYPES = ("Like", "Like", "Comment")


# --- pure helpers --------------------------------------------------------------------------------
def cpu_seconds(info_cpu: Mapping[str, Any]) -> float:
    """Redis's own CPU time from an ``INFO cpu`` reply: ``used_cpu_sys + used_cpu_user``."""
    return float(info_cpu["used_cpu_sys"]) + float(info_cpu["used_cpu_user"])


def command_stats(info: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """``INFO commandstats`` as {command: (calls, usec)}, lower-case names without the
    ``cmdstat_`` prefix. Accepts redis-py's parsed dict (``{"cmdstat_evalsha": {"calls": 3,
    "usec": 40, ...}}``) or the raw ``calls=3,usec=40,...`` strings."""
    out: dict[str, tuple[int, int]] = {}
    for name, value in info.items():
        if isinstance(value, str):
            fields = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
        elif isinstance(value, Mapping):
            fields = dict(value)
        else:
            continue
        if "calls" not in fields or "usec" not in fields:
            continue
        command = name.removeprefix("cmdstat_").lower()
        out[command] = (int(fields["calls"]), int(fields["usec"]))
    return out


def stat_delta(
    before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]], command: str
) -> tuple[int, int]:
    """(calls, usec) of ``command`` between two :func:`command_stats` (0, 0 if it never ran)."""
    calls0, usec0 = before.get(command, (0, 0))
    calls1, usec1 = after.get(command, (0, 0))
    return calls1 - calls0, usec1 - usec0


def command_breakdown(
    before: Mapping[str, tuple[int, int]],
    after: Mapping[str, tuple[int, int]],
    entries: int,
    top: int = 12,
) -> list[dict[str, Any]]:
    """The commands that ran between two :func:`command_stats` (the scripts' own calls
    included: Redis counts them too), most time first: calls and µs per entry."""
    rows: list[dict[str, Any]] = []
    for command in after:
        calls, usec = stat_delta(before, after, command)
        if calls > 0 and command != "info":
            rows.append(
                {
                    "command": command,
                    "calls_per_entry": calls / entries if entries else None,
                    "usec_per_entry": usec / entries if entries else None,
                    "usec": usec,
                }
            )
    rows.sort(key=lambda row: (-row["usec"], row["command"]))
    return rows[:top]


def per_entry_us(seconds: float, entries: int) -> float | None:
    """µs per entry of ``seconds`` spread over ``entries`` (None without entries)."""
    return seconds * 1e6 / entries if entries > 0 else None


def processor_cpu_split(without: Mapping[str, Any], with_: Mapping[str, Any]) -> dict[str, Any]:
    """A cross-check of the Redis-only ratio from the two Processor phases: Redis CPU µs per
    timeline insert (the phase without ``notify``), and per notification (what the phase with
    ``notify`` spent beyond its own timeline inserts at that rate, over its notifications)."""
    per_insert = per_entry_us(without["redis_cpu_s"], int(without["timeline_inserts"]))
    if per_insert is None or not with_["notifications"]:
        return {"redis_cpu_us_per_timeline_insert": per_insert}
    extra = with_["redis_cpu_s"] - per_insert / 1e6 * with_["timeline_inserts"]
    per_notification = per_entry_us(extra, int(with_["notifications"]))
    return {
        "redis_cpu_us_per_timeline_insert": per_insert,
        "redis_cpu_us_per_notification": per_notification,
        "ratio_cpu": ratio(per_notification, per_insert),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


@dataclass(frozen=True, slots=True)
class NotifyActivity:
    """One activity of the notification workload: ``notify`` never holds ``actor`` and holds
    1-3 distinct users."""

    activity_id: str
    actor: str
    ts: int
    type: str
    object: str
    notify: tuple[str, ...]

    def ops(self) -> list[Notify]:
        return [
            Notify(u, self.activity_id, self.actor, self.ts, self.type, self.object)
            for u in self.notify
        ]


def notify_workload(
    rng: random.Random,
    *,
    prefix: str,
    activities: int,
    recipients: Sequence[str],
    actors: Sequence[str],
    hot_posts: int = 5,
    new_share: float = 0.2,
    start_us: int = _T0_US,
    step_us: int = 100_000,
) -> list[NotifyActivity]:
    """``activities`` Likes and Comments on the posts of ``recipients``: each is about a post
    of one owner (one of the owner's ``hot_posts`` posts, or with probability ``new_share`` a
    post never seen before: a new group) and notifies the owner and 0-2 others (thread
    participants), never its actor. Times step by ``step_us`` (well inside the group window)."""
    if not recipients or not actors:
        raise ValueError("recipients and actors must not be empty")
    out: list[NotifyActivity] = []
    fresh = 0
    for n in range(activities):
        owner = rng.choice(recipients)
        if rng.random() < new_share:
            fresh += 1
            post = f"post:{owner}:new{fresh}"
        else:
            post = f"post:{owner}:{rng.randrange(hot_posts)}"
        actor = rng.choice(actors)
        while actor == owner:
            actor = rng.choice(actors)
        notify = [owner]
        for _ in range(rng.choice((0, 0, 1, 2))):
            other = rng.choice(recipients)
            if other != actor and other not in notify:
                notify.append(other)
        out.append(
            NotifyActivity(
                f"{prefix}n{n}",
                actor,
                start_us + n * step_us,
                rng.choice(_TYPES),
                post,
                tuple(notify),
            )
        )
    return out


def _body(activity_id: str, actor: str, ts_us: int, type_: str, object_: str, **more: Any) -> bytes:
    published = (T0 + timedelta(microseconds=ts_us - _T0_US)).isoformat()
    doc = {
        "id": activity_id,
        "type": type_,
        "actor": actor,
        "object": object_,
        "published": published,
        "extra": {"text": "x" * 120},
        **more,
    }
    return msgspec.json.encode(doc)


def _warm_ops(users: Sequence[str], actor: str, prefix: str) -> list[Notify]:
    """One notification for each of ``users`` (loads their feeds before a timed phase)."""
    return [
        Notify(u, f"{prefix}{i}", actor, _T0_US + i, "Like", f"post:{u}:0")
        for i, u in enumerate(users)
    ]


def _percentiles(samples: list[float]) -> dict[str, float] | None:
    if not samples:
        return None
    from bench.reads import _percentiles as percentiles

    return percentiles(samples)


# --- the scenario --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sizes:
    timeline_users: int
    timeline_entries: int
    notify_recipients: int
    notify_entries: int
    processor_users: int
    processor_activities: int  # per mode (without / with notify)
    readers: int
    groups: tuple[int, int]
    http_reads: int
    counts_calls: int
    cold_rounds: int
    cold_users: int


def _sizes(quick: bool) -> _Sizes:
    if quick:
        return _Sizes(1_000, 20_000, 300, 6_000, 1_000, 400, 12, (50, 100), 200, 1_000, 1, 50)
    return _Sizes(
        5_000, 1_000_000, 2_000, 100_000, 5_000, 4_000, 100, (50, 200), 2_000, 10_000, 2, 500
    )


def run(ctx: Any) -> dict[str, Any]:
    sizes = _sizes(bool(ctx.plan.quick))
    ns = f"n{uuid.uuid4().hex[:6]}"
    result: dict[str, Any] = {"status": "ok", "goal_ratio": GOAL_RATIO}
    result["redis_cpu"] = _redis_cpu(ctx, sizes, ns)
    result["processor"] = _processor(ctx, sizes, ns)
    result["cold_inserts"] = _cold_inserts(ctx, sizes, ns)
    result["reads"] = _reads(ctx, sizes, ns)
    cpu = result["redis_cpu"]
    ctx.results.setdefault("targets", []).append(
        {
            "name": "notification insert ÷ timeline insert, Redis CPU per entry",
            "value": cpu.get("ratio_cpu"),
            "target": GOAL_RATIO,
            "unit": "ratio",
            "met": None if cpu.get("ratio_cpu") is None else cpu["ratio_cpu"] <= GOAL_RATIO,
            "at_most": True,
        }
    )
    return result


@dataclass
class _Meter:
    """Redis CPU (``INFO cpu``), commands (``INFO commandstats``) and wall time, summed over
    the runs of one kind of work (the phases alternate, so both see the same machine)."""

    entries: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    commands: dict[str, tuple[int, int]] = field(default_factory=dict)

    def run(self, client: Any, work: Callable[[], int]) -> None:
        """Run ``work`` (returns the entries it inserted) and add what it cost."""
        cpu0, cmd0 = cpu_seconds(client.info("cpu")), command_stats(client.info("commandstats"))
        started = time.perf_counter()
        entries = work()
        self.wall += time.perf_counter() - started
        cpu1, cmd1 = cpu_seconds(client.info("cpu")), command_stats(client.info("commandstats"))
        self.cpu += cpu1 - cpu0
        self.entries += entries
        for command in cmd1:
            calls, usec = stat_delta(cmd0, cmd1, command)
            before = self.commands.get(command, (0, 0))
            self.commands[command] = (before[0] + calls, before[1] + usec)

    def figures(self) -> dict[str, Any]:
        entries, wall, cpu = self.entries, self.wall, self.cpu
        calls, usec = self.commands.get("evalsha", (0, 0))
        return {
            "commands": command_breakdown({}, self.commands, entries),
            "entries": entries,
            "seconds": wall,
            "inserts_per_s": entries / wall if wall > 0 else None,
            "redis_cpu_s": cpu,
            "redis_cpu_us_per_entry": per_entry_us(cpu, entries),
            "evalsha_calls": calls,
            "evalsha_usec": usec,
            "evalsha_us_per_entry": per_entry_us(usec / 1e6, entries),
            "entries_per_script_call": entries / calls if calls else None,
            "redis_cpu_share_of_wall": cpu / wall if wall > 0 else None,
        }


def _set_active(client: Any, users: Sequence[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for user in users:
        pipe.set(keys.active(user), "1", ex=7 * 86_400)
    pipe.execute()


def _redis_cpu(ctx: Any, sizes: _Sizes, ns: str) -> dict[str, Any]:
    from feed.notify_redis import NotifyRedis

    s = ctx.settings
    client = ctx.redis
    rng = random.Random(17)

    # --- timeline inserts: 200 activities a batch, 10-100 active followers each --------------
    users = [f"{ns}t{n}" for n in range(sizes.timeline_users)]
    _set_active(client, users)
    timelines = _timelines(client, s)
    inserts: list[Insert] = []
    planned = 0
    n = 0
    while planned < sizes.timeline_entries:
        followers = rng.sample(users, rng.randint(10, 100))
        actor = rng.choice(users)
        ts = _T0_US + n * 100_000
        aid = f"{ns}ta{n}"
        body = _body(aid, actor, ts, "Create", f"post:{actor}:{n}")
        inserts.append(Insert(order_key(ts, aid), aid, body, followers))
        planned += len(followers)
        n += 1
    batches = [inserts[i : i + 200] for i in range(0, len(inserts), 200)]
    timelines.insert(batches[0][:1])  # the script cache, untimed (its entries stay)

    def timeline_work(part: list[list[Insert]]) -> int:
        done = 0
        with ctx.task("notify: timeline inserts (Redis only)", len(part)) as update:
            for batch in part:
                done += timelines.insert(batch)[0]
                update(advance=1)
        return done

    # --- notification inserts: 500 activities a batch, 1-3 recipients each -------------------
    recipients = [f"{ns}r{n}" for n in range(sizes.notify_recipients)]
    actors = [f"{ns}a{n}" for n in range(max(1_000, sizes.notify_recipients))]
    limits, ttl = s.notify_limits(), s.notify_ttl_s
    # A durable store that writes nothing: Redis does all it does in production (the pending
    # list and its confirmation included) while Cassandra stays out of the timing.
    notifications = NotifyRedis(client, _NoWrites(), limits=limits, ttl_s=ttl)  # type: ignore[arg-type]
    # Load every recipient's feed first (one notification each, untimed), as a hot user's is.
    notifications.apply(_warm_ops(recipients, actors[0], f"{ns}w"))
    stream: list[NotifyActivity] = []
    ops = 0
    start = _T0_US + 10**8
    while ops < sizes.notify_entries:
        more = notify_workload(
            rng,
            prefix=f"{ns}m{len(stream)}x",
            activities=500,
            recipients=recipients,
            actors=actors,
            start_us=start + len(stream) * 100_000,
        )
        stream += more
        ops += sum(len(a.notify) for a in more)
    notify_batches = [stream[i : i + 500] for i in range(0, len(stream), 500)]

    def notify_work(part: list[list[NotifyActivity]]) -> int:
        done = 0
        with ctx.task("notify: notification inserts (Redis only)", len(part)) as update:
            for batch in part:
                batch_ops = [op for a in batch for op in a.ops()]
                notifications.apply(batch_ops)
                done += len(batch_ops)
                update(advance=1)
        return done

    # Alternated halves: timeline, notification, timeline, notification.
    timeline_meter, notify_meter = _Meter(), _Meter()
    for half in (0, 1):
        tl_part = batches[half * len(batches) // 2 : (half + 1) * len(batches) // 2]
        nt_part = notify_batches[
            half * len(notify_batches) // 2 : (half + 1) * len(notify_batches) // 2
        ]
        timeline_meter.run(client, functools.partial(timeline_work, tl_part))
        notify_meter.run(client, functools.partial(notify_work, nt_part))
    timeline, notify = timeline_meter.figures(), notify_meter.figures()
    groups = [int(client.zcard(keys.notify_groups(u))) for u in recipients[:200]]
    timeline.update(
        activities=len(inserts),
        activities_per_batch=200,
        mean_followers=planned / max(1, len(inserts)),
    )
    notify.update(
        activities=len(stream),
        activities_per_batch=500,
        recipients=len(recipients),
        mean_groups_per_recipient_after=sum(groups) / max(1, len(groups)),
        max_groups=limits.max_groups,
    )
    return {
        "timeline": timeline,
        "notify": notify,
        "ratio_cpu": ratio(notify["redis_cpu_us_per_entry"], timeline["redis_cpu_us_per_entry"]),
        "ratio_evalsha": ratio(notify["evalsha_us_per_entry"], timeline["evalsha_us_per_entry"]),
        "ratio_inserts_per_s": ratio(notify["inserts_per_s"], timeline["inserts_per_s"]),
    }


def _processor(ctx: Any, sizes: _Sizes, ns: str) -> dict[str, Any]:
    from bench.reads import _load_followers
    from fanout.followers import FollowerCache
    from fanout.processor import Processor
    from feed.graph_cassandra import CassandraFollowGraph
    from feed.graph_versions_redis import RedisGraphVersions
    from feed.history_cassandra import CassandraHistory
    from feed.notify_cassandra import CassandraNotifyStore
    from feed.notify_redis import NotifyRedis
    from schemas.activity import decode_activity

    s = ctx.settings
    client = ctx.redis
    session = ctx.cassandra
    rng = random.Random(23)
    users = [f"{ns}p{n}" for n in range(sizes.processor_users)]
    actors = users[: max(100, len(users) // 5)]
    edges: list[tuple[str, str]] = []
    for actor in actors:
        edges += [(actor, f) for f in rng.sample(users, rng.randint(10, 100)) if f != actor]
    with ctx.task("notify: follow graph for the Processor phase", None):
        _load_followers(session, s.cassandra_keyspace, edges)
        _set_active(client, users)
    graph = CassandraFollowGraph(session, s.cassandra_keyspace)
    history = CassandraHistory(session, s.cassandra_keyspace)
    versions = RedisGraphVersions(client)
    store = CassandraNotifyStore(session, s.cassandra_keyspace)
    notifications = NotifyRedis(client, store, limits=s.notify_limits(), ttl_s=s.notify_ttl_s)
    processor = Processor(
        timelines=_timelines(client, s),
        history=history,
        graph=graph,
        versions=versions,
        followers=FollowerCache(graph, versions, history=history, fanout_limit=0),
        follow_backfill=0,
        notifications=notifications,
    )
    owners = users[: max(50, len(users) // 10)]
    # Load the owners' notification feeds (from Cassandra: empty) before the timing.
    notifications.apply(_warm_ops(owners, f"{ns}nobody", f"{ns}pw"))
    half = max(1, sizes.processor_activities // 2)
    totals: dict[str, dict[str, float]] = {
        mode: {"activities": 0, "timeline_inserts": 0, "notifications": 0, "seconds": 0.0}
        for mode in ("without_notify", "with_notify")
    }
    cpu: dict[str, float] = {"without_notify": 0.0, "with_notify": 0.0}
    start = _T0_US + 10**9
    n = 0
    try:
        with ctx.task("notify: Processor, history on, without/with notify", 4 * half) as update:
            for _round in range(2):
                for mode in ("without_notify", "with_notify"):
                    stream = notify_workload(
                        rng,
                        prefix=f"{ns}p{n}x",
                        activities=half,
                        recipients=owners,
                        actors=actors,
                        start_us=start + n * 100_000,
                    )
                    n += half
                    events = []
                    notified = 0
                    for a in stream:
                        extra = {"notify": list(a.notify)} if mode == "with_notify" else {}
                        events.append(
                            decode_activity(
                                _body(a.activity_id, a.actor, a.ts, a.type, a.object, **extra)
                            )
                        )
                        notified += len(a.notify) if mode == "with_notify" else 0
                    cpu0 = cpu_seconds(client.info("cpu"))
                    started = time.perf_counter()
                    inserted = 0
                    for i in range(0, len(events), 500):
                        stats = processor.apply(list(enumerate(events[i : i + 500])))
                        inserted += stats.inserted
                        update(advance=len(events[i : i + 500]))
                    totals[mode]["seconds"] += time.perf_counter() - started
                    cpu[mode] += cpu_seconds(client.info("cpu")) - cpu0
                    totals[mode]["activities"] += len(events)
                    totals[mode]["timeline_inserts"] += inserted
                    totals[mode]["notifications"] += notified
    finally:
        processor.close()
    out: dict[str, Any] = {"batch": 500, "rounds": 2, "history_rows": True}
    for mode, t in totals.items():
        wall = t["seconds"]
        out[mode] = {
            **t,
            "activities_per_s": t["activities"] / wall if wall else None,
            "timeline_inserts_per_s": t["timeline_inserts"] / wall if wall else None,
            "notifications_per_s": t["notifications"] / wall if wall else None,
            "redis_cpu_s": cpu[mode],
        }
    out["slowdown_with_notify"] = ratio(
        out["without_notify"]["activities_per_s"], out["with_notify"]["activities_per_s"]
    )
    out.update(processor_cpu_split(out["without_notify"], out["with_notify"]))
    return out


def _cold_inserts(ctx: Any, sizes: _Sizes, ns: str) -> dict[str, Any]:
    """One batch notifying users whose feeds are in Cassandra only (the worker loads each one
    first), against the same batch once they are hot: what a cold recipient costs."""
    from feed.notify_cassandra import CassandraNotifyStore
    from feed.notify_redis import NotifyRedis

    s = ctx.settings
    client = ctx.redis
    users = [f"{ns}c{n}" for n in range(sizes.cold_users)]
    store = CassandraNotifyStore(ctx.cassandra, s.cassandra_keyspace)
    notifications = NotifyRedis(client, store, limits=s.notify_limits(), ttl_s=s.notify_ttl_s)
    groups = 20
    seed = [
        Notify(u, f"{ns}cs{n}-{g}", f"{ns}fan{g}", _T0_US + 3 * 10**9 + g, "Like", f"post:{g}")
        for n, u in enumerate(users)
        for g in range(groups)
    ]
    with ctx.task("notify: cold users' feeds (Cassandra)", len(seed)) as update:
        for i in range(0, len(seed), 1_000):
            notifications.apply(seed[i : i + 1_000])
            update(advance=len(seed[i : i + 1_000]))
    for user in users:
        client.delete(*[k for k in keys.notify_keys(user) if k != keys.presence(user)])
    out: dict[str, Any] = {"users": len(users), "groups_per_user": groups}
    for label in ("cold", "hot"):
        batch = [
            Notify(u, f"{ns}c{label}{n}", f"{ns}fan0", _T0_US + 4 * 10**9 + n, "Like", "post:0")
            for n, u in enumerate(users)
        ]
        started = time.perf_counter()
        notifications.apply(batch)
        seconds = time.perf_counter() - started
        out[label] = {"seconds": seconds, "ms_per_user": seconds * 1000 / len(users)}
    out["ratio_cold_to_hot"] = ratio(out["cold"]["seconds"], out["hot"]["seconds"])
    return out


def _reads(ctx: Any, sizes: _Sizes, ns: str) -> dict[str, Any]:
    from bench.processes import free_port, wait_http
    from feed.notify_cassandra import CassandraNotifyStore
    from feed.notify_redis import NotifyRedis
    from gateway.auth import mint_token

    s = ctx.settings
    client = ctx.redis
    rng = random.Random(29)
    readers = [f"{ns}reader{n}" for n in range(sizes.readers)]
    actors = [f"{ns}fan{n}" for n in range(500)]
    store = CassandraNotifyStore(ctx.cassandra, s.cassandra_keyspace)
    notifications = NotifyRedis(client, store, limits=s.notify_limits(), ttl_s=s.notify_ttl_s)
    wanted = {r: rng.randint(*sizes.groups) for r in readers}
    ops: list[Notify] = []
    n = 0
    for reader, groups in wanted.items():
        for g in range(groups):
            for _ in range(rng.randint(1, 4)):
                ts = _T0_US + 2 * 10**9 + n * 1_000
                ops.append(
                    Notify(reader, f"{ns}rd{n}", rng.choice(actors), ts, "Like", f"post:{g}")
                )
                n += 1
    rng.shuffle(ops)
    ops.sort(key=lambda op: op.ts)
    with ctx.task("notify: readers' feeds (Redis + Cassandra)", len(ops)) as update:
        for i in range(0, len(ops), 1_000):
            notifications.apply(ops[i : i + 1_000])
            update(advance=len(ops[i : i + 1_000]))
    # the groups' sorted set holds one sentinel member besides the groups (feed/lua/notify.lua)
    held = {r: int(client.zcard(keys.notify_groups(r))) - 1 for r in readers}
    result: dict[str, Any] = {
        "readers": len(readers),
        "groups_per_reader": {"min": min(held.values()), "max": max(held.values())},
        "groups_mismatches": sum(1 for r in readers if held[r] != wanted[r]),
        "concurrency": 1,
        "page_limit": 20,
    }
    result.update(asyncio.run(_counts_cost(ctx, readers, sizes.counts_calls)))

    port = free_port()
    env = dict(ctx.env)
    env.update(FEED_GATEWAY_PORT=str(port), FEED_GATEWAY_HOST="127.0.0.1")
    log = ctx.logs_dir() / "gateway-notify.log"
    gateway = ctx.children.feed(["gateway"], env=env, log=log)
    try:
        with ctx.task("notify: start the gateway", None):
            if not wait_http(f"http://127.0.0.1:{port}/healthz", 60, gateway):
                raise RuntimeError(
                    f"the gateway did not answer /healthz within 60s (exit code {gateway.poll()})"
                )
        tokens = {r: mint_token(s.require_jwt(), r, 3600) for r in readers}
        result.update(_http_reads(ctx, port, tokens, held, sizes))
    finally:
        ctx.children.stop(gateway, timeout=20)
    return result


async def _counts_cost(ctx: Any, readers: list[str], calls: int) -> dict[str, Any]:
    """Redis CPU of one ``counts`` and of one first-page call, as the gateway makes them."""
    import redis.asyncio as aioredis

    from feed.notify_redis import AsyncNotifyRedis

    s = ctx.settings
    client = aioredis.Redis.from_url(s.redis_url)
    sync = ctx.redis
    out: dict[str, Any] = {}
    try:
        store = AsyncNotifyRedis(client, lambda: None, needs_durable=False, ttl_s=s.notify_ttl_s)
        for label, count, call in (
            ("counts", calls, lambda r: store.counts(r)),
            ("page", max(1, calls // 5), lambda r: store.page(r, None, 20)),
        ):
            await call(readers[0])  # the script cache
            cpu0, cmd0 = cpu_seconds(sync.info("cpu")), command_stats(sync.info("commandstats"))
            started = time.perf_counter()
            for i in range(count):
                await call(readers[i % len(readers)])
            wall = time.perf_counter() - started
            cpu1, cmd1 = cpu_seconds(sync.info("cpu")), command_stats(sync.info("commandstats"))
            scripts, usec = stat_delta(cmd0, cmd1, "evalsha")
            out[f"{label}_in_process"] = {
                "calls": count,
                "commands": command_breakdown(cmd0, cmd1, count),
                "redis_cpu_us_per_call": per_entry_us(cpu1 - cpu0, count),
                "evalsha_us_per_call": per_entry_us(usec / 1e6, scripts),
                "client_us_per_call": per_entry_us(wall, count),
            }
    finally:
        await client.aclose()
    return out


def _http_reads(
    ctx: Any, port: int, tokens: dict[str, str], held: dict[str, int], sizes: _Sizes
) -> dict[str, Any]:
    import httpx

    client = ctx.redis
    readers = list(tokens)
    rng = random.Random(31)
    out: dict[str, Any] = {}
    bad: list[str] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:

        def get(path: str, reader: str) -> tuple[float, httpx.Response]:
            started = time.perf_counter()
            response = http.get(path, headers={"Authorization": f"Bearer {tokens[reader]}"})
            return time.perf_counter() - started, response

        for _ in range(20):  # warm the connection and the gateway
            get("/v1/notifications/counts", readers[0])
        for label, path in (
            ("page", "/v1/notifications"),
            ("counts", "/v1/notifications/counts"),
        ):
            samples: list[float] = []
            with ctx.task(f"notify: GET {path}", sizes.http_reads) as update:
                for _ in range(sizes.http_reads):
                    reader = rng.choice(readers)
                    seconds, response = get(path, reader)
                    samples.append(seconds)
                    if response.status_code != 200 or response.json()["unseen"] != held[reader]:
                        bad.append(f"{path} {reader}: {response.status_code}")
                    update(advance=1)
            out[f"http_{label}"] = _percentiles(samples)
        # Cold: the user's keys gone, so the gateway loads the feed from Cassandra first. Wait
        # (bounded) for the gateway's Cassandra session: until then a cold read is a 503.
        drop = [k for k in keys.notify_keys(readers[0]) if k != keys.presence(readers[0])]
        deadline = time.monotonic() + 60
        while True:
            client.delete(*drop)
            _, response = get("/v1/notifications", readers[0])
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        cold: list[float] = []
        total = sizes.cold_rounds * len(readers)
        with ctx.task("notify: cold GET /v1/notifications (from Cassandra)", total) as update:
            for _round in range(sizes.cold_rounds):
                for reader in readers:
                    client.delete(
                        *[k for k in keys.notify_keys(reader) if k != keys.presence(reader)]
                    )
                    seconds, response = get("/v1/notifications", reader)
                    cold.append(seconds)
                    if response.status_code != 200 or response.json()["unseen"] != held[reader]:
                        bad.append(f"cold {reader}: {response.status_code}")
                    update(advance=1)
        out["http_page_cold"] = _percentiles(cold)
    out["http_errors"] = len(bad)
    out["http_error_samples"] = bad[:5]
    return out
