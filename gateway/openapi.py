"""The OpenAPI 3.1 document of the gateway's HTTP API, generated from the wire types.

Request and response bodies come from the ``msgspec`` structs in :mod:`schemas`
(``msgspec.json.schema_components``), so the document states the same limits the decoders enforce
(lengths, patterns, item counts); limits JSON Schema cannot express (the encoded size of
``extra``, the range of ``published``) are in the descriptions. Served at ``GET /openapi.json``.

Every route, its security, parameters and every response it can give are listed here; the
integration tests run schemathesis against a live gateway to keep the two in agreement.
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas import (
    MAX_BATCH,
    MAX_EXTRA_BYTES,
    MAX_NOTIFY,
    MAX_RECIPIENTS,
    Accepted,
    Activity,
    ErrorBody,
    FeedPage,
    FollowRequest,
)

__all__ = ["IDEMPOTENCY_KEY_PATTERN", "openapi_document"]

IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
_REF = "#/components/schemas/{name}"
#: Years 1970-2199 (the exact bounds, 1970-01-01 and 2200-01-01 UTC, are checked on decoding).
_PUBLISHED_YEARS = r"^(19[7-9][0-9]|2[01][0-9][0-9])-"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str, *, retry_after: bool = False, auth: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": _json(_ref("ErrorBody"))}
    headers: dict[str, Any] = {}
    if retry_after:
        headers["Retry-After"] = {
            "description": "Whole seconds to wait before retrying (at least 1).",
            "required": True,
            "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"},
        }
    if auth:
        headers["WWW-Authenticate"] = {
            "description": "The authentication scheme: `Bearer`.",
            "required": True,
            "schema": {"type": "string"},
        }
    if headers:
        response["headers"] = headers
    return response


def _components() -> dict[str, Any]:
    _, schemas = msgspec.json.schema_components(
        [Activity, FollowRequest, Accepted, ErrorBody, FeedPage], ref_template=_REF
    )
    activity = schemas["Activity"]
    activity["description"] = (
        "One activity (W3C Activity Streams 2.0 aligned). `type: Delete` removes the activity "
        "whose id is `object` (only its own actor may; `object` is then an activity id). "
        "The first Create of an `id` wins: a repeat by the same actor changes nothing. "
        "Unknown fields are ignored."
    )
    props = activity["properties"]
    props["id"]["description"] = "Unique per producer: the idempotency key of the activity."
    props["published"]["description"] = (
        "RFC 3339 with a time zone (fractions and offsets allowed), from 1970-01-01 to at "
        "most `FEED_MAX_CLOCK_SKEW_S` (default 300 s) ahead of the gateway's clock "
        "(`400 in_the_future` past it)."
    )
    props["published"]["pattern"] = _PUBLISHED_YEARS
    props["to"]["description"] = (
        f"Extra recipients besides the actor's followers (at most {MAX_RECIPIENTS})."
    )
    props["notify"]["description"] = (
        f"Users whose notification feed gets this activity (at most {MAX_NOTIFY}; never its "
        "actor), grouped by `type` + `object`."
    )
    props["extra"]["description"] = f"A small JSON object, at most {MAX_EXTRA_BYTES} bytes encoded."
    schemas["FollowRequest"]["description"] = "`follower` starts or stops following `followee`."
    schemas["FollowRequest"]["properties"]["followee"]["description"] = "Not the follower."
    schemas["Accepted"]["properties"]["accepted"]["minimum"] = 1
    schemas["ErrorDetail"]["description"] = (
        "`field` names the offending field as a dotted path (`to[3]`, `[2].published`), a "
        "header (`Idempotency-Key`, `Content-Type`), a query parameter (`limit`, `cursor`), or "
        "is empty for the whole body."
    )
    item = schemas["FeedItem"]
    item["properties"]["activity"] = _ref("Activity")
    item["properties"]["cursor"]["description"] = "Opaque: pass as `cursor` to continue after it."
    schemas["FeedPage"]["properties"]["next"]["description"] = (
        "Cursor of the next (older) page, or null at the end."
    )
    schemas["ActivityBatch"] = {
        "title": "ActivityBatch",
        "description": f"One activity, or an array of 1 to {MAX_BATCH}.",
        "oneOf": [
            _ref("Activity"),
            {"type": "array", "items": _ref("Activity"), "minItems": 1, "maxItems": MAX_BATCH},
        ],
    }
    schemas["Health"] = {
        "type": "object",
        "properties": {"status": {"const": "ok"}},
        "required": ["status"],
    }
    schemas["Readiness"] = {
        "type": "object",
        "description": "One entry per dependency (redis, kafka, cassandra when used, pubsub).",
        "properties": {
            "ready": {"type": "boolean"},
            "dependencies": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "properties": {
                        "ok": {"type": "boolean"},
                        "latency_ms": {"type": "number"},
                        "error": {"type": "string"},
                    },
                    "required": ["ok"],
                },
            },
        },
        "required": ["ready", "dependencies"],
    }
    schemas.update(_notification_schemas())
    return schemas


def _notification_schemas() -> dict[str, Any]:
    count = {"type": "integer", "minimum": 0}
    user_id = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": r"^\S+$"}
    counts = {
        "type": "object",
        "description": "How many of the caller's notification groups are unseen and unread.",
        "properties": {"unseen": count, "unread": count},
        "required": ["unseen", "unread"],
    }
    group = {
        "type": "object",
        "description": (
            "Notifications of one `type` + `object` while the group was open "
            "(`FEED_NOTIFY_WINDOW_S` from its first activity)."
        ),
        "properties": {
            "id": {"type": "string"},
            "type": {"type": "string"},
            "object": {"type": "string"},
            "actors": {
                "type": "array",
                "items": {"type": "string"},
                "maxItems": 10,
                "description": "The newest distinct actors, newest first.",
            },
            "actor_count": {"type": "integer", "minimum": 1},
            "activity_count": {"type": "integer", "minimum": 1},
            "first": {"type": "string", "format": "date-time"},
            "last": {"type": "string", "format": "date-time"},
            "seen": {"type": "boolean"},
            "read": {"type": "boolean"},
        },
        "required": [
            "id",
            "type",
            "object",
            "actors",
            "actor_count",
            "activity_count",
            "first",
            "last",
            "seen",
            "read",
        ],
    }
    next_cursor = {
        "type": ["string", "null"],
        "description": "Cursor of the next (older) page, or null at the end.",
    }
    return {
        "NotificationCounts": counts,
        "NotificationGroup": group,
        "NotificationPage": {
            "type": "object",
            "properties": {
                "groups": {"type": "array", "items": _ref("NotificationGroup")},
                "next": next_cursor,
                "unseen": count,
                "unread": count,
            },
            "required": ["groups", "next", "unseen", "unread"],
        },
        "NotificationActors": {
            "type": "object",
            "properties": {"actors": {"type": "array", "items": user_id}, "next": next_cursor},
            "required": ["actors", "next"],
        },
        "NotificationMark": {
            "description": (
                "What to mark, one way: every group, the groups listed (unknown ids are ignored), "
                "or every group from the newest through a page's `next`."
            ),
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"all": {"const": True}},
                    "required": ["all"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {
                        "groups": {
                            "type": "array",
                            "items": {"type": "string", "minLength": 1, "maxLength": 200},
                            "maxItems": 500,
                        }
                    },
                    "required": ["groups"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {"cursor": {"type": "string", "minLength": 1, "maxLength": 400}},
                    "required": ["cursor"],
                    "additionalProperties": False,
                },
            ],
        },
    }


def _notification_paths() -> dict[str, Any]:
    user: list[dict[str, list[str]]] = [{"userToken": []}]
    unauthorized = _error("The user token is missing, malformed, expired or forged.", auth=True)
    unavailable = _error(
        "A store is unreachable, or the caller's feed is being loaded; retry.", retry_after=True
    )

    def limit(most: int, default: int) -> dict[str, Any]:
        return {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": most, "default": default},
        }

    cursor = {
        "name": "cursor",
        "in": "query",
        "required": False,
        "description": "`next` of the previous page (opaque).",
        "schema": {"type": "string"},
    }
    counts_ok = {"description": "The new counts.", "content": _json(_ref("NotificationCounts"))}

    def mark(read: bool) -> dict[str, Any]:
        what = "read (and seen)" if read else "seen"
        return {
            "post": {
                "operationId": "markNotificationsRead" if read else "markNotificationsSeen",
                "summary": f"Mark notification groups {what}",
                "description": "The caller's other connections get the new counts live "
                "(`notification_counts`).",
                "security": user,
                "requestBody": {"required": True, "content": _json(_ref("NotificationMark"))},
                "responses": {
                    "200": counts_ok,
                    "400": _error("The body is not one of the three forms, or a bad cursor."),
                    "401": unauthorized,
                    "408": _error("The body did not arrive in time."),
                    "413": _error("The body is too large."),
                    "415": _error("The body is not `application/json` (UTF-8)."),
                    "503": unavailable,
                },
            }
        }

    return {
        "/v1/notifications": {
            "get": {
                "operationId": "readNotifications",
                "summary": "The caller's notification groups, newest-updated first",
                "security": user,
                "parameters": [limit(100, 20), cursor],
                "responses": {
                    "200": {
                        "description": "One page, with the counts.",
                        "content": _json(_ref("NotificationPage")),
                    },
                    "400": _error("`limit` out of range or `cursor` not one of ours."),
                    "401": unauthorized,
                    "503": unavailable,
                },
            }
        },
        "/v1/notifications/counts": {
            "get": {
                "operationId": "notificationCounts",
                "summary": "How many notification groups are unseen and unread",
                "security": user,
                "responses": {
                    "200": {
                        "description": "The counts.",
                        "content": _json(_ref("NotificationCounts")),
                    },
                    "401": unauthorized,
                    "503": unavailable,
                },
            }
        },
        "/v1/notifications/{group}/actors": {
            "get": {
                "operationId": "notificationActors",
                "summary": "A notification group's actors, newest first",
                "security": user,
                "parameters": [
                    {"name": "group", "in": "path", "required": True, "schema": {"type": "string"}},
                    limit(100, 50),
                    cursor,
                ],
                "responses": {
                    "200": {
                        "description": "One page of actors.",
                        "content": _json(_ref("NotificationActors")),
                    },
                    "400": _error("`limit` out of range or `cursor` not one of ours."),
                    "401": unauthorized,
                    "404": _error("The caller has no such group."),
                    "503": unavailable,
                },
            }
        },
        "/v1/notifications/seen": mark(False),
        "/v1/notifications/read": mark(True),
    }


def _ingest_errors(body_limit: int) -> dict[str, Any]:
    return {
        "400": _error("Invalid input: the error names the field and the limit it broke."),
        "401": _error("The ingest token is missing or wrong.", auth=True),
        "403": _error("The ingest token's tenant is disabled (`tenant_disabled`)."),
        "408": _error("The body did not arrive in time (a slow or stalled upload)."),
        "413": _error(f"The body is larger than {body_limit} bytes."),
        "415": _error("The body is not `application/json` (UTF-8); the field is `Content-Type`."),
        "429": _error("Over the ingest rate limit of this token's tenant.", retry_after=True),
        "503": _error("Kafka did not accept the records in time; retry.", retry_after=True),
    }


def openapi_document(
    *, ingest_body_limit: int, follow_body_limit: int, max_limit: int, default_limit: int
) -> dict[str, Any]:
    """The OpenAPI 3.1 document (a JSON-ready dict)."""
    accepted = {"description": "Accepted: produced to Kafka.", "content": _json(_ref("Accepted"))}
    ingest_security: list[dict[str, list[str]]] = [{"ingestToken": []}]
    follow_body = {"required": True, "content": _json(_ref("FollowRequest"))}
    follow_responses = {"202": accepted, **_ingest_errors(follow_body_limit)}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "feed gateway",
            "version": "1",
            "description": (
                "HTTP API of the real-time activity feed. Errors are always "
                '`{"error": {"code", "message", "field"}}`. The live stream is the '
                "WebSocket `GET /v1/stream` (not described here: see the README)."
            ),
        },
        "paths": {
            "/v1/activities": {
                "post": {
                    "operationId": "ingestActivities",
                    "summary": "Publish one activity or a batch to feed.activities",
                    "security": ingest_security,
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "description": (
                                "Makes a retry a no-op: the same key with the same body returns "
                                "the first response and publishes nothing; with another body, "
                                "422. Remembered 24 hours."
                            ),
                            "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
                        }
                    ],
                    "requestBody": {"required": True, "content": _json(_ref("ActivityBatch"))},
                    "responses": {
                        "202": {
                            **accepted,
                            "headers": {
                                "Idempotent-Replayed": {
                                    "description": "`true` when this is a stored response.",
                                    "required": False,
                                    "schema": {"type": "string", "const": "true"},
                                }
                            },
                        },
                        **_ingest_errors(ingest_body_limit),
                        "409": _error(
                            "A request with this Idempotency-Key is still being processed.",
                            retry_after=True,
                        ),
                        "422": _error("This Idempotency-Key was used with a different body."),
                    },
                }
            },
            "/v1/follows": {
                "post": {
                    "operationId": "follow",
                    "summary": "Follow: publish a follow event to feed.follows",
                    "security": ingest_security,
                    "requestBody": follow_body,
                    "responses": follow_responses,
                },
                "delete": {
                    "operationId": "unfollow",
                    "summary": "Unfollow: publish an unfollow event to feed.follows",
                    "security": ingest_security,
                    "requestBody": follow_body,
                    "responses": follow_responses,
                },
            },
            "/v1/feed": {
                "get": {
                    "operationId": "readFeed",
                    "summary": "The caller's own timeline, newest first",
                    "description": (
                        "Ordered by `published`, ties by `id`. Paging continues past the hot "
                        "tier into durable history without gaps or repeats. Only the user of "
                        "the token can be read: there is no parameter naming another user."
                    ),
                    "security": [{"userToken": []}],
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": max_limit,
                                "default": default_limit,
                            },
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "required": False,
                            "description": "`next` of the previous page (opaque).",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": {"description": "One page.", "content": _json(_ref("FeedPage"))},
                        "400": _error("`limit` out of range or `cursor` not one of ours."),
                        "401": _error(
                            "The user token is missing, malformed, expired or forged.", auth=True
                        ),
                        "503": _error("A store is unreachable; retry.", retry_after=True),
                    },
                }
            },
            **_notification_paths(),
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness: the process is up",
                    "security": [],
                    "responses": {
                        "200": {"description": "Alive.", "content": _json(_ref("Health"))}
                    },
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "ready",
                    "summary": "Readiness: every dependency is reachable",
                    "security": [],
                    "responses": {
                        "200": {"description": "Ready.", "content": _json(_ref("Readiness"))},
                        "503": {
                            "description": "A dependency is down (see `dependencies`).",
                            "content": _json(_ref("Readiness")),
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics (text exposition format)",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Metrics.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "The OpenAPI 3.1 document.",
                            "content": _json({"type": "object"}),
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": _components(),
            "securitySchemes": {
                "ingestToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <FEED_INGEST_TOKEN>` (upstream "
                    "services).",
                },
                "userToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A user JWT: HS256 signed with `FEED_JWT_SECRET`, `sub` and "
                    "`exp` required. Never accepted in the query string over HTTP.",
                },
            },
        },
    }
