"""Where the product relies on another library's internals, the library's version is pinned to a
range in pyproject.toml, and this test checks both that the installed release is in that range and
that the internals still have the shape relied on: an upgrade fails here, loudly, not in
production (no server needed).

The reaches, each behind one small adapter:

* ``gateway.transport.server_protocol``: uvicorn's ASGI ``send`` is a bound method of its
  protocol, which holds the ``transport`` (``StreamSocket.abort``) and, as the lean subclass,
  ``write_text_now`` (``StreamSocket.write_now``);
* ``gateway.websocket``: a subclass of uvicorn's ``WebSocketsSansIOProtocol`` that replaces its
  ``queue`` and ``writable`` and overrides ``handle_connect``, ``schedule_ping`` and
  ``start_keepalive``, reading its connection-state attributes;
* ``gateway.server.GatewayServer``: uvicorn's ``Server.servers`` and
  ``config.timeout_graceful_shutdown``;
* the close codes uvicorn sends itself (1011 on a keepalive timeout, 1012 on shutdown), which
  ``gateway.closecodes`` documents;
* redis-py's connection layer: ``feed.timelines_redis``'s packed fan-out pipeline takes a pool
  connection without a command name and drives it (``send_packed_command``, ``read_response``,
  ``retry.call_with_retry``, ``disconnect``), packing with ``hiredis.pack_command``;
  ``gateway.pubsub`` opens its own connection from the pool's ``connection_kwargs`` and
  ``connection_class``;
* OpenTelemetry's OTLP span exporters: ``feed.otlp.install`` replaces the ``encode_spans`` that
  their modules call for each batch (a measured 2x on the export's cost).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import tomllib
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis
import uvicorn
from packaging.requirements import Requirement
from packaging.version import Version
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from gateway import closecodes
from gateway.transport import StreamSocket, server_protocol
from gateway.websocket import Flag, Inbox, protocol_class

ROOT = Path(__file__).resolve().parents[3]


def declared(name: str) -> Requirement:
    """The requirement on ``name`` in pyproject.toml's ``[project] dependencies``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        if requirement.name == name:
            return requirement
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def in_declared_range(name: str, version: str) -> bool:
    """Whether ``version`` of ``name`` is within the range pyproject.toml pins, which must have
    an upper bound (a reach into internals is only checked for the releases tested)."""
    specifier = declared(name).specifier
    assert any(spec.operator in ("<", "<=", "==", "~=") for spec in specifier), (
        f"{name} is used through its internals: pin an upper bound in pyproject.toml"
    )
    return specifier.contains(Version(version), prereleases=True)


def test_the_installed_uvicorn_is_in_the_pinned_range() -> None:
    installed = importlib.metadata.version("uvicorn")
    assert in_declared_range("uvicorn", installed), (
        f"uvicorn {installed} is outside {declared('uvicorn').specifier}: check the reaches "
        "this module lists, then move the pin"
    )


def test_the_range_check_fails_outside_the_range() -> None:
    specifier = declared("uvicorn").specifier
    upper = next(Version(s.version) for s in specifier if s.operator == "<")
    assert not in_declared_range("uvicorn", str(upper))
    assert not in_declared_range("uvicorn", "0.1.0")


@pytest.fixture
def protocol() -> Any:
    """The lean protocol as uvicorn builds it for a connection, given a transport."""

    async def app(scope: Any, receive: Any, send: Any) -> None:  # never run
        raise AssertionError("not called")

    cls = protocol_class()
    assert isinstance(cls, type) and issubclass(cls, WebSocketsSansIOProtocol)
    config = uvicorn.Config(app, ws=cls, lifespan="off", log_config=None)
    config.load()
    loop = asyncio.new_event_loop()
    try:
        built = cls(config=config, server_state=ServerState(), app_state={}, _loop=loop)  # type: ignore[call-arg]
        yield built
    finally:
        loop.close()


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def test_uvicorns_asgi_send_is_a_method_of_the_protocol(protocol: Any) -> None:
    """``server_protocol`` finds the protocol behind ``send``: uvicorn hands the app
    ``self.send``, a bound method."""
    assert "self.app(self.scope, self.receive, self.send)" in inspect.getsource(
        WebSocketsSansIOProtocol.run_asgi
    )
    assert inspect.iscoroutinefunction(WebSocketsSansIOProtocol.send)
    assert server_protocol(protocol.send) is protocol
    transport = _Transport()
    protocol.transport = transport  # what connection_made sets
    socket = StreamSocket(protocol.receive, protocol.send)
    assert server_protocol(socket._send) is protocol and protocol.transport is transport


def test_the_lean_protocol_replaces_what_it_relies_on(protocol: Any) -> None:
    assert isinstance(protocol.queue, Inbox) and isinstance(protocol.writable, Flag)
    # Connection state that write_text_now and the keepalive overrides read.
    for name in (
        "close_sent",
        "disconnected",
        "handshake_complete",
        "initial_response",
        "conn",
        "transport",
        "ping_interval",
        "ping_timer",
        "last_ping_rtt",
    ):
        assert hasattr(protocol, name), name
    assert hasattr(protocol.conn, "extensions") and hasattr(protocol.conn, "state")
    for method in ("handle_connect", "schedule_ping", "start_keepalive", "send_keepalive_ping"):
        assert callable(getattr(WebSocketsSansIOProtocol, method, None)), method
    # uvicorn still reads the flag and the queue through the methods the lean ones provide.
    source = inspect.getsource(WebSocketsSansIOProtocol)
    assert "self.writable.set()" in source and "self.writable.clear()" in source
    assert "self.queue.put_nowait(" in source and "await self.queue.get()" in source


def test_write_text_now_writes_through_the_transport_uvicorn_holds(protocol: Any) -> None:
    from websockets.protocol import State

    transport = _Transport()
    protocol.transport = transport
    protocol.handshake_complete = True
    protocol.conn.state = State.OPEN
    written = protocol.write_text_now([b'{"type":"reset"}'])
    assert written == len(b'{"type":"reset"}')
    assert transport.written == [b"\x81\x10" + b'{"type":"reset"}']
    protocol.writable.clear()  # the transport pushes back: nothing is written now
    assert protocol.write_text_now([b"x"]) is None


def test_uvicorn_closes_with_the_codes_the_table_documents() -> None:
    """1011 (keepalive ping unanswered) and 1012 (restart before the drain) are uvicorn's
    decisions; the table documents them as sent by the server."""
    timeout = inspect.getsource(WebSocketsSansIOProtocol.keepalive_timeout)
    shutdown = inspect.getsource(WebSocketsSansIOProtocol.shutdown)
    assert f"fail({closecodes.PING_TIMEOUT.code}," in timeout
    assert f'"code": {closecodes.SERVICE_RESTART.code}' in shutdown
    for entry in (closecodes.PING_TIMEOUT, closecodes.SERVICE_RESTART):
        assert entry.sent_by is closecodes.SentBy.SERVER


def test_uvicorns_server_has_what_the_graceful_shutdown_uses() -> None:
    """``GatewayServer`` closes uvicorn's listening ``servers`` first and sets the graceful
    timeout left for HTTP requests."""
    assert "self.servers" in inspect.getsource(uvicorn.Server.startup)
    assert "self.config.timeout_graceful_shutdown" in inspect.getsource(uvicorn.Server.shutdown)


def test_the_installed_redis_py_is_in_the_pinned_range() -> None:
    installed = importlib.metadata.version("redis")
    assert in_declared_range("redis", installed), (
        f"redis {installed} is outside {declared('redis').specifier}: check the reaches this "
        "module lists, then move the pin"
    )


def test_redis_py_connections_have_the_shape_the_packed_pipeline_and_pubsub_use() -> None:
    pool = redis.ConnectionPool(host="127.0.0.1", port=1)  # never connected here
    try:
        # get_connection() with no command name (feed.timelines_redis._execute_packed)
        inspect.signature(pool.get_connection).bind()
        assert callable(pool.release)
        assert pool.connection_kwargs["host"] == "127.0.0.1"  # gateway.pubsub
        connection = pool.connection_class(**pool.connection_kwargs)
        for name in ("send_packed_command", "read_response", "disconnect"):
            assert callable(getattr(connection, name)), name
        assert callable(connection.retry.call_with_retry)
    finally:
        pool.disconnect()


def test_hiredis_packs_a_tuple_of_mixed_arguments_as_one_command() -> None:
    packed = hiredis.pack_command(("SET", b"k", 1))  # type: ignore[arg-type]
    assert packed == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n"


def test_the_otlp_span_exporters_encode_through_their_modules_encode_spans() -> None:
    """``feed.otlp.install`` replaces ``encode_spans`` in both exporters' modules: each must
    still call that module-level name for every batch (HTTP in ``export``, gRPC in
    ``_translate_data``), or tracing would silently fall back to the slow encoder."""
    from opentelemetry.exporter.otlp.proto.grpc import trace_exporter as grpc_exporter
    from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_exporter

    assert "encode_spans(spans)" in inspect.getsource(http_exporter.OTLPSpanExporter.export)
    assert "encode_spans(data)" in inspect.getsource(grpc_exporter.OTLPSpanExporter._translate_data)
    assert callable(http_exporter.encode_spans) and callable(grpc_exporter.encode_spans)
