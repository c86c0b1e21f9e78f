"""The ASGI side of one ``/v1/stream`` connection (:class:`StreamSocket`) and how it is closed.

Guarantees: a close never raises for the client's sake (:func:`close_quietly`): the reason is cut
to what a close frame holds, a client that does not read has its connection dropped after
``CLOSE_TIMEOUT_S`` rather than held open by unsent bytes, and a close the protocol refuses
drops the connection. Every close the gateway decides goes through :func:`close_connection`,
which also counts it (``feed_gateway_closes_total{code}``); a connect that failed with an
exception is closed by :func:`reject` with the code :func:`gateway.errors.close_for` maps it to.

Under uvicorn (with :mod:`gateway.websocket`'s protocol) the socket writes live frames
synchronously and can reset a stuck connection; it finds uvicorn's protocol object behind the
ASGI ``send`` callable (:func:`server_protocol`, the one place that relies on it). Under any
other ASGI server those two fall back to plain ASGI messages and do nothing, respectively.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
from typing import Any

import structlog
from starlette.types import Receive, Send
from websockets.exceptions import WebSocketException

from gateway.errors import close_for
from gateway.metrics import GatewayMetrics
from gateway.session import fit_close_reason

__all__ = [
    "CLOSE_TIMEOUT_S",
    "StreamSocket",
    "close_connection",
    "close_quietly",
    "reject",
    "server_protocol",
]

log = structlog.get_logger("gateway")

#: Bound on waiting for a close frame to be written to a client that may not be reading.
CLOSE_TIMEOUT_S = 5.0


def server_protocol(send: Send) -> Any:
    """The server's protocol object behind the ASGI ``send`` callable, or None.

    uvicorn (``>=0.53,<0.56``, pinned in pyproject.toml) passes its protocol's bound method
    ``send`` as the ASGI ``send``; the protocol holds the asyncio ``transport`` (used by
    :meth:`StreamSocket.abort`) and, as :mod:`gateway.websocket`'s subclass, ``write_text_now``.
    That is not part of the ASGI interface: ``tests/unit/gateway/test_private_reach.py`` checks
    the installed uvicorn is in the pinned range and still has this shape."""
    return getattr(send, "__self__", None)


class StreamSocket:
    """The ASGI side of one ``/v1/stream`` connection, with only what the adapter uses.

    Starlette's ``WebSocket`` would do the same, as one more object per connection (with its
    own state, header and query caches) and one more coroutine frame under every receive; a
    gateway holds thousands of these connections, mostly idle, so the raw ASGI callables are used.
    """

    __slots__ = ("_closed", "_send", "receive")

    def __init__(self, receive: Receive, send: Send) -> None:
        self.receive = receive
        self._send = send
        self._closed = False

    async def accept(self) -> None:
        message = await self.receive()
        if message["type"] != "websocket.connect":
            raise RuntimeError(f"expected websocket.connect, got {message['type']!r}")
        await self._send({"type": "websocket.accept"})

    async def send_text(self, text: str) -> None:
        if self._closed:
            raise RuntimeError("the WebSocket is closed")
        await self._send({"type": "websocket.send", "text": text})

    def write_now(self, frames: list[bytes]) -> int | None:
        """Write ``frames`` as text messages at once if the server can (uvicorn under
        :mod:`gateway.websocket`, socket open and writable): the bytes written, or None, having
        written nothing (use :meth:`send_text`)."""
        if self._closed:
            return None
        write = getattr(server_protocol(self._send), "write_text_now", None)
        if write is None:
            return None
        written: int | None = write(frames)
        return written

    async def close(self, code: int, reason: str) -> None:
        if self._closed:
            raise RuntimeError("the WebSocket is closed")
        self._closed = True
        await self._send({"type": "websocket.close", "code": code, "reason": reason})

    def abort(self, *, only_if_stuck: bool = False) -> None:
        """Drop the TCP connection now, unsent data and all. For a client that stopped reading:
        its close frame never gets out, and the server's graceful transport close waits for a
        buffer that never drains, keeping the socket and its buffers for as long as the client
        keeps the connection open. With ``only_if_stuck``, only if data is still unsent.
        (Under a server other than uvicorn this does nothing, see :func:`server_protocol`.)"""
        transport = getattr(server_protocol(self._send), "transport", None)
        if transport is None:
            return
        if only_if_stuck:
            with contextlib.suppress(Exception):
                if not transport.get_write_buffer_size():
                    return
        # Linger 0: the kernel resets the connection and frees its send buffer at once, rather
        # than keep the unsent bytes in an orphaned socket that retries a zero window.
        with contextlib.suppress(Exception):
            transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        transport.abort()


async def close_quietly(websocket: StreamSocket, code: int, reason: str) -> None:
    """Close with ``code`` and ``reason`` (cut to what a close frame holds); never raises for
    the client's sake: a close that cannot be written ends in dropping the connection."""
    try:
        await asyncio.wait_for(websocket.close(code, fit_close_reason(reason)), CLOSE_TIMEOUT_S)
    except TimeoutError:
        websocket.abort()  # the client is not reading: the close frame cannot get out
        return
    except (RuntimeError, OSError):
        return
    except WebSocketException as exc:
        # The protocol refused the close frame (a reason this code let through, or a state
        # it did not expect): drop the connection rather than let the handler die with it.
        log.warning("ws_close_failed", code=code, error=f"{type(exc).__name__}: {exc}"[:200])
        websocket.abort()
        return
    # The close frame may only be buffered: a client that does not read within the close
    # timeout has its connection reset rather than held open by the unsent bytes.
    asyncio.get_running_loop().call_later(
        CLOSE_TIMEOUT_S, functools.partial(websocket.abort, only_if_stuck=True)
    )


async def close_connection(
    websocket: StreamSocket, metrics: GatewayMetrics, code: int, reason: str
) -> None:
    """Close with ``code`` (an entry of :mod:`gateway.closecodes`), quietly, and count it."""
    metrics.closes.labels(str(code)).inc()
    await close_quietly(websocket, code, reason)


async def reject(websocket: StreamSocket, metrics: GatewayMetrics, exc: Exception) -> None:
    """Close a refused or failed connect with the code :func:`close_for` gives ``exc``;
    ``exc`` itself is raised again if it is not one a connect expects."""
    decided = close_for(exc)
    if decided is None:
        raise exc
    close, reason = decided
    await close_connection(websocket, metrics, close.code, reason)
