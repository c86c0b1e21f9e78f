"""HTTP response bodies of the gateway."""

from __future__ import annotations

import msgspec

__all__ = ["Accepted", "ErrorBody", "ErrorDetail", "FeedItem", "FeedPage"]


class Accepted(msgspec.Struct):
    accepted: int


class ErrorDetail(msgspec.Struct):
    code: str
    message: str
    field: str = ""


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class FeedItem(msgspec.Struct):
    cursor: str
    activity: msgspec.Raw


class FeedPage(msgspec.Struct):
    items: list[FeedItem]
    next: str | None
