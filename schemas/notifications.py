"""``POST /v1/notifications/seen`` and ``/read``: the request body, decoded and checked here.

A mark names what it marks in exactly one way: ``{"all": true}``, ``{"groups": [ids]}`` (at most
:data:`MAX_MARK_GROUPS`; unknown ids are ignored) or ``{"cursor": "<next of a page>"}`` (every
group from the newest down to that position: what the client has shown). Anything else is a
:class:`schemas.errors.ValidationError` naming the field.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.errors import DECODE_ERRORS, ValidationError, from_decode_error

__all__ = ["MAX_MARK_BODY", "MAX_MARK_GROUPS", "MarkRequest", "decode_mark_request"]

#: Most group ids in one mark, and the largest body read.
MAX_MARK_GROUPS = 500
MAX_MARK_BODY = 96 * 1024
#: A group id as a client sends it back: any id this API issued is one; anything else is
#: simply not a group of the caller's (ignored).
GroupId = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class MarkRequest(msgspec.Struct, forbid_unknown_fields=True):
    all: bool = False
    groups: Annotated[list[GroupId], msgspec.Meta(max_length=MAX_MARK_GROUPS)] | None = None
    cursor: Annotated[str, msgspec.Meta(min_length=1, max_length=400)] | None = None


_decoder = msgspec.json.Decoder(MarkRequest)


def decode_mark_request(data: bytes) -> MarkRequest:
    try:
        request = _decoder.decode(data)
    except DECODE_ERRORS as exc:
        raise from_decode_error(exc) from None
    given = [name for name in ("groups", "cursor") if getattr(request, name) is not None]
    if request.all:
        given.insert(0, "all")
    if len(given) != 1:
        raise ValidationError(
            given[1] if len(given) > 1 else "all",
            "invalid",
            'send exactly one of {"all": true}, {"groups": [ids]} or {"cursor": "<next>"}',
        )
    return request
