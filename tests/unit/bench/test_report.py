"""bench.report: the e2e section shows the sweep, where the time goes and who used the CPU; the
fan-out section shows the Redis work per insert of both topologies."""

from __future__ import annotations

from typing import Any

from bench.e2e import STAGES
from bench.report import render_markdown


def _run(rate: float, history: bool, scale: float) -> dict[str, Any]:
    return {
        "history": history,
        "rate": rate,
        "connected": 10,
        "latency_ms": {"p50": 10 * scale, "p95": 20 * scale, "p99": 30 * scale, "max": 40 * scale},
        "delivered": 100,
        "lost": 0,
        "duplicates": 0,
        "stages_ms": [
            {"stage": name, "where": where, "p50": i * scale, "p99": 2 * i * scale}
            for i, (name, where, _metric, _label) in enumerate(STAGES, start=1)
        ],
        "cores": {"broker": 0.5 * scale, "worker": 0.25},
    }


def test_the_e2e_section_has_the_sweep_the_stages_and_the_cores() -> None:
    runs = [_run(50, False, 1), _run(250, False, 3), _run(50, True, 2)]
    runs.append({"history": True, "rate": 250, "skipped": True})
    e2e = {
        "status": "ok",
        "clients": 10,
        "seconds": 5,
        "warmup_s": 1,
        "config": "x",
        "runs": runs,
        "max_rate_p99_under_100ms": {"off": 250, "on": 50},
    }
    text = render_markdown({"e2e": e2e})
    assert "history rows off: **250 activities/s**" in text
    assert "history rows on: **50 activities/s**" in text
    assert "| off | 250 | 30.0 | 60.0 | 90.0 | 120.0 | 100 | 0 | 0 |" in text
    assert "| on | 250 | skipped: a lower rate was overwhelmed" in text
    # one row per stage, one column per measured run (cumulative p50 / p99)
    assert "| stage | where | off 50/s | off 250/s | on 50/s |" in text
    assert "| published | worker | 3.0 / 6.0 | 9.0 / 18.0 | 6.0 / 12.0 |" in text
    assert "| read | client | 6.0 / 12.0 | 18.0 / 36.0 | 12.0 / 24.0 |" in text
    assert "| broker | 0.50 | 1.50 | 1.00 |" in text


def test_the_fanout_section_has_the_redis_work_of_both_topologies() -> None:
    one = {"inserts": 20_000, "instructions_per_insert": 16_000.0}
    cluster = {
        "inserts": 20_000,
        "instructions_per_insert": 16_800.0,
        "shard_instructions_per_insert": [5_500.0, 5_600.0, 5_700.0],
        "spread_max_over_mean": 1.0179,
    }
    work = {"status": "ok", "one": one, "cluster": cluster, "cluster_over_one": 1.05}
    text = render_markdown({"fanout": {"status": "ok", "phases": {}, "redis_work": work}})
    assert "| instructions per insert | 16,000 | 16,800 (shards: 5,500, 5,600, 5,700) |" in text
    assert "| load across shards, max ÷ mean | — | 1.018 | |" in text
    skipped = {"status": "skipped: valgrind not found (Debian package valgrind)"}
    text = render_markdown({"fanout": {"status": "ok", "phases": {}, "redis_work": skipped}})
    assert "- Redis work per insert (callgrind): skipped: valgrind not found" in text
