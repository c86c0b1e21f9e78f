"""An OTLP trace receiver for the tests: the processes under test export to it over HTTP
(``http/protobuf``, ``POST /v1/traces``) or gRPC, on 127.0.0.1 and free ports, as they would to an
OpenTelemetry Collector. It decodes every request with OpenTelemetry's own protobuf types and keeps
the spans (:class:`ReceivedSpan`) for the test to read; :meth:`OtlpReceiver.wait_for` waits, with a
deadline, until they satisfy a condition.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.support.procs import free_port

__all__ = ["OtlpReceiver", "ReceivedSpan", "in_memory_tracing", "otlp_receiver"]

_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    links: tuple[tuple[str, str], ...]  # (trace id, span id) of each
    attributes: dict[str, Any] = field(hash=False)
    start_ns: int = 0
    end_ns: int = 0
    protocol: str = ""  # how it arrived: "http" or "grpc"


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return None if kind is None else getattr(any_value, kind)


def _spans(request: Any, protocol: str) -> list[ReceivedSpan]:
    out = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(
                    ReceivedSpan(
                        service=service,
                        name=span.name,
                        kind=_KINDS.get(span.kind, str(span.kind)),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        links=tuple((k.trace_id.hex(), k.span_id.hex()) for k in span.links),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        protocol=protocol,
                    )
                )
    return out


class OtlpReceiver:
    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.requests = 0
        self.http_endpoint = ""
        self.grpc_endpoint = ""

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)
            self.requests += 1

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def render(self, trace_id: str) -> str:
        """The spans of ``trace_id`` as an indented tree, with their times from the trace's start
        (milliseconds), services and links: a failure's message, and the sample in
        docs/operations.md ("Tracing")."""
        spans = [s for s in self.spans() if s.trace_id == trace_id]
        if not spans:
            return f"(no span of trace {trace_id})"
        origin = min(s.start_ns for s in spans)
        ids = {s.span_id for s in spans}
        children: dict[str, list[ReceivedSpan]] = {}
        for span in spans:
            parent = span.parent_span_id if span.parent_span_id in ids else ""
            children.setdefault(parent, []).append(span)
        lines: list[str] = []

        def walk(parent: str, depth: int) -> None:
            for span in sorted(children.get(parent, []), key=lambda s: s.start_ns):
                start = (span.start_ns - origin) / 1e6
                took = (span.end_ns - span.start_ns) / 1e6
                links = f"  links: {len(span.links)}" if span.links else ""
                lines.append(
                    f"{'  ' * depth}{span.name} [{span.service}, {span.kind.lower()}] "
                    f"+{start:.1f} ms, {took:.2f} ms{links}"
                )
                walk(span.span_id, depth + 1)

        walk("", 0)
        return "\n".join(lines)

    def wait_for(
        self,
        condition: Callable[[list[ReceivedSpan]], bool],
        *,
        timeout: float = 30.0,
        message: str = "spans",
    ) -> list[ReceivedSpan]:
        """The spans received, once ``condition`` holds for them (AssertionError after
        ``timeout`` s, listing what did arrive)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if condition(spans):
                return spans
            if time.monotonic() >= deadline:
                shown = sorted({(s.service, s.name) for s in spans})
                raise AssertionError(f"no {message} within {timeout} s; received {shown}")
            time.sleep(0.05)


class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self.receiver.add(_spans(request, "grpc"))
        return trace_service_pb2.ExportTraceServiceResponse()


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A receiver listening on two free ports of 127.0.0.1 (HTTP and gRPC), stopped on exit."""
    receiver = OtlpReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            request = trace_service_pb2.ExportTraceServiceRequest()
            request.ParseFromString(body)
            receiver.add(_spans(request, "http"))
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    http.daemon_threads = True
    thread = threading.Thread(target=http.serve_forever, name="otlp-http", daemon=True)
    thread.start()
    rpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(receiver), rpc)
    grpc_port = free_port()
    rpc.add_insecure_port(f"127.0.0.1:{grpc_port}")
    rpc.start()
    receiver.http_endpoint = f"http://127.0.0.1:{http.server_address[1]}"
    receiver.grpc_endpoint = f"http://127.0.0.1:{grpc_port}"
    try:
        yield receiver
    finally:
        rpc.stop(grace=None)
        http.shutdown()
        http.server_close()
        thread.join(timeout=5)


@contextmanager
def in_memory_tracing(sampler: Any = None) -> Iterator[Any]:
    """This process traces (``feed.tracing``) into an in-memory exporter, which it yields, for a
    unit test of the spans a module writes; the global tracer provider is left alone."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from feed import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider(**({"sampler": sampler} if sampler is not None else {}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    saved = tracing.ENABLED, tracing._tracer
    tracing.ENABLED, tracing._tracer = True, provider.get_tracer("test")
    try:
        yield exporter
    finally:
        tracing.ENABLED, tracing._tracer = saved
        provider.shutdown()
