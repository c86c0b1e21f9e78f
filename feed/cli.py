"""The ``feed`` command, the product's entry point: it reads ``os.environ`` into
:class:`Settings` (and ``feed bench`` hands it to the bench, which reads its switches once).

A command that cannot reach what it needs (Kafka, Cassandra) exits with code 1 within a bounded
time (``--timeout``, or ``--wait`` for ``migrate``), printing one line on stderr that names the
command and what it could not reach (addresses only: never a secret), no traceback and no client
library log lines.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import msgspec

from feed.settings import Settings, SettingsError

__all__ = ["main"]

#: Default bound, in seconds, on how long a one-shot command waits for Kafka.
DEFAULT_TIMEOUT_S = 5.0


def _settings() -> Settings:
    try:
        return Settings.from_env(os.environ)
    except SettingsError as exc:
        print(f"feed: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _logging(settings: Settings, service: str | None = None) -> None:
    """Logging, then (for a long-running ``service``) tracing: both from the environment."""
    from feed.logging import configure

    configure(settings.log_level, settings.log_format)
    if service is not None:
        from feed.tracing import setup

        try:
            setup(service)
        except SettingsError as exc:
            print(f"feed: configuration error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None


def _fail(command: str, message: str) -> int:
    """One line on stderr, ``feed <command>: <message>``; exit code 1."""
    line = " ".join(message.split())
    print(f"feed {command}: {line[:1000]}", file=sys.stderr)
    return 1


def _kafka_error(exc: BaseException) -> str:
    """The broker's own words for ``exc`` (a ``KafkaError``'s text, not its repr)."""
    from confluent_kafka import KafkaError

    error = exc.args[0] if exc.args else exc
    return error.str() if isinstance(error, KafkaError) else str(error)


def _cassandra_address(settings: Settings) -> str:
    return ",".join(f"{host}:{settings.cassandra_port}" for host in settings.cassandra_hosts)


@contextlib.contextmanager
def _driver_quiet() -> Iterator[None]:
    """Keep the Cassandra driver's own log lines (tracebacks of refused connections) off
    stderr while connecting: the caller reports a failure itself, in one line."""
    driver = logging.getLogger("cassandra")
    level = driver.level
    driver.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        driver.setLevel(level)


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {raw}")
    return value


def _positive_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {raw!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3600 s, got {raw}")
    return value


def cmd_migrate(args: argparse.Namespace) -> int:
    from cassandra import OperationTimedOut
    from cassandra.cluster import NoHostAvailable
    from confluent_kafka import KafkaException

    from feed.kafka import create_topics, is_unreachable
    from feed.stores import create_schema, open_cassandra, replication

    settings = _settings()
    _logging(settings)
    started = time.monotonic()
    deadline = started + max(0.0, args.wait)
    kafka, cassandra = settings.kafka_bootstrap, _cassandra_address(settings)
    while True:
        # Each attempt waits at most 5 s, and never much past the deadline.
        attempt = max(1.0, min(5.0, deadline - time.monotonic()))
        problem: str | None = None
        try:
            created = create_topics(settings, timeout=attempt)
        except (KafkaException, TimeoutError) as exc:
            if isinstance(exc, TimeoutError) or is_unreachable(exc):
                problem = f"cannot reach Kafka at {kafka} within {{s}}"
            else:
                problem = f"Kafka at {kafka} did not create the topics: {_kafka_error(exc)}"
        if problem is None:
            try:
                with _driver_quiet():
                    session = open_cassandra(settings, keyspace=False, timeout=attempt)
                break
            except (NoHostAvailable, OperationTimedOut, OSError):
                problem = f"cannot reach Cassandra at {cassandra} within {{s}}"
        if time.monotonic() >= deadline:
            elapsed = f"{time.monotonic() - started:.0f} s"
            return _fail("migrate", problem.replace("{s}", elapsed))
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    try:
        with _driver_quiet():
            create_schema(session, settings.cassandra_keyspace, replication(settings))
    except Exception as exc:
        return _fail("migrate", f"Cassandra at {cassandra} did not take the schema: {exc}")
    finally:
        session.cluster.shutdown()
    print(f"topics created: {', '.join(created) or 'none (all present)'}")
    print(f"cassandra keyspace {settings.cassandra_keyspace!r}: schema up to date")
    return 0


def cmd_fanout(_args: argparse.Namespace) -> int:
    from cassandra import OperationTimedOut
    from cassandra.cluster import NoHostAvailable

    from fanout.http import serve_worker_http, worker_checks
    from fanout.metrics import WorkerMetrics
    from fanout.worker import build_worker, install_signal_handlers
    from feed.history_cassandra import CassandraHistory
    from feed.logging import get_logger

    settings = _settings()
    _logging(settings, "feed-fanout")
    metrics = WorkerMetrics()
    try:
        with _driver_quiet():
            worker = build_worker(settings, metrics)
    except (NoHostAvailable, OperationTimedOut):
        # Kafka and Redis outages are waited out by the running worker; the driver needs one
        # Cassandra node at start.
        return _fail("fanout", f"cannot reach Cassandra at {_cassandra_address(settings)}")
    session = cast(CassandraHistory, worker._processor._history).session  # the store it built

    try:
        server = serve_worker_http(
            settings.worker_metrics_host,
            settings.worker_metrics_port,
            metrics.registry,
            worker_checks(
                settings.redis_url,
                settings.kafka_bootstrap,
                session,
                redis_cluster=worker.redis_cluster,
            ),
        )
    except OSError as exc:
        session.cluster.shutdown()
        address = f"{settings.worker_metrics_host}:{settings.worker_metrics_port}"
        return _fail("fanout", f"cannot listen on {address}: {exc.strerror or exc}")
    get_logger("fanout").info("worker_http_listening", port=server.server_address[1])
    install_signal_handlers(worker.stop)
    worker.run()
    server.shutdown()
    session.cluster.shutdown()
    from feed.tracing import shutdown

    shutdown()  # the last batches' spans
    return 0


def cmd_gateway(_args: argparse.Namespace) -> int:
    from gateway.server import run

    settings = _settings()
    try:
        settings.require_gateway()
    except SettingsError as exc:
        print(f"feed: configuration error: {exc}", file=sys.stderr)
        return 2
    _logging(settings, "feed-gateway")
    run(settings)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from gateway.auth import mint_token

    settings = _settings()
    try:
        secret = settings.require_jwt()
    except SettingsError as exc:
        print(f"feed: configuration error: {exc}", file=sys.stderr)
        return 2
    print(mint_token(secret, args.user, args.ttl))
    return 0


def cmd_lag(args: argparse.Namespace) -> int:
    from confluent_kafka import KafkaException

    from feed.kafka import KafkaUnavailable
    from feed.lag import desired_replicas, measure_lag

    settings = _settings()
    _logging(settings)
    topics = [settings.topic_activities, settings.topic_follows]
    while True:
        try:
            lag = measure_lag(
                settings.kafka_bootstrap, settings.kafka_group, topics, timeout=args.timeout
            )
        except KafkaUnavailable as exc:
            return _fail("lag", str(exc))
        except KafkaException as exc:
            return _fail("lag", f"Kafka at {settings.kafka_bootstrap}: {_kafka_error(exc)}")
        if args.json:
            sys.stdout.write(msgspec.json.encode(lag).decode() + "\n")
            return 0
        partitions = len(lag.partitions)
        replicas = desired_replicas(
            lag.total, partitions, lag_threshold=args.lag_threshold, max_replicas=args.max_replicas
        )
        lines = [
            f"group {lag.group}",
            f"{'TOPIC':<28}{'PART':>5}{'COMMITTED':>12}{'HIGH':>12}{'LAG':>10}",
        ]
        for row in lag.partitions:
            committed = "-" if row.committed is None else str(row.committed)
            lagged = "-" if row.lag is None else str(row.lag)
            lines.append(
                f"{row.topic:<28}{row.partition:>5}{committed:>12}{row.high:>12}{lagged:>10}"
            )
        lines.append(f"{'TOTAL':<57}{lag.total:>10}")
        lines.append(
            f"KEDA would run {replicas} worker(s) (lag threshold {args.lag_threshold}, "
            f"max {args.max_replicas})"
        )
        if args.watch:
            sys.stdout.write("\x1b[2J\x1b[H")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        if not args.watch:
            return 0
        time.sleep(args.interval)


def cmd_dlq(args: argparse.Namespace) -> int:
    from confluent_kafka import KafkaException

    from fanout.dlq import read_dead_letters, replay_dead_letters
    from feed.kafka import KafkaUnavailable

    settings = _settings()
    _logging(settings)
    command = f"dlq {args.action}"
    bootstrap = settings.kafka_bootstrap
    try:
        if args.action == "replay":
            result = replay_dead_letters(
                bootstrap,
                settings.topic_dlq,
                group=settings.kafka_group + "-dlq-replay",
                limit=args.limit,
                code=args.code,
                timeout=args.timeout,
            )
            line = f"replayed {len(result.replayed)} record(s) to their origin topics"
            if result.truncated:
                line += (
                    f"; passed over {len(result.truncated)} truncated record(s) "
                    "(the DLQ holds only their first bytes)"
                )
            print(line)
            return 0
        records, consumer = read_dead_letters(
            bootstrap, settings.topic_dlq, group=None, limit=args.limit, timeout=args.timeout
        )
        consumer.close()
    except KafkaUnavailable as exc:
        return _fail(command, str(exc))
    except LookupError as exc:
        return _fail(command, f"{exc.args[0]} (feed migrate creates it)")
    except KafkaException as exc:
        return _fail(command, f"Kafka at {bootstrap}: {_kafka_error(exc)}")
    for record in records:
        if args.code is not None and record.headers.get("feed.error") != args.code:
            continue
        if args.json:
            sys.stdout.write(msgspec.json.encode(record.as_dict()).decode() + "\n")
        else:
            h = record.headers
            cut = (
                f" [truncated from {h.get('feed.original.size')} bytes]" if record.truncated else ""
            )
            print(
                f"{record.partition}/{record.offset} {h.get('feed.error')} "
                f"field={h.get('feed.error.field') or '-'} attempts={h.get('feed.attempts')} "
                f"from={h.get('feed.origin.topic')}/{h.get('feed.origin.partition')}/"
                f"{h.get('feed.origin.offset')}: {h.get('feed.error.message')}{cut}"
            )
    return 0


def _from_checkout(module: str, what: str) -> Any:
    """``module`` of the source checkout (the benchmark harness ``bench``, the dev launcher
    ``infra``): neither ships in the runtime wheel or image. Importable when ``feed`` runs from a
    checkout (``make run``, ``make bench``); otherwise one line says why, and exit 2."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / module / "__init__.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        print(
            f"feed: {what} needs a source checkout of the project (its '{module}' folder is not "
            "part of the installed package)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def cmd_dev(args: argparse.Namespace) -> int:
    _from_checkout("infra", "feed dev")
    from feed.dev import run_dev

    return run_dev(args)


def cmd_bench(args: argparse.Namespace) -> int:
    run_bench: Callable[[argparse.Namespace, Mapping[str, str]], int] = _from_checkout(
        "bench", "feed bench"
    ).run_bench
    # The bench reads its FEED_BENCH_* switches from this, once (bench.options).
    return run_bench(args, os.environ)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feed", description="Real-time activity feed backend.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="create the Kafka topics and the Cassandra schema")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for dependencies")
    p.set_defaults(func=cmd_migrate)

    sub.add_parser("fanout", help="run a fan-out worker").set_defaults(func=cmd_fanout)
    sub.add_parser("gateway", help="run a WebSocket/HTTP gateway").set_defaults(func=cmd_gateway)

    p = sub.add_parser("token", help="mint a development JWT for a user")
    p.add_argument("user")
    p.add_argument("--ttl", type=int, default=86_400, help="lifetime in seconds")
    p.set_defaults(func=cmd_token)

    from feed.cli_tenant import add_tenant_parser  # here: it imports this module's helpers

    add_tenant_parser(sub)

    p = sub.add_parser("lag", help="consumer lag of the fan-out group")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--watch", action="store_true", help="refresh the table")
    p.add_argument("--interval", type=_positive_seconds, default=2.0)
    p.add_argument("--lag-threshold", type=_positive_int, default=1000)
    p.add_argument("--max-replicas", type=_positive_int, default=16)
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for Kafka before failing (default 5)",
    )
    p.set_defaults(func=cmd_lag)

    p = sub.add_parser("dlq", help="list or replay dead-lettered records")
    p.add_argument("action", choices=["list", "replay"])
    p.add_argument("--limit", type=_positive_int, default=100)
    p.add_argument("--code", default=None, help="only records with this feed.error code")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for Kafka before failing (default 5)",
    )
    p.set_defaults(func=cmd_dlq)

    p = sub.add_parser("dev", help="the whole local stack with demo traffic and a live page")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rate", type=float, default=5.0, help="demo activities per second")
    p.add_argument("--port", type=int, default=8080, help="gateway port (0 = any free port)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--duration", type=float, default=0.0, help="stop after N seconds (0 = never)")
    p.add_argument(
        "--redis-cluster",
        action="store_true",
        help="run a Redis Cluster of 3 masters instead of one Redis server",
    )
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("bench", help="benchmarks (see docs/benchmarks.md)")
    p.add_argument(
        "scenario",
        nargs="?",
        default="all",
        choices=["fanout", "reads", "e2e", "gateway", "notify", "all"],
    )
    p.add_argument("--quick", action="store_true", help="one-minute smoke run")
    p.add_argument("--model", action="store_true", help="print the capacity model and exit")
    p.add_argument("--out", default="bench/results")
    model = p.add_argument_group("capacity model (--model); defaults: Twitter's 2012 load")
    model.add_argument("--rate", type=float, help="average activities/s (4600)")
    model.add_argument("--peak", type=float, help="peak activities/s (12000)")
    model.add_argument("--followers", type=float, help="mean followers per activity (75)")
    model.add_argument("--reads", type=float, help="feed reads/s (300000)")
    model.add_argument("--connections", type=float, help="concurrent WebSocket connections (1M)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
