"""``feed.otlp``: the hand-written span encoding is OpenTelemetry's, message for message."""

from __future__ import annotations

import time
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as reference
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from feed import otlp


def _spans() -> list[Any]:
    """Every kind of span the SDK makes: kinds, parents (remote or not), attributes of every
    type, events, links, statuses, trace state, two resources and several scopes."""
    finished = []
    for resource in (
        Resource.create({"service.name": "a", "k": 1}),
        Resource({"service.name": "b"}, "https://schema/1"),
    ):
        exporter = InMemorySpanExporter()
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        feed = provider.get_tracer("feed")
        other = provider.get_tracer("other.lib", "1.2.3", schema_url="https://schema/2")
        remote = SpanContext(
            0x4BF92F3577B34DA6A3CE929D0E0E4736,
            0x00F067AA0BA902B7,
            is_remote=True,
            trace_flags=TraceFlags(1),
            trace_state=TraceState([("vendor", "x"), ("b", "2")]),
        )
        parent = set_span_in_context(NonRecordingSpan(remote))
        for kind in SpanKind:
            with feed.start_as_current_span(f"k {kind.name}", kind=kind):
                pass
        span = feed.start_span(
            "everything",
            context=parent,
            attributes={
                "s": "text é",
                "empty": "",
                "t": True,
                "f": False,
                "i": 42,
                "neg": -7,
                "big": 2**62,
                "d": 0.25,
                "strs": ["a", "b"],
                "ints": (1, 2, 3),
                "bools": [True, False],
                "floats": [1.5],
            },
            links=[Link(remote, {"why": "batch"}), Link(remote)],
            start_time=time.time_ns(),
        )
        span.add_event("e1", {"n": 1}, timestamp=time.time_ns())
        span.add_event("e2")
        span.set_status(Status(StatusCode.ERROR, "it failed"))
        with feed.start_as_current_span("child", context=set_span_in_context(span)) as child:
            child.set_status(Status(StatusCode.OK))
        span.end()
        with other.start_as_current_span("from another scope", kind=SpanKind.CONSUMER):
            pass
        finished += exporter.get_finished_spans()
        provider.shutdown()
    return finished


def test_it_encodes_every_span_as_opentelemetrys_encoder_does() -> None:
    spans = _spans()
    ours = ExportTraceServiceRequest.FromString(otlp.encode_request(spans))
    assert ours == reference(spans)
    assert otlp.encode_spans(spans) == reference(spans)
    # and byte for byte once both are serialized the same way
    assert ours.SerializeToString(deterministic=True) == reference(spans).SerializeToString(
        deterministic=True
    )


def test_an_empty_batch_is_an_empty_request() -> None:
    assert otlp.encode_request([]) == b""
    assert otlp.encode_spans([]) == reference([])


def test_an_attribute_it_cannot_encode_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="object"):
        otlp._value(object())


def test_the_exporters_encode_with_it_once_installed() -> None:
    from opentelemetry.exporter.otlp.proto.grpc import trace_exporter as grpc_exporter
    from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_exporter

    saved = http_exporter.encode_spans, grpc_exporter.encode_spans
    try:
        otlp.install()
        assert http_exporter.encode_spans is otlp.encode_spans
        assert grpc_exporter.encode_spans is otlp.encode_spans
    finally:
        http_exporter.encode_spans, grpc_exporter.encode_spans = saved
