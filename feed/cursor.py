"""Opaque cursors.

Two kinds, both opaque to clients:

* a **position** in a timeline (HTTP paging): the timeline order key ``<published µs, 16
  digits>:<activity id>``, so ordering is newest first by ``published`` with ties broken by ``id``,
  identically in Redis (lexicographic sorted set) and Cassandra (clustering order);
* a **stream** cursor (WebSocket resume): ``<epoch>.<seq>``, the per-user delivery sequence,
  which is independent of display order (a backfilled or late item gets a new, higher ``seq``).
"""

from __future__ import annotations

import base64
import binascii
import re

__all__ = [
    "CursorError",
    "StreamCursor",
    "decode_position",
    "decode_stream",
    "encode_position",
    "order_key",
    "split_order_key",
]

_TS_DIGITS = 16
_STREAM = re.compile(r"^(?P<epoch>[a-z0-9]{1,16})\.(?P<seq>\d{1,18})$")


class CursorError(ValueError):
    """A cursor that this server did not issue, or that is malformed."""


def order_key(published_us: int, activity_id: str) -> str:
    """The timeline member: sorts like (published, id) as plain bytes."""
    if not 0 <= published_us < 10**_TS_DIGITS:
        raise ValueError("published out of range")
    return f"{published_us:0{_TS_DIGITS}d}:{activity_id}"


def split_order_key(key: str) -> tuple[int, str]:
    ts, sep, activity_id = key.partition(":")
    if not sep or len(ts) != _TS_DIGITS or not ts.isdigit() or not activity_id:
        raise CursorError("malformed timeline key")
    return int(ts), activity_id


def encode_position(key: str) -> str:
    return "p" + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_position(cursor: str) -> str:
    """Return the order key inside a position cursor; raise CursorError if it is not one."""
    if not cursor.startswith("p") or len(cursor) > 400:
        raise CursorError("not a feed cursor")
    body = cursor[1:]
    try:
        key = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise CursorError("not a feed cursor") from None
    split_order_key(key)
    return key


class StreamCursor:
    """A position in one user's delivery stream."""

    __slots__ = ("epoch", "seq")

    def __init__(self, epoch: str, seq: int) -> None:
        self.epoch = epoch
        self.seq = seq

    def __str__(self) -> str:
        return f"{self.epoch}.{self.seq}"

    def __repr__(self) -> str:
        return f"StreamCursor({self.epoch!r}, {self.seq})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StreamCursor) and (self.epoch, self.seq) == (
            other.epoch,
            other.seq,
        )

    def __hash__(self) -> int:
        return hash((self.epoch, self.seq))


def decode_stream(cursor: str) -> StreamCursor:
    match = _STREAM.match(cursor)
    if not match:
        raise CursorError("not a stream cursor")
    return StreamCursor(match.group("epoch"), int(match.group("seq")))
