"""The benchmark harness works: ``feed bench fanout --quick`` end to end, and the capacity model.

The smoke run checks the harness, never speed: it asserts that every figure the report is built
from was measured (positive), that each stands beside its reference as a ratio, and that the
report and the plots were written. The Stream-Framework peer is skipped here
(FEED_BENCH_SKIP_PEERS=1) to keep CI fast; its code path runs in every `feed bench` without it.
The bench starts its own stack (Redis, the Kafka-protocol broker, Cassandra) on free ports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.capacity import ASSUMED, figures_from_results, model

REPO = Path(__file__).resolve().parents[3]
PLOTS = ("latency.png", "throughput.png", "e2e_sweep.png", "lag.png", "memory.png")


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _quick_bench(
    scenario: str, out: Path, timeout: float, **switches: str
) -> tuple[Path, dict[str, Any]]:
    """``feed bench <scenario> --quick --out <out>`` without the peer: its run folder and
    results."""
    env = {**os.environ, "FEED_BENCH_SKIP_PEERS": "1", **switches}
    done = subprocess.run(
        [sys.executable, "-m", "feed.cli", "bench", scenario, "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"feed bench failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    runs = [p for p in out.iterdir() if (p / "results.json").is_file()]
    assert len(runs) == 1, f"expected one run folder in {out}: {list(out.iterdir())}"
    return runs[0], json.loads((runs[0] / "results.json").read_text())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return _quick_bench("fanout", tmp_path_factory.mktemp("bench"), 170)


@pytest.mark.timeout(200)
def test_quick_fanout_measures_every_figure_beside_its_reference(
    quick_run: tuple[Path, dict[str, Any]],
) -> None:
    _, results = quick_run
    assert results["meta"]["quick"] is True
    assert results["errors"] == [], results["errors"]
    ceilings = results["ceilings"]
    assert _positive(ceilings["redis_zadd"]["ops_per_s"])
    assert "-P 64" in ceilings["redis_zadd"]["command"]
    assert _positive(ceilings["cassandra_batch"]["rows_per_s"])

    fanout = results["fanout"]
    assert fanout["status"] == "ok"
    assert fanout["graphs"]["uniform"]["users"] > 0
    assert (
        fanout["graphs"]["skewed"]["max_followers"] > fanout["graphs"]["skewed"]["median_followers"]
    )
    phases = fanout["phases"]
    for name in ("redis_only", "drain_2_workers", "skewed", "history"):
        phase = phases[name]
        assert phase["completed"] is True, (name, phase.get("error"))
        assert _positive(phase["inserts_per_s"]), name
        assert _positive(phase["activities_per_s"]), name
        assert _positive(phase["worker_rss_mb"]["max"]), name
        assert phase["series"]["t"], name
    assert phases["drain_2_workers"]["workers"] == 2
    assert _positive(phases["redis_only"]["ratio_to_redis_zadd"])
    assert _positive(phases["history"]["history_rows_per_s"])
    assert _positive(phases["history"]["ratio_to_cassandra_batch"])
    assert _positive(phases["redis_only"]["memory"]["bytes_per_entry"])
    assert _positive(fanout["drain"]["speedup_2_vs_1"])
    steps = fanout["sweep"]["steps"]
    assert steps and all(_positive(s["achieved_inserts_per_s"]) for s in steps)

    # The peer was skipped on purpose; the ratio to it is then absent, not invented.
    assert results["peers"]["stream_framework"]["status"] == "skipped"
    assert phases["redis_only"]["ratio_to_stream_framework"] is None
    names = [t["name"] for t in results["targets"]]
    assert any("ZADD" in n for n in names) and any("Stream-Framework" in n for n in names)


def _x(ratio: float) -> str:
    """A ratio as the report prints it: 3 significant digits, or one decimal from 10x."""
    return f"{ratio:.3g}x" if ratio < 10 else f"{ratio:,.1f}x"


@pytest.mark.timeout(200)
def test_quick_fanout_writes_the_report_and_plots(quick_run: tuple[Path, dict[str, Any]]) -> None:
    folder, results = quick_run
    report = (folder / "report.md").read_text()
    assert "redis-benchmark" in report and "ZADD" in report
    assert "raw UNLOGGED batches" in report
    assert "Stream-Framework" in report
    # Each ratio of the results is the quotient of its two measured figures, and the report's
    # table prints it beside its reference (the reference's figure, then the ratio).
    ceilings = results["ceilings"]
    phases = results["fanout"]["phases"]
    zadd = ceilings["redis_zadd"]["ops_per_s"]
    raw = ceilings.get("cassandra_batch_before_history", ceilings["cassandra_batch"])["rows_per_s"]
    raw_fresh = ceilings["cassandra_batch"]["rows_per_s"]
    redis_only, skewed, history = phases["redis_only"], phases["skewed"], phases["history"]
    speedup = phases["drain_2_workers"]["activities_per_s"] / redis_only["activities_per_s"]
    rows = {
        "redis_only/ZADD": (redis_only["inserts_per_s"] / zadd, f"ZADD {zadd:,.0f}/s"),
        "skewed/ZADD": (skewed["inserts_per_s"] / zadd, f"ZADD {zadd:,.0f}/s"),
        "history/raw": (history["history_rows_per_s"] / raw, f"just before, {raw:,.0f} rows/s"),
        "history/raw_fresh": (
            history["history_rows_per_s"] / raw_fresh,
            f"fresh server, {raw_fresh:,.0f} rows/s",
        ),
        "drain 2 vs 1": (speedup, "1 worker"),
    }
    assert redis_only["ratio_to_redis_zadd"] == pytest.approx(rows["redis_only/ZADD"][0])
    assert skewed["ratio_to_redis_zadd"] == pytest.approx(rows["skewed/ZADD"][0])
    assert history["ratio_to_cassandra_batch"] == pytest.approx(rows["history/raw"][0])
    assert history["ratio_to_cassandra_batch_fresh"] == pytest.approx(rows["history/raw_fresh"][0])
    assert results["fanout"]["drain"]["speedup_2_vs_1"] == pytest.approx(speedup)
    for name, (ratio, reference) in rows.items():
        assert f"{reference} | {_x(ratio)} |" in report, (name, _x(ratio))
    # The skipped peer's ratios are printed as absent, not as a number.
    assert report.count("/s | n/a |") == 2, "the Stream-Framework ratios"
    for name in PLOTS:
        data = (folder / name).read_bytes()
        assert data.startswith(b"\x89PNG"), name
        assert len(data) > 5_000, name


def test_capacity_model_defaults_are_twitter_2012() -> None:
    result = model()
    load = result["load"]
    assert load["timeline_writes_per_s_avg"] == pytest.approx(345_000)
    assert load["timeline_writes_per_s_peak"] == pytest.approx(900_000)
    assert {c["source"] for c in result["components"]} == {"assumed"}
    assert result["total_cores"] == sum(c["cores"] for c in result["components"])
    workers = next(c for c in result["components"] if c["component"] == "fan-out workers")
    expected = -(-900_000 // int(ASSUMED["worker_inserts_per_core"] * 0.7))
    assert workers["cores"] == expected


def test_capacity_model_uses_measured_figures_and_scales_with_load() -> None:
    results = {
        "fanout": {
            "phases": {
                "redis_only": {
                    "cpu": {
                        "inserts_per_worker_cpu_s": 50_000.0,
                        "inserts_per_redis_cpu_s": 400_000.0,
                    },
                    "memory": {"bytes_per_entry": 90.0},
                },
                "history": {"cpu": {"history_rows_per_cassandra_cpu_s": 20_000.0}},
            }
        },
    }
    figures, sources = figures_from_results(results, label="run X")
    assert figures["worker_inserts_per_core"] == 50_000.0
    assert sources["worker_inserts_per_core"].startswith("run X")
    small = model(
        rate=100,
        peak=200,
        followers=10,
        reads=1_000,
        connections=1_000,
        figures=figures,
        sources=sources,
    )
    big = model(
        rate=1_000,
        peak=2_000,
        followers=10,
        reads=10_000,
        connections=10_000,
        figures=figures,
        sources=sources,
    )
    assert big["total_cores"] > small["total_cores"]
    worker = next(c for c in big["components"] if c["component"] == "fan-out workers")
    assert worker["per_core"] == 50_000.0 and worker["source"].startswith("run X")
    assert big["redis_memory"]["bytes_per_entry"] == 90.0
    with pytest.raises(ValueError):
        model(rate=-1)


@pytest.mark.timeout(240)
def test_quick_e2e_reports_every_stage_and_every_processs_cpu(tmp_path: Path) -> None:
    """``feed bench e2e --quick``: every delivery arrives once, every stage of feed.stages was
    measured in pipeline order, and the CPU of every process is in the report (the harness,
    never speed)."""
    run, results = _quick_bench("e2e", tmp_path, 220, FEED_BENCH_E2E_HISTORY="0")
    e2e = results["e2e"]
    assert e2e["status"] == "ok", e2e
    [row] = e2e["runs"]
    assert row["history"] is False and row["rate"] == 50.0
    assert row["lost"] == 0 and row["duplicates"] == 0
    assert row["delivered"] == row["expected_deliveries"] > 0
    stages = {s["stage"]: s for s in row["stages_ms"]}
    assert list(stages) == ["consumed", "durable", "published", "received", "written", "read"]
    assert all(_positive(s["count"]) and _positive(s["p99"]) for s in stages.values()), stages
    p50s = [stages[name]["p50"] for name in ("consumed", "durable", "published")]
    assert p50s == sorted(p50s), p50s  # one record passes them in this order
    assert set(row["cores"]) == {"broker", "redis", "cassandra", "worker", "gateway", "bench"}
    assert all(_positive(v) for v in row["cores"].values()), row["cores"]
    report = (run / "report.md").read_text()
    assert "| stage | where | off 50/s |" in report
    assert (run / "e2e_sweep.png").stat().st_size > 0


@pytest.mark.timeout(200)
def test_quick_notify_measures_both_inserts_and_the_reads(tmp_path: Path) -> None:
    """``feed bench notify --quick``: Redis CPU per notification insert beside per timeline
    insert, and their ratio; both insert rates through the Processor; the HTTP reads (warm and
    cold) without an error; the figures in the report (the harness, never speed)."""
    run, results = _quick_bench("notify", tmp_path, 180)
    notify = results["notify"]
    assert notify["status"] == "ok", notify
    cpu = notify["redis_cpu"]
    for side in ("timeline", "notify"):
        phase = cpu[side]
        assert _positive(phase["entries"]) and _positive(phase["inserts_per_s"]), side
        assert _positive(phase["redis_cpu_us_per_entry"]), side
        assert _positive(phase["evalsha_us_per_entry"]), side
    ratio = cpu["notify"]["redis_cpu_us_per_entry"] / cpu["timeline"]["redis_cpu_us_per_entry"]
    assert cpu["ratio_cpu"] == pytest.approx(ratio)
    assert any(row["command"] == "evalsha" for row in cpu["notify"]["commands"])
    proc = notify["processor"]
    assert _positive(proc["with_notify"]["notifications_per_s"])
    assert _positive(proc["with_notify"]["timeline_inserts_per_s"])
    assert _positive(proc["without_notify"]["timeline_inserts_per_s"])
    assert proc["without_notify"]["notifications"] == 0
    cold = notify["cold_inserts"]
    assert _positive(cold["cold"]["ms_per_user"]) and _positive(cold["hot"]["ms_per_user"])
    reads = notify["reads"]
    assert reads["groups_mismatches"] == 0 and reads["http_errors"] == 0, reads
    assert reads["groups_per_reader"]["min"] >= 50
    for key in ("http_page", "http_counts", "http_page_cold"):
        assert _positive(reads[key]["p99_ms"]), key
        assert reads[key]["p99_ms"] >= reads[key]["p50_ms"], key
    assert _positive(reads["counts_in_process"]["redis_cpu_us_per_call"])
    [target] = [t for t in results["targets"] if "notification insert" in t["name"]]
    assert target["value"] == pytest.approx(ratio) and target["at_most"] is True
    report = (run / "report.md").read_text()
    assert "## Notification feeds" in report
    assert f"| {_x(ratio)} |" in report
