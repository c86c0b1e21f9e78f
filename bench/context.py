"""What every scenario shares: the plan (sizes), the switches, the running stack, clients,
children, results."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.options import BenchOptions
from bench.processes import Children
from feed.settings import Settings

__all__ = ["BenchContext", "Plan", "plan_for"]


@dataclass(frozen=True)
class Plan:
    """Sizes of one run. ``plan_for(quick, options)`` gives the two presets (and overrides)."""

    quick: bool
    # graphs
    uniform_users: int
    uniform_followers: int
    skewed_users: int
    skewed_top: int
    skewed_exponent: float
    skewed_min: int
    skewed_hot_threshold: int
    skewed_hot_posts: int
    # fan-out backlogs (activities)
    backlog: int
    backlog_skewed: int
    backlog_history: int
    # peers (activities timed through add_user_activity)
    peer_activities_uniform: int
    peer_activities_skewed: int
    peer_timeout_s: float
    peer_install_timeout_s: float
    # offered-rate sweep: fractions of the measured drain rate, seconds per step
    sweep_fractions: tuple[float, ...]
    sweep_step_s: float
    # memory soak: one worker at half its drain rate; RSS sampled every soak_sample_s
    soak_s: float
    soak_sample_s: float
    # ceilings
    redis_benchmark_requests: int
    cassandra_ceiling_rows: int
    # e2e: the offered rates swept (activities/s), each for a warm-up and then e2e_seconds
    e2e_rates: tuple[float, ...]
    e2e_clients: int
    e2e_seconds: float
    e2e_warmup_s: float
    # sampling
    sample_interval_s: float
    drain_timeout_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_for(quick: bool, options: BenchOptions) -> Plan:
    """The preset for ``--quick`` or a full run, with the sizes the switches override
    (``FEED_BENCH_BACKLOG``: the 1- vs 2-worker backlog, for slower or busier machines;
    ``FEED_BENCH_E2E_RATE`` or ``FEED_BENCH_E2E_RATES``; ``FEED_BENCH_SOAK_S``)."""
    plan = _preset(quick)
    if options.backlog is not None:
        plan = replace(plan, backlog=options.backlog)
    if options.e2e_rates is not None:
        plan = replace(plan, e2e_rates=options.e2e_rates)
    elif options.e2e_rate is not None:
        plan = replace(plan, e2e_rates=(options.e2e_rate,))
    if options.soak_s is not None:
        plan = replace(plan, soak_s=options.soak_s)
    return plan


def _preset(quick: bool) -> Plan:
    if quick:
        return Plan(
            quick=True,
            uniform_users=1_000,
            uniform_followers=20,
            skewed_users=5_000,
            skewed_top=2_000,
            skewed_exponent=0.62,
            skewed_min=5,
            skewed_hot_threshold=1_000,
            skewed_hot_posts=1,
            backlog=2_000,
            backlog_skewed=1_000,
            backlog_history=1_000,
            peer_activities_uniform=300,
            peer_activities_skewed=200,
            peer_timeout_s=60,
            peer_install_timeout_s=240,
            sweep_fractions=(0.5, 1.0, 1.5),
            sweep_step_s=3.0,
            soak_s=10.0,
            soak_sample_s=0.5,
            redis_benchmark_requests=200_000,
            cassandra_ceiling_rows=20_000,
            e2e_rates=(50.0,),
            e2e_clients=50,
            e2e_seconds=10,
            e2e_warmup_s=2,
            sample_interval_s=0.25,
            drain_timeout_s=60,
        )
    return Plan(
        quick=False,
        uniform_users=10_000,
        uniform_followers=100,
        skewed_users=100_000,
        skewed_top=50_000,
        skewed_exponent=0.62,
        skewed_min=10,
        skewed_hot_threshold=10_000,
        skewed_hot_posts=2,
        backlog=100_000,
        backlog_skewed=20_000,
        backlog_history=20_000,
        peer_activities_uniform=2_000,
        peer_activities_skewed=1_000,
        peer_timeout_s=300,
        peer_install_timeout_s=600,
        sweep_fractions=(0.25, 0.5, 0.75, 1.0, 1.25),
        sweep_step_s=10.0,
        soak_s=600.0,
        soak_sample_s=5.0,
        redis_benchmark_requests=2_000_000,
        cassandra_ceiling_rows=300_000,
        e2e_rates=(50.0, 100.0, 250.0, 500.0, 750.0),
        e2e_clients=1_000,
        e2e_seconds=20,
        e2e_warmup_s=5,
        sample_interval_s=0.5,
        drain_timeout_s=900,
    )


@dataclass
class BenchContext:
    plan: Plan
    outdir: Path
    workdir: Path
    stack: Any
    settings: Settings
    env: dict[str, str]
    children: Children
    progress: Any
    console: Any
    #: The ``FEED_BENCH_*`` switches, read once by :func:`bench.run_bench`.
    options: BenchOptions = field(default_factory=BenchOptions)
    results: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: Scratch shared between scenarios (e.g. which graphs are already loaded).
    state: dict[str, Any] = field(default_factory=dict)
    _redis: Any = None
    _cassandra: Any = None
    _topics: set[str] = field(default_factory=set)

    @property
    def skip_peers(self) -> bool:
        """``FEED_BENCH_SKIP_PEERS``: do not install or run the peers."""
        return self.options.skip_peers

    @property
    def profile(self) -> bool:
        """``FEED_BENCH_PROFILE``: py-spy the first worker during the first drain."""
        return self.options.profile

    # --- clients -----------------------------------------------------------------------------
    @property
    def redis(self) -> Any:
        if self._redis is None:
            from feed import redis_connect

            self._redis = redis_connect.sync_client(self.settings, socket_timeout=30)
        return self._redis

    def redis_primaries(self) -> list[Any]:
        """One plain client per Redis server that takes writes: the one server, or each primary
        of a cluster (for per-server figures: CPU, memory). Close them after use."""
        import redis

        if not self.options.redis_cluster:
            return [redis.Redis.from_url(self.settings.redis_url, socket_timeout=30)]
        return [
            redis.Redis(host=n.host, port=n.port, socket_timeout=30)
            for n in self.redis.get_primaries()
        ]

    def redis_info(self, section: str) -> list[dict[str, Any]]:
        """``INFO <section>`` of each Redis server that takes writes (:meth:`redis_primaries`)."""
        servers = self.redis_primaries()
        try:
            return [server.info(section) for server in servers]
        finally:
            for server in servers:
                server.close()

    def redis_cpu(self) -> list[float]:
        """CPU seconds so far of each Redis server that takes writes (``INFO cpu``)."""
        return [
            float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
            for info in self.redis_info("cpu")
        ]

    @property
    def cassandra(self) -> Any:
        if self._cassandra is None:
            from feed.stores import open_cassandra

            self._cassandra = open_cassandra(self.settings)
        return self._cassandra

    def close(self) -> None:
        if self._cassandra is not None:
            self._cassandra.cluster.shutdown()
            self._cassandra = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    # --- helpers -----------------------------------------------------------------------------
    def log(self, message: str) -> None:
        self.console.log(message)

    def error(self, where: str, exc: BaseException | str) -> None:
        text = f"{where}: {exc if isinstance(exc, str) else f'{type(exc).__name__}: {exc}'}"
        self.errors.append(text)
        self.console.log(f"[red]{text}")

    def create_topics(self, names: Iterable[str]) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

        wanted = [n for n in names if n not in self._topics]
        if not wanted:
            return
        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap})
        futures = admin.create_topics(
            [
                NewTopic(n, num_partitions=self.settings.kafka_partitions, replication_factor=1)
                for n in wanted
            ],
            operation_timeout=30,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=30)
            except Exception as exc:
                if "exist" not in str(exc).lower():
                    raise
            self._topics.add(name)

    def logs_dir(self) -> Path:
        path = self.outdir / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Any]:
        """A rich progress task for the duration of the block; yields an ``update(n)`` callable."""
        task_id = self.progress.add_task(description, total=total)
        started = time.monotonic()

        def update(
            completed: float | None = None, advance: float | None = None, total: float | None = None
        ) -> None:
            kwargs: dict[str, Any] = {}
            if completed is not None:
                kwargs["completed"] = completed
            if advance is not None:
                kwargs["advance"] = advance
            if total is not None:
                kwargs["total"] = total
            self.progress.update(task_id, **kwargs)

        try:
            yield update
        finally:
            self.progress.update(
                task_id,
                description=f"{description} [dim]({time.monotonic() - started:.1f}s)",
                visible=True,
            )
            self.progress.stop_task(task_id)
