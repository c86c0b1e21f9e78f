"""uvicorn's sans-I/O WebSocket protocol with lean per-connection state.

:class:`LeanWebSocketProtocol` is uvicorn's ``websockets-sansio`` protocol (the same framing,
handshake, keepalive pings, limits and close handling) with a few things changed, because a
gateway holds thousands of mostly idle connections and each of these cost memory for nothing:

* the receive queue is :class:`Inbox` (a list and at most one waiting future) instead of an
  ``asyncio.Queue`` (three deques and an ``asyncio.Event`` with a fourth, ~3 KiB per connection,
  for a queue with one consumer that is almost always empty);
* the "transport is writable" flag is :class:`Flag` (a bool, and a future only while a writer
  waits) instead of an ``asyncio.Event`` (a deque, ~0.8 KiB);
* the keepalive ping is scheduled on the process's coarse timers (:mod:`gateway.timers`), not as
  an event-loop timer of its own (~0.6 KiB per connection under uvloop), and a connection's first
  ping comes at a random point of the second half of the interval (:func:`first_ping_delay`);
* the parsed handshake request and the handshake response (with their header maps) are dropped
  once the handshake is done: uvicorn (and the request parser of ``websockets``) keep them for the
  connection's lifetime and never read them again.

And one thing is added, for the gateway's hot path: :meth:`write_text_now` writes already
encoded UTF-8 frames as text messages at once, synchronously (no ASGI message dict, no
``bytes`` → ``str`` → ``bytes`` round trip, no ``Frame`` object, no coroutine), when the socket
is open and writable; otherwise it writes nothing and the caller uses ASGI ``send`` as before.

Nothing else differs; :func:`protocol_class` returns uvicorn's own class if this uvicorn does not
have the expected one (the gateway then works as before, with more memory per connection).
"""

from __future__ import annotations

import asyncio
import random
import struct
from typing import Any

from gateway.timers import timers

__all__ = ["Flag", "Inbox", "first_ping_delay", "protocol_class", "text_frame_header"]


class Inbox:
    """What uvicorn's protocol needs of its ``asyncio.Queue``: one consumer, no bound.

    :meth:`get` returns a future (already done when an item is waiting), so a reader waiting
    for the next message is one future, with no coroutine frame of its own.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[Any] | None = None

    def put_nowait(self, item: Any) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # a reader that gave up (cancelled) leaves the item queued
                waiter.set_result(item)
                return
        self._items.append(item)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.pop(0)

    def get(self) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._items:
            future.set_result(self._items.pop(0))
        else:
            self._waiter = future
        return future


class Flag:
    """What uvicorn's protocol needs of its ``writable`` ``asyncio.Event``."""

    __slots__ = ("_waiters", "value")

    def __init__(self) -> None:
        #: Whether the flag is set (read as an attribute on the hot path, see
        #: ``write_text_now``: no method call per write).
        self.value = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self.value

    def set(self) -> None:
        self.value = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self.value = False

    async def wait(self) -> bool:
        while not self.value:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            await waiter
        return True


def first_ping_delay(interval: float, draw: float) -> float:
    """When a new connection's first keepalive ping is due: somewhere in the second half of the
    interval (``draw`` in [0, 1)), not at exactly ``interval`` for every connection.

    Connections arrive in bursts (a deploy, a reconnect storm, a benchmark's connect phase), and
    each then pings at a fixed period: without the spread, thousands of pings, and their pongs,
    would keep landing in the same few timer ticks, every interval, stalling the event loop for
    everyone's live frames. A dead peer is still found within one interval plus the timeout.
    """
    return interval * (0.5 + 0.5 * draw)


def text_frame_header(size: int) -> bytes:
    """The header of an unmasked (server to client), final, uncompressed text frame of ``size``
    payload bytes (RFC 6455, section 5.2)."""
    if size < 126:
        return bytes((0x81, size))
    if size < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, size)
    return struct.pack("!BBQ", 0x81, 127, size)


def _build() -> type[asyncio.Protocol] | None:
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import (
            WebSocketsSansIOProtocol,
        )
    except ImportError:
        return None

    class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.queue = Inbox()  # type: ignore[assignment]
            self.writable = Flag()  # type: ignore[assignment]

        def handle_connect(self, event: Any) -> None:
            super().handle_connect(event)
            # The scope has everything the app needs from the request. uvicorn keeps the request,
            # and so does the handshake parser of ``websockets`` (a local of its generator, which
            # lives as long as the connection): its headers, the bulk of it, are emptied.
            self.request = None  # type: ignore[assignment]
            event.headers.clear()

        def schedule_ping(self) -> None:
            assert self.ping_interval is not None
            delay = max(0.0, self.ping_interval - self.last_ping_rtt)
            # stop_keepalive() cancels it like the TimerHandle it replaces.
            self.ping_timer = timers().call_later(delay, _send_ping, self)  # type: ignore[assignment]

        def start_keepalive(self) -> None:
            # Called once the handshake response is sent; uvicorn does not read it again.
            self.response = None  # type: ignore[assignment]
            if self.ping_interval is not None and self.ping_interval > 0:
                delay = first_ping_delay(self.ping_interval, random.random())
                self.ping_timer = timers().call_later(delay, _send_ping, self)  # type: ignore[assignment]

        def write_text_now(self, frames: list[bytes]) -> int | None:
            """Write ``frames`` (UTF-8) as unfragmented text messages now: the payload bytes
            written, or None, having written nothing, if this cannot be done right away (not
            open, the transport's buffer is full, an extension such as permessage-deflate is
            on, or a frame is not valid UTF-8)."""
            if (
                not self.writable.value  # type: ignore[attr-defined]
                or self.close_sent
                or self.disconnected
                or not self.handshake_complete
                or self.initial_response is not None
                or self.conn.extensions
                or self.conn.state is not _OPEN
                or self.transport.is_closing()
            ):
                return None
            parts: list[bytes] = []
            total = 0
            for frame in frames:
                size = len(frame)
                if not frame.isascii():
                    try:
                        frame.decode()
                    except UnicodeDecodeError:
                        return None
                parts.append(text_frame_header(size))
                parts.append(frame)
                total += size
            self.transport.write(b"".join(parts))
            return total

    from websockets.protocol import State

    _OPEN = State.OPEN
    _send_ping = WebSocketsSansIOProtocol.send_keepalive_ping
    return LeanWebSocketProtocol


_CLASS = _build()


def protocol_class() -> type[asyncio.Protocol] | str:
    """The class to pass as uvicorn's ``ws``; uvicorn's own name if it cannot be built."""
    return _CLASS if _CLASS is not None else "websockets-sansio"
