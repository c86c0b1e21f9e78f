"""OTLP span encoding, written by hand for speed: the bytes of an ``ExportTraceServiceRequest``
for a batch of finished spans, the same message OpenTelemetry's own encoder builds.

Why by hand (measured, docs/benchmarks.md "Tracing"): the gateway writes a push span for every
traced frame it delivers. OpenTelemetry's encoder (``opentelemetry-exporter-otlp-proto-common``)
builds one protobuf object per span, attribute and value, about 22 µs a span on the reference
machine, against about 30 µs of gateway CPU per delivered frame: at 10 % sampling, the export
alone cost the gateway about 7 % of its throughput, the span itself as much again. This encoder
writes the protobuf wire format directly (a few µs a span) and hands the exporters a message
parsed from those bytes (``upb``, in C), so their transport, retries, headers, compression and
size limits are OpenTelemetry's, unchanged. ``tests/unit/feed/test_otlp.py`` checks that it
produces the same message as OpenTelemetry's encoder for every kind of span the SDK can make.

:func:`install` makes both OTLP span exporters (HTTP and gRPC) use it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["encode_request", "encode_spans", "install"]

_F64 = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack
_F32 = struct.Struct("<I").pack
#: Span.flags: the parent's is_remote is known (0x100), and true (0x200) (trace.proto SpanFlags).
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200


#: varints below 128: one byte each (most lengths and every tag here).
_SMALL = [bytes((n,)) for n in range(128)]


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _SMALL[value]
    if value < 0:
        value += 1 << 64  # int64: two's complement, ten bytes
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len(field: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _text(field: int, value: str) -> bytes:
    return _len(field, value.encode("utf-8")) if value else b""


def _value(value: Any) -> bytes:
    """An ``AnyValue``'s fields."""
    kind = type(value)
    if kind is str:
        encoded: bytes = value.encode("utf-8")
        return b"\x0a" + _varint(len(encoded)) + encoded
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        return b"\x18" + _varint(value)
    if kind is float:
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, str):
        return _value(str(value))
    if isinstance(value, bool):
        return _value(bool(value))
    if isinstance(value, int):
        return _value(int(value))
    if isinstance(value, float):
        return _value(float(value))
    if isinstance(value, bytes):
        return _len(7, value)
    if isinstance(value, Mapping):
        return _len(6, b"".join(_len(1, _key_value(k, v)) for k, v in value.items()))
    if isinstance(value, Sequence):
        return _len(5, b"".join(_len(1, _value(item)) for item in value))
    raise TypeError(f"cannot encode an attribute of type {type(value).__name__}")


#: Encoded keys (``KeyValue.key``), by key: a process uses a few dozen attribute names.
_KEYS: dict[str, bytes] = {}


def _key_value(key: str, value: Any) -> bytes:
    encoded = _KEYS.get(key)
    if encoded is None:
        encoded = _text(1, key)
        if len(_KEYS) < 1024:
            _KEYS[key] = encoded
    any_value = _value(value)
    return encoded + b"\x12" + _varint(len(any_value)) + any_value


def _attributes(field: int, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    tag = _varint(field << 3 | 2)
    out = []
    for key, value in attributes.items():
        kv = _key_value(key, value)
        out.append(tag + _varint(len(kv)) + kv)
    return b"".join(out)


def _count(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value) if value else b""


def _flags(context: Any) -> int:
    return _HAS_IS_REMOTE | (_IS_REMOTE if context is not None and context.is_remote else 0)


def _trace_state(state: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in state.items()) if state is not None else ""


#: ``Span.flags`` (field 16, fixed32) for a parent that is not remote (or none), and remote.
_LOCAL_FLAGS = b"\x85\x01" + _F32(_HAS_IS_REMOTE)
_REMOTE_FLAGS = b"\x85\x01" + _F32(_HAS_IS_REMOTE | _IS_REMOTE)
#: A span's name and kind, encoded, by (name, kind): a process makes spans of a few dozen names.
_HEADS: dict[tuple[str, int], bytes] = {}


def _span(span: Any) -> bytes:
    context = span.get_span_context()
    parent = span.parent
    out = bytearray(b"\x0a\x10")
    out += context.trace_id.to_bytes(16, "big")
    out += b"\x12\x08"
    out += context.span_id.to_bytes(8, "big")
    if context.trace_state:
        out += _text(3, _trace_state(context.trace_state))
    if parent is not None:
        out += b"\x22\x08"
        out += parent.span_id.to_bytes(8, "big")
    kind = span.kind.value
    head = _HEADS.get((span.name, kind))
    if head is None:
        # SpanKind INTERNAL (0) is SPAN_KIND_INTERNAL (1), and so on
        head = _text(5, span.name) + b"\x30" + _varint(kind + 1)
        if len(_HEADS) < 1024:
            _HEADS[(span.name, kind)] = head
    out += head
    out += b"\x39"
    out += _F64(span.start_time or 0)
    out += b"\x41"
    out += _F64(span.end_time or 0)
    attributes = span.attributes
    if attributes:
        out += _attributes(9, attributes)
    if span.dropped_attributes:
        out += _count(10, span.dropped_attributes)
    for event in span.events:
        body = (
            b"\x09"
            + _F64(event.timestamp)
            + _text(2, event.name)
            + _attributes(3, event.attributes)
            + _count(4, event.dropped_attributes)
        )
        out += _len(11, body)
    if span.dropped_events:
        out += _count(12, span.dropped_events)
    for link in span.links:
        body = (
            b"\x0a\x10"
            + link.context.trace_id.to_bytes(16, "big")
            + b"\x12\x08"
            + link.context.span_id.to_bytes(8, "big")
            + _attributes(4, link.attributes)
            + _count(5, link.dropped_attributes)
            + b"\x35"
            + _F32(_flags(link.context))
        )
        out += _len(13, body)
    if span.dropped_links:
        out += _count(14, span.dropped_links)
    status = span.status
    if status is not None:
        out += _len(15, _text(2, status.description or "") + _count(3, status.status_code.value))
    out += _REMOTE_FLAGS if parent is not None and parent.is_remote else _LOCAL_FLAGS
    return bytes(out)


def _scope(scope: Any) -> bytes:
    return (
        _text(1, scope.name)
        + _text(2, scope.version or "")
        + _attributes(3, getattr(scope, "attributes", None))
    )


def encode_request(spans: Iterable[Any]) -> bytes:
    """The serialized ``ExportTraceServiceRequest`` of finished SDK spans (``ReadableSpan``),
    grouped by resource, then by instrumentation scope, in first-seen order (as OpenTelemetry's
    encoder groups them)."""
    # By the objects' identity: a Resource's hash serialises its attributes to JSON each time
    # (measured 8 µs a span); a process has one resource and a few scopes.
    groups: dict[int, dict[int, list[bytes]]] = {}
    objects: dict[int, Any] = {}
    for span in spans:
        resource, scope = span.resource, span.instrumentation_scope or None
        objects[id(resource)] = resource
        objects[id(scope)] = scope
        by_scope = groups.get(id(resource))
        if by_scope is None:
            by_scope = groups[id(resource)] = {}
        encoded = by_scope.get(id(scope))
        if encoded is None:
            encoded = by_scope[id(scope)] = []
        encoded.append(_span(span))
    out = []
    for resource_id, by_scope_id in groups.items():
        resource = objects[resource_id]
        body = [_len(1, _attributes(1, resource.attributes))]
        for scope_id, encoded in by_scope_id.items():
            scope = objects[scope_id]
            scope_spans = b"".join(
                [
                    _len(1, _scope(scope) if scope is not None else b""),
                    *[b"\x12" + _varint(len(span)) + span for span in encoded],
                    _text(3, scope.schema_url if scope is not None else ""),
                ]
            )
            body.append(_len(2, scope_spans))
        body.append(_text(3, resource.schema_url))
        out.append(_len(1, b"".join(body)))
    return b"".join(out)


def encode_spans(spans: Sequence[Any]) -> Any:
    """What ``opentelemetry.exporter.otlp.proto.common.trace_encoder.encode_spans`` returns (an
    ``ExportTraceServiceRequest``), parsed from :func:`encode_request`'s bytes."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    return ExportTraceServiceRequest.FromString(encode_request(spans))


def install() -> None:
    """Make OpenTelemetry's OTLP span exporters (HTTP and gRPC) encode with :func:`encode_spans`.
    Both call their module's ``encode_spans`` for each batch
    (``tests/unit/gateway/test_private_reach.py`` pins it)."""
    from opentelemetry.exporter.otlp.proto.grpc import trace_exporter as grpc_exporter
    from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_exporter

    http_exporter.encode_spans = encode_spans  # type: ignore[attr-defined,assignment]
    grpc_exporter.encode_spans = encode_spans  # type: ignore[attr-defined,assignment]
