"""The OpenAPI document (``GET /openapi.json``) and schemathesis against the live gateway.

The gateway runs as ``feed gateway`` (uvicorn) on a free port with the session stack's real
Redis, Kafka-protocol broker (ingest produces for real) and Cassandra. schemathesis loads the
document from the live URL, generates positive and negative requests for every operation (ingest
token and a valid user JWT supplied through the document's security schemes) and checks each
response: no 5xx, status codes, content types, headers and bodies as documented, negative data
rejected, auth not ignored. The number of examples is bounded so the run stays well under a
minute; the number of requests the gateway served (its own request counter) is printed
(``schemathesis: N requests``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from feed.settings import Secret
from gateway.auth import mint_token
from tests.conftest import TEST_INGEST_TOKEN, TEST_JWT_SECRET
from tests.support.procs import FeedProcess, free_port, http_get, metric_value

#: Examples per operation and generation mode (positive, negative): 13 operations. 100 took
#: 98 s of the suite's 15 minutes (2026-12-07), most of it generating and validating the
#: ingest and follow bodies, not the gateway serving them.
MAX_EXAMPLES = 60
SENT: dict[str, int] = {"requests": 0}


@dataclasses.dataclass
class GatewayProcess:
    base: str
    process: FeedProcess


@pytest.fixture(scope="module")
def gw(
    stack_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[GatewayProcess]:
    """``feed gateway`` as an operator runs it, on a free port, on the session stack.

    Generous ingest limits: schemathesis sends hundreds of ingest requests in seconds (429 is
    documented and would pass, but it would hide the ingest path from the checks). A separate
    process also keeps a thousand requests' worth of server logging away from pytest's output
    capture.
    """
    port = free_port()
    env = dict(
        stack_env,
        FEED_GATEWAY_PORT=str(port),
        FEED_INGEST_RATE="10000",
        FEED_INGEST_BURST="10000",
        FEED_LOG_LEVEL="warning",
    )
    log = tmp_path_factory.mktemp("openapi") / "gateway.log"
    process = FeedProcess(["gateway"], env, log).start()
    live = GatewayProcess(f"http://127.0.0.1:{port}", process)
    try:
        # /readyz: Redis, the broker and Cassandra (connected in the background) all reachable.
        process.wait_http(f"{live.base}/readyz", timeout=60)
        before = _served(live)
        started = time.monotonic()
        yield live
        served = _served(live) - before
        _say(
            request,
            f"schemathesis: {served} requests served by the gateway "
            f"({SENT['requests']} generated cases) in {time.monotonic() - started:.1f}s",
        )
        assert process.alive(), process.log_tail()
        assert "request_failed" not in log.read_text(errors="replace"), process.log_tail()
    finally:
        process.stop()


def _say(request: pytest.FixtureRequest, line: str) -> None:
    """Print past pytest's output capture (the count is quoted from the test log)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        print(f"\n{line}")


def _served(live: GatewayProcess) -> int:
    status, body = http_get(f"{live.base}/metrics", timeout=5)
    assert status == 200
    return int(metric_value(body.decode(), "feed_gateway_http_requests_total"))


@pytest.fixture(scope="module")
def live_schema(gw: GatewayProcess) -> Any:
    user_jwt = mint_token(Secret(TEST_JWT_SECRET), "schemathesis-user", 3600)
    config = schemathesis.Config.from_dict(
        {
            "auth": {
                "openapi": {
                    "ingestToken": {"bearer": TEST_INGEST_TOKEN},
                    "userToken": {"bearer": user_jwt},
                }
            },
        }
    )
    return schemathesis.openapi.from_url(f"{gw.base}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("live_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_document(case: Any, gw: GatewayProcess) -> None:
    SENT["requests"] += 1
    case.call_and_validate(
        base_url=gw.base,
        timeout=15,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[schema_valid_data_accepted_unless_explained],
    )


#: Rejections of schema-valid requests for reasons JSON Schema cannot state: (status, code,
#: field or None for any field).
EXPLAINED_REJECTIONS = {
    (400, "out_of_range", "published"),  # `published` before 1970
    (400, "in_the_future", "published"),  # `published` more than FEED_MAX_CLOCK_SKEW_S ahead
    (400, "invalid_chars", "object"),  # a Delete's object is an activity id
    (400, "too_large", None),  # `extra` over 4 KiB encoded, or the event over 32 KiB
    (400, "invalid", "followee"),  # a user cannot follow themselves
    (400, "invalid_cursor", "cursor"),  # a string that is not one of our cursors
    (422, "idempotency_key_reused", "Idempotency-Key"),  # a generated key met again
    (404, "not_found", "group"),  # a notification group id the caller does not have
}


def schema_valid_data_accepted_unless_explained(ctx: Any, response: Any, case: Any) -> None:
    """schemathesis's ``positive_data_acceptance``, except for the rejections above: a
    schema-valid request gets 2xx (or 401/409/429), or a 400/422 whose error code explains it."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code < 400:
        return
    if response.status_code in (401, 409, 429):
        return
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {}
    got = str(error.get("field", ""))
    for status, code, field in EXPLAINED_REJECTIONS:
        # In a batch the field is prefixed by the item's index: "[3].published".
        if (response.status_code, error.get("code")) == (status, code) and (
            field is None or got == field or got.endswith(f"].{field}")
        ):
            return
    raise AssertionError(
        f"schema-valid request rejected with {response.status_code}: {response.text[:300]}"
    )


# --- the document itself ----------------------------------------------------------------------
def test_document_lists_every_route_and_response(gw: GatewayProcess) -> None:
    doc = httpx.get(f"{gw.base}/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    assert {
        ("post", "/v1/activities"),
        ("post", "/v1/follows"),
        ("delete", "/v1/follows"),
        ("get", "/v1/feed"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/v1/notifications"),
        ("get", "/v1/notifications/counts"),
        ("get", "/v1/notifications/{group}/actors"),
        ("post", "/v1/notifications/seen"),
        ("post", "/v1/notifications/read"),
    } <= {(m, p) for p, ops in paths.items() for m in ops}
    ingest = paths["/v1/activities"]["post"]
    assert {"202", "400", "401", "413", "415", "422", "429", "503"} <= set(ingest["responses"])
    assert "Retry-After" in ingest["responses"]["429"]["headers"]
    assert "Retry-After" in ingest["responses"]["503"]["headers"]
    assert ingest["security"] == [{"ingestToken": []}]
    feed = paths["/v1/feed"]["get"]
    params = {p["name"]: p for p in feed["parameters"]}
    assert params["limit"]["schema"]["minimum"] == 1
    assert params["limit"]["schema"]["maximum"] == 200
    assert "cursor" in params and "token" not in params and "user" not in params
    assert feed["security"] == [{"userToken": []}]
    schemes = doc["components"]["securitySchemes"]
    assert schemes["userToken"] == {**schemes["userToken"], "type": "http", "scheme": "bearer"}
    activity = doc["components"]["schemas"]["Activity"]
    assert activity["properties"]["id"]["maxLength"] == 128
    assert activity["properties"]["to"]["maxItems"] == 100
    assert set(activity["required"]) == {"id", "type", "actor", "object", "published"}
