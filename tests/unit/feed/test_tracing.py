"""``feed.tracing``: when tracing is on, what a trace context looks like on its way in (Kafka
headers, HTTP headers, frames) and out (``traceparent``), and the log lines' ids. The processes'
spans end to end are tests/e2e/test_tracing.py's."""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from feed import tracing
from feed.settings import SettingsError
from tests.support.otlp import in_memory_tracing

_PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:4318", "OTEL_SDK_DISABLED": "TRUE"},
    ],
)
def test_without_an_endpoint_or_with_the_sdk_disabled_tracing_stays_off(
    env: dict[str, str],
) -> None:
    assert tracing.setup("feed-test", env) is False
    assert tracing.ENABLED is False


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift"),
    ],
)
def test_an_unknown_protocol_is_a_configuration_error_naming_the_variable(
    variable: str, value: str
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", variable: value}
    with pytest.raises(SettingsError) as caught:
        tracing.setup("feed-test", env)
    assert str(caught.value).startswith(variable) and "http/protobuf, grpc" in str(caught.value)
    assert tracing.ENABLED is False


@pytest.mark.parametrize(
    ("raw", "valid"),
    [
        (_PARENT, _PARENT),
        (_PARENT.upper(), _PARENT),  # header values are case-insensitive hex
        (f" {_PARENT} ".encode(), _PARENT),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),  # all-zero trace id
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),  # all-zero span id
        ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),  # unknown version
        ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),  # short trace id
        (b"\xff" * 55, None),
        ("", None),
        (None, None),
    ],
)
def test_a_traceparent_is_taken_only_when_it_is_a_valid_w3c_one(
    raw: Any, valid: str | None
) -> None:
    assert tracing.valid_traceparent(raw) == valid


def test_ingest_carries_a_valid_context_onto_its_records_and_drops_a_malformed_one() -> None:
    assert tracing.carried_headers(_PARENT, "vendor=1") == [
        ("traceparent", _PARENT.encode()),
        ("tracestate", b"vendor=1"),
    ]
    assert tracing.carried_headers(_PARENT, None) == [("traceparent", _PARENT.encode())]
    assert tracing.carried_headers(_PARENT, "x" * 513) == [("traceparent", _PARENT.encode())]
    assert tracing.carried_headers("garbage", "vendor=1") == []
    assert tracing.carried_headers(None, None) == []


def test_a_records_headers_give_its_parent_context() -> None:
    from opentelemetry.trace import get_current_span

    context = tracing.header_context([("other", b"1"), ("traceparent", _PARENT.encode())])
    assert context is not None
    parent = get_current_span(context).get_span_context()
    assert (f"{parent.trace_id:032x}", f"{parent.span_id:016x}", parent.is_remote) == (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00f067aa0ba902b7",
        True,
    )
    assert tracing.header_context(None) is None
    assert tracing.header_context([("other", b"1")]) is None
    assert tracing.header_context([("traceparent", b"\xff\xfe")]) is None
    assert tracing.header_context([("traceparent", None)]) is None


def test_a_span_is_named_by_its_traceparent_only_when_sampled() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    with in_memory_tracing():
        span = tracing.tracer().start_span("x", context=tracing.context_of(_PARENT))
        context = span.get_span_context()
        assert tracing.span_traceparent(span) == (
            f"00-4bf92f3577b34da6a3ce929d0e0e4736-{context.span_id:016x}-01"
        )
        span.end()
    with in_memory_tracing(ALWAYS_OFF):
        assert tracing.span_traceparent(tracing.tracer().start_span("x")) is None


def test_log_lines_inside_a_sampled_span_carry_its_ids_and_others_none(
    capsys: pytest.CaptureFixture[str],
) -> None:
    events: list[dict[str, Any]] = []

    def keep(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        events.append(dict(event))
        raise structlog.DropEvent

    log = structlog.wrap_logger(None, processors=[tracing.ids_processor, keep])
    with in_memory_tracing():
        log.info("outside")
        with tracing.span_of("work") as span:
            assert span is not None
            log.info("inside")
            context = span.get_span_context()
        with tracing.using(None):
            log.info("no_span")
    log.info("not_tracing")
    assert [e.get("trace_id") for e in events] == [None, f"{context.trace_id:032x}", None, None]
    assert events[1]["span_id"] == f"{context.span_id:016x}"
