"""HTTP ingest under hostile input, against a live gateway (uvicorn on port 0) producing to the
session stack's real Kafka-protocol broker, with the stack's real Redis.

Valid activities are published first, then a barrage of hostile requests (wrong types, missing
fields, huge strings, deep nesting, bad UTF-8, a 10 MB body, 501 items, an empty body, wrong
content types, non-object JSON), then more valid ones. Each hostile request gets its documented
4xx naming the field; afterwards ``feed.activities`` is read from the beginning with a fresh group
and every accepted activity is there exactly once, and nothing from a rejected request is.

Reading "to the end" of a topic: this broker's high watermark is wrong for batched produces
(INFRA.md), so the test does not trust it. It produces one marker record to every partition after
the barrage; a partition has been read far enough once its marker arrived.

The live gateway and ``read_activities`` are in :mod:`tests.support.live_gateway`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import structlog

import gateway.routes.ingest
from feed.settings import Settings
from tests.conftest import TEST_INGEST_TOKEN
from tests.support.live_gateway import LiveGateway, activity, live_gateway, read_activities

TIMEOUT = 15.0
INGEST = {"Authorization": f"Bearer {TEST_INGEST_TOKEN}", "Content-Type": "application/json"}


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gw(settings: Settings) -> Iterator[LiveGateway]:
    with live_gateway(settings) as live:
        yield live


@pytest.fixture
async def http(gw: LiveGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gw.base, timeout=TIMEOUT) as client:
        yield client


# --- the barrage ------------------------------------------------------------------------------
@dataclasses.dataclass
class Hostile:
    name: str
    body: bytes
    status: int
    field: str | None = None  # None: not checked (401, 413)
    code: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    path: str = "/v1/activities"
    method: str = "POST"
    mentions: str = ""  # the message names the limit


def hostile_requests(run: str) -> list[Hostile]:
    """Each one carries activity ids starting with ``run``: none of them may reach Kafka."""
    n = iter(range(10_000))

    def good(**extra: Any) -> dict[str, Any]:
        return activity(f"{run}-{next(n)}", f"{run}-actor", **extra)

    def enc(doc: Any) -> bytes:
        return json.dumps(doc).encode()

    def without(name: str) -> bytes:
        doc = good()
        del doc[name]
        return enc(doc)

    cases = [
        Hostile("id as number", enc({**good(), "id": 12}), 400, "id", "wrong_type"),
        Hostile("actor as object", enc({**good(), "actor": {"a": 1}}), 400, "actor", "wrong_type"),
        Hostile(
            "published as number", enc({**good(), "published": 1e9}), 400, "published", "wrong_type"
        ),
        Hostile(
            "published naive", enc({**good(), "published": "2026-01-01T00:00:00"}), 400, "published"
        ),
        Hostile(
            "published before 1970",
            enc({**good(), "published": "1960-01-01T00:00:00Z"}),
            400,
            "published",
            "out_of_range",
        ),
        Hostile("to as string", enc({**good(), "to": "u7"}), 400, "to", "wrong_type"),
        Hostile("to item as number", enc({**good(), "to": ["ok", 5]}), 400, "to[1]", "wrong_type"),
        Hostile(
            "to with 101 recipients",
            enc({**good(), "to": [f"u{i}" for i in range(101)]}),
            400,
            "to",
            "too_long",
            mentions="100",
        ),
        Hostile("extra as list", enc({**good(), "extra": [1]}), 400, "extra", "wrong_type"),
        Hostile(
            "extra over 4 KiB",
            enc({**good(), "extra": {"k": "v" * 5000}}),
            400,
            "extra",
            "too_large",
            mentions="4096",
        ),
        Hostile("id with a space", enc({**good(), "id": f"{run} x"}), 400, "id", "invalid_chars"),
        Hostile(
            "id 129 chars",
            enc({**good(), "id": run + "x" * 129}),
            400,
            "id",
            "too_long",
            mentions="128",
        ),
        Hostile(
            "actor 20k chars", enc({**good(), "actor": "a" * 20_000}), 400, "actor", "too_long"
        ),
        Hostile(
            "object 40k chars",
            enc({**good(), "object": "o" * 40_000}),
            400,
            "",
            "too_large",
            mentions="32768",
        ),
        Hostile("string of 900 KB", enc({**good(), "junk": "j" * 900_000}), 400, "", "too_large"),
        *[
            Hostile(f"missing {name}", without(name), 400, name, "missing")
            for name in ("id", "type", "actor", "object", "published")
        ],
        Hostile("deep nesting [ x 100000", b"[" * 100_000, 400, "", "too_deep"),
        Hostile(
            "deep nesting in extra",
            enc(good())[:-1] + b', "extra": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
            400,
            "",
        ),
        Hostile(
            "deep nesting in a batch item",
            b"[" + enc(good()) + b"," + b"[" * 50_000 + b"]" * 50_000 + b"]",
            400,
            "",
        ),
        Hostile(
            "invalid UTF-8 in id",
            enc(good()).replace(f'"{run}-'.encode(), b'"\xff\xfe-'),
            400,
            "",
            "invalid_utf8",
        ),
        Hostile(
            "overlong UTF-8",
            enc({**good(), "object": "X"}).replace(b'"X"', b'"\xc0\xaf"'),
            400,
            "",
            "invalid_utf8",
        ),
        Hostile(
            "lone surrogate escape",
            enc({**good(), "object": "X"}).replace(b'"X"', b'"\\udc80"'),
            400,
            "",
            "malformed_json",
        ),
        Hostile("NaN", enc(good())[:-1] + b', "extra": {"x": NaN}}', 400, "", "malformed_json"),
        Hostile(
            "Infinity", enc(good())[:-1] + b', "extra": {"x": Infinity}}', 400, "", "malformed_json"
        ),
        Hostile(
            "number out of range", enc(good())[:-1] + b', "extra": {"x": 1e999}}', 400, "extra[...]"
        ),
        Hostile("truncated JSON", enc(good())[:-5], 400, "", "malformed_json"),
        Hostile("empty body", b"", 400, "", "empty"),
        Hostile("whitespace body", b"  \n ", 400, "", "empty"),
        Hostile("string instead of object", b'"activity"', 400, "", "wrong_type"),
        Hostile("number instead of object", b"42", 400, "", "wrong_type"),
        Hostile("null instead of object", b"null", 400, "", "wrong_type"),
        Hostile("array of numbers", b"[1, 2]", 400, "[0]", "wrong_type"),
        Hostile("empty array", b"[]", 400, "", "too_short"),
        Hostile(
            "501 items", enc([good() for _ in range(501)]), 400, "", "too_many", mentions="500"
        ),
        Hostile(
            "a bad item among good ones",
            enc([good(), good(), {**good(), "published": "yesterday"}, good()]),
            400,
            "[2].published",
        ),
        Hostile(
            "text/plain",
            enc(good()),
            415,
            "Content-Type",
            "unsupported_media_type",
            headers={"Content-Type": "text/plain"},
        ),
        Hostile(
            "form encoded",
            b"id=1&type=Create",
            415,
            "Content-Type",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        Hostile(
            "JSON in latin-1",
            enc(good()),
            415,
            "Content-Type",
            headers={"Content-Type": "application/json; charset=latin-1"},
        ),
        Hostile(
            "multipart",
            enc(good()),
            415,
            "Content-Type",
            headers={"Content-Type": "multipart/form-data; boundary=x"},
        ),
        Hostile(
            "bad Idempotency-Key",
            enc(good()),
            400,
            "Idempotency-Key",
            "invalid",
            headers={"Idempotency-Key": "has space"},
        ),
        Hostile(
            "Idempotency-Key of 256 chars",
            enc(good()),
            400,
            "Idempotency-Key",
            headers={"Idempotency-Key": "k" * 256},
        ),
        Hostile("no token", enc(good()), 401, headers={"Authorization": ""}),
        Hostile(
            "wrong token",
            enc(good()),
            401,
            headers={"Authorization": "Bearer " + TEST_INGEST_TOKEN[:-1] + "X"},
        ),
        Hostile(
            "token in the query string",
            enc(good()),
            401,
            headers={"Authorization": ""},
            path=f"/v1/activities?token={TEST_INGEST_TOKEN}",
        ),
        Hostile("body over 1 MiB", b"[" + b" " * (1 << 20) + b"]", 413, "", "too_large"),
        # follows
        Hostile(
            "follow self",
            enc({"follower": "a", "followee": "a"}),
            400,
            "followee",
            path="/v1/follows",
        ),
        Hostile(
            "follow missing followee",
            enc({"follower": "a"}),
            400,
            "followee",
            "missing",
            path="/v1/follows",
        ),
        Hostile(
            "follow wrong type",
            enc({"follower": 1, "followee": "b"}),
            400,
            "follower",
            "wrong_type",
            path="/v1/follows",
        ),
        Hostile(
            "unfollow deep nesting",
            b'{"x":' + b"[" * 1500 + b"]" * 1500 + b"}",
            400,
            "",
            path="/v1/follows",
            method="DELETE",
        ),
        Hostile("follow 10 KB body", b" " * 10_000, 413, "", "too_large", path="/v1/follows"),
        Hostile(
            "follow as text/plain",
            enc({"follower": "a", "followee": "b"}),
            415,
            "Content-Type",
            headers={"Content-Type": "text/plain"},
            path="/v1/follows",
        ),
    ]
    return cases


async def post_valid(http: httpx.AsyncClient, run: str, count: int, batch: int) -> list[str]:
    """Publish ``count`` activities in requests of ``batch``; return their ids."""
    ids: list[str] = []
    for start in range(0, count, batch):
        docs = [activity(f"{run}-ok-{i}", f"{run}-actor") for i in range(start, start + batch)]
        body = docs[0] if batch == 1 else docs
        response = await http.post("/v1/activities", json=body, headers=INGEST)
        assert response.status_code == 202, response.text
        assert response.json() == {"accepted": len(docs)}
        ids += [d["id"] for d in docs]
    return ids


async def test_hostile_barrage_and_nothing_lost(http: httpx.AsyncClient, gw: LiveGateway) -> None:
    run = f"hx{uuid.uuid4().hex[:10]}"
    accepted = await post_valid(http, run + "a", 6, 1)
    accepted += await post_valid(http, run + "b", 60, 20)
    retried = activity(f"{run}-idem", f"{run}-actor")
    idem = {**INGEST, "Idempotency-Key": f"{run}-key"}
    first = await http.post("/v1/activities", json=retried, headers=idem)
    again = await http.post("/v1/activities", json=retried, headers=idem)
    assert first.status_code == again.status_code == 202
    assert again.headers.get("idempotent-replayed") == "true"
    accepted.append(retried["id"])

    failures = []
    barrage = hostile_requests(f"{run}-bad")
    for case in barrage:
        headers = {**INGEST, **case.headers}
        headers = {k: v for k, v in headers.items() if v}
        response = await http.request(case.method, case.path, content=case.body, headers=headers)
        problem = check_response(case, response)
        if problem:
            failures.append(f"{case.name}: {problem}")
    assert not failures, "\n".join(failures)
    print(f"\nhostile HTTP requests: {len(barrage)} cases, each answered as documented")

    # The gateway still works, and nothing was lost.
    accepted += await post_valid(http, run + "c", 10, 5)
    assert (await http.get("/healthz")).status_code == 200
    counts = await asyncio.to_thread(read_activities, gw.settings)
    missing = [a for a in accepted if counts[a] == 0]
    repeated = {a: counts[a] for a in accepted if counts[a] > 1}
    leaked = sorted(a for a in counts if a.startswith(f"{run}-bad"))
    assert not missing, f"{len(missing)} accepted activities are not in the topic: {missing[:5]}"
    assert not repeated, f"accepted activities published more than once: {repeated}"
    assert not leaked, f"activities of rejected requests reached Kafka: {leaked[:5]}"


def check_response(case: Hostile, response: httpx.Response) -> str:
    if response.status_code != case.status:
        return f"status {response.status_code} (want {case.status}): {response.text[:200]}"
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not an error body: {response.text[:200]}"
    if set(error) != {"code", "message", "field"}:
        return f"error body has keys {sorted(error)}"
    if case.field is not None and error["field"] != case.field:
        return f"field {error['field']!r} (want {case.field!r}): {error}"
    if case.code is not None and error["code"] != case.code:
        return f"code {error['code']!r} (want {case.code!r}): {error}"
    if case.mentions and case.mentions not in error["message"]:
        return f"message does not name the limit {case.mentions}: {error['message']!r}"
    if case.status == 401 and response.headers.get("www-authenticate") != "Bearer":
        return "401 without WWW-Authenticate: Bearer"
    return ""


# --- 10 MB: refused without being read --------------------------------------------------------
async def _raw_request(port: int, head: bytes, body_start: bytes) -> tuple[int, bytes]:
    """Send the head and the start of a body, never the rest; return the status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body_start)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        headers: dict[str, str] = {}
        while (line := await asyncio.wait_for(reader.readline(), TIMEOUT)) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
        return int(status_line.split()[1]), body
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _head(extra: str) -> bytes:
    return (
        "POST /v1/activities HTTP/1.1\r\nHost: gateway\r\n"
        f"Authorization: Bearer {TEST_INGEST_TOKEN}\r\nContent-Type: application/json\r\n"
        f"{extra}\r\n"
    ).encode()


async def test_10mb_body_by_content_length_is_refused_before_it_is_sent(gw: LiveGateway) -> None:
    """The 413 arrives while 10 MB minus 64 KiB of the declared body were never sent."""
    status, body = await _raw_request(
        gw.port, _head(f"Content-Length: {10 * 1024 * 1024}\r\n"), b"[" + b" " * 65_536
    )
    assert status == 413
    assert json.loads(body)["error"]["code"] == "too_large"


async def test_chunked_body_is_cut_at_the_limit_while_streaming(gw: LiveGateway) -> None:
    """Without a Content-Length the bytes are counted as they arrive: 413 once past 1 MiB,
    while the client has not finished (and never will finish) the body."""
    chunk = b" " * 65_536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(18))  # 1.125 MiB
    status, body = await _raw_request(
        gw.port, _head("Transfer-Encoding: chunked\r\n"), b"1\r\n[\r\n" + chunks
    )
    assert status == 413
    assert json.loads(body)["error"]["code"] == "too_large"


async def test_10mb_body_sent_whole_is_413(gw: LiveGateway, http: httpx.AsyncClient) -> None:
    """A client that sends all 10 MB anyway gets the 413. The response is read by a reader that
    runs while the body is still being written (the server answers, then closes a connection
    whose body it never read, so the client's later writes may fail: that alone proves nothing).
    The 413 must be read off the socket and logged, and the gateway serves on afterwards. (How
    much of the body the client managed to write first is not a property of the server: the
    loopback's socket buffers can take all 10 MB before the answer is read.)"""
    size = 10 * 1024 * 1024
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)

    async def response() -> tuple[int, bytes]:
        status_line = await reader.readline()
        assert status_line, "the connection closed without a response"
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), body

    with structlog.testing.capture_logs() as logs:
        answer = asyncio.create_task(asyncio.wait_for(response(), TIMEOUT))
        sent = 0
        try:
            writer.write(_head(f"Content-Length: {size + 2}\r\n") + b"[")
            chunk = b" " * 65_536
            while sent < size and not answer.done():
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
            if not answer.done():
                writer.write(b"]")
                await writer.drain()
        except OSError:
            pass  # the server closed after answering: the reader has (or gets) the answer
        try:
            status, body = await answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        assert status == 413, (status, body[:200])
        assert json.loads(body)["error"]["code"] == "too_large"
        requests = [e for e in logs if e.get("event") == "http_request"]
    assert [(e["path"], e["status"]) for e in requests] == [("/v1/activities", 413)], requests
    assert (await http.get("/healthz")).status_code == 200


# --- Idempotency-Key, checked on the topic ----------------------------------------------------
async def test_idempotent_retry_publishes_nothing_new(
    http: httpx.AsyncClient, gw: LiveGateway
) -> None:
    run = f"idem{uuid.uuid4().hex[:10]}"
    batch = [activity(f"{run}-{i}", f"{run}-actor") for i in range(3)]
    headers = {**INGEST, "Idempotency-Key": f"{run}-key"}
    first = await http.post("/v1/activities", json=batch, headers=headers)
    retries = [await http.post("/v1/activities", json=batch, headers=headers) for _ in range(3)]
    assert first.status_code == 202 and first.json() == {"accepted": 3}
    for retry in retries:
        assert (retry.status_code, retry.json()) == (202, {"accepted": 3})
        assert retry.headers["idempotent-replayed"] == "true"
    other = [activity(f"{run}-other", f"{run}-actor")]
    reused = await http.post("/v1/activities", json=other, headers=headers)
    assert reused.status_code == 422
    assert reused.json()["error"]["field"] == "Idempotency-Key"
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    counts = await asyncio.to_thread(read_activities, gw.settings)
    assert {a["id"]: counts[a["id"]] for a in batch} == {a["id"]: 1 for a in batch}
    assert counts[f"{run}-other"] == 0


# --- bodies that never finish -----------------------------------------------------------------
async def test_client_gone_mid_body_is_not_a_server_error(gw: LiveGateway) -> None:
    """A client that sends part of its body and hangs up is its own problem: a 4xx in the
    metrics, no error logged."""
    with structlog.testing.capture_logs() as logs:
        _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_head("Content-Length: 5000\r\n") + b'{"id": "a-')
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        deadline = time.monotonic() + TIMEOUT
        while not any(e.get("event") == "http_request" for e in logs):
            assert time.monotonic() < deadline, "the request was never logged"
            await asyncio.sleep(0.02)
    requests = [e for e in logs if e.get("event") == "http_request"]
    assert requests[0]["status"] == 400
    assert not [e for e in logs if e.get("log_level") in ("error", "critical")]


async def test_body_that_trickles_past_the_deadline_is_408(
    gw: LiveGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.routes.ingest, "BODY_TIMEOUT_S", 0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(_head("Content-Length: 5000\r\n") + b'{"id": "a-')
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    assert int(status_line.split()[1]) == 408
