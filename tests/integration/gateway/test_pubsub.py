"""gateway.pubsub.PubSubLink against the real Redis of the test session (and, for the one case
Redis never produces, a malformed reply, against a socket that sends one)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions

from feed.settings import Settings
from gateway.pubsub import PubSubLink
from tests.support.procs import free_port, stop_process
from tests.support.pubsub import DEADLINE_S, Recorder


async def _open(url: str, rec: Recorder, **kwargs: Any) -> PubSubLink:
    client = aioredis.Redis.from_url(url, **kwargs)
    try:
        return await PubSubLink.open(
            client,
            timeout_s=5.0,
            on_message=rec.message,
            on_subscribe=rec.subscribe,
            on_pong=rec.pong,
        )
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _subscribed(url: str, rec: Recorder, *channels: bytes) -> AsyncIterator[PubSubLink]:
    """A link subscribed to ``channels`` (confirmed), closed on the way out."""
    link = await _open(url, rec)
    try:
        link.send("SUBSCRIBE", *channels)
        await _until(lambda: len(rec.subscribed) >= len(channels), "the confirmations")
        yield link
    finally:
        await link.aclose()


async def _until(predicate: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {DEADLINE_S}s waiting for {what}")
        await asyncio.sleep(0.01)


def test_messages_arrive_in_order_and_only_while_subscribed(
    settings: Settings, redis_client: redis.Redis, ids: Callable[[str], str]
) -> None:
    channel, other = ids("ch").encode(), ids("other").encode()
    rec = Recorder()

    async def scenario() -> None:
        async with _subscribed(settings.redis_url, rec, channel, other) as link:
            assert sorted(rec.subscribed) == sorted([channel, other])
            # Many messages in one pipeline: they reach the link in a few large chunks.
            pipe = redis_client.pipeline(transaction=False)
            for n in range(2000):
                pipe.publish(channel, f"m{n}".encode())
            pipe.publish(other, b"to-other")
            pipe.execute()
            await _until(lambda: len(rec.messages) == 2001, "2,001 messages")
            assert rec.messages[:2000] == [(channel, f"m{n}".encode()) for n in range(2000)]
            assert rec.messages[2000] == (other, b"to-other")
            link.send("UNSUBSCRIBE", other)
            await _until(lambda: redis_client.pubsub_numsub(other)[0][1] == 0, "unsubscribe")
            redis_client.publish(other, b"not for us")
            redis_client.publish(channel, b"last")
            await _until(lambda: rec.messages[-1] == (channel, b"last"), "the last message")
            assert (other, b"not for us") not in rec.messages

    asyncio.run(scenario())


def test_ping_is_answered_in_and_out_of_subscriber_mode(
    settings: Settings, ids: Callable[[str], str]
) -> None:
    rec = Recorder()

    async def scenario() -> None:
        link = await _open(settings.redis_url, rec)
        try:
            link.send("PING")  # not subscribed yet: Redis answers +PONG
            await _until(lambda: rec.pongs == 1, "PONG")
            link.send("SUBSCRIBE", ids("ch"))
            await _until(lambda: rec.subscribed, "the confirmation")
            loop = asyncio.get_running_loop()
            link.last_seen = -1.0  # a sentinel: only data received after the PING replaces it
            sent_at = loop.time()
            link.send("PING")  # subscribed: Redis answers ["pong", ""]
            await _until(lambda: rec.pongs == 2, "pong")
            # The pong is data received: last_seen is the loop time it arrived.
            assert sent_at <= link.last_seen <= loop.time(), (sent_at, link.last_seen)
        finally:
            await link.aclose()

    asyncio.run(scenario())


def test_a_failing_callback_does_not_end_the_link(
    settings: Settings, redis_client: redis.Redis, ids: Callable[[str], str]
) -> None:
    channel = ids("ch").encode()
    rec = Recorder(fail_on=b"boom")

    async def scenario() -> None:
        async with _subscribed(settings.redis_url, rec, channel) as link:
            for data in (b"one", b"boom", b"two"):
                redis_client.publish(channel, data)
            await _until(lambda: len(rec.messages) == 2, "the messages around the failure")
            assert [data for _, data in rec.messages] == [b"one", b"two"]
            assert link.is_open

    asyncio.run(scenario())


def test_a_killed_connection_is_reported_and_refuses_commands(
    settings: Settings, redis_client: redis.Redis, ids: Callable[[str], str]
) -> None:
    channel = ids("ch").encode()
    rec = Recorder()

    async def scenario() -> None:
        link = await _open(settings.redis_url, rec)
        try:
            link.send("CLIENT", "SETNAME", channel)
            link.send("SUBSCRIBE", channel)
            await _until(lambda: rec.subscribed, "the confirmation")
            killed = 0
            for client in redis_client.client_list():
                if client["name"] == channel.decode():
                    killed += redis_client.client_kill_filter(_id=client["id"])
            assert killed == 1
            await asyncio.wait_for(asyncio.shield(link.closed), DEADLINE_S)
            assert "closed" in link.closed.result() or "lost" in link.closed.result()
            assert not link.is_open
            with pytest.raises(redis.exceptions.ConnectionError):
                link.send("PING")
        finally:
            await link.aclose()

    asyncio.run(scenario())


def test_authenticates_with_username_and_password_and_names_no_secret_when_refused(
    settings: Settings, redis_client: redis.Redis, ids: Callable[[str], str]
) -> None:
    user, password = ids("acl-user"), "pw-" + ids("secret")
    redis_client.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", "resetchannels", "&*", "+@all", "~*"
    )
    base = settings.redis_url.split("://", 1)[1]
    channel = ids("ch").encode()
    rec = Recorder()

    async def scenario() -> None:
        async with _subscribed(f"redis://{user}:{password}@{base}", rec, channel):
            redis_client.publish(channel, b"hello")
            await _until(lambda: rec.messages == [(channel, b"hello")], "the message")
        with pytest.raises(redis.exceptions.AuthenticationError) as refused:
            await _open(f"redis://{user}:wrong-{password}@{base}", Recorder())
        assert password not in str(refused.value)

    try:
        asyncio.run(scenario())
    finally:
        redis_client.execute_command("ACL", "DELUSER", user)


def test_nothing_listening_is_a_connection_error() -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(redis.exceptions.ConnectionError):
            await _open(f"redis://127.0.0.1:{port}/0", Recorder())

    asyncio.run(scenario())


def test_a_malformed_reply_ends_the_link() -> None:
    async def scenario() -> None:
        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nok\r\n?not-resp\r\n")
                await writer.drain()
                with contextlib.suppress(OSError):
                    await asyncio.wait_for(reader.read(), DEADLINE_S)  # until the link hangs up
            finally:
                writer.close()

        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        rec = Recorder()
        try:
            link = await _open(f"redis://127.0.0.1:{port}/0", rec)
            await asyncio.wait_for(asyncio.shield(link.closed), DEADLINE_S)
            assert "protocol error" in link.closed.result()
            assert rec.messages == [(b"c", b"ok")]  # what came before the bad reply counts
            await link.aclose()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


def test_connects_over_a_unix_socket(tmp_path: Path, ids: Callable[[str], str]) -> None:
    """``unix://`` URLs (FEED_REDIS_URL accepts them): a Redis of its own, listening only on a
    Unix socket, stopped by pid."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    path = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(path), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    channel = ids("ch").encode()
    rec = Recorder()

    async def scenario() -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("redis-server did not open its Unix socket")
            await asyncio.sleep(0.02)
        url = f"unix://{path}?db=0"
        publisher = aioredis.Redis.from_url(url)
        try:
            async with _subscribed(url, rec, channel):
                await publisher.publish(channel, b"over unix")
                await _until(lambda: rec.messages == [(channel, b"over unix")], "the message")
        finally:
            await publisher.aclose()

    try:
        asyncio.run(scenario())
    finally:
        stop_process(proc)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_connects_over_tls_and_checks_the_certificate(
    tmp_path: Path, ids: Callable[[str], str]
) -> None:
    """``rediss://`` URLs: a Redis of its own serving TLS only (Debian's redis-server is built
    with it), stopped by pid. The link verifies the server against the URL's CA file, and
    refuses a server whose certificate it cannot verify."""
    cert, key = _self_signed(tmp_path)
    port = free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(cert),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    channel = ids("ch").encode()
    rec = Recorder()

    async def scenario() -> None:
        publisher = aioredis.Redis.from_url(url)
        deadline = time.monotonic() + DEADLINE_S
        while True:
            try:
                if await publisher.ping():
                    break
            except redis.exceptions.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("redis-server did not serve TLS")
                await asyncio.sleep(0.05)
        try:
            async with _subscribed(url, rec, channel):
                await publisher.publish(channel, b"over tls")
                await _until(lambda: rec.messages == [(channel, b"over tls")], "the message")
        finally:
            await publisher.aclose()
        # Without the CA, the server's certificate cannot be verified: no connection.
        with pytest.raises(redis.exceptions.ConnectionError):
            await _open(f"rediss://127.0.0.1:{port}/0", Recorder())

    try:
        asyncio.run(scenario())
    finally:
        stop_process(proc)
