"""Writing a run's folder: ``results.json``, ``report.md`` and the PNG plots (matplotlib, Agg).

Plots (each written even when its data is missing, with a note saying so):

* ``latency.png`` — latency percentiles over time: e2e publish→receive (when the e2e scenario ran)
  and the fan-out worker's batch apply time (from its ``feed_batch_seconds`` histogram).
* ``throughput.png`` — achieved versus offered rate (the fan-out sweep).
* ``e2e_sweep.png`` — e2e p50/p99 latency against offered rate, history rows off and on.
* ``lag.png`` — consumer lag while each backlog drains (1 and 2 workers, skewed, history on).
* ``memory.png`` — worker RSS over time in each phase.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["PLOTS", "write_report"]

PLOTS = ("latency.png", "throughput.png", "e2e_sweep.png", "lag.png", "memory.png")
_QUICK_NOTE = "quick (smoke run: the harness works; figures are not meaningful)"


def write_report(outdir: Path, results: dict[str, Any]) -> dict[str, Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    paths = {"results": outdir / "results.json", "report": outdir / "report.md"}
    paths["results"].write_text(json.dumps(_clean(results), indent=2, default=str) + "\n")
    try:
        paths.update(write_plots(outdir, results))
    except Exception as exc:
        results.setdefault("errors", []).append(f"plots: {type(exc).__name__}: {exc}")
        paths["results"].write_text(json.dumps(_clean(results), indent=2, default=str) + "\n")
    paths["report"].write_text(render_markdown(results))
    return paths


def _clean(value: Any) -> Any:
    """NaN/inf are not JSON: turn them into null."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# --- formatting --------------------------------------------------------------------------------
def _num(value: Any, digits: int = 0, suffix: str = "") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "n/a"
    if digits == 0:
        return f"{value:,.0f}{suffix}"
    return f"{value:,.{digits}f}{suffix}"


def _ratio(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    return f"{value:.3g}x" if value < 10 else f"{value:,.1f}x"


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def render_markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    lines: list[str] = []
    add = lines.append
    add(f"# Benchmark report — {meta.get('started', '?')}")
    add("")
    add(
        f"- Command: `{meta.get('command', 'feed bench')}`; mode: "
        + (_QUICK_NOTE if meta.get("quick") else "full")
    )
    add(
        f"- Machine: {meta.get('cpus', '?')} CPUs, {meta.get('memory_gb', '?')} GB; "
        f"Python {meta.get('python', '?')}; every server, worker and load generator on this "
        "machine."
    )
    servers = meta.get("servers", {})
    if servers:
        add("- Servers: " + ", ".join(f"{k} {v}" for k, v in servers.items()))
    loads = [meta.get("load_average_start"), meta.get("load_average_end")]
    if all(isinstance(x, list) and x for x in loads):
        add(
            f"- Load average (1 min) at start {loads[0][0]:.2f}, at end {loads[1][0]:.2f} "
            f"on {meta.get('cpus', '?')} CPUs: anything well above the bench's own share means "
            "other work competed for the cores during this run."
        )
    add(
        f"- Duration: {_num(meta.get('seconds'), 1)} s"
        + ("; **interrupted**" if meta.get("interrupted") else "")
    )
    add("")
    add(
        "Every figure stands beside its reference, measured in the same run on the same servers, "
        "as a ratio. Targets come from the issue; the harness reports them and never fails on them."
    )
    add("")

    targets = results.get("targets") or []
    if targets:
        add("## Targets")
        add("")
        add("| figure | measured | target | met |")
        add("|---|---:|---:|:---:|")
        for t in targets:
            unit = t.get("unit")
            value = (
                _ratio(t.get("value")) if unit == "ratio" else _num(t.get("value"), 0, " " + unit)
            )
            sign = "≤" if t.get("at_most") else "≥"
            target = (
                f"{sign} {_ratio(t['target'])}"
                if unit == "ratio"
                else f"{sign} {_num(t['target'])} {unit}"
            )
            met = {True: "yes", False: "**no**", None: "n/a"}[t.get("met")]
            add(f"| {t['name']} | {value} | {target} | {met} |")
        add("")

    ceilings = results.get("ceilings") or {}
    if ceilings:
        add("## Physical ceilings (same servers, same run)")
        add("")
        zadd = ceilings.get("redis_zadd", {})
        rows = ceilings.get("cassandra_batch", {})
        add(
            f"- Redis: `{zadd.get('command', 'redis-benchmark -P 64 -t zadd')}` → "
            f"**{_num(zadd.get('ops_per_s'))} ZADD/s**"
            + (f" (error: {zadd['error']})" if zadd.get("error") else "")
        )
        add(
            f"- Cassandra: {rows.get('method', 'UNLOGGED batches')} "
            f"(batches of {rows.get('batch_rows', 100)}, "
            f"concurrency {rows.get('concurrency', 32)}, "
            f"{_num(rows.get('rows'))} rows) → on the fresh server "
            f"**{_num(rows.get('rows_per_s'))} rows/s**"
            + (f" (error: {rows['error']})" if rows.get("error") else "")
        )
        again = ceilings.get("cassandra_batch_before_history")
        if isinstance(again, dict):
            add(
                "- Cassandra, the same measurement again just before the history phase "
                "(after the earlier phases' writes; the reference for the history ratio): "
                f"**{_num(again.get('rows_per_s'))} rows/s**"
                + (f" (error: {again['error']})" if again.get("error") else "")
            )
        add("")

    fanout = results.get("fanout")
    if fanout:
        _fanout_section(add, fanout, results)

    peers = results.get("peers") or {}
    sf = peers.get("stream_framework")
    if sf:
        add("## Peer: Stream-Framework 1.4.0")
        add("")
        add(
            f"Status: **{sf.get('status')}**"
            + (
                f" — {sf.get('reason') or sf.get('error')}"
                if sf.get("reason") or sf.get("error")
                else ""
            )
        )
        add("")
        for name in ("uniform", "skewed"):
            run = sf.get(name)
            if not isinstance(run, dict):
                continue
            if run.get("error"):
                add(f"- {name}: error: {run['error']}")
                continue
            corr = run.get("correctness", {})
            add(
                f"- {name}: {_num(run.get('activities'))} activities x "
                f"{_num(run.get('mean_followers'), 1)} followers = "
                f"{_num(run.get('follower_inserts'))} follower-feed inserts in "
                f"{_num(run.get('seconds'), 2)} s → "
                f"**{_num(run.get('inserts_per_s'))} inserts/s**; "
                f"add_user_activity p50 {_num(_get(run, 'add_user_activity_ms', 'p50'), 2)} ms, "
                f"p99 {_num(_get(run, 'add_user_activity_ms', 'p99'), 2)} ms; correctness: "
                f"{corr.get('feeds_checked')} feeds checked, {corr.get('mismatches')} mismatches"
            )
        add("")
        add(
            "Run in its own virtualenv with the PEERS.md shims applied at run time "
            "(import hook renaming `async`, Celery eager + pickle, STREAM_REDIS_CONFIG → the bench "
            "Redis, db 1); defaults kept (max_length 100, 1% trim chance, 100 followers per task)."
        )
        add("")

    reads = results.get("reads")
    if reads:
        _reads_section(add, reads)

    e2e = results.get("e2e")
    if e2e:
        _e2e_section(add, e2e)

    notify = results.get("notify")
    if notify:
        _notify_section(add, notify)

    gateway = results.get("gateway")
    if gateway:
        add("## Gateway vs python-socketio")
        add("")
        add(
            f"Status: **{gateway.get('status')}**"
            + (f" — {gateway.get('error')}" if gateway.get("error") else "")
        )
        for key, value in gateway.items():
            if key not in {"status", "error"} and not isinstance(value, (dict, list)):
                add(f"- {key}: {value}")
        add("")

    errors = results.get("errors") or []
    if errors:
        add("## Errors")
        add("")
        for e in errors:
            add(f"- {e}")
        add("")

    add("## Plots")
    add("")
    add(
        "- `latency.png` — latency percentiles over time (e2e publish→receive; "
        "worker batch apply time)"
    )
    add("- `throughput.png` — achieved versus offered rate (fan-out sweep)")
    add("- `e2e_sweep.png` — e2e p50/p99 latency against offered rate")
    add("- `lag.png` — consumer lag while each backlog drains")
    add("- `memory.png` — worker RSS over time")
    add("")
    add("See docs/benchmarks.md for what each scenario measures and how to read this report.")
    add("")
    return "\n".join(lines)


def _fanout_section(add: Any, fanout: dict[str, Any], results: dict[str, Any]) -> None:
    phases = fanout.get("phases", {})
    ceilings = results.get("ceilings", {})
    sf = _get(results, "peers", "stream_framework") or {}
    zadd = _get(ceilings, "redis_zadd", "ops_per_s")
    raw = _get(ceilings, "cassandra_batch_before_history", "rows_per_s") or _get(
        ceilings, "cassandra_batch", "rows_per_s"
    )
    raw_fresh = _get(ceilings, "cassandra_batch", "rows_per_s")
    add("## Fan-out (`feed fanout`, one process per worker)")
    add("")
    graphs = fanout.get("graphs", {})
    for name, g in graphs.items():
        loaded = g.get("loaded", {})
        add(
            f"- Graph **{name}**: {g.get('description')}; mean {_num(g.get('mean_followers'), 1)}, "
            f"max {_num(g.get('max_followers'))}, accounts over 10,000 followers: "
            f"{g.get('accounts_over_10k')}; {_num(loaded.get('rows'))} follower rows loaded "
            f"for the users who post ({_num(loaded.get('rows_per_s'))} rows/s)."
        )
    add("")
    add("| figure | measured | reference | ratio |")
    add("|---|---:|---|---:|")
    ro = phases.get("redis_only", {})
    sk = phases.get("skewed", {})
    hi = phases.get("history", {})
    add(
        f"| timeline inserts/s, uniform, history off, 1 worker | {_num(ro.get('inserts_per_s'))} "
        f"| redis-benchmark ZADD {_num(zadd)}/s | {_ratio(ro.get('ratio_to_redis_zadd'))} |"
    )
    add(
        f"| ″ | ″ | Stream-Framework {_num(_get(sf, 'uniform', 'inserts_per_s'))}/s "
        f"| {_ratio(ro.get('ratio_to_stream_framework'))} |"
    )
    add(
        f"| timeline inserts/s, skewed, history off, 1 worker | {_num(sk.get('inserts_per_s'))} "
        f"| Stream-Framework {_num(_get(sf, 'skewed', 'inserts_per_s'))}/s "
        f"| {_ratio(sk.get('ratio_to_stream_framework'))} |"
    )
    add(
        f"| ″ | ″ | redis-benchmark ZADD {_num(zadd)}/s | {_ratio(sk.get('ratio_to_redis_zadd'))} |"
    )
    add(
        f"| Cassandra history rows/s, history on, 1 worker | {_num(hi.get('history_rows_per_s'))} "
        f"| raw UNLOGGED batches, just before, {_num(raw)} rows/s "
        f"| {_ratio(hi.get('ratio_to_cassandra_batch'))} |"
    )
    add(
        f"| ″ | ″ | raw UNLOGGED batches, fresh server, {_num(raw_fresh)} rows/s "
        f"| {_ratio(hi.get('ratio_to_cassandra_batch_fresh'))} |"
    )
    add(
        f"| timeline inserts/s with history on | {_num(hi.get('inserts_per_s'))} "
        f"| redis-benchmark ZADD {_num(zadd)}/s | {_ratio(_div(hi.get('inserts_per_s'), zadd))} |"
    )
    drain = fanout.get("drain", {})
    add(
        "| backlog drain, 1 worker (activities/s) "
        f"| {_num(drain.get('workers_1_activities_per_s'))} "
        f"| — | — |"
    )
    add(
        "| backlog drain, 2 workers (activities/s) "
        f"| {_num(drain.get('workers_2_activities_per_s'))} "
        f"| 1 worker | {_ratio(drain.get('speedup_2_vs_1'))} |"
    )
    add("")
    add(
        "Rates are steady-state (10% → 90% of the expected inserts); the start-to-end rate, which "
        "includes the group join and cold follower caches, is in the phase table below."
    )
    add("")
    add(
        "| phase | graph | workers | history | activities | inserts | steady inserts/s "
        "| overall inserts/s | drain s | first insert after s | worker RSS max MB "
        "| inserts per worker CPU s | per Redis CPU s | load avg |"
    )
    add("|---|---|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, p in phases.items():
        add(
            f"| {name} | {p.get('graph')} | {p.get('workers')} "
            f"| {'on' if p.get('history') else 'off'} "
            f"| {_num(p.get('activities'))} | {_num(p.get('expected_inserts'))} "
            f"| {_num(p.get('inserts_per_s'))} | {_num(p.get('inserts_per_s_overall'))} "
            f"| {_num(p.get('drain_seconds'), 1)} | {_num(p.get('time_to_first_insert_s'), 1)} "
            f"| {_num(_get(p, 'worker_rss_mb', 'max'), 1)} "
            f"| {_num(_get(p, 'cpu', 'inserts_per_worker_cpu_s'))} "
            f"| {_num(_get(p, 'cpu', 'inserts_per_redis_cpu_s'))} "
            f"| {_num(p.get('load_average_1m'), 2)} |"
            + (f" error: {p['error']}" if p.get("error") else "")
        )
    add("")
    memory = _get(ro, "memory") or {}
    if memory:
        add(
            "- Redis memory: "
            f"**{_num(memory.get('bytes_per_entry'), 1)} bytes per timeline entry** "
            f"(INFO used_memory delta {_num(memory.get('used_memory_delta'))} B over "
            f"{_num(memory.get('timeline_entries'))} entries held, activity bodies amortised in); "
            f"the sorted sets alone: {_num(memory.get('timeline_bytes_per_entry'), 1)} B/entry "
            f"(MEMORY USAGE); one activity body: {_num(memory.get('body_bytes_avg'))} B; "
            f"delta per entry inserted: {_num(memory.get('bytes_per_inserted'), 1)} B "
            "(lower when the 800-entry cap trimmed)."
        )
    mem = fanout.get("memory", {})
    add(f"- Worker RSS: max {_num(mem.get('worker_rss_mb_max'), 1)} MB over all phases.")
    sweep = fanout.get("sweep", {})
    steps = sweep.get("steps") or []
    if steps:
        add("")
        add("Offered-rate sweep (1 worker, history off, activities produced at a fixed rate):")
        add("")
        add(
            "| offered activities/s | offered inserts/s | achieved inserts/s "
            "| achieved ÷ offered | lag at end |"
        )
        add("|---:|---:|---:|---:|---:|")
        for s in steps:
            add(
                f"| {_num(s.get('offered_activities_per_s'))} "
                f"| {_num(s.get('offered_inserts_per_s'))} "
                f"| {_num(s.get('achieved_inserts_per_s'))} "
                f"| {_ratio(_div(s.get('achieved_inserts_per_s'), s.get('offered_inserts_per_s')))}"
                " "
                f"| {_num(s.get('lag_at_end'))} |"
            )
    elif sweep.get("error"):
        add(f"- Sweep: {sweep['error']}")
    soak = fanout.get("soak", {})
    if soak:
        add("")
        growth = soak.get("rss_growth")
        add(
            f"Memory soak (1 worker, history off, {_num(soak.get('offered_activities_per_s'))} "
            f"activities/s = half the drain rate, {_num(soak.get('seconds'))} s): worker RSS "
            f"{_num(soak.get('rss_after_warmup_mb'), 1)} MB after the warm-up, "
            f"{_num(soak.get('rss_end_mb'), 1)} MB at the end "
            f"({'n/a' if growth is None else f'{growth * 100:+.1f}%'}), "
            f"max {_num(soak.get('rss_max_mb'), 1)} MB; "
            f"{_num(soak.get('inserts_per_s'))} inserts/s; "
            f"lag at end {_num(soak.get('lag_at_end'))}"
            + (f"; error: {soak['error']}" if soak.get("error") else "")
            + "."
        )
    _redis_work_lines(add, fanout.get("redis_work"))
    profile = _get(ro, "profile")
    if isinstance(profile, dict) and profile.get("self"):
        add("")
        add(
            f"Worker profile (py-spy, {profile.get('samples')} samples during the redis_only "
            f"drain; flame graph: `{profile.get('flamegraph')}`). Top frames by own time:"
        )
        add("")
        add("| share | frame |")
        add("|---:|---|")
        for row in profile["self"][:12]:
            add(f"| {row['share'] * 100:.1f}% | `{row['frame']}` |")
    add("")


def _redis_work_lines(add: Any, work: dict[str, Any] | None) -> None:
    """The ``redis_work`` phase: Redis instructions per insert (callgrind), one Redis against
    a 3-master cluster."""
    if not work:
        return
    add("")
    if work.get("status") != "ok":
        add(f"- Redis work per insert (callgrind): {work.get('status')}.")
        return
    one, cluster = work.get("one") or {}, work.get("cluster") or {}
    shards = ", ".join(_num(v) for v in cluster.get("shard_instructions_per_insert") or [])
    add(
        "Redis work per insert (`redis_work`: the worker's timeline writes, Redis under "
        "callgrind, which counts instructions: the same count for the same work however busy "
        "the machine is):"
    )
    add("")
    add("| | one Redis | 3-master cluster | cluster ÷ one |")
    add("|---|---:|---:|---:|")
    add(
        f"| instructions per insert | {_num(one.get('instructions_per_insert'))} "
        f"| {_num(cluster.get('instructions_per_insert'))} (shards: {shards}) "
        f"| {_ratio(work.get('cluster_over_one'))} |"
    )
    add(
        f"| load across shards, max ÷ mean | — | {_num(cluster.get('spread_max_over_mean'), 3)} | |"
    )
    add(f"| inserts counted | {_num(one.get('inserts'))} | {_num(cluster.get('inserts'))} | |")


def _reads_section(add: Any, reads: dict[str, Any]) -> None:
    add("## Reads: hot/cold memory and read latency")
    add("")
    if reads.get("status") != "ok":
        add(f"Status: **{reads.get('status')}** — {reads.get('error', '')}")
        add("")
        return
    add(
        f"{_num(reads.get('users'))} users, 20% active, {_num(reads.get('activities'))} "
        f"activities, {reads.get('follows_per_user')} follows each (fanned out twice: hot/cold, "
        "and everyone hot)."
    )
    add("")
    add("| figure | value |")
    add("|---|---|")
    rows = (
        ("Redis timeline bytes per active user (hot/cold)", "redis_bytes_per_active_user", 1),
        ("Redis timeline bytes per user if everyone were hot", "redis_bytes_per_user_all_hot", 1),
        ("Redis bytes per timeline entry", "redis_bytes_per_entry", 1),
        ("activity bodies (stored once, either way), bytes", "redis_body_bytes", 1),
        ("timeline memory saved by hot/cold", "redis_saving", 100),
        ("total Redis memory saved (bodies included)", "redis_saving_total", 100),
    )
    for label, key, scale in rows:
        value = reads.get(key)
        shown = _num(value * scale if value is not None else None, 1 if scale == 100 else 0)
        add(f"| {label} | {shown}{' %' if scale == 100 else ''} |")
    add("")
    add("| read (`FeedReader.page`, limit 50) | p50 ms | p95 ms | p99 ms | max ms | reads |")
    add("|---|---|---|---|---|---|")
    for key, label in (
        ("read_first_page", "first page (Redis)"),
        ("read_crossing_redis_to_cassandra", "page crossing Redis → Cassandra"),
        ("read_with_merged_large_accounts", "first page with 5 merged large accounts"),
    ):
        p = reads.get(key) or {}
        add(
            f"| {label} | {_num(p.get('p50_ms'), 2)} | {_num(p.get('p95_ms'), 2)} | "
            f"{_num(p.get('p99_ms'), 2)} | {_num(p.get('max_ms'), 2)} | {_num(p.get('samples'))} |"
        )
    add("")


def _notify_section(add: Any, notify: dict[str, Any]) -> None:
    add("## Notification feeds: inserts beside timeline inserts, page and count reads")
    add("")
    if notify.get("status") != "ok":
        add(f"Status: **{notify.get('status')}** — {notify.get('error', '')}")
        add("")
        return
    cpu = notify.get("redis_cpu") or {}
    timeline, notes = cpu.get("timeline") or {}, cpu.get("notify") or {}
    add(
        "Redis only (Cassandra out of the timing), same Redis, the phases alternated: "
        f"{_num(timeline.get('activities'))} activities fanned out to "
        f"{_num(timeline.get('mean_followers'), 1)} active followers on average "
        f"({timeline.get('activities_per_batch')} a batch, `RedisTimelines.insert`), and "
        f"{_num(notes.get('activities'))} activities notifying 1-3 of "
        f"{_num(notes.get('recipients'))} users ({notes.get('activities_per_batch')} a batch, "
        "`NotifyRedis.apply`, a store that writes nothing; most join an open group of a hot post, "
        "20% open a new one)."
    )
    add("")
    add("| per inserted entry | timeline | notification | notification ÷ timeline |")
    add("|---|---:|---:|---:|")
    add(
        f"| Redis CPU µs (INFO cpu, sys+user) | {_num(timeline.get('redis_cpu_us_per_entry'), 2)} "
        f"| {_num(notes.get('redis_cpu_us_per_entry'), 2)} | {_ratio(cpu.get('ratio_cpu'))} |"
    )
    add(
        f"| script µs (commandstats evalsha) | {_num(timeline.get('evalsha_us_per_entry'), 2)} "
        f"| {_num(notes.get('evalsha_us_per_entry'), 2)} | {_ratio(cpu.get('ratio_evalsha'))} |"
    )
    add(
        f"| entries per script call | {_num(timeline.get('entries_per_script_call'), 1)} "
        f"| {_num(notes.get('entries_per_script_call'), 1)} | |"
    )
    add(
        f"| client inserts/s | {_num(timeline.get('inserts_per_s'))} "
        f"| {_num(notes.get('inserts_per_s'))} | {_ratio(cpu.get('ratio_inserts_per_s'))} |"
    )
    goal = notify.get("goal_ratio")
    met = cpu.get("ratio_cpu") is not None and goal is not None and cpu["ratio_cpu"] <= goal
    add("")
    add(
        f"Goal (issue 17): ≤ {_ratio(goal)} Redis CPU per entry — "
        + ("met." if met else "**not met**.")
    )
    add("")
    rows = notes.get("commands") or []
    if rows:
        add("Where a notification insert's Redis time goes (commandstats, the script's calls):")
        add("")
        add("| command | calls per entry | µs per entry |")
        add("|---|---:|---:|")
        for row in rows:
            add(
                f"| `{row['command']}` | {_num(row.get('calls_per_entry'), 2)} "
                f"| {_num(row.get('usec_per_entry'), 2)} |"
            )
        add("")
    proc = notify.get("processor") or {}
    add(
        "Through `fanout.processor.Processor` (history rows on, notifications in Redis and "
        f"Cassandra), batches of {proc.get('batch')}, alternated over {proc.get('rounds')} rounds:"
    )
    add("")
    add("| phase | activities/s | timeline inserts/s | notification inserts/s | Redis CPU s |")
    add("|---|---:|---:|---:|---:|")
    for key, label in (("without_notify", "without `notify`"), ("with_notify", "with `notify`")):
        row = proc.get(key) or {}
        add(
            f"| {label} | {_num(row.get('activities_per_s'))} "
            f"| {_num(row.get('timeline_inserts_per_s'))} "
            f"| {_num(row.get('notifications_per_s'))} | {_num(row.get('redis_cpu_s'), 2)} |"
        )
    add("")
    if proc.get("redis_cpu_us_per_notification") is not None:
        add(
            "Cross-check from these two phases: Redis CPU "
            f"{_num(proc.get('redis_cpu_us_per_timeline_insert'), 2)} µs per timeline insert "
            f"(without `notify`), {_num(proc.get('redis_cpu_us_per_notification'), 2)} µs per "
            "notification (what the phase with `notify` spent beyond its timeline inserts): "
            f"{_ratio(proc.get('ratio_cpu'))}."
        )
        add("")
    cold = notify.get("cold_inserts") or {}
    if cold.get("cold"):
        add(
            f"Cold recipients: one batch notifying {_num(cold.get('users'))} users whose feeds "
            f"({cold.get('groups_per_user')} groups each) are in Cassandra only took "
            f"{_num(_get(cold, 'cold', 'seconds'), 2)} s "
            f"({_num(_get(cold, 'cold', 'ms_per_user'), 2)} ms a user, loads included); the same "
            f"batch once they are hot {_num(_get(cold, 'hot', 'seconds'), 2)} s "
            f"({_num(_get(cold, 'hot', 'ms_per_user'), 2)} ms a user): "
            f"{_ratio(cold.get('ratio_cold_to_hot'))}."
        )
        add("")
    reads = notify.get("reads") or {}
    groups = reads.get("groups_per_reader") or {}
    add(
        f"Reads: {_num(reads.get('readers'))} users holding "
        f"{groups.get('min')}-{groups.get('max')} "
        "groups each; HTTP against a live gateway on 127.0.0.1, one request at a time "
        f"(first page, limit {reads.get('page_limit')}); errors: {reads.get('http_errors')}."
    )
    add("")
    add("| read | p50 ms | p95 ms | p99 ms | max ms | requests |")
    add("|---|---:|---:|---:|---:|---:|")
    for key, label in (
        ("http_page", "`GET /v1/notifications`"),
        ("http_counts", "`GET /v1/notifications/counts`"),
        ("http_page_cold", "`GET /v1/notifications`, cold (loaded from Cassandra)"),
    ):
        p = reads.get(key) or {}
        add(
            f"| {label} | {_num(p.get('p50_ms'), 2)} | {_num(p.get('p95_ms'), 2)} | "
            f"{_num(p.get('p99_ms'), 2)} | {_num(p.get('max_ms'), 2)} | {_num(p.get('samples'))} |"
        )
    add("")
    add("| one call (`AsyncNotifyRedis`, in-process) | Redis CPU µs | script µs | client µs |")
    add("|---|---:|---:|---:|")
    for key, label in (("counts_in_process", "counts"), ("page_in_process", "first page")):
        p = reads.get(key) or {}
        add(
            f"| {label} | {_num(p.get('redis_cpu_us_per_call'), 1)} "
            f"| {_num(p.get('evalsha_us_per_call'), 1)} | {_num(p.get('client_us_per_call'), 1)} |"
        )
    add("")
    commands = _get(reads, "counts_in_process", "commands") or []
    if commands:
        shown = ", ".join(
            f"`{c['command']}` {_num(c.get('calls_per_entry'), 1)}" for c in commands[:8]
        )
        add(f"Redis commands of one counts call (calls each): {shown}.")
        add("")


def _div(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return float(a) / float(b)
    return None


def _e2e_section(add: Any, e2e: dict[str, Any]) -> None:
    add("## End to end (Kafka → worker → Redis → gateway → WebSocket), swept over offered rates")
    add("")
    add(f"Status: **{e2e.get('status')}**" + (f" — {e2e.get('error')}" if e2e.get("error") else ""))
    for error in e2e.get("errors") or []:
        add(f"- {error}")
    add("")
    runs = [r for r in e2e.get("runs") or [] if not r.get("skipped")]
    if not runs:
        return
    add(
        f"{_num(e2e.get('clients'))} connected followers; each rate for a "
        f"{_num(e2e.get('warmup_s'))} s warm-up (its deliveries count for loss only) and "
        f"{_num(e2e.get('seconds'))} s measured. {e2e.get('config', '')}."
    )
    add("")
    best = e2e.get("max_rate_p99_under_100ms") or {}
    for mode, rate in best.items():
        add(
            f"- Highest rate with p99 < 100 ms and nothing lost or repeated, history rows "
            f"{mode}: **{_num(rate)} activities/s**"
        )
    add("")
    add("| history rows | offered/s | p50 ms | p95 ms | p99 ms | max ms | delivered | lost | dup |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in e2e.get("runs") or []:
        mode = "on" if r.get("history") else "off"
        if r.get("skipped"):
            add(f"| {mode} | {_num(r.get('rate'))} | skipped: a lower rate was overwhelmed |||||||")
            continue
        lat = r.get("latency_ms") or {}
        add(
            f"| {mode} | {_num(r.get('rate'))} | {_num(lat.get('p50'), 1)} | "
            f"{_num(lat.get('p95'), 1)} | {_num(lat.get('p99'), 1)} | {_num(lat.get('max'), 1)} | "
            f"{_num(r.get('delivered'))} | {_num(r.get('lost'))} | {_num(r.get('duplicates'))} |"
        )
    add("")
    add(
        "Where the time goes: each stage's latency from the activity's Kafka record timestamp "
        "(cumulative p50 / p99 in ms; `feed.stages`). Servers' stages from their histograms, "
        "the client's exact."
    )
    add("")
    head = " | ".join(
        f"{'on' if r.get('history') else 'off'} {_num(r.get('rate'))}/s" for r in runs
    )
    add(f"| stage | where | {head} |")
    add("|---|---|" + "---:|" * len(runs))
    names = [row["stage"] for row in runs[0].get("stages_ms") or []]
    for index, name in enumerate(names):
        cells = []
        where = ""
        for r in runs:
            row = (r.get("stages_ms") or [])[index]
            where = row.get("where", "")
            cells.append(f"{_num(row.get('p50'), 1)} / {_num(row.get('p99'), 1)}")
        add(f"| {name} | {where} | " + " | ".join(cells) + " |")
    add("")
    add("CPU of each process over the measured window, in cores (the machine has 2):")
    add("")
    add(f"| process | {head} |")
    add("|---|" + "---:|" * len(runs))
    for name in runs[0].get("cores") or {}:
        cells = [_num((r.get("cores") or {}).get(name), 2) for r in runs]
        add(f"| {name} | " + " | ".join(cells) + " |")
    add("")
    add(
        "`broker` is the Kafka-protocol test broker and `bench` the load generator (the producer "
        "and the WebSocket clients): test rig, not this project."
    )
    add("")


# --- plots -------------------------------------------------------------------------------------
def write_plots(outdir: Path, results: dict[str, Any]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = _get(results, "fanout", "phases") or {}
    paths: dict[str, Path] = {}

    # latency percentiles over time
    e2e_series = _get(results, "e2e", "latency_series") or []
    batch_phases = [
        (n, p.get("batch_latency") or [])
        for n, p in phases.items()
        if n in ("redis_only", "history")
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    if e2e_series:
        t = [row["t"] for row in e2e_series]
        for key, label in (
            ("p50_ms", "p50"),
            ("p95_ms", "p95"),
            ("p99_ms", "p99"),
            ("max_ms", "max"),
        ):
            ax.plot(t, [row.get(key) for row in e2e_series], label=label)
        ax.legend()
    else:
        _no_data(ax, "e2e did not run (or had no deliveries)")
    ax.set_title("e2e publish → WebSocket receive latency")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("ms")
    ax = axes[1]
    plotted = False
    for name, rows in batch_phases:
        if not rows:
            continue
        t = [row["t"] for row in rows]
        for key, style in (("p50_ms", "-"), ("p99_ms", "--")):
            ax.plot(
                t,
                [row[key] for row in rows],
                style,
                marker="o",
                markersize=3,
                label=f"{name} {key[:3]}",
            )
        plotted = True
    if plotted:
        ax.legend()
    else:
        _no_data(ax, "no fan-out batches observed")
    paths["latency"] = _save(
        fig,
        ax,
        outdir,
        "latency",
        "fan-out worker: batch apply time (≤500 records)",
        "time since worker start (s)",
        "ms",
    )

    # throughput versus offered rate
    steps = _get(results, "fanout", "sweep", "steps") or []
    fig, ax = plt.subplots(figsize=(7, 5))
    if steps:
        x = [s["offered_inserts_per_s"] for s in steps]
        y = [s["achieved_inserts_per_s"] for s in steps]
        ax.plot(x, y, "o-", label="feed fanout, 1 worker (history off)")
        top = max(x + y) * 1.1
        ax.plot([0, top], [0, top], ":", color="grey", label="achieved = offered")
        zadd = _get(results, "ceilings", "redis_zadd", "ops_per_s")
        if isinstance(zadd, (int, float)) and zadd <= 2 * top:
            ax.axhline(
                zadd,
                color="red",
                linestyle="--",
                linewidth=0.8,
                label=f"redis-benchmark ZADD ceiling ({zadd:,.0f}/s)",
            )
        elif isinstance(zadd, (int, float)):
            ax.text(
                0.02,
                0.97,
                f"redis-benchmark ZADD ceiling {zadd:,.0f}/s (off scale)",
                transform=ax.transAxes,
                va="top",
                fontsize=8,
                color="red",
            )
        peer = _get(results, "peers", "stream_framework", "uniform", "inserts_per_s")
        if isinstance(peer, (int, float)):
            ax.axhline(
                peer,
                color="purple",
                linestyle="--",
                linewidth=0.8,
                label=f"Stream-Framework ({peer:,.0f}/s)",
            )
        ax.set_ylim(
            0,
            max(
                [top, *(v * 1.05 for v in (zadd,) if isinstance(v, (int, float)) and v <= 2 * top)]
            ),
        )
        ax.legend(fontsize=8)
    else:
        _no_data(ax, "no sweep data")
    paths["throughput"] = _save(
        fig,
        ax,
        outdir,
        "throughput",
        "throughput versus offered rate",
        "offered timeline inserts/s",
        "achieved timeline inserts/s",
    )

    # e2e: latency against offered rate
    fig, ax = plt.subplots(figsize=(8, 5))
    runs = [r for r in _get(results, "e2e", "runs") or [] if not r.get("skipped")]
    for history in (False, True):
        rows = sorted(
            (r for r in runs if bool(r.get("history")) == history), key=lambda r: r["rate"]
        )
        if not rows:
            continue
        rates = [r["rate"] for r in rows]
        mode = "on" if history else "off"
        for key, style in (("p50", "-o"), ("p99", "--o")):
            ax.plot(
                rates,
                [(r.get("latency_ms") or {}).get(key) for r in rows],
                style,
                label=f"{key}, history rows {mode}",
            )
    if runs:
        ax.axhline(100, color="red", linestyle=":", linewidth=0.8, label="100 ms")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        _no_data(ax, "e2e did not run")
    paths["e2e_sweep"] = _save(
        fig,
        ax,
        outdir,
        "e2e_sweep",
        "e2e publish → WebSocket read latency against offered rate",
        "offered activities/s",
        "ms",
    )

    # lag while the backlog drains
    fig, ax = plt.subplots(figsize=(8, 5))
    plotted = False
    for name, p in phases.items():
        s = p.get("series") or {}
        points = [
            (t, lag)
            for t, lag in zip(s.get("t", []), s.get("lag", []), strict=False)
            if lag is not None
        ]
        if points:
            ax.plot(
                [a for a, _ in points],
                [b for _, b in points],
                label=f"{name} ({p.get('workers')} worker(s))",
            )
            plotted = True
    if plotted:
        ax.legend()
    else:
        _no_data(ax, "no drain data")
    paths["lag"] = _save(
        fig,
        ax,
        outdir,
        "lag",
        "consumer lag while the backlog drains",
        "time since worker start (s)",
        "lag (records)",
    )

    # worker RSS
    fig, ax = plt.subplots(figsize=(8, 5))
    plotted = False
    for name, p in phases.items():
        s = p.get("series") or {}
        t = s.get("t", [])
        rss = s.get("rss_mb", [])
        if not t or not rss:
            continue
        workers = max((len(r) for r in rss), default=0)
        for w in range(workers):
            values = [
                float(row[w]) if w < len(row) and row[w] is not None else math.nan for row in rss
            ]
            ax.plot(t, values, label=f"{name} worker {w}")
            plotted = True
    if plotted:
        ax.legend(fontsize=8)
    else:
        _no_data(ax, "no RSS samples")
    paths["memory"] = _save(
        fig, ax, outdir, "memory", "fan-out worker RSS", "time since worker start (s)", "MB"
    )
    return paths


def _save(fig: Any, ax: Any, outdir: Path, name: str, title: str, xlabel: str, ylabel: str) -> Path:
    """Title and label ``ax``, write ``fig`` to ``outdir/<name>.png`` and close it."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    path = outdir / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
