"""Follow events on ``feed.follows`` and the HTTP follow body."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from schemas.activity import DEFAULT_MAX_SKEW_S, UserId, check_not_ahead
from schemas.errors import DECODE_ERRORS, ValidationError, from_decode_error

__all__ = ["FollowEvent", "FollowRequest", "decode_follow_event", "decode_follow_request"]

MAX_FOLLOW_BYTES = 4096


class FollowEvent(msgspec.Struct):
    """``follower`` starts (``follow``) or stops (``unfollow``) following ``followee``."""

    type: Literal["follow", "unfollow"]
    follower: UserId
    followee: UserId
    at: Annotated[datetime, msgspec.Meta(tz=True)]


class FollowRequest(msgspec.Struct):
    """Body of ``POST``/``DELETE /v1/follows``."""

    follower: UserId
    followee: UserId


_event = msgspec.json.Decoder(FollowEvent)
_request = msgspec.json.Decoder(FollowRequest)


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes) -> Any:
    if len(data) > MAX_FOLLOW_BYTES:
        raise ValidationError("", "too_large", f"body exceeds {MAX_FOLLOW_BYTES} bytes")
    try:
        value = decoder.decode(data)
    except DECODE_ERRORS as exc:
        raise from_decode_error(exc) from None
    if value.follower == value.followee:
        raise ValidationError("followee", "invalid", "a user cannot follow themselves")
    return value


def decode_follow_event(
    data: bytes, *, max_skew_s: float = DEFAULT_MAX_SKEW_S, now: float | None = None
) -> FollowEvent:
    """Decode a ``feed.follows`` record; ``at`` may be at most ``max_skew_s`` ahead of ``now``
    (default: this machine's clock): a follow dated years ahead could never be undone."""
    result: FollowEvent = _decode(_event, data)
    check_not_ahead(result.at, "at", max_skew_s=max_skew_s, now=now)
    return result


def decode_follow_request(data: bytes) -> FollowRequest:
    result: FollowRequest = _decode(_request, data)
    return result
