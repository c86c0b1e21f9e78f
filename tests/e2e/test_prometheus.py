"""A real Prometheus (Debian's ``prometheus``, installed by ``infra/setup.sh``) scrapes a real
``feed fanout`` and ``feed gateway`` while traffic flows, on the test session's servers:

1. every query of the Grafana dashboard (``infra/grafana/dashboards/feed.json``) is valid
   PromQL for this Prometheus, and the ones that traffic feeds (delivery latency, stages,
   event-loop lag, consumption, pushes, connections, process metrics) return data;
2. the alert rules (``infra/prometheus/rules.yml``, with every ``for:`` cut to 1 s so the test need
   not wait minutes) load, and stopping the worker while records wait (lag) fires
   ``FeedWorkerDown`` and ``FeedTargetDown``, through Prometheus' own HTTP API.

Prometheus listens on 127.0.0.1 on a free port, scrapes every second, and is stopped by pid.
Every wait has a deadline.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
import yaml

from tests.conftest import wait_for
from tests.support.pipeline import Pipeline, frames_until, next_frame, shared_env
from tests.support.procs import free_port, http_get

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "infra" / "prometheus" / "rules.yml"
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "feed.json"
#: Dashboard queries that the traffic of this test must fill (the others may be empty: no DLQ,
#: no resets, no slow clients...).
FED = (
    "feed_delivery_latency_seconds_bucket",
    "feed_stage_latency_seconds_bucket",
    "feed_event_loop_lag_seconds_bucket",
    "feed_activities_consumed_total",
    "feed_timeline_inserts_total",
    "feed_gateway_messages_pushed_total",
    "feed_gateway_connections",
    "feed_assigned_partitions",
    "process_cpu_seconds_total",
    "feed_gateway_pubsub_connected",
)


@pytest.fixture(scope="module")
def pipeline(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    env = shared_env(stack_env, "prom")
    with Pipeline(env, tmp_path_factory.mktemp("prom")).running() as p:
        yield p


@pytest.fixture(scope="module")
def prometheus(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    # Never skipped: `make test` installs it, so its absence is a set-up failure.
    assert binary, "prometheus is missing: run infra/setup.sh (apt-get install prometheus)"
    work = tmp_path_factory.mktemp("prometheus")
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "1s"
    (work / "rules.yml").write_text(yaml.safe_dump(rules))
    worker = pipeline.metrics_url.removeprefix("http://")
    gateway = pipeline.gateway_url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(work / "rules.yml")],
        "scrape_configs": [
            {"job_name": "feed-fanout", "static_configs": [{"targets": [worker]}]},
            {"job_name": "feed-gateway", "static_configs": [{"targets": [gateway]}]},
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (work / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: http_get(f"{base}/-/ready")[0] == 200,
            timeout=30,
            message="prometheus ready",
        )
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _api(base: str, path: str, **params: str) -> Any:
    status, body = http_get(f"{base}{path}?{urllib.parse.urlencode(params)}", timeout=10)
    answer = json.loads(body or b"{}")
    assert status == 200 and answer.get("status") == "success", (status, body[:500])
    return answer["data"]


def _query(base: str, expr: str) -> list[Any]:
    result: list[Any] = _api(base, "/api/v1/query", query=expr)["result"]
    return result


def _dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]


def _firing(base: str) -> set[str]:
    alerts = _api(base, "/api/v1/alerts")["alerts"]
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


async def test_dashboard_queries_return_data_and_a_stopped_worker_fires_its_alert(
    pipeline: Pipeline, prometheus: str, ids: Callable[[str], str]
) -> None:
    s = pipeline.settings
    star, fan = ids("star"), ids("fan")
    pipeline.follow(fan, star)
    wait_for(
        lambda: pipeline.worker_metric("feed_activities_consumed_total") >= 1,
        timeout=30,
        message="the follow consumed",
    )
    auth = {"Authorization": f"Bearer {pipeline.token(fan)}"}
    async with websockets.connect(pipeline.ws_url, additional_headers=auth) as ws:
        assert (await next_frame(ws, 5))["type"] == "welcome"
        for round_ in range(5):
            aids = [ids(f"a{round_}-{n}") for n in range(4)]
            for aid in aids:
                pipeline.produce(s.topic_activities, star, pipeline.activity(aid, star))
            await frames_until(
                ws, lambda f, last=aids[-1]: f.get("activity", {}).get("id") == last, timeout=15
            )
        # both targets scraped, and the deliveries in Prometheus
        wait_for(
            lambda: (
                len(_query(prometheus, "up == 1")) == 2
                and bool(_query(prometheus, "sum(feed_delivery_latency_seconds_count) > 0"))
            ),
            timeout=30,
            message="prometheus scraped both processes after the deliveries",
        )
        queries = [q.replace("$__rate_interval", "1m") for q in _dashboard_queries()]
        assert len(queries) >= 30
        for expr in queries:
            _query(prometheus, expr)  # valid PromQL here (raises otherwise)
        fed = [q for q in queries if any(name in q for name in FED)]
        assert len(fed) >= len(FED)
        wait_for(
            lambda: all(_query(prometheus, q) for q in fed),
            timeout=30,
            message="every fed dashboard query returns data: "
            + str([q for q in fed if not _query(prometheus, q)]),
        )
    assert _firing(prometheus) & {"FeedWorkerDown", "FeedTargetDown"} == set()
    # The worker stops while records wait for it: its alert fires.
    pipeline.worker.stop()
    for n in range(3):
        pipeline.produce(s.topic_activities, star, pipeline.activity(ids(f"late{n}"), star))
    wait_for(
        lambda: {"FeedWorkerDown", "FeedTargetDown"} <= _firing(prometheus),
        timeout=30,
        message="FeedWorkerDown and FeedTargetDown firing",
    )
    assert "FeedGatewayDown" not in _firing(prometheus)
