"""The gateway's JSON response: a :mod:`msgspec` struct (or plain data) encoded once, as is."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

__all__ = ["JSONResponse", "encode_json"]

#: The one JSON encoder of the gateway's responses (msgspec structs, dicts, lists).
encode_json = msgspec.json.Encoder().encode


class JSONResponse(Response):
    """``application/json``, encoded by msgspec (Starlette's own uses :mod:`json`)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return encode_json(content)
