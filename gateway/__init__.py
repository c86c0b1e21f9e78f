"""The WebSocket/HTTP gateway: ``GET /v1/stream``, ``GET /v1/feed``, HTTP ingest, health.

Public surface:

* :func:`create_app` — the Starlette app (collaborators injectable, lifespan opens the rest);
* :func:`run` / :func:`build_server` — serve it with uvicorn and a graceful (1001) shutdown;
* :class:`Session` — the sans-I/O protocol of one stream connection;
* :class:`Hub` — the process-wide registry of local connections and their Pub/Sub connection;
* :func:`mint_token` / :func:`verify_user_token` — user JWTs (HS256 only).

Names are imported on first use, so ``from gateway.auth import mint_token`` (``feed token``)
does not load the web stack.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AuthError",
    "Gateway",
    "GatewayError",
    "GatewayMetrics",
    "GatewayServer",
    "Hub",
    "HubUnavailable",
    "Producer",
    "Session",
    "UserClaims",
    "build_server",
    "create_app",
    "mint_token",
    "run",
    "verify_user_token",
]

_HOME = {
    "AuthError": "gateway.auth",
    "UserClaims": "gateway.auth",
    "mint_token": "gateway.auth",
    "verify_user_token": "gateway.auth",
    "Gateway": "gateway.resources",
    "GatewayError": "gateway.errors",
    "Producer": "gateway.resources",
    "create_app": "gateway.app",
    "Hub": "gateway.hub",
    "HubUnavailable": "gateway.hub",
    "GatewayMetrics": "gateway.metrics",
    "GatewayServer": "gateway.server",
    "build_server": "gateway.server",
    "run": "gateway.server",
    "Session": "gateway.session",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
