"""``/v1/notifications``: the caller's notification feed (``feed.notify``), its counts, a group's
actors, and marking groups seen or read.

Guarantees: the caller is the user of a valid bearer token (401 otherwise) and only ever reads or
marks their own feed; ``limit``, ``cursor`` and bodies are checked at the boundary (400 naming the
field); an unknown group is 404. A mark returns the new counts, and the user's connections get
them live (``notification_counts``). A user whose feed is not in Redis is loaded from Cassandra
first; while Cassandra is not connected that is a 503 with ``Retry-After``.
"""

from __future__ import annotations

import base64
import binascii
import re

from starlette.requests import Request
from starlette.responses import Response

from feed.cursor import encode_position
from feed.interfaces import Mark
from feed.notify_redis import NotifyUnavailable
from gateway.errors import GatewayError
from gateway.resources import gateway_of
from gateway.responses import JSONResponse, encode_json
from gateway.routes.feed import page_limit, position_key, user
from gateway.routes.ingest import read_body, require_json
from schemas.activity import is_valid_id
from schemas.notifications import MAX_MARK_BODY, decode_mark_request

__all__ = [
    "DEFAULT_ACTORS",
    "DEFAULT_GROUPS",
    "MAX_ACTORS",
    "MAX_GROUPS",
    "notification_actors",
    "notification_counts",
    "notification_page",
    "notifications_read",
    "notifications_seen",
]

#: ``limit`` of ``GET /v1/notifications`` and of ``.../actors``.
DEFAULT_GROUPS, MAX_GROUPS = 20, 100
DEFAULT_ACTORS, MAX_ACTORS = 50, 100
#: An actors cursor: ``a`` and unpadded URL-safe base64 of ``<16 digits>\x1f<actor id>``.
_ACTORS_CURSOR = re.compile(r"a[A-Za-z0-9_-]{1,400}")


def _bad_cursor() -> GatewayError:
    return GatewayError(
        400,
        "invalid_cursor",
        "not a cursor of this list: use `next` of a page as it was returned",
        field="cursor",
    )


def _actors_after(raw: str | None) -> str | None:
    if not raw:
        return None
    if _ACTORS_CURSOR.fullmatch(raw) is None:
        raise _bad_cursor()
    body = raw[1:]
    try:
        after = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _bad_cursor() from None
    rank, sep, actor = after.partition("\x1f")
    if not sep or len(rank) != 16 or not (rank.isascii() and rank.isdigit()):
        raise _bad_cursor()
    if not is_valid_id(actor):
        raise _bad_cursor()
    return after


def _encode_actors_cursor(after: str) -> str:
    return "a" + base64.urlsafe_b64encode(after.encode()).decode().rstrip("=")


def _unavailable(exc: NotifyUnavailable) -> GatewayError:
    return GatewayError(
        503,
        "unavailable",
        "the notification feed is being loaded from durable storage; retry",
        headers={"Retry-After": "1"},
    )


async def notification_page(request: Request) -> Response:
    claims = await user(request)
    limit = page_limit(request.query_params.get("limit"), DEFAULT_GROUPS, MAX_GROUPS)
    before = position_key(request.query_params.get("cursor"))
    try:
        page = (
            await gateway_of(request)
            .notifications_for(claims.tenant)
            .page(claims.user, before, limit)
        )
    except NotifyUnavailable as exc:
        raise _unavailable(exc) from None
    nxt = encode_position(page.next) if page.next is not None else None
    body = b"".join(
        (
            b'{"groups":[',
            b",".join(page.groups),
            b'],"next":',
            encode_json(nxt),
            b',"unseen":%d,"unread":%d}' % (page.unseen, page.unread),
        )
    )
    return Response(body, media_type="application/json")


async def notification_counts(request: Request) -> Response:
    claims = await user(request)
    try:
        unseen, unread = (
            await gateway_of(request).notifications_for(claims.tenant).counts(claims.user)
        )
    except NotifyUnavailable as exc:
        raise _unavailable(exc) from None
    return JSONResponse({"unseen": unseen, "unread": unread})


async def notification_actors(request: Request) -> Response:
    claims = await user(request)
    gid = request.path_params["group"]
    limit = page_limit(request.query_params.get("limit"), DEFAULT_ACTORS, MAX_ACTORS)
    after = _actors_after(request.query_params.get("cursor"))
    if not is_valid_id(gid):
        raise GatewayError(404, "not_found", "no such notification group", field="group")
    try:
        page = (
            await gateway_of(request)
            .notifications_for(claims.tenant)
            .actors(claims.user, gid, after, limit)
        )
    except NotifyUnavailable as exc:
        raise _unavailable(exc) from None
    if page is None:
        raise GatewayError(404, "not_found", "no such notification group", field="group")
    nxt = _encode_actors_cursor(page.next) if page.next is not None else None
    return JSONResponse({"actors": page.actors, "next": nxt})


async def _mark(request: Request, *, read: bool) -> Response:
    claims = await user(request)
    require_json(request)
    wanted = decode_mark_request(await read_body(request, MAX_MARK_BODY))
    if wanted.all:
        mark = Mark(read=read, all=True)
    elif wanted.groups is not None:
        mark = Mark(read=read, groups=wanted.groups)
    else:
        mark = Mark(read=read, through=position_key(wanted.cursor))
    try:
        unseen, unread = (
            await gateway_of(request).notifications_for(claims.tenant).mark(claims.user, mark)
        )
    except NotifyUnavailable as exc:
        raise _unavailable(exc) from None
    return JSONResponse({"unseen": unseen, "unread": unread})


async def notifications_seen(request: Request) -> Response:
    return await _mark(request, read=False)


async def notifications_read(request: Request) -> Response:
    return await _mark(request, read=True)
