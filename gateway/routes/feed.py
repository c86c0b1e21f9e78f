"""``GET /v1/feed``: a page of the caller's feed, newest first.

Guarantees: the caller is the user of a valid bearer token (401 otherwise); ``limit`` and
``cursor`` are checked at the boundary (400 naming the field, never an exception from deeper
down for a cursor this API could not have issued); a page is read by :class:`feed.reader.FeedReader`
(Redis, then Cassandra past the hot tier).
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response

from feed.cursor import decode_position, split_order_key
from gateway.auth import AuthError, UserClaims, bearer_token
from gateway.errors import GatewayError
from gateway.resources import gateway_of
from gateway.responses import JSONResponse

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "feed_page",
    "page_limit",
    "position_cursor",
    "position_key",
    "user",
]

#: ``limit`` of ``GET /v1/feed``.
DEFAULT_LIMIT, MAX_LIMIT = 50, 200
#: ``limit``: ASCII digits only (``str.isdigit`` and ``int`` also take "²", "٣" and other
#: Unicode digits, and ``int`` refuses more than 4300 of them), a few at most.
_LIMIT = re.compile(r"[0-9]{1,9}")
#: The order key inside a position cursor starts with 16 ASCII digits (``feed.cursor``).
_MAX_CURSOR_CHARS = 400


async def user(request: Request) -> UserClaims:
    """The claims of the request's bearer token, of whichever tenant signed it (AuthError:
    401; ``gateway.tenancy``)."""
    token = bearer_token(request.headers)
    if token is None:
        raise AuthError("missing", "an `Authorization: Bearer <token>` header is required")
    return await gateway_of(request).tenancy.authenticate(token)


def page_limit(raw: str | None, default: int = DEFAULT_LIMIT, most: int = MAX_LIMIT) -> int:
    """``limit``: 1 to ``most`` (absent: ``default``), or 400 naming it."""
    if raw is None:
        return default
    if not _LIMIT.fullmatch(raw) or not 1 <= int(raw) <= most:
        raise GatewayError(
            400,
            "out_of_range",
            f"must be a whole number from 1 to {most} in ASCII digits",
            field="limit",
        )
    return int(raw)


def position_cursor(raw: str | None) -> str | None:
    """A paging cursor checked at the boundary: one this API issued, or 400 naming ``cursor``
    (never an exception from deeper down for a cursor it could not have issued)."""
    return raw if position_key(raw) is not None else None


def position_key(raw: str | None) -> str | None:
    """The order key inside a paging cursor (:func:`position_cursor`'s check): a timeline's, or
    a notification group's position."""
    if not raw:
        return None
    key: str | None = None
    if len(raw) <= _MAX_CURSOR_CHARS:
        try:
            key = decode_position(raw)
            split_order_key(key)
        except ValueError:  # CursorError, or int() refusing a digit that is not ASCII
            key = None
    if key is None:
        raise GatewayError(
            400,
            "invalid_cursor",
            "not a cursor of this feed: use `next` of a page as it was returned "
            f"(at most {_MAX_CURSOR_CHARS} characters)",
            field="cursor",
        )
    return key


async def feed_page(request: Request) -> Response:
    claims = await user(request)
    limit = page_limit(request.query_params.get("limit"))
    cursor = position_cursor(request.query_params.get("cursor"))
    page = await gateway_of(request).reader_for(claims.tenant).page(claims.user, cursor, limit)
    return JSONResponse(page)
