"""The push peer of the gateway benchmark: python-socketio, run as PEERS.md describes.

``socketio.AsyncServer(client_manager=socketio.AsyncRedisManager(url))`` as an ASGI app under
uvicorn, one worker, in this process (so this pid is the server's pid: its RSS and CPU are what
the bench reads from ``/proc``). Each client authenticates with ``{"user": "<id>"}`` in the
Socket.IO CONNECT packet and joins room ``user:<id>``; a publisher in another process emits to
those rooms through ``AsyncRedisManager(url, write_only=True)`` (:mod:`bench.ws_clients`).

Configuration, stated in the report: Engine.IO 4 / Socket.IO 5 defaults (ping every 25 s), no
permessage-deflate (``ws_per_message_deflate=False``, and the bench clients do not offer it),
the same uvicorn WebSocket implementation as ``feed gateway`` (``websockets-sansio``), logging at
warning. ``GET /healthz`` answers 200 once the server listens (for the bench's readiness wait).
``GET /gc`` answers the process's garbage collections so far, per generation, as JSON
(``count_<g>``, ``sum_<g>`` and ``longest_<g>`` in seconds, the names
``bench.gateway.gc_stats`` uses for ours): a callback times them and changes nothing else.

Run: ``python -m bench.peer_socketio --port P --redis-url redis://127.0.0.1:R/0``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
import time
from typing import Any

__all__ = ["build_app", "main"]

ROOM_PREFIX = "user:"
EVENT = "feed"


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (thousands of sockets); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


async def _health(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Fallback ASGI app: 200 on /healthz, 404 elsewhere (lifespan events acknowledged)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path = scope.get("path")
    status = 200 if path in ("/healthz", "/gc") else 404
    body = b"ok" if status == 200 else b"not found"
    if path == "/gc":
        body = json.dumps(_GC_STATS).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json" if path == "/gc" else b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


_GC_STATS: dict[str, float] = {
    f"{name}_{g}": 0.0 for g in range(3) for name in ("count", "sum", "longest")
}
_gc_started = 0.0


def _time_gc(phase: str, info: dict[str, Any]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
        return
    seconds = time.perf_counter() - _gc_started
    g = int(info.get("generation", 2))
    _GC_STATS[f"count_{g}"] += 1
    _GC_STATS[f"sum_{g}"] += seconds
    _GC_STATS[f"longest_{g}"] = max(_GC_STATS[f"longest_{g}"], seconds)


def build_app(redis_url: str) -> Any:
    import socketio

    manager = socketio.AsyncRedisManager(redis_url)
    sio = socketio.AsyncServer(
        async_mode="asgi",
        client_manager=manager,
        cors_allowed_origins="*",
        logger=False,
        engineio_logger=False,
    )

    @sio.event  # type: ignore[untyped-decorator]
    async def connect(sid: str, _environ: dict[str, Any], auth: Any) -> bool:
        user = auth.get("user") if isinstance(auth, dict) else None
        if not isinstance(user, str) or not user:
            return False
        await sio.enter_room(sid, ROOM_PREFIX + user)
        return True

    return socketio.ASGIApp(sio, other_asgi_app=_health)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args(argv)
    raise_nofile()
    gc.callbacks.append(_time_gc)
    logging.basicConfig(level=logging.WARNING)
    config = uvicorn.Config(
        build_app(args.redis_url),
        host=args.host,
        port=args.port,
        workers=1,
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        log_level="warning",
        access_log=False,
        server_header=False,
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
