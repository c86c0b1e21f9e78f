"""The gateway's one Redis Pub/Sub connection, read without a coroutine per message.

redis-py's ``PubSub.get_message`` parses one message per ``await``, under a timeout context and a
retry wrapper, and builds a dict for each. At thousands of messages per second that was a fifth
of the gateway's CPU (py-spy, ``feed bench gateway``). :class:`PubSubLink` is an
:class:`asyncio.Protocol`: each chunk the socket delivers is parsed by hiredis at once and every
message in it handed to ``on_message(channel, data)`` synchronously, from ``data_received``.

What it does (and no more, since it only ever SUBSCRIBEs, UNSUBSCRIBEs and PINGs):

* connects as redis-py would from the gateway's client: TCP (with ``TCP_NODELAY`` and
  keepalive), TLS (``rediss://``, redis-py's own SSL context from the URL's options) or a Unix
  socket, then ``AUTH`` (with the username if the URL has one) before anything else;
* :meth:`send` writes a command at once (no await: the socket's buffer takes it);
  :meth:`subscribe`, :meth:`unsubscribe` and :meth:`ping` are the commands the hub sends;
* replies: ``message`` → ``on_message``, ``subscribe`` → ``on_subscribe(channel)``, ``pong`` (or
  ``PONG`` outside subscriber mode) → ``on_pong``; an error reply is logged;
* :attr:`closed` is a future done when the connection is lost, with the reason as its result.

Nothing here retries: the hub reconnects and re-subscribes (``gateway.hub``).

On a Redis Cluster the link is a :class:`ShardedLink`: sharded Pub/Sub (``SSUBSCRIBE``, and
``smessage``/``ssubscribe`` replies), one :class:`PubSubLink` per primary, each channel on the
primary that owns its slot; see there for when it ends.

:class:`RedisSubscriber` opens links for the hub: it is the Redis implementation of
``feed.interfaces.Subscriber`` (whose guarantees it keeps: confirmed subscriptions, per-channel
order, at-most-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import Callable, Iterable
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.crc import key_slot

from feed.interfaces import SubscriberLink

__all__ = ["PubSubLink", "RedisSubscriber", "ShardedLink"]

log = structlog.get_logger("gateway.pubsub")


class PubSubLink(asyncio.Protocol):
    """One Redis connection in subscriber mode (see the module doc)."""

    def __init__(
        self,
        on_message: Callable[[bytes, bytes], None],
        on_subscribe: Callable[[bytes], None],
        on_pong: Callable[[], None],
    ) -> None:
        self._on_message = on_message
        self._on_subscribe = on_subscribe
        self._on_pong = on_pong
        self._parser = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._reply: asyncio.Future[Any] | None = None  # the AUTH reply, while it is awaited
        #: Done when the connection is lost; its result says why.
        self.closed: asyncio.Future[str] = self._loop.create_future()
        self._gone: asyncio.Future[None] = self._loop.create_future()  # connection_lost ran
        #: Loop time of the last data received (the hub pings an idle connection).
        self.last_seen = self._loop.time()
        #: Sharded Pub/Sub (a Redis Cluster node): SSUBSCRIBE/SUNSUBSCRIBE, ``smessage``.
        self.sharded = False
        #: Channels this link asked to leave and not yet heard leave (sharded only): any other
        #: ``sunsubscribe`` is the server's (the channel's slot moved away).
        self._leaving: dict[bytes, int] = {}

    # --- connecting ------------------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        client: aioredis.Redis,
        *,
        timeout_s: float,
        on_message: Callable[[bytes, bytes], None],
        on_subscribe: Callable[[bytes], None],
        on_pong: Callable[[], None],
    ) -> PubSubLink:
        """Connect to the server ``client`` uses (or the cluster node ``client`` is),
        authenticated; raises ``redis.exceptions.ConnectionError`` (or
        ``AuthenticationError``) if it cannot."""
        kwargs, connection_class = await _endpoint(client)
        link = cls(on_message, on_subscribe, on_pong)
        loop = link._loop
        try:
            async with asyncio.timeout(timeout_s):
                if kwargs.get("path"):
                    await loop.create_unix_connection(lambda: link, kwargs["path"])
                else:
                    ssl_context = None
                    if issubclass(connection_class, aioredis.SSLConnection):
                        ssl_context = connection_class(**kwargs).ssl_context.get()
                    await loop.create_connection(
                        lambda: link,
                        kwargs.get("host") or "localhost",
                        int(kwargs.get("port") or 6379),
                        ssl=ssl_context,
                    )
                    link._tune_socket()
                password = kwargs.get("password")
                if password:
                    username = kwargs.get("username")
                    args = ("AUTH", username, password) if username else ("AUTH", password)
                    reply = await link._call(args)
                    if isinstance(reply, hiredis.ReplyError):
                        # Redis's message names no secret ("WRONGPASS invalid username-...").
                        raise redis.exceptions.AuthenticationError(str(reply))
        except TimeoutError:
            link.close()
            raise redis.exceptions.TimeoutError(
                f"no Pub/Sub connection within {timeout_s:g} s"
            ) from None
        except OSError as exc:
            link.close()
            raise redis.exceptions.ConnectionError(f"Pub/Sub connection failed: {exc}") from None
        except BaseException:
            link.close()
            raise
        return link

    def _tune_socket(self) -> None:
        sock = self._transport.get_extra_info("socket") if self._transport else None
        if sock is None:
            return
        for level, option in (
            (socket.IPPROTO_TCP, socket.TCP_NODELAY),
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        ):
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, 1)

    async def _call(self, args: tuple[Any, ...]) -> Any:
        reply: asyncio.Future[Any] = self._loop.create_future()
        self._reply = reply
        self.send(*args)
        await asyncio.wait({reply, self.closed}, return_when=asyncio.FIRST_COMPLETED)
        self._reply = None
        if reply.done():
            return reply.result()
        raise redis.exceptions.ConnectionError(self.closed.result())

    # --- commands --------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self.closed.done()

    def send(self, *args: Any) -> None:
        """Write one command now; raises ``redis.exceptions.ConnectionError`` once closed."""
        transport = self._transport
        if transport is None or self.closed.done() or transport.is_closing():
            raise redis.exceptions.ConnectionError("the Pub/Sub connection is closed")
        transport.write(hiredis.pack_command(args))

    def subscribe(self, *channels: bytes) -> None:
        self.send("SSUBSCRIBE" if self.sharded else "SUBSCRIBE", *channels)

    def unsubscribe(self, *channels: bytes) -> None:
        if self.sharded:
            for channel in channels:
                self._leaving[channel] = self._leaving.get(channel, 0) + 1
        self.send("SUNSUBSCRIBE" if self.sharded else "UNSUBSCRIBE", *channels)

    def ping(self) -> None:
        self.send("PING")

    def close(self) -> None:
        transport = self._transport
        if transport is not None:
            transport.close()
        else:
            if not self._gone.done():
                self._gone.set_result(None)
        self._lost("closed by the gateway")

    async def aclose(self, timeout_s: float = 1.0) -> None:
        """Close, and wait (bounded) until the transport has let go of the socket."""
        self.close()
        await asyncio.wait({self._gone}, timeout=timeout_s)

    # --- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._gone.done():
            self._gone.set_result(None)
        self._lost(f"connection lost: {exc}" if exc else "connection closed by the server")

    def eof_received(self) -> bool | None:
        return None  # close the transport (connection_lost follows)

    def data_received(self, data: bytes) -> None:
        self.last_seen = self._loop.time()
        parser = self._parser
        try:
            parser.feed(data)
            while True:
                reply = parser.gets()
                if reply is False:
                    return
                self._handle(reply)
        except hiredis.ProtocolError as exc:
            log.error("pubsub_protocol_error", error=str(exc))
            if self._transport is not None:
                self._transport.abort()
            self._lost(f"protocol error: {exc}")

    def _handle(self, reply: Any) -> None:
        waiter = self._reply
        if waiter is not None:
            self._reply = None
            if not waiter.done():
                waiter.set_result(reply)
            return
        if type(reply) is list and reply:
            kind = reply[0]
            try:
                if kind == b"message" or kind == b"smessage":
                    self._on_message(reply[1], reply[2])
                elif kind == b"subscribe" or kind == b"ssubscribe":
                    self._on_subscribe(reply[1])
                elif kind == b"pong":
                    self._on_pong()
                elif kind == b"sunsubscribe":
                    self._left(reply[1])
            except Exception:
                log.exception("pubsub_callback_failed", kind=kind.decode(errors="replace"))
        elif reply == b"PONG":
            self._on_pong()
        elif isinstance(reply, hiredis.ReplyError):
            log.warning("pubsub_error_reply", error=str(reply))
            if self.sharded and str(reply).startswith(("MOVED", "ASK", "CLUSTERDOWN", "CROSSSLOT")):
                # The channel's slot is served elsewhere now: start over on the new slot map.
                self._drop(f"redis cluster: {reply}")

    def rolled_back(self, channel: bytes, before: SubscriberLink) -> bool:
        """One Redis: a lost connection is a network fault or a restart (which empties Redis
        and ends every presence: attach sees it), not a rollback."""
        return False

    def _left(self, channel: bytes) -> None:
        """A ``sunsubscribe`` (sharded): ours, or the server's when the slot moved away."""
        pending = self._leaving.get(channel, 0)
        if pending > 1:
            self._leaving[channel] = pending - 1
        elif pending == 1:
            del self._leaving[channel]
        else:
            self._drop("redis cluster: a subscribed channel's slot moved")

    def _drop(self, why: str) -> None:
        """End the link (the hub opens a new one, subscribes again and checks for gaps)."""
        if self._transport is not None:
            self._transport.abort()
        self._lost(why)

    def _lost(self, why: str) -> None:
        if not self.closed.done():
            self.closed.set_result(why)  # also ends a _call() waiting for its reply


async def _endpoint(client: Any) -> tuple[dict[str, Any], type]:
    """The connection options and class of the server ``client`` talks to (one Redis), or of
    the cluster node ``client`` is (a ``ClusterNode``)."""
    if hasattr(client, "connection_kwargs"):  # a cluster node
        return {**client.connection_kwargs, "host": client.host, "port": client.port}, (
            client.connection_class
        )
    pool = client.connection_pool
    return dict(pool.connection_kwargs), pool.connection_class


class ShardedLink:
    """The gateway's Pub/Sub on a Redis Cluster: sharded Pub/Sub, one :class:`PubSubLink` per
    primary, each channel subscribed (``SSUBSCRIBE``) on the primary that owns its slot, so a
    frame published with ``SPUBLISH`` travels to that node only, never to every node.

    It is one ``SubscriberLink`` to the hub: :attr:`closed` is done as soon as any of its
    connections is lost, or told that a channel's slot moved (``MOVED``, a ``sunsubscribe`` the
    gateway did not ask for: a resharding), or the slot map names a primary it has no connection
    to (a failover). The hub then opens a new one, on the slot map as redis-py knows it then,
    subscribes everything again, and every connection checks its delivery stream for a gap."""

    def __init__(
        self, client: aioredis.RedisCluster, links: dict[str, PubSubLink], pongs: _Pongs
    ) -> None:
        self._client = client
        self._links = links
        self._pongs = pongs
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[str] = loop.create_future()
        #: Slots whose primary's connection was lost (not dropped by the gateway or after a
        #: ``MOVED``): that primary may be dead, and its replica promoted without its newest
        #: writes (Redis replicates asynchronously), or restarted without them.
        self._lost_slots: set[int] = set()
        #: Each slot's (primary, replicas) by name in the slot map this link was opened on.
        self._owners = {
            slot: (owners[0].name, frozenset(o.name for o in owners[1:]))
            for slot, owners in client.nodes_manager.slots_cache.items()
            if owners
        }
        for name, link in links.items():
            link.closed.add_done_callback(functools.partial(self._lost, name))

    @classmethod
    async def open(
        cls,
        client: aioredis.RedisCluster,
        *,
        timeout_s: float,
        on_message: Callable[[bytes, bytes], None],
        on_subscribe: Callable[[bytes], None],
        on_pong: Callable[[], None],
    ) -> ShardedLink:
        """One connection per primary of the slot map, refreshed first (after a failover or a
        resharding the old map is stale)."""
        try:
            async with asyncio.timeout(timeout_s):
                await client.initialize()
                await client.nodes_manager.initialize()
        except TimeoutError:
            raise redis.exceptions.TimeoutError(
                f"no Redis Cluster slot map within {timeout_s:g} s"
            ) from None
        except redis.exceptions.RedisError as exc:
            raise redis.exceptions.ConnectionError(f"Redis Cluster unreachable: {exc}") from None
        links: dict[str, PubSubLink] = {}
        pongs = _Pongs(on_pong)
        try:
            for node in client.get_primaries():
                link = await PubSubLink.open(
                    node,  # type: ignore[arg-type]  # a ClusterNode: see _endpoint
                    timeout_s=timeout_s,
                    on_message=on_message,
                    on_subscribe=on_subscribe,
                    on_pong=functools.partial(pongs.pong, node.name),
                )
                link.sharded = True
                links[node.name] = link
        except BaseException:
            for link in links.values():
                link.close()
            raise
        return cls(client, links, pongs)

    @property
    def last_seen(self) -> float:
        """The stalest connection's (the hub pings when any has been quiet)."""
        return min(link.last_seen for link in self._links.values())

    def _lost(self, name: str, done: asyncio.Future[str]) -> None:
        why = done.result() if not done.cancelled() else "cancelled"
        if why.startswith("connection"):  # PubSubLink.connection_lost: the server went away
            self._lost_slots.update(slot for slot, (p, _) in self._owners.items() if p == name)
        if not self.closed.done():
            self.closed.set_result(why)

    def rolled_back(self, channel: bytes, before: SubscriberLink) -> bool:
        """The slot's primary's connection was lost in ``before``, or the primary now serving
        it was a replica of the one ``before`` knew (a failover, however it was noticed: a
        lost connection, a hung primary that stopped answering PINGs, a ``MOVED``, a
        ``sunsubscribe``); not a resharding, which moves a slot to another primary with its
        keys whole."""
        if not isinstance(before, ShardedLink):
            return False
        slot = key_slot(channel)
        if slot in before._lost_slots:
            return True
        old, new = before._owners.get(slot), self._owners.get(slot)
        return old is not None and new is not None and new[0] != old[0] and new[0] in old[1]

    def _by_slot(self, channels: tuple[bytes, ...]) -> dict[tuple[str, int], list[bytes]]:
        """The channels by (owner, slot): one SSUBSCRIBE names one slot's channels only."""
        out: dict[tuple[str, int], list[bytes]] = {}
        slots = self._client.nodes_manager.slots_cache
        for channel in channels:
            slot = key_slot(channel)
            owners = slots.get(slot)
            if not owners or owners[0].name not in self._links:
                # No connection to the owner (the slot map moved on): start over.
                self._lost_now("redis cluster: a channel's slot has a new owner")
                raise redis.exceptions.ConnectionError("the Pub/Sub slot map is out of date")
            out.setdefault((owners[0].name, slot), []).append(channel)
        return out

    def _lost_now(self, why: str) -> None:
        for link in self._links.values():
            link._drop(why)
        if not self.closed.done():
            self.closed.set_result(why)

    def subscribe(self, *channels: bytes) -> None:
        if self.closed.done():
            raise redis.exceptions.ConnectionError("the Pub/Sub connection is closed")
        for (name, _), mine in self._by_slot(channels).items():
            self._links[name].subscribe(*mine)

    def unsubscribe(self, *channels: bytes) -> None:
        if self.closed.done():
            raise redis.exceptions.ConnectionError("the Pub/Sub connection is closed")
        for (name, _), mine in self._by_slot(channels).items():
            self._links[name].unsubscribe(*mine)

    def ping(self) -> None:
        """PING every primary; the hub hears the answer once all of them answered (a hung
        primary is noticed: its PONG never comes)."""
        self._pongs.expect(self._links)
        for link in self._links.values():
            link.ping()

    def close(self) -> None:
        for link in self._links.values():
            link.close()

    async def aclose(self, timeout_s: float = 1.0) -> None:
        await asyncio.gather(*(link.aclose(timeout_s) for link in self._links.values()))


class _Pongs:
    """The PONGs a :class:`ShardedLink` awaits: the hub's ``on_pong`` runs once every primary
    answered its PING."""

    def __init__(self, on_pong: Callable[[], None]) -> None:
        self._on_pong = on_pong
        self._awaited: set[str] = set()

    def expect(self, names: Iterable[str]) -> None:
        self._awaited = set(names)

    def pong(self, name: str) -> None:
        if name in self._awaited:
            self._awaited.discard(name)
            if not self._awaited:
                self._on_pong()


class RedisSubscriber:
    """``feed.interfaces.Subscriber`` on Redis: opens :class:`PubSubLink` connections to the
    server ``client`` uses."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client

    async def open(
        self,
        *,
        timeout_s: float,
        on_message: Callable[[bytes, bytes], None],
        on_subscribe: Callable[[bytes], None],
        on_pong: Callable[[], None],
    ) -> SubscriberLink:
        if isinstance(self._client, aioredis.RedisCluster):
            return await ShardedLink.open(
                self._client,
                timeout_s=timeout_s,
                on_message=on_message,
                on_subscribe=on_subscribe,
                on_pong=on_pong,
            )
        return await PubSubLink.open(
            self._client,
            timeout_s=timeout_s,
            on_message=on_message,
            on_subscribe=on_subscribe,
            on_pong=on_pong,
        )
