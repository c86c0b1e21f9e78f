"""OpenTelemetry tracing (W3C Trace Context): its set-up from the standard ``OTEL_*`` variables, and
the pieces the product's spans are made of.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set and
``OTEL_SDK_DISABLED`` is not ``true``; off too, with one warning, when the ``tracing`` extra is not
installed. Off, the product pays one check of :data:`ENABLED` per batch, request or write, and
imports nothing of OpenTelemetry.

On, the SDK reads the rest of the standard variables itself: ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` (the service name is ``feed-gateway`` or ``feed-fanout`` unless one of
them names it), ``OTEL_TRACES_SAMPLER`` and ``OTEL_TRACES_SAMPLER_ARG`` (default
``parentbased_always_on``: a record or request that arrives with a sampled ``traceparent`` is
traced), ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``, the default, or ``grpc``),
``OTEL_EXPORTER_OTLP_HEADERS`` and the ``OTEL_BSP_*`` batching settings. Spans leave the process
in batches, from a background thread; a full queue drops spans, never blocks the product.

Where the spans come from (docs/operations.md, "Tracing"):

* the gateway's HTTP requests: OpenTelemetry's ASGI middleware (``gateway.app``); ingest's
  records get their ``traceparent`` from OpenTelemetry's confluent-kafka producer instrumentation
  (``feed.kafka.AsyncProducer``);
* the fan-out worker: written here and in ``fanout.worker``, not by the confluent-kafka consumer
  or Cassandra instrumentations. The worker applies records in batches whose Redis write runs on
  a background thread while the next batch is read (``fanout.processor``): the consumer
  instrumentation's span ends at the next ``poll``, before the batch is applied, and the Cassandra
  one makes a span per statement (hundreds per batch, and a root trace for each statement outside
  a span). The processor records when each step ran (:class:`Phase`); the worker turns them into
  spans once the batch is committed;
* the gateway's push to a socket and its WebSocket sessions: written here, as no instrumentation
  sees them. The worker's record span travels to the gateway inside the activity frame, as the
  optional ``traceparent`` field (:func:`schemas.frames.activity_tail`), and in the delivery
  stream with it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from feed.logging import get_logger
from feed.settings import SettingsError
from schemas.frames import TRACEPARENT

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "ENABLED",
    "Phase",
    "carried_headers",
    "context_of",
    "header_context",
    "ids_processor",
    "record_push",
    "setup",
    "shutdown",
    "span_traceparent",
    "tracer",
    "using",
    "valid_traceparent",
]

log = get_logger("feed.tracing")

#: Whether this process traces (set by :func:`setup`); read by the hot paths before anything else.
ENABLED = False
_tracer: Tracer | None = None
_provider: Any = None
#: Where push spans go without the SDK's span machinery (:func:`record_push`): the provider's
#: batch processor, while its sampler follows a sampled parent; else None (the SDK makes them).
_pushes: Any = None

_TRACESTATE_MAX = 512  # the W3C limit is 32 members; a longer header is dropped, not forwarded

#: One step of a batch, as the fan-out's processor records it: (span name, start, end), times in
#: nanoseconds since the epoch (``time.time_ns``).
Phase = tuple[str, int, int]

_PROTOCOLS = ("http/protobuf", "grpc")


def _endpoint(env: Mapping[str, str]) -> str:
    return env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", ""
    )


def setup(default_service: str, env: Mapping[str, str] | None = None) -> bool:
    """Start tracing for this process if the environment asks for it; returns whether it did.

    ``default_service``: the service name unless ``OTEL_SERVICE_NAME`` or
    ``OTEL_RESOURCE_ATTRIBUTES`` gives one. Raises :class:`SettingsError` for an
    ``OTEL_EXPORTER_OTLP_PROTOCOL`` this build cannot export with."""
    global ENABLED, _tracer, _provider, _pushes
    env = os.environ if env is None else env
    if not _endpoint(env) or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    variable = (
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
        if env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        else "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    protocol = env.get(variable, "http/protobuf").strip() or "http/protobuf"
    if protocol not in _PROTOCOLS:
        raise SettingsError(
            f"{variable} must be one of {', '.join(_PROTOCOLS)} (got {protocol[:40]!r})"
        )
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
    except ImportError as exc:
        log.warning(
            "tracing_unavailable",
            reason=f"{exc.name or 'opentelemetry'} is not installed; "
            "install the tracing extra: pip install 'feed-backend[tracing]'",
        )
        return False
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_service}))
    from feed import otlp

    otlp.install()  # the exporters encode with feed.otlp (measured: see there)
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER(_ARG)
    processor = BatchSpanProcessor(OTLPSpanExporter())
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _provider = provider
    _tracer = provider.get_tracer("feed")
    _pushes = _PushSink(processor, resource) if _follows_parent(provider.sampler) else None
    ENABLED = True
    log.info(
        "tracing_enabled",
        service=resource.attributes.get(SERVICE_NAME),
        protocol=protocol,
        sampler=env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
    )
    return True


def shutdown(timeout_s: float = 5.0) -> None:
    """Export the spans still queued (at most ``timeout_s``) and stop tracing."""
    global ENABLED, _tracer, _provider, _pushes
    provider, _provider = _provider, None
    ENABLED, _tracer, _pushes = False, None, None
    if provider is not None:
        provider.force_flush(int(timeout_s * 1000))
        provider.shutdown()


def tracer() -> Tracer:
    """The product's tracer (only while :data:`ENABLED`)."""
    assert _tracer is not None, "tracing is not set up"
    return _tracer


def _follows_parent(sampler: Any) -> bool:
    """Whether ``sampler`` keeps a span whose remote parent is sampled (the ``parentbased_*``
    samplers, with their default delegates, and ``always_on``): asked once, with such a
    parent."""
    from opentelemetry.sdk.trace.sampling import Decision
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        TraceFlags,
        set_span_in_context,
    )

    parent = SpanContext(1, 1, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    # trace ids from both ends of the range: a ratio sampler that ignored the parent would
    # drop at least one of them
    return all(
        sampler.should_sample(
            set_span_in_context(NonRecordingSpan(parent)), trace_id, "push", SpanKind.PRODUCER
        ).decision
        is Decision.RECORD_AND_SAMPLE
        for trace_id in (1, (1 << 128) - 1)
    )


class _PushSink:
    """Push spans (``gateway.connection``) handed to the batch processor as finished spans,
    without OpenTelemetry's ``Span``: measured on the gateway bench (docs/benchmarks.md,
    "Tracing"), an SDK span cost about 30 µs of gateway CPU where it is made (its sampler,
    attribute checks, limits and locks), against about 3 µs for this record. The gateway
    writes one per traced frame it delivers, 10 % of a traced fan-out's frames at 10 %
    sampling, next to about 30 µs for the delivery itself. A push span has a sampled remote
    parent (the frame's ``traceparent``), so a parent-based sampler would keep it: with any
    other sampler the SDK makes them (:func:`record_push`)."""

    def __init__(self, processor: Any, resource: Any) -> None:
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanKind, Status, TraceFlags

        self.processor = processor
        self.resource = resource
        self.scope = InstrumentationScope("feed")
        self.kind = SpanKind.PRODUCER
        self.status = Status()
        self.sampled = TraceFlags(TraceFlags.SAMPLED)


class _RemoteParent:
    """A push span's parent, as the encoders read it: its span id, from another process."""

    __slots__ = ("span_id",)
    is_remote = True

    def __init__(self, span_id: int) -> None:
        self.span_id = span_id


class _PushSpan:
    """A finished push span, in the shape the batch processor and ``feed.otlp`` read."""

    __slots__ = ("attributes", "context", "end_time", "parent", "sink", "start_time")
    name = "push"
    dropped_attributes = dropped_events = dropped_links = 0
    events: tuple[Any, ...] = ()
    links: tuple[Any, ...] = ()

    def __init__(
        self, sink: _PushSink, context: Any, parent: Any, start: int, end: int, user: str
    ) -> None:
        self.sink = sink
        self.context = context
        self.parent = parent
        self.start_time = start
        self.end_time = end
        self.attributes = {"feed.user": user}

    def get_span_context(self) -> Any:
        return self.context

    @property
    def kind(self) -> Any:
        return self.sink.kind

    @property
    def status(self) -> Any:
        return self.sink.status

    @property
    def resource(self) -> Any:
        return self.sink.resource

    @property
    def instrumentation_scope(self) -> Any:
        return self.sink.scope


def record_push(traceparent: str, start_ns: int, end_ns: int, user: str) -> tuple[int, int]:
    """Record the push span of a frame whose ``traceparent`` (checked, sampled) names the
    worker's record span: from ``start_ns`` to ``end_ns``, for ``user``. Returns its (trace id,
    span id), for the delivery latency's exemplar."""
    from opentelemetry.trace import SpanContext

    sink = _pushes
    trace_id = int(traceparent[3:35], 16)
    if sink is None:  # a sampler that decides by itself: the SDK makes the span
        from opentelemetry.trace import SpanKind

        span = tracer().start_span(
            "push",
            context=context_of(traceparent),
            kind=SpanKind.PRODUCER,
            start_time=start_ns,
            attributes={"feed.user": user},
        )
        span.end(end_time=end_ns)
        made = span.get_span_context()
        return made.trace_id, made.span_id
    span_id = random.getrandbits(64) or 1
    parent = _RemoteParent(int(traceparent[36:52], 16))
    context = SpanContext(trace_id, span_id, False, sink.sampled)
    sink.processor.on_end(_PushSpan(sink, context, parent, start_ns, end_ns, user))
    return trace_id, span_id


def valid_traceparent(value: str | bytes | None) -> str | None:
    """``value`` if it is a W3C ``traceparent`` this code understands (version 00), else None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip().lower()
    return value if TRACEPARENT.fullmatch(value) else None


def carried_headers(traceparent: str | None, tracestate: str | None) -> list[tuple[str, bytes]]:
    """Kafka record headers that carry an incoming trace context on unchanged (HTTP ingest when
    this process does not trace: the worker may): nothing for a malformed ``traceparent``."""
    parent = valid_traceparent(traceparent)
    if parent is None:
        return []
    headers = [("traceparent", parent.encode())]
    if tracestate and len(tracestate) <= _TRACESTATE_MAX and tracestate.isascii():
        headers.append(("tracestate", tracestate.encode()))
    return headers


def header_context(headers: Sequence[tuple[str, bytes | None]] | None) -> Context | None:
    """The trace context of a Kafka record's headers, or None if they carry none."""
    if not headers:
        return None
    carrier: dict[str, str] = {}
    for name, value in headers:
        if name in ("traceparent", "tracestate") and value is not None:
            try:
                carrier[name] = value.decode("ascii")
            except UnicodeDecodeError:
                return None
    if "traceparent" not in carrier:
        return None
    return _extract(carrier)


def context_of(traceparent: str) -> Context:
    """The context whose parent is the span that ``traceparent`` names: a frame's, which
    :func:`schemas.frames.frame_traceparent` has checked (version 00, lower-case hex). Built
    directly, not through the propagator, whose parse measured 4 µs of the push span's cost."""
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

    parent = SpanContext(
        int(traceparent[3:35], 16),
        int(traceparent[36:52], 16),
        is_remote=True,
        trace_flags=TraceFlags(int(traceparent[53:55], 16)),
    )
    return set_span_in_context(NonRecordingSpan(parent))


def _extract(carrier: dict[str, str]) -> Context:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carrier)


def span_traceparent(span: Span) -> str | None:
    """The ``traceparent`` naming ``span`` (its children's parent), or None if it is not sampled:
    what an activity frame carries to the gateway's push span."""
    context = span.get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def using(span: Span | None) -> Any:
    """A context manager that makes ``span`` the current one (log lines inside it carry its ids);
    nothing if ``span`` is None."""
    if span is None:
        return nullcontext()
    from opentelemetry.trace import use_span

    return use_span(span, end_on_exit=False)


def ids_processor(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: ``trace_id`` and ``span_id`` on a line written inside a sampled span
    (while tracing; otherwise one flag check)."""
    if ENABLED:
        from opentelemetry.trace import get_current_span

        context = get_current_span().get_span_context()
        if context.is_valid and context.trace_flags.sampled:
            event.setdefault("trace_id", f"{context.trace_id:032x}")
            event.setdefault("span_id", f"{context.span_id:016x}")
    return event
