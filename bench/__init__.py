"""``feed bench``: one command that starts the local stack, drives load and writes a report.

``run_bench(args, environ)`` (called by ``feed.cli``; ``args`` has ``scenario`` in
{fanout, reads, e2e, gateway, notify, all}, ``quick``, ``model`` and ``out``; ``environ`` is the
process environment, which only :mod:`bench.options` reads):

1. ``--model``: print the capacity model (:mod:`bench.capacity`) and return.
2. Read the ``FEED_BENCH_*`` switches once (:class:`bench.options.BenchOptions`); a bad value
   stops here with one line naming the variable (exit 2), before any server starts.
3. Start :class:`infra.LocalStack` (Redis, the Kafka-protocol broker, Cassandra) under the bench
   work folder, create the topics and the schema.
4. Run the scenarios: ``fanout`` (:mod:`bench.fanout`), ``reads`` (:mod:`bench.reads`), ``e2e``
   (:mod:`bench.e2e`), ``notify`` (:mod:`bench.notify`, notification feeds) and ``gateway``,
   which is dispatched to ``bench.gateway.run(ctx)`` when that module exists (signature:
   ``run(ctx: BenchContext) -> dict`` with at least a ``"status"`` key; it may add entries to
   ``ctx.results["targets"]``) and otherwise recorded as "not yet implemented".
5. Write ``<out>/<timestamp>/`` with ``results.json``, ``report.md`` and PNG plots
   (:mod:`bench.report`).

Everything started (stack, workers, gateway, peer processes) is stopped by pid at the end, also on
Ctrl-C, SIGTERM or an error. The environment switches (``FEED_BENCH_SKIP_PEERS``,
``FEED_BENCH_PHASES``, ...) are listed in :mod:`bench.options` and docs/benchmarks.md.

Exit status: 0 when every requested scenario ran (targets missed or a peer that could not be
installed do not change it), 1 when a scenario failed, 2 when a switch is invalid, 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.options import BenchOptions, BenchOptionsError

__all__ = ["run_bench"]

SCENARIOS = ("fanout", "reads", "e2e", "gateway", "notify")
#: Secrets for the bench's own gateway only (127.0.0.1, torn down at the end).
_BENCH_JWT_SECRET = "bench-only-jwt-secret-" + "b" * 32
_BENCH_INGEST_TOKEN = "bench-only-ingest-token-0123456789"
_REPO = Path(__file__).resolve().parents[1]


def _workdir(out_root: Path, options: BenchOptions) -> Path:
    if options.workdir is not None:
        return options.workdir
    if out_root.name == "results":
        return out_root.parent / "work"  # bench/results -> bench/work (both git-ignored)
    return out_root / "work"


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_bench(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if getattr(args, "model", False):
        from bench.capacity import print_model

        return print_model(args)
    try:
        options = BenchOptions.from_env(environ)
    except BenchOptionsError as exc:
        print(f"feed bench: configuration error: {exc}", file=sys.stderr)
        return 2

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from bench.context import BenchContext, plan_for
    from bench.processes import Children
    from bench.report import write_report
    from feed.settings import Settings
    from infra import LocalStack

    scenario = getattr(args, "scenario", "all") or "all"
    scenarios = list(SCENARIOS) if scenario == "all" else [scenario]
    quick = bool(getattr(args, "quick", False))
    out_root = Path(getattr(args, "out", None) or "bench/results")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = out_root / stamp
    suffix = 1
    while outdir.exists():
        outdir = out_root / f"{stamp}-{suffix}"
        suffix += 1
    outdir.mkdir(parents=True)
    workdir = _workdir(out_root, options)
    workdir.mkdir(parents=True, exist_ok=True)
    plan = plan_for(quick, options)
    console = Console(stderr=True)
    children = Children()
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["feed bench", scenario] + (["--quick"] if quick else [])),
            "scenarios": scenarios,
            "quick": quick,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "memory_gb": _memory_gb(),
            "plan": plan.as_dict(),
            "outdir": str(outdir),
            "skip_peers": options.skip_peers,
            "redis_cluster": options.redis_cluster,
            # Other work on the machine shows up in every figure: note how busy it was.
            "load_average_start": list(os.getloadavg()),
        },
        "targets": [],
        "errors": [],
    }
    stack = LocalStack(
        workdir / f"stack-{outdir.name}",
        partitions=4,
        with_cassandra=True,
        redis_cluster=options.redis_cluster,
        # INFRA.md: periodic commit-log sync is ~3x faster for batches; the bench never kills it.
        cassandra_kwargs={
            "commitlog_sync": "periodic",
            "commitlog_window_ms": 10_000,
            "heap_min_mb": 1024,
            "heap_max_mb": 1024,
        },
    )
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    for sig in previous:
        signal.signal(sig, _interrupt)
    ctx: BenchContext | None = None
    status = 0
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    try:
        with progress:
            task = progress.add_task("stack: Redis, Kafka-protocol broker, Cassandra", total=None)
            stack.start()
            progress.update(task, description=f"stack ready in {stack.startup_seconds:.1f}s")
            progress.stop_task(task)
            env = _child_env(stack, options)
            if options.tracing:
                env.update(_otlp_sink(children, outdir, env, options.tracing))
                results["meta"]["tracing"] = options.tracing
            settings = Settings.from_env(env)
            _migrate(settings)
            results["meta"]["servers"] = _server_versions(stack)
            ctx = BenchContext(
                plan=plan,
                outdir=outdir,
                workdir=workdir,
                stack=stack,
                settings=settings,
                env=env,
                children=children,
                progress=progress,
                console=console,
                results=results,
                options=options,
                errors=results["errors"],
            )
            for name in scenarios:
                results[name] = _run_scenario(ctx, name)
                if results[name].get("status") == "failed":
                    status = 1
    except KeyboardInterrupt:
        results["meta"]["interrupted"] = True
        console.print("[yellow]interrupted: stopping everything the bench started")
        status = 130
    except Exception as exc:
        results["errors"].append(f"bench: {type(exc).__name__}: {exc}")
        console.print(f"[red]bench failed: {type(exc).__name__}: {exc}")
        status = 1
    finally:
        children.stop_all()
        if ctx is not None:
            ctx.close()
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not options.keep:
            shutil.rmtree(stack.workdir, ignore_errors=True)
        results["meta"]["seconds"] = time.monotonic() - started
        results["meta"]["load_average_end"] = list(os.getloadavg())
        paths = write_report(outdir, results)
    console.print(f"report: {paths['report']}")
    console.print(f"results: {paths['results']}")
    return status


def _run_scenario(ctx: Any, name: str) -> dict[str, Any]:
    try:
        if name == "fanout":
            from bench import fanout

            return fanout.run(ctx)
        if name == "reads":
            from bench import reads

            return reads.run(ctx)
        if name == "e2e":
            from bench import e2e

            return e2e.run(ctx)
        if name == "notify":
            from bench import notify

            return notify.run(ctx)
        if name == "gateway":
            if importlib.util.find_spec("bench.gateway") is None:
                return {
                    "status": "not yet implemented",
                    "note": "the gateway-vs-python-socketio scenario goes in bench/gateway.py",
                }
            gateway = importlib.import_module("bench.gateway")
            result: dict[str, Any] = gateway.run(ctx)
            return result
        return {"status": "failed", "error": f"unknown scenario {name!r}"}
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        ctx.error(name, exc)
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def _child_env(stack: Any, options: BenchOptions) -> dict[str, str]:
    env = options.inherited()
    env.update(stack.env())
    env.update(
        # INFRA.md: the test broker's group join takes ~session.timeout/2.
        FEED_KAFKA_SESSION_TIMEOUT_MS="6000",
        FEED_KAFKA_HEARTBEAT_MS="500",
        FEED_LOG_FORMAT="json",
        FEED_LOG_LEVEL="info",
        FEED_JWT_SECRET=_BENCH_JWT_SECRET,
        FEED_INGEST_TOKEN=_BENCH_INGEST_TOKEN,
        FEED_GATEWAY_HOST="127.0.0.1",
        FEED_REDIS_CLUSTER="true" if options.redis_cluster else "false",
    )
    # The children run this checkout's code whether or not the project is pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(_REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    return env


def _otlp_sink(children: Any, outdir: Path, env: dict[str, str], share: float) -> dict[str, str]:
    """Start the OTLP sink (:mod:`bench.otlp_sink`) and return the tracing settings of the
    bench's processes: export there, sampling ``share`` of new traces (``FEED_BENCH_TRACING``)."""
    from bench.processes import free_port, wait_http

    port = free_port()
    sink = children.spawn(
        [sys.executable, "-m", "bench.otlp_sink", "--port", str(port)],
        env=dict(env),
        log=outdir / "otlp-sink.log",
    )
    if not wait_http(f"http://127.0.0.1:{port}/healthz", 30, sink):
        raise RuntimeError("the OTLP sink did not start")
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": str(share),
    }


def _migrate(settings: Any) -> None:
    from feed.kafka import create_topics
    from feed.stores import create_schema, open_cassandra

    create_topics(settings)
    session = open_cassandra(settings, keyspace=False)
    try:
        create_schema(session, settings.cassandra_keyspace, settings.cassandra_replication_factor)
    finally:
        session.cluster.shutdown()


def _server_versions(stack: Any) -> dict[str, str]:
    versions: dict[str, str] = {}
    try:
        import redis

        info = redis.Redis.from_url(stack.redis.url).info("server")
        versions["redis"] = str(info.get("redis_version"))
    except Exception:
        pass
    if stack.cassandra is not None and stack.cassandra.release_version:
        versions["cassandra"] = str(stack.cassandra.release_version)
    versions["kafka"] = "Tansu (Kafka protocol, memory storage)"
    return versions


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        return None
    return None
