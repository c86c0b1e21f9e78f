"""Operations and development routes: ``/healthz``, ``/readyz``, ``/metrics``,
``/openapi.json``, the demo page ``/`` and, in dev mode only, ``/dev/token``.

Guarantees: none needs authentication, and none says more than it must: ``/readyz`` names each
dependency and what failed in one word, never a host or port (:meth:`Gateway.readiness`); the
OpenAPI document and the page are built once per process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import mint_token
from gateway.errors import GatewayError
from gateway.openapi import openapi_document
from gateway.resources import gateway_of
from gateway.responses import JSONResponse, encode_json
from gateway.routes.feed import DEFAULT_LIMIT, MAX_LIMIT
from gateway.routes.ingest import MAX_FOLLOW_BODY, MAX_INGEST_BODY
from schemas.activity import is_valid_id

__all__ = ["dev_token", "healthz", "metrics_endpoint", "openapi_json", "page", "readyz"]

_STATIC = Path(__file__).resolve().parent.parent / "static"
_OPENAPI: bytes | None = None
_PAGE: bytes | None = None


async def healthz(_request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    checks = await gateway_of(request).readiness()
    ready = all(check["ok"] for check in checks.values())
    return JSONResponse({"ready": ready, "dependencies": checks}, status_code=200 if ready else 503)


async def metrics_endpoint(request: Request) -> Response:
    gateway = gateway_of(request)
    gateway.metrics.pubsub_connected.set(1 if gateway.hub.connected else 0)
    body, content_type = gateway.metrics.render(request.headers.get("accept", ""))
    return Response(body, media_type=content_type)


async def openapi_json(_request: Request) -> Response:
    global _OPENAPI
    if _OPENAPI is None:
        _OPENAPI = encode_json(
            openapi_document(
                ingest_body_limit=MAX_INGEST_BODY,
                follow_body_limit=MAX_FOLLOW_BODY,
                max_limit=MAX_LIMIT,
                default_limit=DEFAULT_LIMIT,
            )
        )
    return Response(_OPENAPI, media_type="application/json")


async def dev_token(request: Request) -> Response:
    user = request.query_params.get("user", "")
    if not is_valid_id(user):
        raise GatewayError(400, "invalid", "a user id (1-128 printable characters)", field="user")
    ttl = 86_400
    token = mint_token(gateway_of(request).settings.require_jwt(), user, ttl)
    return JSONResponse({"user": user, "token": token, "expires_in": ttl})


async def page(_request: Request) -> Response:
    global _PAGE
    if _PAGE is None:
        _PAGE = await asyncio.to_thread((_STATIC / "index.html").read_bytes)
    return Response(_PAGE, media_type="text/html; charset=utf-8")
