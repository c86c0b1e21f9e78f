"""The ``gateway`` scenario: ``feed gateway`` and python-socketio, same workload, one run.

The two push servers run one after the other, each in its own process, on the bench stack's Redis
(a side's server and clients run only while that side is measured: an idle server holding 5,000
connections, and its clients, would still take a share of the two cores from the other):

* **ours** — ``feed gateway`` (uvicorn, one process), with history reads off (the workload needs
  no Cassandra). Messages reach it exactly as the fan-out worker publishes them: the fan-out Lua
  script (:meth:`feed.timelines_redis.RedisTimelines.insert`) inserts into the user's timeline,
  gives the frame the next delivery seq, appends it to the user's delivery stream and PUBLISHes
  the complete frame on ``u:{uid}`` (users are online because their client is connected);
* **peer** — python-socketio ``AsyncServer`` + ``AsyncRedisManager`` under uvicorn, one worker
  (:mod:`bench.peer_socketio`), one room per user, emitted to by
  ``AsyncRedisManager(write_only=True)`` (PEERS.md).

For each side, C clients (one user each) run in a separate process and a publisher runs in
another (:mod:`bench.ws_clients`); nothing of the load shares the server's process. Each
payload is a ~300-byte activity carrying its send timestamp in ``extra``. Neither side uses
permessage-deflate (both servers are configured without it and the clients do not offer it), and
both use uvicorn's ``websockets-sansio`` WebSocket implementation (ours with its lean
per-connection state, :mod:`gateway.websocket`).

Measured per side:

* memory: server RSS before any client and after C idle clients connected (``/proc/<pid>/status``
  VmRSS): ``(after - before) / C`` per connection; and the server's garbage collections (ours
  from ``feed_gateway_gc_pause_seconds``, the peer's timed by its harness): full collections and
  their pause while the clients connected and during the sweep, and the longest pause of each
  generation;
* an offered-rate sweep (full: 1k to 6k msg/s in steps of 1k, then 8k to 16k in steps of 2k,
  10 s each, extended while a side still meets the bound; ``FEED_BENCH_GATEWAY_RATES=...``
  sweeps only the rates it lists; quick: two small rates for 3 s), per side:
  delivered msgs/s, publish→receive latency p50/p95/p99/p99.9/max, loss (sent - distinct
  received, after a bounded drain) and repeats, server CPU from ``/proc/<pid>/stat`` utime+stime
  over the step (also Redis's and the client process's, to see who saturates first);
* the highest offered rate with p99 < 50 ms and ≥ 99 % delivered, per side, and the ratio
  ours ÷ peer, and messages delivered per second of server CPU (which holds up better than the
  latency bound on a busy machine) and its ratio. The machine may be shared: before each step the
  bench waits (bounded) until other work uses < 0.3 cores, measures the other work during the
  step (machine busy time from ``/proc/stat`` minus the bench's own processes), and in a full run
  repeats a step (up to 4 runs) that other work disturbed or that missed the bound, until it has
  a clean run within the bound or three clean runs over it; the best clean run counts, all are
  kept. A side stops after two consecutive rates over the bound.

Writes ``gateway.png`` (throughput, latency percentiles and server CPU against offered rate) into
the run's folder. Every process started here is stopped by pid, also on error.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.context import BenchContext
from bench.processes import free_port, wait_http

__all__ = ["run"]

#: The latency bound a rate must meet (p99, ms) and the share that must arrive.
P99_BOUND_MS = 50.0
MIN_DELIVERED = 0.99
#: A rate is over the bound for a side once this many runs undisturbed by other work missed it
#: (full mode; at most ``max_runs`` runs). Both servers are Python processes whose garbage
#: collections stall them now and then (the peer's full collections take 0.3-0.7 s with 5,000
#: connections), so one unlucky run must not decide a side's limit.
CLEAN_RUNS_OVER = 3
PLOT = "gateway.png"


@dataclass(frozen=True)
class GatewayPlan:
    clients: int
    rates: tuple[int, ...]
    extra_rates: tuple[int, ...]
    step_s: float
    warmup_rate: int
    warmup_s: float
    drain_s: float  # at most this long after the publisher ends, waiting for deliveries
    stall_s: float  # ... or until nothing new arrived for this long
    connect_timeout_s: float
    settle_s: float
    max_runs: (
        int  # runs of one step at most: a run spoiled by other work, or over the bound, is repeated
    )
    quiet_cores: float  # before a step, wait until other work uses less than this many cores
    quiet_wait_s: float  # ... for at most this long per step
    quiet_budget_s: float  # ... and this long over one side's sweep


def plan_for(quick: bool, rates: tuple[int, ...] | None = None) -> GatewayPlan:
    """The preset for ``--quick`` or a full run; ``rates`` (``FEED_BENCH_GATEWAY_RATES``, through
    :class:`bench.options.BenchOptions`) sweeps only these offered rates (msg/s)."""
    plan = _default_plan(quick)
    if rates is not None:
        plan = replace(plan, rates=rates, extra_rates=())
    return plan


def _default_plan(quick: bool) -> GatewayPlan:
    if quick:
        return GatewayPlan(
            clients=200,
            rates=(200, 600),
            extra_rates=(),
            step_s=3.0,
            warmup_rate=100,
            warmup_s=1.0,
            drain_s=3.0,
            stall_s=1.0,
            connect_timeout_s=60.0,
            settle_s=0.5,
            max_runs=1,
            quiet_cores=0.3,
            quiet_wait_s=3.0,
            quiet_budget_s=10.0,
        )
    return GatewayPlan(
        clients=5000,
        rates=(1000, 2000, 3000, 4000, 5000, 6000, 8000, 10000, 12000, 14000, 16000),
        extra_rates=(18000, 20000, 24000),
        step_s=10.0,
        warmup_rate=500,
        warmup_s=3.0,
        drain_s=20.0,
        stall_s=2.0,
        connect_timeout_s=240.0,
        settle_s=3.0,
        max_runs=4,
        quiet_cores=0.3,
        quiet_wait_s=90.0,
        quiet_budget_s=480.0,
    )


# --- /proc -------------------------------------------------------------------------------------
def proc_rss(pid: int) -> int | None:
    """VmRSS of ``pid`` in bytes (``/proc/<pid>/status``)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def proc_cpu(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds (``/proc/<pid>/stat``)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_sched(pid: int) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for one) of ``pid``, all threads
    (``/proc/<pid>/task/*/schedstat``)."""
    on_cpu = waiting = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as handle:
                run_ns, wait_ns, _slices = handle.read().split()
        except (OSError, ValueError):
            continue
        on_cpu += int(run_ns)
        waiting += int(wait_ns)
    return on_cpu / 1e9, waiting / 1e9


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy so far (``/proc/stat``, all cores)."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal ...
    ticks = [int(x) for x in fields[1:9]]
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]
    return busy / os.sysconf("SC_CLK_TCK")


class Quiet:
    """The machine is shared: measure how much CPU work *other* than the bench's own processes
    uses (machine busy time minus the bench's processes), and wait (bounded) for a quiet moment
    before each step, so that other people's builds do not decide the figures."""

    def __init__(self, gp: GatewayPlan, pids: list[int]) -> None:
        self.gp = gp
        self.pids = [os.getpid(), *pids]
        self.budget = gp.quiet_budget_s
        self.waited_total = 0.0

    def own_cpu(self) -> float:
        return sum(c for c in (proc_cpu(p) for p in self.pids) if c is not None)

    def sample(self, seconds: float) -> float | None:
        m0, o0 = machine_busy_s(), self.own_cpu()
        time.sleep(seconds)
        m1, o1 = machine_busy_s(), self.own_cpu()
        if m0 is None or m1 is None:
            return None
        return max(0.0, (m1 - m0) - (o1 - o0)) / seconds

    def wait(self) -> dict[str, Any]:
        started = time.monotonic()
        limit = min(self.gp.quiet_wait_s, max(0.0, self.budget))
        quiet_in_a_row = 0
        others = None
        while True:
            others = self.sample(0.5)
            if others is None:
                break
            quiet_in_a_row = quiet_in_a_row + 1 if others < self.gp.quiet_cores else 0
            if quiet_in_a_row >= 2 or time.monotonic() - started >= limit:
                break
        waited = time.monotonic() - started
        self.budget -= waited
        self.waited_total += waited
        return {"waited_s": waited, "others_cores_before": others}


# --- one side ----------------------------------------------------------------------------------
@dataclass
class Side:
    key: str  # "ours" | "peer"
    label: str
    kind: str  # ws_clients --kind
    server: Any = None
    server_port: int = 0
    clients: Any = None
    control_port: int = 0
    users_file: Path | None = None
    rss_before: int | None = None
    rss_after: int | None = None
    #: The server's garbage collections (ours from /metrics, the peer's from its harness's /gc):
    #: after start, after connect, after the sweep.
    gc: dict[str, dict[str, float] | None] = field(default_factory=dict)
    connected: int = 0
    connect_seconds: float | None = None
    connect_info: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    failures_in_a_row: int = 0
    stopped: str | None = None  # why the sweep stopped for this side
    error: str | None = None

    @property
    def active(self) -> bool:
        return self.error is None and self.stopped is None


def _get_json(url: str, timeout: float = 10.0, data: bytes | None = None) -> dict[str, Any]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def _tail(path: Path, chars: int = 800) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


def _start_ours(ctx: BenchContext, side: Side) -> None:
    side.server_port = free_port()
    env = dict(ctx.env)
    env.update(
        FEED_GATEWAY_HOST="127.0.0.1",
        FEED_GATEWAY_PORT=str(side.server_port),
        # The workload reads nothing from history: no Cassandra in the gateway.
        FEED_FANOUT_HISTORY="false",
        FEED_LOG_LEVEL="warning",
        # Every bench client connects from 127.0.0.1: the per-IP and per-user connect limits
        # (abuse protection) would throttle the set-up, not measure the gateway.
        FEED_CONNECT_IP_RATE="0",
        FEED_CONNECT_RATE="0",
    )
    log = ctx.logs_dir() / "gateway-bench-ours.log"
    side.server = ctx.children.feed(["gateway"], env=env, log=log)
    if not wait_http(f"http://127.0.0.1:{side.server_port}/healthz", 60, side.server):
        raise RuntimeError(
            f"feed gateway did not answer /healthz within 60 s (exit {side.server.poll()}): "
            f"{_tail(log)}"
        )


def _start_peer(ctx: BenchContext, side: Side) -> None:
    side.server_port = free_port()
    log = ctx.logs_dir() / "gateway-bench-socketio.log"
    side.server = ctx.children.spawn(
        [
            sys.executable,
            "-m",
            "bench.peer_socketio",
            "--port",
            str(side.server_port),
            "--redis-url",
            ctx.settings.redis_url,
        ],
        env=dict(ctx.env),
        log=log,
    )
    if not wait_http(f"http://127.0.0.1:{side.server_port}/healthz", 60, side.server):
        raise RuntimeError(
            f"the python-socketio peer did not start (exit {side.server.poll()}): {_tail(log)}"
        )


def _connect_clients(ctx: BenchContext, side: Side, gp: GatewayPlan) -> None:
    side.control_port = free_port()
    if side.key == "ours":
        url = f"ws://127.0.0.1:{side.server_port}/v1/stream"
    else:
        url = f"ws://127.0.0.1:{side.server_port}/socket.io/?EIO=4&transport=websocket"
    log = ctx.logs_dir() / f"gateway-bench-clients-{side.key}.log"
    side.clients = ctx.children.spawn(
        [
            sys.executable,
            "-m",
            "bench.ws_clients",
            "clients",
            "--kind",
            side.kind,
            "--url",
            url,
            "--prefix",
            "bench-u",
            "--count",
            str(gp.clients),
            "--control-port",
            str(side.control_port),
            "--concurrency",
            "100",
            "--max-seconds",
            "7200",
        ],
        env=dict(ctx.env),
        log=log,
    )
    control = f"http://127.0.0.1:{side.control_port}"
    started = time.monotonic()
    deadline = started + gp.connect_timeout_s
    status: dict[str, Any] = {}
    with ctx.task(f"gateway: connect {gp.clients:,} clients to {side.label}", gp.clients) as update:
        while time.monotonic() < deadline:
            if side.clients.poll() is not None:
                raise RuntimeError(f"the client process exited: {_tail(log)}")
            try:
                status = _get_json(f"{control}/status", timeout=5)
            except (OSError, urllib.error.URLError, ValueError):
                time.sleep(0.2)
                continue
            update(completed=status["connected"])
            if status["connected"] + status["failed"] >= gp.clients:
                break
            time.sleep(0.2)
    side.connected = int(status.get("connected", 0))
    side.connect_info = {
        k: status.get(k) for k in ("attempted", "failed", "retries", "refusals", "failures")
    }
    side.connect_seconds = status.get("connect_seconds") or (time.monotonic() - started)
    if side.connected == 0:
        raise RuntimeError(f"no client connected to {side.label}: {status.get('failures')}")
    if side.connected < gp.clients:
        ctx.error(
            f"gateway/{side.key}",
            f"{gp.clients - side.connected} of {gp.clients} clients did not connect: "
            f"{status.get('failures')}",
        )
    users = _get_json(f"{control}/status?users=1", timeout=10)["connected_users"]
    side.users_file = ctx.outdir / "logs" / f"gateway-bench-users-{side.key}.json"
    side.users_file.write_text(json.dumps(users))


def _measure_rss_after(side: Side, gp: GatewayPlan) -> None:
    time.sleep(gp.settle_s)  # let connection set-up finish (idle afterwards)
    side.rss_after = proc_rss(side.server.pid)
    _record_gc(side, "connected")


_GC_SERIES = re.compile(
    r"^feed_gateway_gc_(pause_seconds_count|pause_seconds_sum|longest_pause_seconds)"
    r'\{generation="(\d)"\} (\S+)$',
    re.MULTILINE,
)


def gc_stats(text: str) -> dict[str, float] | None:
    """``count_<g>``, ``sum_<g>`` and ``longest_<g>`` (seconds) of the gateway's garbage
    collections per generation ``g``, from its ``/metrics`` text (None without them)."""
    names = {
        "pause_seconds_count": "count",
        "pause_seconds_sum": "sum",
        "longest_pause_seconds": "longest",
    }
    found = {f"{names[n]}_{g}": float(v) for n, g, v in _GC_SERIES.findall(text)}
    return found or None


def _record_gc(side: Side, when: str) -> None:
    """The server's garbage collections so far: ours from ``/metrics``, the peer's from the
    ``/gc`` of its harness (:mod:`bench.peer_socketio`)."""
    if not side.server_port:
        return
    try:
        if side.key == "ours":
            url = f"http://127.0.0.1:{side.server_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                side.gc[when] = gc_stats(response.read().decode())
        else:
            side.gc[when] = {
                k: float(v) for k, v in _get_json(f"http://127.0.0.1:{side.server_port}/gc").items()
            }
    except (OSError, urllib.error.URLError, ValueError):
        side.gc[when] = None


def _redis_cpu(ctx: BenchContext) -> float | None:
    """CPU seconds of every Redis server that takes writes (each primary of a cluster)."""
    try:
        return sum(ctx.redis_cpu())
    except Exception:
        return None


def redis_pids(redis: Any) -> list[int]:
    """The pids of the stack's Redis servers: one Redis's, or every node's of a cluster
    (``infra.RedisCluster.nodes``). Their CPU is the bench's own work, not other work."""
    servers = getattr(redis, "nodes", None) or ([redis] if redis is not None else [])
    return [pid for pid in (getattr(s, "pid", None) for s in servers) if isinstance(pid, int)]


def _step(
    ctx: BenchContext,
    side: Side,
    gp: GatewayPlan,
    number: int,
    rate: int,
    seconds: float,
    quiet: Quiet,
) -> dict[str, Any]:
    assert side.users_file is not None
    control = f"http://127.0.0.1:{side.control_port}"
    out_file = ctx.outdir / "logs" / f"gateway-bench-publish-{side.key}-{number}.json"
    log = ctx.logs_dir() / f"gateway-bench-publish-{side.key}.log"
    argv = [
        sys.executable,
        "-m",
        "bench.ws_clients",
        "publish",
        "--kind",
        side.kind,
        "--redis-url",
        ctx.settings.redis_url,
        "--users-file",
        str(side.users_file),
        "--rate",
        str(rate),
        "--seconds",
        str(seconds),
        "--step",
        str(number),
        "--seed",
        str(1000 + number),
        "--timeline-max",
        str(ctx.settings.timeline_max),
        "--stream-history",
        str(ctx.settings.stream_history),
        *(["--trace-share", str(ctx.options.tracing)] if ctx.options.tracing else []),
        *(["--redis-cluster"] if ctx.options.redis_cluster else []),
    ]
    burn_cores = rate * ctx.options.gateway_burn_us / 1e6 if ctx.options.gateway_burn_us else 0.0
    waited = quiet.wait()
    sched0 = proc_sched(side.server.pid)
    server_cpu0 = proc_cpu(side.server.pid)
    clients_cpu0 = proc_cpu(side.clients.pid)
    redis_cpu0 = _redis_cpu(ctx)
    machine0, own0 = machine_busy_s(), quiet.own_cpu()
    wall0 = time.time()
    burn_file = out_file.with_suffix(".burn.json")
    with out_file.open("wb") as stdout, burn_file.open("wb") as burn_out:
        burner = None
        if burn_cores > 0:
            burn_argv = [sys.executable, "-m", "bench.ws_clients", "burn"]
            burn_argv += ["--cores", f"{burn_cores:.4f}", "--seconds", str(seconds)]
            burner = ctx.children.spawn(
                burn_argv, env=dict(ctx.env), log=log, stdout=burn_out.fileno()
            )
        publisher = ctx.children.spawn(argv, env=dict(ctx.env), log=log, stdout=stdout.fileno())
        try:
            publisher.wait(timeout=seconds + 60)
            if burner is not None:
                burner.wait(timeout=seconds + 60)
        except Exception:
            for child in (publisher, burner):
                if child is not None:
                    ctx.children.stop(child, timeout=5)
            raise RuntimeError(f"the publisher did not finish within {seconds + 60:.0f}s") from None
        for child in (publisher, burner):
            if child is not None:
                ctx.children.stop(child, timeout=5)
    burned = _burned(burn_file) if burner is not None else None
    lines = [line for line in out_file.read_text().splitlines() if line.strip()]
    if publisher.returncode != 0 or not lines:
        raise RuntimeError(f"the publisher failed ({publisher.returncode}): {_tail(log)}")
    published = json.loads(lines[-1])
    sent = int(published["sent"])
    publish_end = time.monotonic()
    # Drain: until everything sent arrived, nothing new came for stall_s, or drain_s passed.
    summary: dict[str, Any] = {}
    last_unique, last_change = -1, time.monotonic()
    while True:
        summary = _get_json(f"{control}/step?step={number}", timeout=30)
        now = time.monotonic()
        unique = int(summary.get("unique", 0))
        if unique != last_unique:
            last_unique, last_change = unique, now
        if unique >= sent or now - last_change >= gp.stall_s or now - publish_end >= gp.drain_s:
            break
        time.sleep(0.1)
    drain_seconds = time.monotonic() - publish_end
    status = _get_json(f"{control}/status", timeout=30)
    server_cpu1 = proc_cpu(side.server.pid)
    sched1 = proc_sched(side.server.pid)
    clients_cpu1 = proc_cpu(side.clients.pid)
    redis_cpu1 = _redis_cpu(ctx)
    machine1, own1 = machine_busy_s(), quiet.own_cpu()
    elapsed = time.time() - wall0
    others = None
    if machine0 is not None and machine1 is not None:
        own = (own1 - own0) + float(published.get("cpu_s") or 0.0)
        own += float((burned or {}).get("cpu_s") or 0.0)
        others = max(0.0, (machine1 - machine0) - own) / elapsed if elapsed > 0 else None
    window = float(published["seconds"]) + drain_seconds
    unique = int(summary.get("unique", 0))
    # The clients keep nothing about a finished step (memory stays flat over the sweep).
    summary = _get_json(f"{control}/step?step={number}&forget=1&since={wall0}", timeout=30)
    first_sent = float(published.get("started_wall") or wall0)
    last_receive = summary.get("last_receive")
    span = (last_receive - first_sent) if last_receive else None
    server_cpu = _delta(server_cpu0, server_cpu1)
    clients_cpu = _delta(clients_cpu0, clients_cpu1)
    redis_cpu = _delta(redis_cpu0, redis_cpu1)
    latency = summary.get("latency_ms") or {}
    lost = max(0, sent - unique)
    delivered_share = unique / sent if sent else None
    p99 = latency.get("p99")
    ok = (
        isinstance(p99, (int, float))
        and p99 < P99_BOUND_MS
        and delivered_share is not None
        and delivered_share >= MIN_DELIVERED
    )
    return {
        "step": number,
        "offered_rate": rate,
        "publish_rate": published.get("achieved_rate"),
        "publish_seconds": published.get("seconds"),
        "publisher_cpu_s": published.get("cpu_s"),
        # FEED_BENCH_GATEWAY_BURN_US: the cores the burner was asked for, and those it used
        "burn_cores_asked": burn_cores or None,
        "burn_cores": (
            float(burned["cpu_s"]) / float(burned["seconds"])
            if burned and burned.get("seconds")
            else None
        ),
        "sent": sent,
        "pushed_by_redis": published.get("pushed"),
        "received": summary.get("received", 0),
        "unique": unique,
        "duplicates": summary.get("duplicates", 0),
        "lost": lost,
        "loss_ratio": lost / sent if sent else None,
        "delivered_per_s": unique / span if span and span > 0 else None,
        "latency_ms": latency,
        "drain_seconds": drain_seconds,
        "window_s": window,
        "server_cpu_s": server_cpu,
        "server_cores": server_cpu / window if server_cpu is not None and window else None,
        "server_cpu_us_per_msg": server_cpu / unique * 1e6 if server_cpu and unique else None,
        "clients_cores": clients_cpu / window if clients_cpu is not None and window else None,
        "redis_cores": redis_cpu / window if redis_cpu is not None and window else None,
        "redis_cpu_us_per_msg": redis_cpu / sent * 1e6 if redis_cpu and sent else None,
        "server_rss_mb": (proc_rss(side.server.pid) or 0) / 2**20,
        # Time the server was runnable but waited for a CPU: how much the machine's other work
        # (and the bench's own processes) held it back during the step.
        "server_runqueue_wait_share": (
            (sched1[1] - sched0[1]) / elapsed if sched0 and sched1 and elapsed > 0 else None
        ),
        "client_stalls": summary.get("client_stalls"),
        "client_stall_max_ms": summary.get("client_stall_max_ms"),
        "load_average_1m": os.getloadavg()[0],
        "others_cores": others,
        "clean": others is None or others <= gp.quiet_cores,
        "others_cores_before": waited["others_cores_before"],
        "quiet_wait_s": waited["waited_s"],
        "connected_after": status.get("connected"),
        "closes_so_far": status.get("closes"),
        "within_bound": ok,
    }


def _burned(path: Path) -> dict[str, Any] | None:
    """The burner's report (``ws_clients burn``), or None if it wrote none."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def _delta(a: float | None, b: float | None) -> float | None:
    return (b - a) if a is not None and b is not None else None


# --- the scenario ------------------------------------------------------------------------------
def run(ctx: BenchContext) -> dict[str, Any]:
    from bench.peer_socketio import raise_nofile

    nofile = raise_nofile()
    gp = plan_for(ctx.plan.quick, ctx.options.gateway_rates)
    result: dict[str, Any] = {
        "status": "ok",
        "clients": gp.clients,
        "step_seconds": gp.step_s,
        "config": (
            "both servers: uvicorn, one process, ws=websockets-sansio (ours: its lean "
            "subclass, gateway.websocket), no permessage-deflate "
            "(clients do not offer it); ours: feed gateway, frames published by the fan-out Lua "
            "script (timeline + delivery stream + PUBLISH per user); peer: python-socketio "
            "AsyncServer + AsyncRedisManager, room per user, emits via "
            "AsyncRedisManager(write_only=True); ~300-byte payload; clients (aiohttp) and "
            "publisher in separate processes; all on 127.0.0.1"
        ),
        "bound": f"p99 < {P99_BOUND_MS:g} ms and >= {MIN_DELIVERED:.0%} delivered",
        "nofile_limit": nofile,
    }
    if ctx.options.gateway_burn_us:
        result["burn_us_per_msg"] = ctx.options.gateway_burn_us
    sides = [Side("ours", "feed gateway", "ours")]
    peer_note = None
    if ctx.skip_peers:
        peer_note = "skipped (FEED_BENCH_SKIP_PEERS=1)"
    elif ctx.options.redis_cluster:
        peer_note = "skipped on a Redis Cluster (python-socketio's Redis manager is not sharded)"
    else:
        try:
            import socketio  # noqa: F401
        except ImportError as exc:
            peer_note = f"python-socketio is not installed ({exc})"
    if peer_note is None:
        sides.append(Side("peer", "python-socketio", "socketio"))
    else:
        result["peer_status"] = peer_note
    only = ctx.options.gateway_sides
    if only:  # e.g. "peer": measure only that side (a diagnostic; the ratio needs both)
        sides = [side for side in sides if side.key in only]
        result["sides_measured"] = [side.key for side in sides]
    started = time.monotonic()
    waited = 0.0
    # One side at a time: a side's server and clients run only during its own measurements, so
    # the side being measured has the machine to itself (an idle server with 5,000 connections,
    # and its clients, still cost the shared cores: pings, timers, GC).
    for side in sides:
        try:
            waited += _measure_side(ctx, side, gp)
        except Exception as exc:
            side.error = f"{type(exc).__name__}: {exc}"
            ctx.error(f"gateway/{side.key}", side.error)
        finally:
            _stop(ctx, [side])
    result["waited_for_quiet_s"] = round(waited, 1)
    if sides and sides[0].key == "ours" and sides[0].error is not None:
        result["status"] = "failed"
        result["error"] = sides[0].error
    result["seconds"] = time.monotonic() - started
    _summarise(ctx, result, sides, gp)
    try:
        result["plot"] = str(_plot(ctx.outdir / PLOT, sides, gp))
    except Exception as exc:
        ctx.error("gateway plot", exc)
    if result["status"] == "ok" and any(s.error for s in sides):
        result["status"] = "partial"
    return result


def _measure_side(ctx: BenchContext, side: Side, gp: GatewayPlan) -> float:
    """Start one side, connect its clients, measure its memory and sweep its rates: the seconds
    it waited for a quiet machine. The caller stops it."""
    with ctx.task(f"gateway: start {side.label}", None):
        (_start_ours if side.key == "ours" else _start_peer)(ctx, side)
    time.sleep(1.0)
    side.rss_before = proc_rss(side.server.pid)
    _record_gc(side, "started")
    _connect_clients(ctx, side, gp)
    _measure_rss_after(side, gp)
    quiet = _sweep(ctx, side, gp)
    _record_gc(side, "swept")
    return quiet.waited_total


def _sweep(ctx: BenchContext, side: Side, gp: GatewayPlan) -> Quiet:
    """Offer ``side`` each rate in turn (repeating disturbed or failed runs, see the module doc)
    until it fails two rates in a row or the rates run out."""
    pids = [p.pid for p in (side.server, side.clients) if p is not None]
    pids += redis_pids(getattr(ctx.stack, "redis", None))
    quiet = Quiet(gp, pids)
    # Warm-up (not reported): the first messages through a server pay for lazy set-up.
    number = 1
    try:
        _step(ctx, side, gp, number, gp.warmup_rate, gp.warmup_s, quiet)
    except Exception as exc:
        side.error = f"warm-up: {type(exc).__name__}: {exc}"
        ctx.error(f"gateway/{side.key}", side.error)
        return quiet
    rates = list(gp.rates)
    extra = list(gp.extra_rates)
    with ctx.task(f"gateway: {side.label}, offered-rate sweep (steps)", len(rates)) as update:
        index = 0
        while index < len(rates) and side.active:
            rate = rates[index]
            index += 1
            if side.server.poll() is not None:
                side.error = f"the server exited ({side.server.returncode})"
                ctx.error(f"gateway/{side.key}", side.error)
                break
            try:
                runs: list[dict[str, Any]] = []
                for _run in range(gp.max_runs):
                    number += 1
                    step = _step(ctx, side, gp, number, rate, gp.step_s, quiet)
                    _log_step(ctx, side, step)
                    runs.append(step)
                    if step["clean"] and step["within_bound"]:
                        break
                    clean_runs = sum(1 for r in runs if r["clean"])
                    if clean_runs >= CLEAN_RUNS_OVER or quiet.budget <= 0:
                        break
                step = _choose(runs)
            except Exception as exc:
                side.error = f"step at {rate}/s: {type(exc).__name__}: {exc}"
                ctx.error(f"gateway/{side.key}", side.error)
                break
            side.steps.append(step)
            if step["within_bound"]:
                side.failures_in_a_row = 0
            else:
                side.failures_in_a_row += 1
                if side.failures_in_a_row >= 2:
                    side.stopped = f"over the bound at two rates in a row (last {rate}/s)"
            update(advance=1)
            # Extend the sweep while the side still meets the bound at the top rate.
            if index == len(rates) and extra and step["within_bound"]:
                rates.append(extra.pop(0))
                update(total=len(rates))
    if side.active:
        side.stopped = "end of the rate list"
    return quiet


def _choose(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of a step that counts: a clean one (little other work on the machine) first,
    then one within the bound, then the lowest p99. The others are kept beside it."""

    def rank(step: dict[str, Any]) -> tuple[int, int, float]:
        p99 = (step.get("latency_ms") or {}).get("p99")
        return (
            0 if step["clean"] else 1,
            0 if step["within_bound"] else 1,
            p99 if isinstance(p99, (int, float)) else 1e12,
        )

    ordered = sorted(runs, key=rank)
    kept = dict(ordered[0])
    kept["runs"] = len(runs)
    kept["other_runs"] = ordered[1:]
    return kept


def _log_step(ctx: BenchContext, side: Side, s: dict[str, Any]) -> None:
    lat = s.get("latency_ms") or {}
    ctx.log(
        f"gateway/{side.key} {s['offered_rate']:>6,}/s: delivered "
        f"{_fmt(s.get('delivered_per_s'))}/s, p50 {_fmt(lat.get('p50'), 1)} p99 "
        f"{_fmt(lat.get('p99'), 1)} p99.9 {_fmt(lat.get('p999'), 1)} max {_fmt(lat.get('max'), 1)}"
        f" ms, lost {s['lost']}, server {_fmt(s.get('server_cores'), 2)} cores, clients "
        f"{_fmt(s.get('clients_cores'), 2)}, redis {_fmt(s.get('redis_cores'), 2)}, publisher "
        f"{_fmt((s.get('publisher_cpu_s') or 0) / (s.get('publish_seconds') or 1), 2)}, burner "
        f"{_fmt(s.get('burn_cores'), 2)}, other work "
        f"{_fmt(s.get('others_cores'), 2)}, server waited for a CPU "
        f"{_fmt((s.get('server_runqueue_wait_share') or 0) * 100)} % of the step"
    )


def _fmt(value: Any, digits: int = 0) -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _stop(ctx: BenchContext, sides: list[Side]) -> None:
    for side in sides:
        if side.clients is not None and side.clients.poll() is None:
            try:
                _get_json(f"http://127.0.0.1:{side.control_port}/quit", timeout=5, data=b"")
                side.clients.wait(timeout=15)
            except Exception:
                pass
        if side.clients is not None:
            ctx.children.stop(side.clients, timeout=10)
    for side in sides:
        if side.server is not None:
            ctx.children.stop(side.server, timeout=20)


def _best(side: Side) -> dict[str, Any] | None:
    passing = [s for s in side.steps if s["within_bound"]]
    return max(passing, key=lambda s: s["offered_rate"]) if passing else None


def _summarise(
    ctx: BenchContext, result: dict[str, Any], sides: list[Side], gp: GatewayPlan
) -> None:
    detail: dict[str, Any] = {}
    best_rate: dict[str, float | None] = {}
    for side in sides:
        per_conn = None
        if side.rss_before is not None and side.rss_after is not None and side.connected:
            per_conn = (side.rss_after - side.rss_before) / side.connected
        best = _best(side)
        best_rate[side.key] = float(best["offered_rate"]) if best else None
        # Loss below saturation: every step that met the latency bound.
        below = [s for s in side.steps if s["within_bound"]]
        tested = [s["offered_rate"] for s in side.steps]
        detail[side.key] = {
            "label": side.label,
            "connected": side.connected,
            "connect_seconds": side.connect_seconds,
            "connect": side.connect_info,
            "rss_before_mb": (side.rss_before or 0) / 2**20,
            "rss_after_mb": (side.rss_after or 0) / 2**20,
            "rss_per_connection_kb": per_conn / 1024 if per_conn is not None else None,
            "best": best,
            "best_rate": best_rate[side.key],
            "best_is_top_of_sweep": bool(best and tested and best["offered_rate"] == max(tested)),
            "loss_below_saturation": sum(s["lost"] for s in below),
            "sent_below_saturation": sum(s["sent"] for s in below),
            "duplicates": sum(s["duplicates"] for s in side.steps),
            "stopped": side.stopped,
            "error": side.error,
            "steps": side.steps,
        }
        prefix = "ours" if side.key == "ours" else "peer"
        result[f"{prefix}_max_rate_within_bound"] = best_rate[side.key]
        result[f"{prefix}_rss_kb_per_connection"] = (
            round(per_conn / 1024, 1) if per_conn is not None else None
        )
        if best:
            result[f"{prefix}_at_best_server_cpu_us_per_msg"] = _round(
                best.get("server_cpu_us_per_msg"), 1
            )
            result[f"{prefix}_at_best_server_cores"] = _round(best.get("server_cores"), 2)
            result[f"{prefix}_at_best_p99_ms"] = _round(best["latency_ms"].get("p99"), 1)
        if side.gc:
            detail[side.key]["gc"] = side.gc
            result.update(_gc_summary(prefix, side.gc))
        result[f"{prefix}_loss_below_saturation"] = detail[side.key]["loss_below_saturation"]
        result[f"{prefix}_connected"] = side.connected
        result[f"{prefix}_connect_seconds"] = _round(side.connect_seconds, 1)
        result[f"{prefix}_connect_retries"] = side.connect_info.get("retries")
        if side.error:
            result[f"{prefix}_error"] = side.error
        for s in side.steps:
            lat = s.get("latency_ms") or {}
            result[f"{prefix} @ {s['offered_rate']:,}/s"] = (
                f"delivered {_fmt(s.get('delivered_per_s'))}/s; latency p50 "
                f"{_fmt(lat.get('p50'), 1)} / p95 {_fmt(lat.get('p95'), 1)} / p99 "
                f"{_fmt(lat.get('p99'), 1)} / p99.9 {_fmt(lat.get('p999'), 1)} / max "
                f"{_fmt(lat.get('max'), 1)} ms; lost {s['lost']:,} of {s['sent']:,}; repeats "
                f"{s['duplicates']}; server {_fmt(s.get('server_cores'), 2)} cores "
                f"({_fmt(s.get('server_cpu_us_per_msg'))} µs/msg); redis "
                f"{_fmt(s.get('redis_cores'), 2)} cores; clients {_fmt(s.get('clients_cores'), 2)}"
                f" cores; other work on the machine {_fmt(s.get('others_cores'), 2)} cores; "
                f"server waited for a CPU "
                f"{_fmt((s.get('server_runqueue_wait_share') or 0) * 100)} % of the time"
                + (f"; best of {s['runs']} runs" if s.get("runs", 1) > 1 else "")
                + ("" if s.get("clean", True) else "; every run disturbed by other work")
                + ("" if s["within_bound"] else "; **over the bound**")
            )
    ours, peer = best_rate.get("ours"), best_rate.get("peer")
    result["ratio_ours_to_peer"] = (ours / peer) if ours and peer else None
    # Work per message does not depend on how much CPU the scheduler gave the server, so it
    # holds up on a busy machine where the latency bound does not: messages delivered per
    # second of server CPU (median over the steps), and the ratio of the two sides.
    per_core: dict[str, float | None] = {}
    for side in sides:
        values = sorted(
            s["unique"] / s["server_cpu_s"]
            for s in side.steps
            if s.get("server_cpu_s") and s["server_cpu_s"] > 0 and s["unique"]
        )
        per_core[side.key] = values[len(values) // 2] if values else None
        detail[side.key]["msgs_per_server_cpu_s"] = per_core[side.key]
        prefix = "ours" if side.key == "ours" else "peer"
        result[f"{prefix}_msgs_per_server_cpu_s"] = _round(per_core[side.key], 0)
    ours_core, peer_core = per_core.get("ours"), per_core.get("peer")
    if ours_core and peer_core:
        result["ratio_msgs_per_cpu_s_ours_to_peer"] = round(ours_core / peer_core, 2)
    if ours and not peer and "peer" in best_rate:
        result["ratio_note"] = "the peer met the bound at no tested rate"
    if detail.get("ours", {}).get("best_is_top_of_sweep"):
        result["ours_note"] = "ours met the bound at the top tested rate: its maximum is higher"
    if ours_core:
        # For the capacity model (feed bench --model): frames pushed per gateway CPU second.
        result["gateway_deliveries_per_core"] = ours_core
    result["sides"] = detail


def _gc_summary(prefix: str, gc: dict[str, dict[str, float] | None]) -> dict[str, Any]:
    """Full collections (generation 2) while the clients connected and during the sweep, and
    the longest pause of any collection since the server started."""
    out: dict[str, Any] = {}
    phases = (("connecting", "started", "connected"), ("sweep", "connected", "swept"))
    for name, start, end in phases:
        a, b = gc.get(start), gc.get(end)
        if not a or not b:
            continue
        count = b.get("count_2", 0.0) - a.get("count_2", 0.0)
        total = b.get("sum_2", 0.0) - a.get("sum_2", 0.0)
        out[f"{prefix}_gc_full_collections_{name}"] = int(count)
        out[f"{prefix}_gc_full_pause_ms_{name}"] = round(total * 1000, 1)
    last = gc.get("swept") or gc.get("connected")
    if last:
        out[f"{prefix}_gc_longest_pause"] = ", ".join(
            f"generation {g}: {last.get(f'longest_{g}', 0.0) * 1000:.1f} ms" for g in "012"
        )
    return out


def _round(value: Any, digits: int) -> Any:
    return round(value, digits) if isinstance(value, (int, float)) else None


# --- plot ----------------------------------------------------------------------------------------
def _plot(path: Path, sides: list[Side], gp: GatewayPlan) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    colours = {"ours": "tab:blue", "peer": "tab:orange"}
    top = 0.0
    for side in sides:
        steps = side.steps
        if not steps:
            continue
        x = [s["offered_rate"] for s in steps]
        top = max(top, *x)
        colour = colours[side.key]
        axes[0].plot(
            x, [s.get("delivered_per_s") or 0 for s in steps], "o-", color=colour, label=side.label
        )
        for key, style, name in (("p50", ":", "p50"), ("p99", "-", "p99"), ("p999", "--", "p99.9")):
            axes[1].plot(
                x,
                [max(0.01, (s.get("latency_ms") or {}).get(key) or math.nan) for s in steps],
                style,
                marker="o",
                markersize=3,
                color=colour,
                label=f"{side.label} {name}",
            )
        axes[2].plot(
            x,
            [s.get("server_cores") or 0 for s in steps],
            "o-",
            color=colour,
            label=f"{side.label} server",
        )
    if top:
        axes[0].plot([0, top], [0, top], ":", color="grey", label="delivered = offered")
    axes[0].set_title(f"delivered vs offered ({gp.clients:,} connections)")
    axes[0].set_xlabel("offered msg/s")
    axes[0].set_ylabel("delivered msg/s")
    axes[0].legend(fontsize=8)
    axes[1].axhline(P99_BOUND_MS, color="red", linewidth=0.8, label=f"{P99_BOUND_MS:g} ms bound")
    axes[1].set_yscale("log")
    axes[1].set_title("publish → client receive latency")
    axes[1].set_xlabel("offered msg/s")
    axes[1].set_ylabel("ms (log)")
    axes[1].legend(fontsize=7)
    axes[2].axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    axes[2].set_title("server CPU (cores, /proc utime+stime)")
    axes[2].set_xlabel("offered msg/s")
    axes[2].set_ylabel("cores")
    axes[2].legend(fontsize=8)
    if not any(side.steps for side in sides):
        for ax in axes:
            ax.text(
                0.5,
                0.5,
                "no steps measured",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="grey",
            )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
