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
        with tracing.tracer().start_as_current_span("work") as span:
            log.info("inside")
            context = span.get_span_context()
        with tracing.using(None):
            log.info("no_span")
    log.info("not_tracing")
    assert [e.get("trace_id") for e in events] == [None, f"{context.trace_id:032x}", None, None]
    assert events[1]["span_id"] == f"{context.span_id:016x}"


@pytest.mark.parametrize(
    ("sampler", "follows"),
    [
        ("parentbased_traceidratio", True),
        ("parentbased_always_off", True),  # a sampled parent still decides
        ("always_on", True),
        ("traceidratio", False),
        ("always_off", False),
        ("remote_parent_dropped", False),
    ],
)
def test_push_spans_skip_the_sdk_only_under_a_sampler_that_keeps_a_sampled_parents_child(
    sampler: str, follows: bool
) -> None:
    from opentelemetry.sdk.trace import sampling

    samplers = {
        "parentbased_traceidratio": sampling.ParentBasedTraceIdRatio(0.1),
        "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
        "always_on": sampling.ALWAYS_ON,
        "traceidratio": sampling.TraceIdRatioBased(0.5),
        "always_off": sampling.ALWAYS_OFF,
        "remote_parent_dropped": sampling.ParentBased(
            sampling.ALWAYS_ON, remote_parent_sampled=sampling.ALWAYS_OFF
        ),
    }
    assert tracing._follows_parent(samplers[sampler]) is follows


def _push_span_fields(span: Any) -> dict[str, Any]:
    """What a push span says, once encoded as OTLP (ids and times aside)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    (resource_spans,) = encode_spans([span]).resource_spans
    (scope_spans,) = resource_spans.scope_spans
    (encoded,) = scope_spans.spans
    return {
        "scope": scope_spans.scope.name,
        "name": encoded.name,
        "kind": encoded.kind,
        "trace_id": encoded.trace_id.hex(),
        "parent": encoded.parent_span_id.hex(),
        "flags": encoded.flags,
        "attributes": [(a.key, a.value.string_value) for a in encoded.attributes],
        "status": encoded.status.code,
        "window": (encoded.start_time_unix_nano, encoded.end_time_unix_nano),
    }


def test_a_push_span_recorded_without_the_sdk_is_the_span_the_sdk_would_make() -> None:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from feed import otlp

    with in_memory_tracing() as exporter:  # no sink: the SDK makes the push span
        made = tracing.record_push(_PARENT, 1_000, 2_000, "u1")
        (sdk_span,) = exporter.get_finished_spans()
    direct_exporter = InMemorySpanExporter()
    saved = tracing._pushes
    tracing._pushes = tracing._PushSink(
        SimpleSpanProcessor(direct_exporter), Resource.create({"service.name": "t"})
    )
    try:
        recorded = tracing.record_push(_PARENT, 1_000, 2_000, "u1")
    finally:
        tracing._pushes = saved
    (direct,) = direct_exporter.get_finished_spans()
    assert made[0] == recorded[0] == int(_PARENT[3:35], 16)
    assert (direct.context.trace_id, direct.context.span_id) == recorded
    sdk_fields, direct_fields = _push_span_fields(sdk_span), _push_span_fields(direct)
    sdk_fields["scope"] = "feed"  # in_memory_tracing's tracer is named "test"
    assert direct_fields == sdk_fields
    assert direct_fields["parent"] == _PARENT[36:52] and direct_fields["window"] == (1_000, 2_000)
    # and the hand-written encoder reads it as OpenTelemetry's does
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    assert otlp.encode_spans([direct]) == encode_spans([direct])
