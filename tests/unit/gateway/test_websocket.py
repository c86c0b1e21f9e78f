"""The gateway's lean WebSocket pieces: the receive queue and writable flag of the uvicorn
protocol, the protocol class, the direct text-frame header and the first-ping spread (no server)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.websocket import (
    Flag,
    Inbox,
    first_ping_delay,
    protocol_class,
    text_frame_header,
)


def test_inbox_hands_items_in_order_to_one_reader() -> None:
    async def scenario() -> None:
        inbox = Inbox()
        assert inbox.empty()
        inbox.put_nowait(1)
        inbox.put_nowait(2)
        assert inbox.qsize() == 2
        assert await inbox.get() == 1
        assert inbox.get_nowait() == 2
        with pytest.raises(asyncio.QueueEmpty):
            inbox.get_nowait()
        waiting = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)
        inbox.put_nowait(3)
        assert await waiting == 3
        # A reader that gave up (cancelled) leaves the next item for the next reader.
        gave_up = inbox.get()
        gave_up.cancel()
        inbox.put_nowait(4)
        assert not inbox.empty()
        assert await inbox.get() == 4

    asyncio.run(scenario())


def test_flag_blocks_writers_while_cleared() -> None:
    async def scenario() -> None:
        flag = Flag()
        assert flag.is_set()
        assert await flag.wait() is True
        flag.clear()
        writers = [asyncio.ensure_future(flag.wait()) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert not any(w.done() for w in writers)
        flag.set()
        assert await asyncio.gather(*writers) == [True, True]

    asyncio.run(scenario())


def test_the_lean_protocol_is_uvicorns_sansio_protocol() -> None:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    cls = protocol_class()
    assert isinstance(cls, type) and issubclass(cls, WebSocketsSansIOProtocol)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 300, 65535, 65536, 70000])
def test_text_frame_header_frames_exactly_like_websockets(size: int) -> None:
    """The gateway's direct write (``write_text_now``) puts the same bytes on the wire as
    ``websockets`` does for a server's unfragmented, uncompressed text frame."""
    from websockets.frames import Frame, Opcode

    payload = ("é" * (size // 2) + "x" * (size % 2)).encode()
    assert len(payload) == size
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert text_frame_header(size) + payload == expected


def test_first_pings_of_a_connect_burst_are_spread_over_half_an_interval() -> None:
    import random

    rng = random.Random(5)
    interval = 20.0
    delays = [first_ping_delay(interval, rng.random()) for _ in range(5000)]
    assert all(interval / 2 <= d < interval for d in delays)  # never later than before
    # Spread: no 0.25 s timer tick gets more than a few times its even share (5000 / 40).
    ticks: dict[int, int] = {}
    for d in delays:
        ticks[int(d / 0.25)] = ticks.get(int(d / 0.25), 0) + 1
    assert len(ticks) == 40
    assert max(ticks.values()) < 3 * 5000 / 40
    assert first_ping_delay(interval, 0.0) == interval / 2
