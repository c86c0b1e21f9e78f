"""The gateway's lean per-connection pieces: coarse timers, the receive queue and writable flag of
the uvicorn protocol, and the parsing of a stream connect (no server, no Redis)."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest

from feed.settings import Settings
from gateway.admission import handshake
from gateway.timers import TICK_S, Timers
from gateway.websocket import (
    Flag,
    Inbox,
    first_ping_delay,
    protocol_class,
    text_frame_header,
)


def test_timers_run_in_due_order_not_early_and_at_most_a_tick_late() -> None:
    async def scenario() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        timers = Timers()
        fired: list[tuple[str, float]] = []
        start = loop.time()
        for name, delay in (("c", 0.3), ("a", 0.05), ("b", 0.1), ("now", -1.0)):
            timers.call_later(delay, lambda n: fired.append((n, loop.time() - start)), name)
        assert len(timers) == 4
        await asyncio.sleep(0.3 + 2 * TICK_S)
        assert len(timers) == 0
        return fired

    fired = asyncio.run(scenario())
    assert [name for name, _ in fired] == ["now", "a", "b", "c"]
    due = {"now": 0.0, "a": 0.05, "b": 0.1, "c": 0.3}
    for name, at in fired:
        assert due[name] - 0.006 <= at <= due[name] + TICK_S + 0.1, (name, at)


def test_cancelled_timers_do_not_run_and_release_what_they_held() -> None:
    async def scenario() -> None:
        timers = Timers()
        fired: list[str] = []
        held = object()
        keep = timers.call_later(0.05, fired.append, "kept")
        drop = timers.call_later(0.05, fired.append, held)
        drop.cancel()
        drop.cancel()  # twice is harmless
        assert drop.arg is None and drop.fn is None
        assert len(timers) == 1
        await asyncio.sleep(0.05 + 2 * TICK_S)
        assert fired == ["kept"]
        assert keep.fn is None  # a timer that ran holds nothing either

    asyncio.run(scenario())


def test_many_cancelled_timers_are_compacted_away() -> None:
    async def scenario() -> None:
        timers = Timers()
        far = [timers.call_later(3600.0, print, i) for i in range(1000)]
        for timer in far[:900]:
            timer.cancel()
        assert len(timers) == 100
        assert len(timers._heap) < 300  # not 1000 until an hour from now

    asyncio.run(scenario())


def test_a_failing_callback_does_not_stop_the_others() -> None:
    async def scenario() -> list[int]:
        timers = Timers()
        fired: list[int] = []

        def boom(_arg: object) -> None:
            raise RuntimeError("boom")

        timers.call_later(0.0, boom, None)
        timers.call_later(0.0, fired.append, 1)
        timers.call_later(0.01, fired.append, 2)
        await asyncio.sleep(3 * TICK_S)
        return fired

    assert asyncio.run(scenario()) == [1, 2]


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


def _scope(headers: list[tuple[bytes, bytes]], query: bytes = b"") -> dict[str, object]:
    return {
        "type": "websocket",
        "headers": headers,
        "query_string": query,
        "client": ("10.1.2.3", 5555),
    }


def test_handshake_reads_origin_ip_and_the_bearer_token() -> None:
    scope = _scope([(b"Origin", b"http://a.example"), (b"authorization", b"Bearer  tok-1 ")])
    assert handshake(scope) == ("http://a.example", "10.1.2.3", "tok-1")


def test_handshake_token_from_the_query_when_no_bearer_header() -> None:
    scope = _scope([(b"authorization", b"Basic abc")], b"a=1&token=first&token=last")
    assert handshake(scope) == (None, "10.1.2.3", "last")
    scope = _scope([], b"token=t%2B1")
    assert handshake(scope)[2] == "t+1"


def test_handshake_without_credentials_or_client() -> None:
    scope = _scope([], b"tokens=x")
    scope["client"] = None
    assert handshake(scope) == (None, "unknown", "")


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


# --- frames that come before a connection's session starts ---------------------------------------
def _activity_frame(epoch: str, seq: int) -> bytes:
    return f'{{"type":"activity","cursor":"{epoch}.{seq}","activity":{{"id":"a{seq}"}}}}'.encode()


def _drain(session: Any, stream: dict[int, bytes], oldest: int) -> list[bytes]:
    """Everything the session sends, answering its stream reads from ``stream`` (100 a page)."""
    sent: list[bytes] = []
    for _ in range(10_000):
        frames = session.frames_to_send()
        sent += frames
        session.frame_sent(sum(len(f) for f in frames))
        after = session.history_request()
        if after is None and not frames:
            return sent
        if after is not None:
            page = [(seq, stream[seq]) for seq in range(after + 1, after + 101) if seq in stream]
            session.receive_history(page, oldest)
    pytest.fail("the session never settled")


def test_frames_before_the_session_starts_are_bounded_and_none_is_lost() -> None:
    from gateway.auth import UserClaims
    from gateway.connection import EARLY_MAX_FRAMES, StreamConnection
    from gateway.session import RESET_CONTROL, presence_frame

    gateway = SimpleNamespace(settings=Settings(send_queue_bytes=1 << 20), hold_live_s=0.0)
    conn = StreamConnection(None, UserClaims("u1", time.time() + 600), gateway)  # type: ignore[arg-type]
    epoch, attached = "ep1", 5
    stream = {seq: _activity_frame(epoch, seq) for seq in range(1, 10_006)}
    # A flood for a user whose session has not started yet (presence being attached).
    for seq in range(attached + 1, 10_006):
        conn.deliver(stream[seq])
        if seq == 7_000:
            conn.deliver(presence_frame(epoch, 6_999))
            conn.deliver(RESET_CONTROL)
    early = conn._early
    assert early is not None and len(early) <= EARLY_MAX_FRAMES
    session = conn._start_session(epoch, attached)
    sent = [json.loads(frame) for frame in _drain(session, stream, oldest=1)]
    assert sent[0]["type"] == "welcome"
    assert {"type": "reset"} in sent  # the reset request survived the flood
    seqs = [int(f["cursor"].rpartition(".")[2]) for f in sent if f["type"] == "activity"]
    assert seqs == list(range(attached + 1, 10_006))  # every frame, once, in order
