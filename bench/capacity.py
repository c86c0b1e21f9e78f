"""Capacity model: how many cores (and how much Redis memory) a given load needs.

:func:`model` is a pure function: the load (activities/s on average and at peak, followers per
activity, feed reads/s, concurrent connections) and per-core figures in, a table of components
out. :func:`figures_from_results` derives the per-core figures from a bench run's
``results.json`` (CPU seconds each process spent per unit of work, measured during the drains);
every figure a run did not measure falls back to :data:`ASSUMED`, and the output says which is
which. ``feed bench --model`` prints it for the latest run under ``--out``.

Defaults are Twitter's published 2012 load: 4,600 tweets/s on average, 12,000 at peak, about 75
followers per tweet (≈ 345 k timeline writes/s), 300 k timeline reads/s, and 1 M concurrent
streaming connections (rounded).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ASSUMED", "DEFAULTS", "figures_from_results", "model", "print_model"]

DEFAULTS: dict[str, float] = {
    "rate": 4_600.0,
    "peak": 12_000.0,
    "followers": 75.0,
    "reads": 300_000.0,
    "connections": 1_000_000.0,
}

#: Per-core figures used when a run did not measure them (documented in docs/benchmarks.md).
ASSUMED: dict[str, float] = {
    # fan-out worker: timeline inserts per worker CPU second (Python, batched Lua scripts)
    "worker_inserts_per_core": 100_000.0,
    # Redis: timeline inserts (ZADD + ZCARD + presence check in Lua) per Redis CPU second
    "redis_inserts_per_core": 300_000.0,
    # Cassandra: history timeline rows (UNLOGGED batches) per Cassandra CPU second
    "cassandra_rows_per_core": 30_000.0,
    # gateway: feed page reads (GET /v1/feed, Redis hot tier) per gateway CPU second
    "gateway_reads_per_core": 5_000.0,
    # gateway: WebSocket frames delivered per gateway CPU second (PEERS.md: socketio ~6.7 k/core)
    "gateway_deliveries_per_core": 7_000.0,
    # gateway: open connections one core holds (memory and pings, not traffic)
    "gateway_connections_per_core": 20_000.0,
    # Redis: bytes per timeline entry, activity bodies amortised in
    "redis_bytes_per_entry": 80.0,
}


def model(
    rate: float = DEFAULTS["rate"],
    peak: float = DEFAULTS["peak"],
    followers: float = DEFAULTS["followers"],
    reads: float = DEFAULTS["reads"],
    connections: float = DEFAULTS["connections"],
    *,
    figures: Mapping[str, float] | None = None,
    sources: Mapping[str, str] | None = None,
    utilisation: float = 0.7,
    online_share: float = 0.1,
    active_users: float = 150_000_000.0,
    timeline_max: int = 800,
) -> dict[str, Any]:
    """Cores per component for the load; sized for ``peak`` at ``utilisation`` of each core.

    ``figures`` override :data:`ASSUMED` per key; ``sources`` say where each came from
    (default: "assumed"). ``online_share`` is the share of timeline writes whose recipient is
    connected (each becomes a WebSocket frame); ``active_users`` x ``timeline_max`` entries sizes
    the Redis hot tier.
    """
    if min(rate, peak, followers, reads, connections) < 0:
        raise ValueError("load figures must not be negative")
    if not 0 < utilisation <= 1:
        raise ValueError("utilisation must be in (0, 1]")
    per_core = {**ASSUMED, **(figures or {})}
    source = {k: (sources or {}).get(k, "assumed") for k in per_core}
    writes_avg = rate * followers
    writes_peak = peak * followers
    deliveries_peak = writes_peak * online_share

    def cores(load: float, key: str) -> int:
        capacity = per_core[key] * utilisation
        return max(1, math.ceil(load / capacity)) if capacity > 0 else 0

    components = [
        {
            "component": "fan-out workers",
            "load": writes_peak,
            "unit": "timeline inserts/s",
            "per_core": per_core["worker_inserts_per_core"],
            "source": source["worker_inserts_per_core"],
            "cores": cores(writes_peak, "worker_inserts_per_core"),
        },
        {
            "component": "Redis (timeline writes)",
            "load": writes_peak,
            "unit": "timeline inserts/s",
            "per_core": per_core["redis_inserts_per_core"],
            "source": source["redis_inserts_per_core"],
            "cores": cores(writes_peak, "redis_inserts_per_core"),
        },
        {
            "component": "Cassandra (history rows)",
            "load": writes_peak,
            "unit": "rows/s",
            "per_core": per_core["cassandra_rows_per_core"],
            "source": source["cassandra_rows_per_core"],
            "cores": cores(writes_peak, "cassandra_rows_per_core"),
        },
        {
            "component": "gateway (feed reads)",
            "load": reads,
            "unit": "reads/s",
            "per_core": per_core["gateway_reads_per_core"],
            "source": source["gateway_reads_per_core"],
            "cores": cores(reads, "gateway_reads_per_core"),
        },
        {
            "component": "gateway (push frames)",
            "load": deliveries_peak,
            "unit": "frames/s",
            "per_core": per_core["gateway_deliveries_per_core"],
            "source": source["gateway_deliveries_per_core"],
            "cores": cores(deliveries_peak, "gateway_deliveries_per_core"),
        },
        {
            "component": "gateway (connections)",
            "load": connections,
            "unit": "connections",
            "per_core": per_core["gateway_connections_per_core"],
            "source": source["gateway_connections_per_core"],
            "cores": cores(connections, "gateway_connections_per_core"),
        },
    ]
    redis_bytes = active_users * timeline_max * per_core["redis_bytes_per_entry"]
    return {
        "load": {
            "activities_per_s_avg": rate,
            "activities_per_s_peak": peak,
            "followers_per_activity": followers,
            "timeline_writes_per_s_avg": writes_avg,
            "timeline_writes_per_s_peak": writes_peak,
            "feed_reads_per_s": reads,
            "connections": connections,
            "push_frames_per_s_peak": deliveries_peak,
        },
        "assumptions": {
            "utilisation": utilisation,
            "online_share": online_share,
            "active_users": active_users,
            "timeline_max": timeline_max,
        },
        "components": components,
        "total_cores": sum(c["cores"] for c in components),
        "redis_memory": {
            "bytes_per_entry": per_core["redis_bytes_per_entry"],
            "source": source["redis_bytes_per_entry"],
            "entries": active_users * timeline_max,
            "bytes": redis_bytes,
            "gib": redis_bytes / 2**30,
        },
    }


def figures_from_results(
    results: Mapping[str, Any], label: str = "measured"
) -> tuple[dict[str, float], dict[str, str]]:
    """Per-core figures a run measured (CPU seconds per unit of work), with their sources."""
    figures: dict[str, float] = {}
    sources: dict[str, str] = {}
    phases = (results.get("fanout") or {}).get("phases") or {}
    redis_only = phases.get("redis_only") or {}
    history = phases.get("history") or {}
    cpu = redis_only.get("cpu") or {}

    def put(key: str, value: Any, where: str) -> None:
        if isinstance(value, (int, float)) and value > 0:
            figures[key] = float(value)
            sources[key] = f"{label}: {where}"

    put(
        "worker_inserts_per_core",
        cpu.get("inserts_per_worker_cpu_s"),
        "redis_only drain, inserts per worker CPU second",
    )
    put(
        "redis_inserts_per_core",
        cpu.get("inserts_per_redis_cpu_s"),
        "redis_only drain, inserts per Redis CPU second",
    )
    put(
        "cassandra_rows_per_core",
        (history.get("cpu") or {}).get("history_rows_per_cassandra_cpu_s"),
        "history drain, rows per Cassandra CPU second",
    )
    put(
        "redis_bytes_per_entry",
        (redis_only.get("memory") or {}).get("bytes_per_entry"),
        "INFO used_memory delta per entry",
    )
    e2e = results.get("e2e") or {}
    put(
        "gateway_deliveries_per_core",
        e2e.get("deliveries_per_gateway_cpu_s"),
        "e2e, frames per gateway CPU second",
    )
    gateway = results.get("gateway") or {}
    for key in (
        "gateway_reads_per_core",
        "gateway_deliveries_per_core",
        "gateway_connections_per_core",
    ):
        put(key, gateway.get(key), "gateway scenario")
    return figures, sources


def merged_figures(out: str | Path) -> tuple[dict[str, float], dict[str, str], str | None]:
    """Per-core figures from every ``results.json`` under ``out``: for each figure the newest
    run that measured it (a scenario run alone measures only its own figures). Quick runs count
    only when there is no full run. Returns (figures, sources, a description of the runs)."""
    root = Path(out)
    paths = sorted(p for p in root.glob("*/results.json") if p.is_file()) if root.is_dir() else []
    loaded: list[tuple[Path, dict[str, Any], bool]] = []
    for path in paths:
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"feed bench --model: cannot read {path}: {exc}; skipped")
            continue
        loaded.append((path, results, bool((results.get("meta") or {}).get("quick"))))
    full_only = any(not quick for _, _, quick in loaded)
    figures: dict[str, float] = {}
    sources: dict[str, str] = {}
    used: list[str] = []
    for path, results, quick in loaded:  # oldest first: newer runs override
        if quick and full_only:
            continue
        found, where = figures_from_results(
            results, label=f"{'quick run' if quick else 'measured'} {path.parent.name}"
        )
        if found:
            figures.update(found)
            sources.update(where)
            used.append(path.parent.name)
    description = f"{root} ({', '.join(sorted(set(used)))})" if used else None
    return figures, sources, description


def print_model(args: argparse.Namespace) -> int:
    """``feed bench --model``: the model for the CLI's load flags (defaults: Twitter 2012)."""
    figures, sources, description = merged_figures(getattr(args, "out", None) or "bench/results")
    load = {k: float(getattr(args, k, None) or v) for k, v in DEFAULTS.items()}
    result = model(
        load["rate"],
        load["peak"],
        load["followers"],
        load["reads"],
        load["connections"],
        figures=figures,
        sources=sources,
    )
    print(render(result, description))
    return 0


def render(result: Mapping[str, Any], path: Path | str | None = None) -> str:
    load = result["load"]
    lines = [
        "Capacity model (sized for the peak at "
        f"{result['assumptions']['utilisation']:.0%} of each core)",
        f"  figures from: {path if path else 'no results.json found: all figures assumed'}",
        f"  load: {load['activities_per_s_avg']:,.0f} activities/s avg, "
        f"{load['activities_per_s_peak']:,.0f} peak, {load['followers_per_activity']:,.0f} "
        f"followers each -> {load['timeline_writes_per_s_avg']:,.0f} timeline writes/s avg, "
        f"{load['timeline_writes_per_s_peak']:,.0f} peak; {load['feed_reads_per_s']:,.0f} "
        f"feed reads/s; {load['connections']:,.0f} connections",
        "",
        f"  {'component':<26}{'load':>14}  {'unit':<20}{'per core':>12}{'cores':>8}  source",
    ]
    for c in result["components"]:
        lines.append(
            f"  {c['component']:<26}{c['load']:>14,.0f}  {c['unit']:<20}{c['per_core']:>12,.0f}"
            f"{c['cores']:>8,}  {c['source']}"
        )
    lines.append(f"  {'total':<26}{'':>14}  {'':<20}{'':>12}{result['total_cores']:>8,}")
    mem = result["redis_memory"]
    lines += [
        "",
        f"  Redis hot tier: {mem['entries']:,.0f} entries x {mem['bytes_per_entry']:,.1f} B "
        f"({mem['source']}) = {mem['gib']:,.0f} GiB",
    ]
    return "\n".join(lines)
