"""Activity events on ``feed.activities`` (W3C Activity Streams 2.0 aligned).

Limits are declared on the types; :func:`decode_activity` and :func:`decode_activities` are the only
ways in, and they raise :class:`schemas.errors.ValidationError` naming the field and the limit.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec

from schemas.errors import DECODE_ERRORS, ValidationError, from_decode_error

__all__ = [
    "MAX_ACTIVITY_BYTES",
    "MAX_BATCH",
    "MAX_BATCH_BYTES",
    "MAX_EXTRA_BYTES",
    "MAX_RECIPIENTS",
    "Activity",
    "ActivityId",
    "UserId",
    "decode_activities",
    "decode_activity",
    "encode_activity",
    "published_us",
]

#: Printable, no whitespace or control characters: ids become parts of Redis keys and channels.
_ID_PATTERN = r"^[^\s\x00-\x1f\x7f]+$"
UserId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=_ID_PATTERN)]
ActivityId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=_ID_PATTERN)]
Verb = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=_ID_PATTERN)]
ObjectRef = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
Published = Annotated[datetime, msgspec.Meta(tz=True)]

MAX_RECIPIENTS = 100
MAX_EXTRA_BYTES = 4096
#: Upper bound of one encoded event; everything inside it is bounded by the field limits.
MAX_ACTIVITY_BYTES = 32 * 1024
#: Most activities in one HTTP ingest request, and the largest body :func:`decode_activities`
#: looks at (the HTTP layer enforces a smaller one while reading).
MAX_BATCH = 500
MAX_BATCH_BYTES = MAX_BATCH * MAX_ACTIVITY_BYTES
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_PUBLISHED = datetime(2200, 1, 1, tzinfo=UTC)


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


def _check(activity: Activity, prefix: str) -> Activity:
    if not (_EPOCH <= activity.published < _MAX_PUBLISHED):
        raise ValidationError(
            _join(prefix, "published"), "out_of_range", "must be between 1970-01-01 and 2200-01-01"
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


def decode_activity(data: bytes | str, *, prefix: str = "") -> Activity:
    """Decode and validate one activity from JSON."""
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
    return _check(activity, prefix)


def decode_activities(data: bytes) -> list[Activity]:
    """Decode an HTTP ingest body: one activity object, or an array of up to ``MAX_BATCH``."""
    if len(data) > MAX_BATCH_BYTES:
        raise ValidationError(
            "", "too_large", f"body is {len(data)} bytes; the limit is {MAX_BATCH_BYTES} bytes"
        )
    stripped = data.lstrip()
    if not stripped.startswith(b"["):
        return [decode_activity(data)]
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
    return [decode_activity(bytes(raw), prefix=f"[{i}]") for i, raw in enumerate(raws)]


def encode_activity(activity: Activity) -> bytes:
    """Canonical JSON for an activity (what timelines store and clients receive)."""
    return _encoder.encode(activity)
