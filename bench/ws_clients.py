"""Load processes of the gateway benchmark: the WebSocket clients and the publisher.

Both run as separate processes (``python -m bench.ws_clients clients|publish ...``), apart
from the server under test and from each other, so neither steals the server's event loop.

``clients``
    Opens C connections (one user each) to our gateway (``/v1/stream``) or to the Socket.IO peer, on
    aiohttp (under uvloop when installed), without permessage-deflate, and keeps them open. For the
    peer it speaks the Engine.IO 4 / Socket.IO 5 wire protocol itself (open packet, ``40{auth}``
    CONNECT, ``42[...]`` events, answering the server's ``2`` ping with ``3``), which is lighter
    than ``socketio.AsyncClient``. Every received message carries ``extra.bench_sent`` (the
    publisher's wall clock), ``extra.step`` and ``extra.seq``; the process keeps, per step, the
    publish→receive latencies and the distinct seqs seen (so loss and repeats are counted). A small
    HTTP control server on 127.0.0.1 answers ``GET /status``, ``GET /step?step=N`` and ``POST
    /quit``.

``publish``
    One step: messages at a fixed offered rate for a fixed time, each to a random connected user,
    then prints one JSON line (sent count, achieved rate, its own CPU). For our gateway it writes
    exactly as the fan-out worker does, through :meth:`feed.timelines_redis.RedisTimelines.insert`
    (the fan-out Lua script: timeline ZADD, delivery seq, stream XADD, PUBLISH of the complete
    frame on ``u:{uid}``; one script call per tick). For the peer it emits with
    ``socketio.AsyncRedisManager(url, write_only=True)`` to room ``user:<id>`` (PEERS.md).

Payloads are the same on both sides: an activity of ~300 bytes whose ``extra`` carries the send
timestamp. Every loop here is bounded in count and time.

Being a process entry point, the ``__main__`` block hands ``os.environ`` to :func:`main`, which
reads one variable from it, ``FEED_JWT_SECRET`` (set by the bench for its own gateway), through
:func:`bench.options.client_jwt_secret`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import os
import random
import sys
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

__all__ = ["main", "payload"]

#: Target size of one activity body (the JSON the client receives inside the frame).
PAYLOAD_BYTES = 300
_PAD_BASE = "x" * PAYLOAD_BYTES
_TICK_S = 0.002
#: Connection attempts per client before it counts as failed (backoff between them).
_CONNECT_ATTEMPTS = 6
#: Emits in flight at once in the Socket.IO publisher (redis-py's pool holds 100 connections).
_EMIT_CONCURRENCY = 32
#: The clients' event-loop watch: wake every _WATCH_S; later than _STALL_S counts as a stall.
_WATCH_S = 0.005
_STALL_S = 0.020


# --- payload --------------------------------------------------------------------------------
def payload(step: int, seq: int, sent: float, published: str) -> dict[str, Any]:
    """One activity (AS2-shaped, as the fan-out publishes it) of about ``PAYLOAD_BYTES``."""
    activity: dict[str, Any] = {
        "id": f"gb{step}-{seq}",
        "type": "Create",
        "actor": f"bench-actor-{seq % 997}",
        "object": f"post:gb{step}-{seq}",
        "published": published,
        "extra": {"bench_sent": sent, "step": step, "seq": seq, "pad": ""},
    }
    size = len(_enc.encode(activity))
    activity["extra"]["pad"] = _PAD_BASE[: max(0, PAYLOAD_BYTES - size)]
    return activity


# --- decoding on the client side --------------------------------------------------------------
class _Extra(msgspec.Struct):
    bench_sent: float = 0.0
    step: int = -1
    seq: int = -1


class _Activity(msgspec.Struct):
    extra: _Extra | None = None


class _OurFrame(msgspec.Struct):
    type: str
    activity: _Activity | None = None


_enc = msgspec.json.Encoder()
_our_frame = msgspec.json.Decoder(_OurFrame)
_sio_event = msgspec.json.Decoder(tuple[str, _Activity])
_any = msgspec.json.Decoder()


@dataclass
class _Step:
    received: int = 0
    seqs: set[int] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)
    first: float | None = None
    last: float | None = None


class Recorder:
    def __init__(self) -> None:
        self.steps: dict[int, _Step] = {}
        self.unmatched = 0

    def record(self, extra: _Extra | None, now: float) -> None:
        if extra is None or extra.step < 0:
            self.unmatched += 1
            return
        step = self.steps.get(extra.step)
        if step is None:
            step = self.steps[extra.step] = _Step()
        step.received += 1
        step.seqs.add(extra.seq)
        step.latencies.append(now - extra.bench_sent)
        if step.first is None:
            step.first = now
        step.last = now

    def summary(self, number: int) -> dict[str, Any]:
        step = self.steps.get(number)
        if step is None:
            return {"step": number, "received": 0, "unique": 0, "duplicates": 0}
        ordered = sorted(step.latencies)
        ms = [x * 1000 for x in ordered]
        return {
            "step": number,
            "received": step.received,
            "unique": len(step.seqs),
            "duplicates": step.received - len(step.seqs),
            "first_receive": step.first,
            "last_receive": step.last,
            "latency_ms": {
                "p50": _pct(ms, 0.50),
                "p95": _pct(ms, 0.95),
                "p99": _pct(ms, 0.99),
                "p999": _pct(ms, 0.999),
                "max": ms[-1] if ms else None,
                "mean": (sum(ms) / len(ms)) if ms else None,
            },
        }

    def forget(self, number: int) -> None:
        self.steps.pop(number, None)


def _pct(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- clients ----------------------------------------------------------------------------------
class Clients:
    def __init__(self, args: argparse.Namespace, secret: str | None) -> None:
        """``secret``: the gateway's JWT secret, to mint each user's token (``--kind ours``)."""
        self.args = args
        self._secret = secret
        self.recorder = Recorder()
        self.connected: dict[str, Any] = {}
        self.failed: list[str] = []
        self.closes: dict[str, int] = {}
        self.pings = 0
        self.attempted = 0
        self.retries = 0
        self.refusals: dict[str, int] = {}
        self.started = time.monotonic()
        self.connect_seconds: float | None = None
        self._quit = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        #: (wall time, seconds) of this process's event-loop stalls over _STALL_S: a stalled
        #: client adds latency that is not the server's, so the bench reports them per step.
        self.stalls: collections.deque[tuple[float, float]] = collections.deque(maxlen=10_000)

    def users(self) -> list[str]:
        return [f"{self.args.prefix}{i}" for i in range(self.args.count)]

    async def run(self) -> None:
        import aiohttp
        from aiohttp import web

        connector = aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        app = web.Application()
        app.router.add_get("/status", self._status)
        app.router.add_get("/step", self._step)
        app.router.add_post("/quit", self._quit_handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.args.control_port)
        await site.start()
        try:
            monitor = asyncio.create_task(self._watch_loop())
            self._tasks.add(monitor)
            semaphore = asyncio.Semaphore(self.args.concurrency)
            tokens = self._tokens()
            for user in self.users():
                task = asyncio.create_task(self._one(session, semaphore, user, tokens.get(user)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            deadline = time.monotonic() + self.args.max_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quit.wait(), max(1.0, deadline - time.monotonic()))
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await session.close()
            await runner.cleanup()

    def _tokens(self) -> dict[str, str]:
        if self.args.kind != "ours":
            return {}
        from gateway.auth import mint_token

        if self._secret is None:
            raise ValueError("--kind ours needs the gateway's JWT secret (FEED_JWT_SECRET)")
        secret = self._secret
        return {u: mint_token(secret, u, 6 * 3600) for u in self.users()}

    async def _one(
        self, session: Any, semaphore: asyncio.Semaphore, user: str, token: str | None
    ) -> None:
        import aiohttp

        ws = None
        try:
            async with semaphore:
                ws = await self._open(session, user, token)
                self.connected[user] = ws
                if len(self.connected) == self.args.count:
                    self.connect_seconds = time.monotonic() - self.started
                    _quiet_gc()
            if self.args.kind == "ours":
                await self._read_ours(ws)
            else:
                await self._read_sio(ws)
            code = ws.close_code
            key = str(code) if code is not None else "none"
            self.closes[key] = self.closes.get(key, 0) + 1
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, RuntimeError) as exc:
            if user not in self.connected:
                self.failed.append(f"{user}: {type(exc).__name__}: {exc}"[:200])
            else:
                key = f"error:{type(exc).__name__}"
                self.closes[key] = self.closes.get(key, 0) + 1
        finally:
            self.connected.pop(user, None)
            if ws is not None and not ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 2)

    async def _watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(_WATCH_S)
            late = loop.time() - before - _WATCH_S
            if late > _STALL_S:
                self.stalls.append((time.time(), late))

    async def _open(self, session: Any, user: str, token: str | None) -> Any:
        """Connect and complete the handshake; a refused attempt is retried with backoff, as a
        real client does (bounded: ``_CONNECT_ATTEMPTS``)."""
        import aiohttp

        for attempt in range(_CONNECT_ATTEMPTS):
            self.attempted += 1
            ws = None
            try:
                if self.args.kind == "ours":
                    ws = await asyncio.wait_for(
                        session.ws_connect(
                            self.args.url,
                            headers={"Authorization": f"Bearer {token}"},
                            compress=0,
                            autoping=True,
                            max_msg_size=0,
                            decode_text=False,
                        ),
                        30,
                    )
                    await self._handshake_ours(ws)
                else:
                    ws = await asyncio.wait_for(
                        session.ws_connect(
                            self.args.url,
                            compress=0,
                            autoping=True,
                            max_msg_size=0,
                            decode_text=False,
                        ),
                        30,
                    )
                    await self._handshake_sio(ws, user)
                return ws
            except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError):
                if ws is not None:
                    code = ws.close_code
                    key = f"refused:{code}"
                    self.refusals[key] = self.refusals.get(key, 0) + 1
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(ws.close(), 2)
                if attempt == _CONNECT_ATTEMPTS - 1:
                    raise
                self.retries += 1
                await asyncio.sleep(0.2 * 2**attempt * (0.5 + random.random() / 2))
        raise RuntimeError("unreachable")

    async def _receive_text(self, ws: Any, timeout: float) -> bytes:
        import aiohttp

        msg = await asyncio.wait_for(ws.receive(), timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"expected a text frame, got {msg.type!r}")
        data = msg.data
        return data if isinstance(data, bytes) else str(data).encode()

    async def _handshake_ours(self, ws: Any) -> None:
        welcome = _any.decode(await self._receive_text(ws, 30))
        if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
            raise RuntimeError(f"first frame was not a welcome: {str(welcome)[:100]}")
        # As the page does: resume from the welcome cursor (ends the server's short live hold).
        await ws.send_str(json.dumps({"type": "resume", "cursor": welcome["cursor"]}))

    async def _handshake_sio(self, ws: Any, user: str) -> None:
        opened = await self._receive_text(ws, 30)
        if not opened.startswith(b"0"):
            raise RuntimeError(f"expected the Engine.IO open packet, got {opened[:60]!r}")
        await ws.send_str("40" + json.dumps({"user": user}))
        for _ in range(10):  # bounded: pings may come first
            packet = await self._receive_text(ws, 30)
            if packet == b"2":
                await ws.send_str("3")
                continue
            if packet.startswith(b"40"):
                return
            if packet.startswith(b"44"):
                raise RuntimeError(f"connect refused: {packet[:100]!r}")
        raise RuntimeError("no Socket.IO CONNECT acknowledgement")

    async def _read_ours(self, ws: Any) -> None:
        import aiohttp

        record = self.recorder.record
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                now = time.time()
                try:
                    frame = _our_frame.decode(msg.data)
                except msgspec.DecodeError:
                    continue
                if frame.type == "activity" and frame.activity is not None:
                    record(frame.activity.extra, now)
            elif _ended(msg.type):
                return

    async def _read_sio(self, ws: Any) -> None:
        import aiohttp

        record = self.recorder.record
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                now = time.time()
                data = msg.data
                if data.startswith(b"42"):
                    try:
                        _event, activity = _sio_event.decode(data[2:])
                    except msgspec.DecodeError:
                        continue
                    record(activity.extra, now)
                elif data == b"2":  # Engine.IO ping from the server
                    self.pings += 1
                    await ws.send_str("3")
                elif data.startswith(b"41") or data.startswith(b"1"):
                    return  # Socket.IO disconnect / Engine.IO close
            elif _ended(msg.type):
                return

    # --- control ------------------------------------------------------------------------------
    async def _status(self, _request: Any) -> Any:
        from aiohttp import web

        return web.json_response(
            {
                "kind": self.args.kind,
                "count": self.args.count,
                "attempted": self.attempted,
                "connected": len(self.connected),
                "connected_users": sorted(self.connected, key=_user_index)
                if _request.query.get("users")
                else None,
                "failed": len(self.failed),
                "failures": self.failed[:10],
                "closes": self.closes,
                "pings_answered": self.pings,
                "retries": self.retries,
                "refusals": self.refusals,
                "connect_seconds": self.connect_seconds,
                "unmatched": self.recorder.unmatched,
            }
        )

    async def _step(self, request: Any) -> Any:
        from aiohttp import web

        number = int(request.query["step"])
        summary = self.recorder.summary(number)
        since = float(request.query.get("since", "0"))
        stalls = [lag for at, lag in self.stalls if at >= since]
        summary["client_stalls"] = len(stalls)
        summary["client_stall_max_ms"] = max(stalls) * 1000 if stalls else 0.0
        if request.query.get("forget"):
            self.recorder.forget(number)
        return web.json_response(summary)

    async def _quit_handler(self, _request: Any) -> Any:
        from aiohttp import web

        self._quit.set()
        return web.json_response({"quitting": True})


def _quiet_gc() -> None:
    """Keep this process's collector from pausing the measurement.

    With thousands of open connections a full collection walks ~10^6 objects and stops the
    event loop for hundreds of ms, which would show up as server latency. The connections'
    objects are moved to the permanent generation once everyone is connected, and the young
    generation is collected less often (what a step allocates is freed by reference counting).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)


def _user_index(user: str) -> int:
    digits = "".join(ch for ch in user if ch.isdigit())
    return int(digits) if digits else 0


# --- publisher --------------------------------------------------------------------------------
def _published() -> str:
    return datetime.now(UTC).isoformat()


def _cpu_self() -> float:
    times = os.times()
    return times.user + times.system


def publish_ours(args: argparse.Namespace, users: list[str]) -> dict[str, Any]:
    import redis

    from feed.cursor import order_key
    from feed.interfaces import Insert

    def stamped(ts_ms: int) -> dict[str, int]:
        # Frames carry their record's time since feed.stages; the bench measures versions
        # before it too (their Insert has no such field).
        return {"ts_ms": ts_ms} if "ts_ms" in Insert.__dataclass_fields__ else {}

    from feed.timelines_redis import RedisTimelines

    # the writes as the worker makes them: on a cluster, per slot (FEED_BENCH_REDIS_CLUSTER)
    factory = redis.RedisCluster if args.redis_cluster else redis.Redis
    client = factory.from_url(args.redis_url, socket_timeout=30)
    timelines = RedisTimelines(
        client,
        timeline_max=args.timeline_max,
        stream_history=args.stream_history,
        body_ttl_s=3600,
        only_active=False,
    )
    rng = random.Random(args.seed)
    sent = 0
    pushed = 0
    ticks = 0
    total = int(args.rate * args.seconds)
    cpu0 = _cpu_self()
    started_wall = time.time()
    t0 = time.monotonic()
    hard_stop = t0 + args.seconds + 30
    while sent < total and time.monotonic() < hard_stop:
        elapsed = time.monotonic() - t0
        due = min(total, int(elapsed * args.rate) + 1) - sent
        if due > 0:
            batch = []
            now = time.time()
            published = _published()
            published_us = int(now * 1_000_000)
            for _ in range(due):
                activity = payload(args.step, sent, now, published)
                aid = activity["id"]
                traced = {}
                if args.trace_share > 0 and rng.random() < args.trace_share:
                    # a sampled record's frame, as a traced worker publishes it: the gateway
                    # writes a push span for it (FEED_BENCH_TRACING)
                    traced["traceparent"] = (
                        f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64) | 1:016x}-01"
                    )
                batch.append(
                    Insert(
                        member=order_key(published_us, aid),
                        activity_id=aid,
                        body=_enc.encode(activity),
                        users=[users[rng.randrange(len(users))]],
                        # as the worker publishes them: the gateway reads it for its latency
                        **stamped(int(now * 1000)),
                        **traced,
                    )
                )
                sent += 1
            pushed += timelines.insert(batch)[1]
            ticks += 1
        # One call per tick at most, whatever the time a call takes: the Pub/Sub bursts the
        # servers read then have the same shape for every version of the publishing code.
        time.sleep(
            max(0.0, t0 + (int((time.monotonic() - t0) / _TICK_S) + 1) * _TICK_S - time.monotonic())
        )
    seconds = time.monotonic() - t0
    client.close()
    return {
        "sent": sent,
        "pushed": pushed,
        "seconds": seconds,
        "achieved_rate": sent / seconds if seconds else None,
        "started_wall": started_wall,
        "calls": ticks,
        "cpu_s": _cpu_self() - cpu0,
    }


async def publish_socketio(args: argparse.Namespace, users: list[str]) -> dict[str, Any]:
    import socketio

    from bench.peer_socketio import EVENT, ROOM_PREFIX

    manager = socketio.AsyncRedisManager(args.redis_url, write_only=True)
    rng = random.Random(args.seed)
    sent = 0
    total = int(args.rate * args.seconds)
    cpu0 = _cpu_self()
    started_wall = time.time()
    t0 = time.monotonic()
    hard_stop = t0 + args.seconds + 30
    calls = 0
    while sent < total and time.monotonic() < hard_stop:
        elapsed = time.monotonic() - t0
        due = min(total, int(elapsed * args.rate) + 1) - sent
        if due > 0:
            # At most _EMIT_CONCURRENCY emits in flight (one PUBLISH each, on pooled
            # connections); each chunk is stamped just before it goes out.
            for start in range(0, due, _EMIT_CONCURRENCY):
                now = time.time()
                published = _published()
                emits = []
                for _ in range(min(_EMIT_CONCURRENCY, due - start)):
                    data = payload(args.step, sent, now, published)
                    room = ROOM_PREFIX + users[rng.randrange(len(users))]
                    emits.append(manager.emit(EVENT, data, room=room, namespace="/"))
                    sent += 1
                await asyncio.gather(*emits)
                calls += 1
        else:
            await asyncio.sleep(_TICK_S)
    seconds = time.monotonic() - t0
    redis_client = getattr(manager, "redis", None)
    if redis_client is not None:
        with contextlib.suppress(Exception):
            await redis_client.aclose()
    return {
        "sent": sent,
        "pushed": sent,
        "seconds": seconds,
        "achieved_rate": sent / seconds if seconds else None,
        "started_wall": started_wall,
        "calls": calls,
        "cpu_s": _cpu_self() - cpu0,
    }


def burn(cores: float, seconds: float) -> dict[str, Any]:
    """Busy-loop ``cores`` of one core (at most 1) for ``seconds``, in 10 ms periods: a known
    load on the cores the measured server shares (``FEED_BENCH_GATEWAY_BURN_US``). Spins by the
    clock, so a burner the scheduler holds back burns less, as any other process would."""
    period = 0.01
    busy = min(1.0, max(0.0, cores)) * period
    cpu0 = _cpu_self()
    t0 = time.monotonic()
    periods = max(0, int(seconds / period))
    for n in range(periods):  # bounded: seconds / 10 ms periods
        start = t0 + n * period
        while time.monotonic() < start + busy:
            pass
        pause = start + period - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    return {"cores": cores, "seconds": time.monotonic() - t0, "cpu_s": _cpu_self() - cpu0}


# --- entry point ------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_clients")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("clients", help="hold C WebSocket connections and record deliveries")
    c.add_argument("--kind", choices=["ours", "socketio"], required=True)
    c.add_argument("--url", required=True)
    c.add_argument("--prefix", required=True)
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--control-port", type=int, required=True)
    c.add_argument("--concurrency", type=int, default=100)
    c.add_argument("--max-seconds", type=float, default=3600.0)
    p = sub.add_parser("publish", help="one step of messages at a fixed offered rate")
    p.add_argument("--kind", choices=["ours", "socketio"], required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--redis-cluster", action="store_true")
    p.add_argument("--users-file", type=Path, required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--seed", type=int, default=7)
    # The share of frames that carry a sampled traceparent (FEED_BENCH_TRACING).
    p.add_argument("--trace-share", type=float, default=0.0)
    p.add_argument("--timeline-max", type=int, default=800)
    p.add_argument("--stream-history", type=int, default=1000)
    b = sub.add_parser("burn", help="busy-loop a share of one core for a while")
    b.add_argument("--cores", type=float, required=True)
    b.add_argument("--seconds", type=float, required=True)
    return parser


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run the load generator's event loop on uvloop when it is installed (it comes with
    ``uvicorn[standard]``, like the servers' loops): the measuring side should cost the machine as
    little as it can, since it shares the cores with the servers it measures."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: list[str] | None, environ: Mapping[str, str]) -> int:
    """The load process's entry point; ``environ`` is its environment (the ``__main__`` block
    hands over ``os.environ``), read only for ``FEED_JWT_SECRET`` (``clients --kind ours``)."""
    from bench.options import BenchOptionsError, client_jwt_secret
    from bench.peer_socketio import raise_nofile

    args = _parser().parse_args(argv)
    if args.command == "clients":
        try:
            secret = client_jwt_secret(environ) if args.kind == "ours" else None
        except BenchOptionsError as exc:
            print(f"bench.ws_clients: configuration error: {exc}", file=sys.stderr)
            return 2
        raise_nofile()
        _run(Clients(args, secret).run())
        return 0
    if args.command == "burn":
        sys.stdout.write(json.dumps(burn(args.cores, args.seconds)) + "\n")
        sys.stdout.flush()
        return 0
    raise_nofile()
    users = [u for u in json.loads(args.users_file.read_text()) if u]
    if not users:
        print(json.dumps({"error": "no users to publish to"}))
        return 2
    if args.kind == "ours":
        result = publish_ours(args, users)
    else:
        result = _run(publish_socketio(args, users))
    result["rate"] = args.rate
    result["step"] = args.step
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


def _ended(kind: Any) -> bool:
    """Whether an aiohttp WebSocket message type means the connection is over."""
    import aiohttp

    return kind in (
        aiohttp.WSMsgType.CLOSE,
        aiohttp.WSMsgType.CLOSING,
        aiohttp.WSMsgType.CLOSED,
        aiohttp.WSMsgType.ERROR,
    )


if __name__ == "__main__":
    raise SystemExit(main(None, os.environ))
