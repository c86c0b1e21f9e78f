"""Activity events on ``feed.activities`` (W3C Activity Streams 2.0 aligned).

Limits are declared on the types; :func:`decode_activity` and :func:`decode_activities` are the only
ways in, and they raise :class:`schemas.errors.ValidationError` naming the field and the limit.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec

from schemas.errors import DECODE_ERRORS, ValidationError, from_decode_error

__all__ = [
    "DEFAULT_MAX_SKEW_S",
    "ID_RE",
    "MAX_ACTIVITY_BYTES",
    "MAX_BATCH",
    "MAX_BATCH_BYTES",
    "MAX_EXTRA_BYTES",
    "MAX_NOTIFY",
    "MAX_RECIPIENTS",
    "Activity",
    "ActivityId",
    "UserId",
    "check_not_ahead",
    "decode_activities",
    "decode_activity",
    "encode_activity",
    "is_valid_id",
    "published_us",
]

#: Printable, no whitespace or control characters (C0, DEL, C1) anywhere: ids become parts of
#: Redis keys and channels, and lists of them are newline-joined. ``\A``/``\Z``, not ``^``/``$``:
#: ``$`` also matches before a trailing newline, which let ``"x\n"`` through. This is the one
#: user/activity id rule; :data:`ID_RE` and :func:`is_valid_id` serve the code that is not a
#: msgspec decoder (JWT ``sub``, the development token).
_ID_CHARS = r"[^\s\x00-\x1f\x7f-\x9f]"
_ID_PATTERN = rf"\A{_ID_CHARS}+\Z"
ID_MAX = 128
ID_RE = re.compile(rf"\A{_ID_CHARS}{{1,{ID_MAX}}}\Z")
UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=_ID_PATTERN)]
ActivityId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=_ID_PATTERN)]
Verb = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=_ID_PATTERN)]
ObjectRef = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
Published = Annotated[datetime, msgspec.Meta(tz=True)]

MAX_RECIPIENTS = 100
#: Most users one activity notifies (``notify``).
MAX_NOTIFY = 100
MAX_EXTRA_BYTES = 4096
#: Upper bound of one encoded event; everything inside it is bounded by the field limits.
MAX_ACTIVITY_BYTES = 32 * 1024
#: Most activities in one HTTP ingest request, and the largest body :func:`decode_activities`
#: looks at (the HTTP layer enforces a smaller one while reading).
MAX_BATCH = 500
MAX_BATCH_BYTES = MAX_BATCH * MAX_ACTIVITY_BYTES
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: How far ahead of the receiver's clock an event time (``published``, a follow's ``at``) may be
#: by default (``FEED_MAX_CLOCK_SKEW_S``). A time far in the future would pin a post to the top of
#: every feed, or make a follow that no unfollow can ever undo.
DEFAULT_MAX_SKEW_S = 300.0


def is_valid_id(value: str) -> bool:
    """True if ``value`` is a valid user or activity id (1-128 characters, no whitespace or
    control character anywhere)."""
    return ID_RE.match(value) is not None


def check_not_ahead(
    value: datetime, field: str, *, max_skew_s: float, now: float | None = None
) -> None:
    """Refuse an event time more than ``max_skew_s`` ahead of this machine's clock."""
    ahead = value.timestamp() - (time.time() if now is None else now)
    if ahead > max_skew_s:
        raise ValidationError(
            field,
            "in_the_future",
            f"is {ahead:.0f} s ahead of the receiver's clock; at most {max_skew_s:g} s is allowed",
        )


class Activity(msgspec.Struct, omit_defaults=True):
    """One activity. ``type == "Delete"`` removes the activity whose id is ``object``."""

    id: ActivityId
    type: Verb
    actor: UserId
    object: ObjectRef
    published: Published
    target: ObjectRef | None = None
    to: Annotated[list[UserId], msgspec.Meta(max_length=MAX_RECIPIENTS)] = []
    extra: dict[str, Any] | None = None
    #: Users whose notification feed gets this activity (``feed.notify``), the actor left out.
    notify: Annotated[list[UserId], msgspec.Meta(max_length=MAX_NOTIFY)] = []

    @property
    def is_delete(self) -> bool:
        return self.type == "Delete"


_decoder = msgspec.json.Decoder(Activity)
_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_encoder = msgspec.json.Encoder()


def published_us(activity: Activity) -> int:
    """Microseconds since the Unix epoch of ``published``: the timeline sort key."""
    delta = activity.published - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _check(activity: Activity, prefix: str, max_skew_s: float, now: float | None) -> Activity:
    if activity.published < _EPOCH:
        raise ValidationError(
            _join(prefix, "published"), "out_of_range", "must be 1970-01-01 or later"
        )
    check_not_ahead(activity.published, _join(prefix, "published"), max_skew_s=max_skew_s, now=now)
    if activity.is_delete and not is_valid_id(activity.object):
        raise ValidationError(
            _join(prefix, "object"),
            "invalid_chars",
            "a Delete's object is an activity id: 1-128 characters, no whitespace or control "
            "characters",
        )
    if activity.extra is not None:
        size = len(_encoder.encode(activity.extra))
        if size > MAX_EXTRA_BYTES:
            raise ValidationError(
                _join(prefix, "extra"),
                "too_large",
                f"encoded size {size} bytes exceeds the limit of {MAX_EXTRA_BYTES} bytes",
            )
    return activity


def _join(prefix: str, field: str) -> str:
    return f"{prefix}.{field}" if prefix else field


def decode_activity(
    data: bytes | str,
    *,
    prefix: str = "",
    max_skew_s: float = DEFAULT_MAX_SKEW_S,
    now: float | None = None,
) -> Activity:
    """Decode and validate one activity from JSON. ``published`` may be at most ``max_skew_s``
    ahead of ``now`` (default: this machine's clock)."""
    if len(data) > MAX_ACTIVITY_BYTES:
        raise ValidationError(
            prefix,
            "too_large",
            f"event is {len(data)} bytes; the limit is {MAX_ACTIVITY_BYTES} bytes",
        )
    try:
        activity = _decoder.decode(data)
    except DECODE_ERRORS as exc:
        raise from_decode_error(exc, prefix=prefix) from None
    return _check(activity, prefix, max_skew_s, now)


def decode_activities(
    data: bytes, *, max_skew_s: float = DEFAULT_MAX_SKEW_S, now: float | None = None
) -> list[Activity]:
    """Decode an HTTP ingest body: one activity object, or an array of up to ``MAX_BATCH``."""
    if len(data) > MAX_BATCH_BYTES:
        raise ValidationError(
            "", "too_large", f"body is {len(data)} bytes; the limit is {MAX_BATCH_BYTES} bytes"
        )
    stripped = data.lstrip()
    if not stripped.startswith(b"["):
        return [decode_activity(data, max_skew_s=max_skew_s, now=now)]
    try:
        raws = _list_decoder.decode(data)
    except DECODE_ERRORS as exc:
        raise from_decode_error(exc) from None
    if not raws:
        raise ValidationError("", "too_short", "the array is empty; send 1 to 500 activities")
    if len(raws) > MAX_BATCH:
        raise ValidationError(
            "", "too_many", f"{len(raws)} activities in one request; the limit is {MAX_BATCH}"
        )
    return [
        decode_activity(bytes(raw), prefix=f"[{i}]", max_skew_s=max_skew_s, now=now)
        for i, raw in enumerate(raws)
    ]


def encode_activity(activity: Activity) -> bytes:
    """Canonical JSON for an activity (what timelines store and clients receive)."""
    return _encoder.encode(activity)
