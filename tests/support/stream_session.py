"""Driving a :class:`gateway.session.Session` without sockets or Redis: frames as the fan-out
script builds them, a session whose welcome was sent, and draining what it would send.

``drain`` confirms every frame it takes as written, so a test sees the session's state after a
completed write; ``seqs`` is the delivery seq of each non-welcome frame, in order.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.session import Session

__all__ = ["EPOCH", "activity", "drain", "new", "removed", "seqs", "started", "stream"]

EPOCH = "ab12cd34"


def activity(seq: int, epoch: str = EPOCH, ident: str | None = None, pad: int = 0) -> bytes:
    """A frame exactly as the fan-out script builds it."""
    body = json.dumps({"id": ident or f"a-{seq}", "pad": "x" * pad}, separators=(",", ":"))
    return (
        b'{"type":"activity","cursor":"'
        + f"{epoch}.{seq}".encode()
        + b'","activity":'
        + body.encode()
        + b"}"
    )


def removed(seq: int, ident: str, epoch: str = EPOCH) -> bytes:
    return (
        b'{"type":"removed","cursor":"'
        + f"{epoch}.{seq}".encode()
        + b'","id":'
        + json.dumps(ident).encode()
        + b"}"
    )


def new(seq: int = 0, *, hold: bool = False, max_queue: int = 1 << 20, **kw: Any) -> Session:
    return Session("u1", EPOCH, seq, max_queue_bytes=max_queue, hold_live=hold, **kw)


def drain(session: Session) -> list[dict[str, Any]]:
    """Take the frames to send, confirm them as written, return them decoded."""
    frames = session.frames_to_send()
    for frame in frames:
        session.frame_sent(len(frame))
    return [json.loads(frame) for frame in frames]


def seqs(frames: list[dict[str, Any]]) -> list[int]:
    return [int(f["cursor"].rpartition(".")[2]) for f in frames if f["type"] != "welcome"]


def started(seq: int = 0, **kw: Any) -> Session:
    """A live session whose welcome was already sent."""
    session = new(seq, **kw)
    drain(session)
    return session


def stream(first: int, last: int, epoch: str = EPOCH) -> list[tuple[int, bytes]]:
    return [(seq, activity(seq, epoch)) for seq in range(first, last + 1)]
