"""WebSocket frames of ``GET /v1/stream``.

Server frames are built as bytes by the fan-out script and the gateway (one encoding, shared by
every connection of a user); these structs document them and are used in tests and for the few
frames the gateway builds itself. Client frames are decoded with :func:`decode_client_frame`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.errors import DECODE_ERRORS, ValidationError, from_decode_error

__all__ = [
    "MAX_INBOUND_FRAME",
    "ActivityFrame",
    "ClientFrame",
    "Removed",
    "Reset",
    "Resume",
    "UnknownFrameType",
    "Welcome",
    "decode_client_frame",
    "encode_frame",
]

MAX_INBOUND_FRAME = 64 * 1024
Cursor = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class Welcome(msgspec.Struct, tag_field="type", tag="welcome"):
    user: str
    cursor: str | None


class ActivityFrame(msgspec.Struct, tag_field="type", tag="activity"):
    cursor: str
    activity: msgspec.Raw


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


def encode_frame(frame: Welcome | ActivityFrame | Removed | Reset) -> bytes:
    return _encoder.encode(frame)
