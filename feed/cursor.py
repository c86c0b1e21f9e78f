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

from schemas.activity import is_valid_id
from schemas.errors import FeedError

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
# Every parser below matches the whole string (``fullmatch``: no "$" that also matches before a
# trailing newline) with ASCII classes only (never ``\d`` or ``str.isdigit``, which accept other
# scripts' digits and superscripts).
_STREAM = re.compile(r"(?P<epoch>[a-z0-9]{1,16})\.(?P<seq>[0-9]{1,18})")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


class CursorError(FeedError, ValueError):
    """A cursor that this server did not issue, or that is malformed."""


def order_key(published_us: int, activity_id: str) -> str:
    """The timeline member: sorts like (published, id) as plain bytes."""
    if not 0 <= published_us < 10**_TS_DIGITS:
        raise ValueError("published out of range")
    return f"{published_us:0{_TS_DIGITS}d}:{activity_id}"


def split_order_key(key: str) -> tuple[int, str]:
    """(published µs, activity id) of a timeline member; CursorError unless ``key`` is exactly
    16 ASCII digits, a colon and a non-empty id. The one parser of order keys (the Redis scripts
    never parse them: they get each activity's keys from ``feed.keys``)."""
    n = _TS_DIGITS
    ts, colon, activity_id = key[:n], key[n : n + 1], key[n + 1 :]
    if colon != ":" or not activity_id or not (ts.isascii() and ts.isdigit()):
        raise CursorError("malformed timeline key")
    return int(ts), activity_id


def encode_position(key: str) -> str:
    return "p" + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_position(cursor: str) -> str:
    """Return the order key inside a position cursor; raise CursorError if it is not one.

    Only what :func:`encode_position` issues is accepted: ``p`` and unpadded URL-safe base64
    (no other character, and the one canonical encoding of the key) of an order key whose id is
    a valid activity id (1-128 characters, no whitespace or control character)."""
    if len(cursor) > 400 or not cursor.startswith("p"):
        raise CursorError("not a feed cursor")
    body = cursor[1:]
    if _BASE64URL.fullmatch(body) is None:
        raise CursorError("not a feed cursor")
    try:
        key = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise CursorError("not a feed cursor") from None
    _ts, activity_id = split_order_key(key)
    if encode_position(key) != cursor or not is_valid_id(activity_id):
        raise CursorError("not a feed cursor")
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
    """The stream position in ``cursor``: exactly ``<1-16 of a-z0-9>.<1-18 ASCII digits>``,
    else CursorError."""
    match = _STREAM.fullmatch(cursor)
    if match is None:
        raise CursorError("not a stream cursor")
    return StreamCursor(match["epoch"], int(match["seq"]))
