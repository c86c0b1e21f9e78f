"""The end-to-end pipeline of the tests: a worker and a gateway process on the session stack.

:class:`Pipeline` runs ``feed fanout`` and ``feed gateway`` (``tests.support.procs``) on topics and
a consumer group of its own (``isolated_env``), produces to the real broker and reads feeds and
streams back; ``next_frame``/``frames_until``/``resumed_stream`` read WebSocket frames with
deadlines, ``log_events`` the processes' JSON logs.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from feed import redis_connect
from feed.settings import Settings
from gateway.auth import mint_token
from tests.conftest import wait_for
from tests.support.procs import FeedProcess, free_port, http_get, metric_value

__all__ = ["Pipeline", "frames_until", "isolated_env", "log_events", "next_frame", "shared_env"]


def shared_env(stack_env: dict[str, str], prefix: str, **extra: str) -> dict[str, str]:
    """``stack_env`` with a consumer group of the caller's own and free ports for the worker's
    metrics and the gateway, on the session's topics; ``extra`` settings override."""
    return {
        **stack_env,
        "FEED_KAFKA_GROUP": f"{prefix}-{uuid.uuid4().hex[:8]}",
        "FEED_WORKER_METRICS_PORT": str(free_port()),
        "FEED_GATEWAY_PORT": str(free_port()),
        **extra,
    }


def isolated_env(stack_env: dict[str, str], prefix: str, **extra: str) -> dict[str, str]:
    """``stack_env`` with topics and a consumer group of the caller's own (so its worker
    replays nothing from other modules) and free ports for the worker's metrics and the
    gateway; ``extra`` settings override."""
    tag = uuid.uuid4().hex[:8]
    return {
        **stack_env,
        "FEED_TOPIC_ACTIVITIES": f"{prefix}-act-{tag}",
        "FEED_TOPIC_FOLLOWS": f"{prefix}-fol-{tag}",
        "FEED_TOPIC_DLQ": f"{prefix}-dlq-{tag}",
        "FEED_TOPIC_DEFERRED": f"{prefix}-deferred-{tag}",
        "FEED_KAFKA_GROUP": f"{prefix}-{tag}",
        "FEED_WORKER_METRICS_PORT": str(free_port()),
        "FEED_GATEWAY_PORT": str(free_port()),
        **extra,
    }


class Pipeline:
    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.settings = Settings.from_env(env)
        self.gateway_url = f"http://127.0.0.1:{env['FEED_GATEWAY_PORT']}"
        self.ws_url = self.gateway_url.replace("http", "ws") + "/v1/stream"
        self.metrics_url = f"http://127.0.0.1:{env['FEED_WORKER_METRICS_PORT']}"
        self.worker = FeedProcess(["fanout"], env, logdir / "fanout.log")
        self.gateway = FeedProcess(["gateway"], env, logdir / "gateway.log")
        self.producer = Producer({"bootstrap.servers": self.settings.kafka_bootstrap})
        self._redis: Any = None

    @property
    def redis(self) -> Any:
        """A client of the pipeline's Redis (one server or a cluster, as the processes see it)."""
        if self._redis is None:
            self._redis = redis_connect.sync_client(self.settings)
        return self._redis

    @contextmanager
    def running(self, *, stop_timeout: float = 20.0) -> Iterator[Pipeline]:
        """Start the worker and the gateway, wait until both serve and the worker holds
        partitions (the group join takes a few seconds on this broker, INFRA.md), and stop
        both by pid afterwards."""
        self.worker.start()
        self.gateway.start()
        try:
            self.worker.wait_http(f"{self.metrics_url}/healthz", timeout=60)
            self.gateway.wait_http(f"{self.gateway_url}/healthz", timeout=60)
            wait_for(
                lambda: self.worker_metric("feed_assigned_partitions") > 0,
                timeout=60,
                message="worker partition assignment",
            )
            yield self
        finally:
            self.gateway.stop(timeout=stop_timeout)
            self.worker.stop(timeout=stop_timeout)
            self.producer.flush(5)
            if self._redis is not None:
                self._redis.close()

    def produce(self, topic: str, key: str, value: bytes) -> None:
        self.producer.produce(topic, key=key.encode(), value=value)
        assert self.producer.flush(10) == 0

    def activity(self, aid: str, actor: str, **extra: Any) -> bytes:
        body = {
            "id": aid,
            "type": "Create",
            "actor": actor,
            "object": f"post:{aid}",
            "published": datetime.now(UTC).isoformat(),
            **extra,
        }
        return json.dumps(body).encode()

    def follow(self, follower: str, followee: str) -> None:
        event = {
            "type": "follow",
            "follower": follower,
            "followee": followee,
            "at": datetime.now(UTC).isoformat(),
        }
        self.produce(self.settings.topic_follows, follower, json.dumps(event).encode())

    def token(self, user: str) -> str:
        assert self.settings.jwt_secret is not None
        return mint_token(self.settings.jwt_secret, user, 600)

    def feed(self, user: str) -> list[dict[str, Any]]:
        status, body = http_get(
            f"{self.gateway_url}/v1/feed?limit=200",
            headers={"Authorization": f"Bearer {self.token(user)}"},
        )
        assert status == 200, body
        return [item["activity"] for item in json.loads(body)["items"]]

    def call(
        self,
        user: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """An HTTP call to the gateway as ``user`` (or with ``token``; a POST of ``body`` as
        JSON, if given; ``headers`` added): (status, decoded JSON body)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.gateway_url + path,
            data=data,
            method="GET" if data is None else "POST",
            headers={
                "Authorization": f"Bearer {token or self.token(user)}",
                "Content-Type": "application/json",
                **(headers or {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read() or b"null")

    def worker_metric(self, name: str) -> float:
        status, body = http_get(f"{self.metrics_url}/metrics")
        return metric_value(body.decode(), name) if status == 200 else 0.0


@asynccontextmanager
async def resumed_stream(
    url: str,
    token: str,
    cursor: str | None = None,
    *,
    open_timeout: float = 10,
    close_timeout: float = 2,
) -> AsyncIterator[tuple[Any, dict[str, Any]]]:
    """A ``/v1/stream`` connection (bearer token) past its welcome, resumed from ``cursor``
    (the welcome's own cursor when None): yields the socket and the welcome."""
    import websockets

    async with websockets.connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=open_timeout,
        close_timeout=close_timeout,
    ) as ws:
        welcome = await next_frame(ws, 10)
        assert welcome["type"] == "welcome", welcome
        await ws.send(json.dumps({"type": "resume", "cursor": cursor or welcome["cursor"]}))
        yield ws, welcome


async def next_frame(ws: Any, timeout: float) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def frames_until(
    ws: Any, predicate: Callable[[dict[str, Any]], bool], timeout: float
) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"no matching frame within {timeout}s; got {frames}")
        frame = await next_frame(ws, remaining)
        frames.append(frame)
        if predicate(frame):
            return frames


_JSON = json.JSONDecoder()


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log records of ``event`` in a process's log file. Only the leading JSON object of
    a line is read (a stdlib log line of a driver may be glued to its end)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                record, _ = _JSON.raw_decode(line)
            except ValueError:
                continue
            if record.get("event") == event:
                out.append(record)
    return out
