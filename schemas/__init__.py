"""Wire types of the public contract: events, WebSocket frames and HTTP bodies."""

from schemas.activity import (
    MAX_ACTIVITY_BYTES,
    MAX_BATCH,
    MAX_EXTRA_BYTES,
    MAX_NOTIFY,
    MAX_RECIPIENTS,
    Activity,
    decode_activities,
    decode_activity,
    encode_activity,
    published_us,
)
from schemas.errors import FeedError, ValidationError
from schemas.follow import FollowEvent, FollowRequest, decode_follow_event, decode_follow_request
from schemas.frames import (
    MAX_INBOUND_FRAME,
    ActivityFrame,
    Removed,
    Reset,
    Resume,
    UnknownFrameType,
    Welcome,
    decode_client_frame,
    encode_frame,
)
from schemas.http import Accepted, ErrorBody, ErrorDetail, FeedItem, FeedPage

__all__ = [
    "MAX_ACTIVITY_BYTES",
    "MAX_BATCH",
    "MAX_EXTRA_BYTES",
    "MAX_INBOUND_FRAME",
    "MAX_NOTIFY",
    "MAX_RECIPIENTS",
    "Accepted",
    "Activity",
    "ActivityFrame",
    "ErrorBody",
    "ErrorDetail",
    "FeedError",
    "FeedItem",
    "FeedPage",
    "FollowEvent",
    "FollowRequest",
    "Removed",
    "Reset",
    "Resume",
    "UnknownFrameType",
    "ValidationError",
    "Welcome",
    "decode_activities",
    "decode_activity",
    "decode_client_frame",
    "decode_follow_event",
    "decode_follow_request",
    "encode_activity",
    "encode_frame",
    "published_us",
]
