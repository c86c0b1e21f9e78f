"""HTTP ingest: ``POST /v1/activities`` and ``POST``/``DELETE /v1/follows`` into Kafka.

Guarantees: only a caller with the ingest token gets in (401), within its rate limit (429 with
``Retry-After``); a body is read chunk by chunk up to a limit (413 as soon as a declared
``Content-Length`` or the bytes received pass it, never buffering more; 408 if it does not arrive
within ``BODY_TIMEOUT_S``), must be JSON (415 otherwise) and is decoded by :mod:`schemas`, whose
:class:`ValidationError` becomes 400 naming the field. ``202`` means the broker has every record
(``acks=all``); a broker that does not take them in time is 503 with ``Retry-After``. An
``Idempotency-Key`` makes a retried request produce nothing twice (:mod:`gateway.idempotency`).
A ``traceparent`` (and ``tracestate``) request header reaches the records' headers: as the parent
of the request's span while the gateway traces (``feed.tracing``), unchanged otherwise.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime

import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from feed import tracing
from feed.kafka import KafkaUnavailable
from feed.tenants import DEFAULT
from feed.tenants import HEADER as TENANT_HEADER
from gateway.auth import AuthError, bearer_token, ingest_authorized
from gateway.errors import GatewayError, http_error
from gateway.idempotency import Idempotency
from gateway.ratelimit import Limit, ingest_key, tenant_ingest_key
from gateway.resources import Gateway, gateway_of
from gateway.responses import JSONResponse, encode_json
from schemas import Accepted, FollowEvent, decode_activities, decode_follow_request, encode_activity

__all__ = [
    "BODY_TIMEOUT_S",
    "MAX_FOLLOW_BODY",
    "MAX_INGEST_BODY",
    "follow",
    "ingest_activities",
    "read_body",
    "require_ingest",
    "require_json",
]

log = structlog.get_logger("gateway")

#: Largest HTTP ingest body (activities); follow bodies are far smaller.
MAX_INGEST_BODY = 1 << 20
MAX_FOLLOW_BODY = 4096
#: How long a request body may take to arrive (a slow trickle holds a connection and memory).
BODY_TIMEOUT_S = 30.0

_JSON_MEDIA = re.compile(r"^application/(?:[a-z0-9.+-]+\+)?json$")


async def require_ingest(request: Request) -> str:
    """The tenant whose ingest token the request carries (``FEED_INGEST_TOKEN``: ``default``,
    compared in constant time; else a tenant's current or still valid previous token), within
    that tenant's ingest rate (429 otherwise). 401 for no such token, 403 for a disabled
    tenant's."""
    gateway = gateway_of(request)
    token = gateway.settings.ingest_token
    if token is not None and ingest_authorized(request.headers, token):
        tenant, bucket = DEFAULT, ingest_key(token.reveal())
        quotas = gateway.tenancy.limits(DEFAULT)  # the settings', or the registry's overrides
        limit = Limit(quotas.ingest_rate, quotas.ingest_burst)
    else:
        raw = bearer_token(request.headers)
        found = None if raw is None else await gateway.tenancy.by_ingest_token(raw)
        if found is None or found.id == DEFAULT:
            raise AuthError("ingest", "the ingest token is missing or wrong")
        if not found.enabled:
            raise GatewayError(403, "tenant_disabled", "the ingest token's tenant is disabled")
        tenant = found.id
        quotas = found.quotas.effective(gateway.settings)
        # one bucket per tenant, whichever of its tokens (during a rotation's grace) is used
        bucket = tenant_ingest_key(tenant)
        limit = Limit(quotas.ingest_rate, quotas.ingest_burst)
        structlog.contextvars.bind_contextvars(tenant=tenant)
    decision = await gateway.limiter.take(bucket, limit)
    if not decision.allowed:
        wait = decision.retry_after
        raise GatewayError(
            429,
            "throttled",
            f"over the ingest rate limit of {limit.rate:g} requests/s "
            f"(burst {limit.burst}); retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )
    return tenant


def require_json(request: Request) -> None:
    """The body is declared JSON (``application/json`` or ``+json``, UTF-8), or not declared."""
    declared = request.headers.get("content-type", "").strip()
    if not declared:
        return  # tolerated: the body is parsed as JSON and rejected with 400 if it is not
    media, _, params = declared.partition(";")
    media = media.strip().lower()
    charset = ""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    if not _JSON_MEDIA.match(media) or charset not in ("", "utf-8", "utf8"):
        raise GatewayError(
            415,
            "unsupported_media_type",
            f"the body must be application/json in UTF-8, not {declared[:100]!r}",
            field="Content-Type",
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read chunk by chunk and never more than ``limit`` bytes of it: a declared
    ``Content-Length`` over the limit is refused before reading anything, a chunked body as soon
    as the bytes received pass it; a body still incomplete after ``BODY_TIMEOUT_S`` is 408. An
    empty body is refused here (400), not by the decoders."""
    declared = request.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise GatewayError(
            413, "too_large", f"body of {declared} bytes exceeds the limit of {limit} bytes"
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise GatewayError(413, "too_large", f"body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise GatewayError(
            408, "body_timeout", f"the body did not arrive within {BODY_TIMEOUT_S:g} s"
        ) from None
    except ClientDisconnect:
        # The client went away mid-body: nobody reads the answer, but it must not count (or
        # log) as a server error.
        raise GatewayError(
            400, "incomplete_body", f"the client disconnected after {size} bytes of the body"
        ) from None
    body = b"".join(chunks)
    if not body.strip():
        raise GatewayError(400, "empty", "the body is empty; send JSON")
    return body


async def ingest_activities(request: Request) -> Response:
    tenant = await require_ingest(request)
    require_json(request)
    gateway = gateway_of(request)
    body = await read_body(request, MAX_INGEST_BODY)
    activities = decode_activities(body, max_skew_s=gateway.settings.max_clock_skew_s)
    key = request.headers.get("idempotency-key")
    idempotency = None
    if key is not None:
        idempotency = Idempotency(gateway.redis, key, body, tenant)
        stored = await idempotency.begin()
        if stored is not None:
            status, content = stored
            return Response(
                content,
                status_code=status,
                media_type="application/json",
                headers={"Idempotent-Replayed": "true"},
            )
    records = [(a.actor.encode(), encode_activity(a)) for a in activities]
    headers = None
    if not tracing.ENABLED:  # else the producer's instrumentation puts its span's context there
        headers = tracing.carried_headers(
            request.headers.get("traceparent"), request.headers.get("tracestate")
        )
    try:
        await _produce(gateway, gateway.settings.topic_activities, records, headers, tenant)
    except GatewayError:
        if idempotency is not None:
            await idempotency.abandon()
        raise
    content = encode_json(Accepted(accepted=len(activities)))
    if idempotency is not None:
        await idempotency.finish(202, content)
    gateway.metrics.ingest_activities.inc(len(activities))
    return Response(content, status_code=202, media_type="application/json")


async def follow(request: Request) -> Response:
    tenant = await require_ingest(request)
    require_json(request)
    gateway = gateway_of(request)
    body = await read_body(request, MAX_FOLLOW_BODY)
    wanted = decode_follow_request(body)
    event = FollowEvent(
        type="follow" if request.method == "POST" else "unfollow",
        follower=wanted.follower,
        followee=wanted.followee,
        at=datetime.now(UTC),
    )
    await _produce(
        gateway,
        gateway.settings.topic_follows,
        [(wanted.follower.encode(), encode_json(event))],
        tenant=tenant,
    )
    return JSONResponse(Accepted(accepted=1), status_code=202)


async def _produce(
    gateway: Gateway,
    topic: str,
    records: list[tuple[bytes, bytes]],
    headers: list[tuple[str, bytes]] | None = None,
    tenant: str = DEFAULT,
) -> None:
    if tenant != DEFAULT:  # the worker applies the records in the tenant's namespace
        headers = [*(headers or []), (TENANT_HEADER, tenant.encode())]
    try:
        await gateway.producer.send_many(topic, records, timeout=15.0, headers=headers)
    except (KafkaUnavailable, TimeoutError, OSError) as exc:
        log.warning("produce_failed", topic=topic, records=len(records), error=str(exc))
        # 503 with Retry-After (gateway.errors); a GatewayError, so a caller can undo its claim.
        raise http_error(KafkaUnavailable(str(exc))) from None
