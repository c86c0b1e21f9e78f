"""WebSocket frames of ``GET /v1/stream``.

Server frames are built as bytes by the Redis scripts and the gateway (one encoding, shared by
every connection of a user). This module is their one owner: the structs below define them, and
the byte pieces (``*_HEAD``, ``*_MIDDLE``, ``*_TAIL``) are what the scripts splice around a cursor
and a body (they receive them through ``ARGV``; no frame text is written in Lua). A unit test
decodes spliced frames with these structs, so the pieces and the structs cannot drift apart.
:func:`stream_position` reads the cursor of a spliced frame back by the same pieces. Client
frames are decoded with :func:`decode_client_frame`.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from schemas.errors import DECODE_ERRORS, ValidationError, from_decode_error

__all__ = [
    "ACTIVITY_HEAD",
    "ACTIVITY_MIDDLE",
    "ACTIVITY_TAIL",
    "ACTIVITY_TRACEPARENT",
    "ACTIVITY_TS",
    "CURSOR_HEADS",
    "MAX_INBOUND_FRAME",
    "PRESENCE_HEAD",
    "REMOVED_HEAD",
    "REMOVED_MIDDLE",
    "REMOVED_TAIL",
    "TRACED_TAIL",
    "TRACEPARENT",
    "ActivityFrame",
    "ClientFrame",
    "Removed",
    "Reset",
    "Resume",
    "UnknownFrameType",
    "Welcome",
    "activity_tail",
    "decode_client_frame",
    "encode_frame",
    "frame_traceparent",
    "frame_ts_ms",
    "stream_position",
]

MAX_INBOUND_FRAME = 64 * 1024
Cursor = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


#: ``activity`` frame: ``ACTIVITY_HEAD + <epoch>.<seq> + ACTIVITY_MIDDLE + <activity JSON> +
#: activity_tail(ts)`` (what :class:`ActivityFrame` encodes to; spliced by ``feed/lua/fanout.lua``).
ACTIVITY_HEAD = b'{"type":"activity","cursor":"'
ACTIVITY_MIDDLE = b'","activity":'
ACTIVITY_TAIL = b"}"
#: Before the optional ``ts`` of an activity frame: when the activity entered the pipeline, in
#: milliseconds since the Unix epoch (its Kafka record's timestamp; HTTP ingest sets that to the
#: time it accepted the request). It lets the gateway measure publish-to-socket latency without
#: decoding the frame (:func:`frame_ts_ms`), and a client its own.
ACTIVITY_TS = b',"ts":'
#: Before the optional ``traceparent`` of an activity frame (W3C Trace Context, 55 characters),
#: which comes before ``ts``: the fan-out worker's span for the record, while the worker traces and
#: the record's trace is sampled (``feed.tracing``). The gateway's push span is its child.
ACTIVITY_TRACEPARENT = b',"traceparent":"'
_TRACEPARENT_LEN = 55
#: ``removed`` frame: ``REMOVED_HEAD + <epoch>.<seq> + REMOVED_MIDDLE + <id as a JSON string> +
#: REMOVED_TAIL`` (the order :class:`Removed` decodes; spliced by ``feed/lua/remove.lua``).
REMOVED_HEAD = b'{"type":"removed","cursor":"'
REMOVED_MIDDLE = b'","id":'
REMOVED_TAIL = b"}"
#: The gateway's in-process ``_presence`` frame (never sent to a client): ``PRESENCE_HEAD +
#: <epoch>.<seq> + b'"}'`` (``gateway.session.presence_frame``).
PRESENCE_HEAD = b'{"type":"_presence","cursor":"'
#: The frames that carry a delivery cursor, by the piece before it (:func:`stream_position`).
CURSOR_HEADS = (ACTIVITY_HEAD, REMOVED_HEAD, PRESENCE_HEAD)
#: Longest ``<epoch>.<seq>`` (16 + 1 + 18 characters, see ``feed.cursor``).
_CURSOR_MAX = 35


class Welcome(msgspec.Struct, tag_field="type", tag="welcome"):
    user: str
    cursor: str | None


class ActivityFrame(msgspec.Struct, tag_field="type", tag="activity", omit_defaults=True):
    cursor: str
    activity: msgspec.Raw
    #: The worker's span for the record, when its trace is sampled (see ACTIVITY_TRACEPARENT).
    traceparent: str | None = None
    #: Milliseconds since the epoch when the activity entered the pipeline (see ACTIVITY_TS).
    ts: int | None = None


class Removed(msgspec.Struct, tag_field="type", tag="removed", omit_defaults=True):
    id: str
    cursor: str | None = None


class Reset(msgspec.Struct, tag_field="type", tag="reset"):
    pass


class Resume(msgspec.Struct, tag_field="type", tag="resume"):
    cursor: Cursor


ClientFrame = Resume


class UnknownFrameType(ValidationError):
    """A well-formed JSON frame whose ``type`` the server does not know (close code 1003)."""


class _Envelope(msgspec.Struct):
    type: Annotated[str, msgspec.Meta(max_length=64)]


_envelope = msgspec.json.Decoder(_Envelope)
_client = msgspec.json.Decoder(ClientFrame)
_encoder = msgspec.json.Encoder()


def decode_client_frame(data: bytes | str) -> ClientFrame:
    """Decode a client frame; raise ValidationError (1007) or UnknownFrameType (1003)."""
    if len(data) > MAX_INBOUND_FRAME:
        raise ValidationError("", "too_large", f"frame exceeds {MAX_INBOUND_FRAME} bytes")
    try:
        envelope = _envelope.decode(data)
    except DECODE_ERRORS as exc:
        raise from_decode_error(exc) from None
    if envelope.type != "resume":
        message = f"unknown frame type {_shown(envelope.type)}"
        raise UnknownFrameType("type", "unknown_type", message)
    try:
        return _client.decode(data)
    except DECODE_ERRORS as exc:
        raise from_decode_error(exc) from None


#: Most characters of an unknown ``type`` echoed in the error (and so in the close reason).
_SHOWN_MAX = 64


def _shown(value: str) -> str:
    """``value`` quoted for an error message, in ASCII (``ascii()`` escapes anything else), at
    most ``_SHOWN_MAX`` characters, cut between whole escapes: the message becomes a close
    reason, which must fit in 123 bytes of UTF-8, and a client's text must not reach a log
    unescaped."""
    shown = ascii(value)
    if len(shown) <= _SHOWN_MAX:
        return shown
    end = len(value)  # at most 64 characters (the envelope's bound): a few dozen tries
    while end > 0 and len(shown := ascii(value[:end])) > _SHOWN_MAX - 3:
        end -= 1
    return shown + "..."


def stream_position(frame: bytes) -> tuple[str, int] | None:
    """``(epoch, seq)`` of a frame that starts with one of :data:`CURSOR_HEADS`, read with
    string operations (no JSON decoding); None for any other frame or a malformed cursor
    (anything but ``<1-16 of a-z0-9>.<1-18 ASCII digits>`` closed by a quote)."""
    for head in CURSOR_HEADS:
        if frame.startswith(head):
            break
    else:
        return None
    start = len(head)
    end = frame.find(b'"', start, start + _CURSOR_MAX + 1)
    if end < 0:
        return None
    epoch, dot, seq = frame[start:end].partition(b".")
    if not dot or not 0 < len(epoch) <= 16 or not 0 < len(seq) <= 18:
        return None
    if not (epoch.isascii() and epoch.isalnum() and epoch == epoch.lower()):
        return None
    if not (seq.isascii() and seq.isdigit()):
        return None
    return epoch.decode("ascii"), int(seq)


def activity_tail(ts_ms: int | None, traceparent: str | None = None) -> bytes:
    """The bytes after the activity JSON of an activity frame: ``traceparent`` when given (a
    valid W3C one, see ``feed.tracing``), then ``ts`` when it is known (a positive millisecond
    time), then the closing brace."""
    trace = b""
    if traceparent is not None and len(traceparent) == _TRACEPARENT_LEN:
        trace = b'%s%s"' % (ACTIVITY_TRACEPARENT, traceparent.encode("ascii"))
    if ts_ms is None or ts_ms <= 0:
        return trace + ACTIVITY_TAIL
    return b"%s%s%d%s" % (trace, ACTIVITY_TS, ts_ms, ACTIVITY_TAIL)


#: A frame's ``ts`` is read only at the very end, where :func:`activity_tail` puts it: a 13-digit
#: millisecond time (years 2001 to 2286).
_TS_DIGITS = 13
_TS_AT = -(len(ACTIVITY_TS) + _TS_DIGITS + len(ACTIVITY_TAIL))
#: A W3C ``traceparent`` of version 00 (lower-case hex, trace and span ids not all zeros): the one
#: definition, which ``feed.tracing`` uses for the headers it takes in too.
TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
#: The length of the tail of a frame with both ``traceparent`` and ``ts`` (what the fan-out
#: worker writes for a traced record): its ``traceparent`` field starts this far from the end.
TRACED_TAIL = len(ACTIVITY_TRACEPARENT) + _TRACEPARENT_LEN + 1 + len(ACTIVITY_TS) + _TS_DIGITS + 1


def frame_ts_ms(frame: bytes) -> int | None:
    """The ``ts`` of a spliced activity frame, read from its last bytes (no JSON decoding; about
    a third of a microsecond); None for a frame without one. Only the tail that
    :func:`activity_tail` writes is recognised, so a body's own fields are never taken for it."""
    if frame[_TS_AT : _TS_AT + len(ACTIVITY_TS)] != ACTIVITY_TS:
        return None
    digits = frame[-_TS_DIGITS - 1 : -1]
    if not digits.isdigit():
        return None
    return int(digits)


def frame_traceparent(frame: bytes) -> str | None:
    """The ``traceparent`` of a spliced activity frame, read from its last bytes like
    :func:`frame_ts_ms` (no JSON decoding); None for a frame without one."""
    end = len(frame) - 1  # the closing brace
    if frame[_TS_AT : _TS_AT + len(ACTIVITY_TS)] == ACTIVITY_TS:
        end = len(frame) + _TS_AT
    start = end - 1 - _TRACEPARENT_LEN
    head = start - len(ACTIVITY_TRACEPARENT)
    if head < 0 or frame[end - 1 : end] != b'"' or frame[head:start] != ACTIVITY_TRACEPARENT:
        return None
    value = frame[start : end - 1].decode("ascii", "replace")
    return value if TRACEPARENT.fullmatch(value) else None


def encode_frame(frame: Welcome | ActivityFrame | Removed | Reset) -> bytes:
    return _encoder.encode(frame)
