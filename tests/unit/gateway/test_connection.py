"""A stream connection before its session starts: the early frames are bounded and none is lost
(``gateway.connection.StreamConnection``; no server, no Redis)."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pytest

from feed.settings import Settings


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


def test_the_push_latency_clock_starts_at_a_frame_for_the_client_not_at_presence() -> None:
    """The hub's presence frames are never written to the client: before the fix one started
    ``feed_gateway_push_latency_seconds`` (and a push span), so the next push was measured from
    it."""
    from gateway.auth import UserClaims
    from gateway.connection import StreamConnection
    from gateway.session import presence_frame

    gateway = SimpleNamespace(settings=Settings(send_queue_bytes=1 << 20), hold_live_s=0.0)
    conn = StreamConnection(None, UserClaims("u1", time.time() + 600), gateway)  # type: ignore[arg-type]
    conn._start_session("ep1", 5)
    conn.deliver(presence_frame("ep1", 5))
    assert conn._pending_since is None
    conn.deliver(_activity_frame("ep1", 6))
    assert conn._pending_since is not None
