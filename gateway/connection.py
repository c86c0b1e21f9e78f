"""One ``/v1/stream`` connection once admitted: :class:`StreamConnection`, the adapter between
the socket (:class:`gateway.transport.StreamSocket`), the sans-I/O :class:`gateway.session.Session`
and the process-wide :class:`gateway.hub.Hub`.

Guarantees: the session starts only once the user's presence is attached, their large accounts'
channels are asked for and their stream is caught up (a connect that cannot do this is closed
with 1013, see :func:`gateway.errors.close_for`); frames the hub delivers before that are kept,
at most ``EARLY_MAX_FRAMES`` of them, without losing any (the session reads the rest from the
stream); an idle connection holds no task but its own; whoever sees the session close stops the
pump and the reader, and :meth:`StreamConnection.run` writes the close frame (the session's
code, counted by :func:`gateway.transport.close_connection`). Each connection logs one summary
line (``ws_connection``) when it ends.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import Any

import structlog
from starlette.types import Message

from feed import tracing
from feed.stages import now_ms
from gateway import closecodes
from gateway.auth import UserClaims
from gateway.errors import REDIS_ERRORS, ConnectRejected
from gateway.hub import HubUnavailable, TooManyConnections
from gateway.resources import Gateway
from gateway.session import PRESENCE_PREFIX, RESET_CONTROL, Session
from gateway.timers import timers
from gateway.transport import StreamSocket, close_connection, reject
from schemas.frames import (
    ACTIVITY_HEAD,
    ACTIVITY_TRACEPARENT,
    TRACED_TAIL,
    frame_traceparent,
    frame_ts_ms,
)

__all__ = ["EARLY_MAX_FRAMES", "HISTORY_PAGE", "StreamConnection", "essential_early"]

log = structlog.get_logger("gateway")

#: Frames per delivery-stream read while replaying or filling a gap.
HISTORY_PAGE = 100
#: Frames kept for a connection whose session has not started yet (see
#: ``StreamConnection._deliver_early``).
EARLY_MAX_FRAMES = 64
#: Where a traced frame's ``traceparent`` field starts and ends, from the frame's end: the
#: cheap test of every delivered frame while tracing (``schemas.frames.activity_tail``).
_TRACED_AT = -TRACED_TAIL
_TRACED_END = _TRACED_AT + len(ACTIVITY_TRACEPARENT)
#: The client's close code when its close frame had none (RFC 6455, 7.1.5).
_NO_STATUS = 1005


class StreamConnection:
    """Adapter between one WebSocket, its :class:`Session` and the :class:`Hub`.

    The connection's own task (the server's, running :meth:`run`) reads client frames and feeds
    them to the session. The hub's callbacks (:meth:`deliver`, :meth:`check_gap`,
    :meth:`shutdown`, synchronous) and the timers feed it too. A *pump* task performs the
    session's history reads and writes its frames; it exists only while there is something to
    do (an idle connection has no task but its own, which is most of its memory). Whoever
    notices that the session closed stops the pump and gets the reader out of its wait;
    :meth:`run` then writes the close frame.
    """

    __slots__ = (
        "_claims",
        "_client_code",
        "_context",
        "_early",
        "_early_gap",
        "_gateway",
        "_going_away",
        "_hold",
        "_interrupted",
        "_main",
        "_opened_ms",
        "_pending_since",
        "_pump_again",
        "_pump_task",
        "_pushed",
        "_reading",
        "_revoked",
        "_session",
        "_span",
        "_ws",
    )

    def __init__(self, websocket: StreamSocket, claims: UserClaims, gateway: Gateway) -> None:
        self._ws = websocket
        self._claims = claims
        self._gateway = gateway
        self._session: Session | None = None
        self._early: list[bytes] | None = None  # frames delivered before the session started
        self._early_gap = False
        self._going_away = False
        self._revoked: str | None = None  # why the connection's credentials were revoked
        self._hold: asyncio.TimerHandle | None = None  # the live hold after the welcome
        self._context: contextvars.Context | None = None
        self._main: asyncio.Task[Any] | None = None  # the task running run() (the reader)
        self._reading = False  # the reader waits for a client frame
        self._interrupted = False  # ... and was cancelled out of that wait by us
        self._pump_task: asyncio.Task[None] | None = None
        self._pump_again = False  # an event came while the pump was busy
        self._pending_since: float | None = None
        self._client_code: int | None = None
        self._pushed = 0
        self._span: Any = None  # the session's span, while tracing (feed.tracing)
        #: Deliveries of activities that entered the pipeline before this are replays (a resume)
        #: and are left out of the delivery latency.
        self._opened_ms = now_ms()

    @property
    def user(self) -> str:
        """The principal (``gateway.tenancy``): what the hub and the delivery streams key."""
        return self._claims.principal

    # --- hub callbacks ---------------------------------------------------------------------------
    def deliver(self, frame: bytes) -> None:
        session = self._session
        if session is None:
            self._deliver_early(frame)
            return
        session.receive_live(frame)
        if not frame.startswith(PRESENCE_PREFIX):
            # the push latency (and a push span) runs from now, unless the frame is a presence
            # notice, which is never written to the client and must not start the clock
            self._mark_pending()
        self._after_event()

    def _deliver_early(self, frame: bytes) -> None:
        """Keep a frame that came before the session started (while presence is attached).

        At most ``EARLY_MAX_FRAMES`` are kept: a flood for a user who is still connecting does
        not grow the list without bound. Past it the list shrinks to what the session cannot
        get again (the newest stream frame, which tells it how far the stream goes, and the
        hub's control frames) and the session starts by reading the stream: every pushed frame
        is in it, so nothing is lost.
        """
        early = self._early
        if early is None:
            early = self._early = []
        elif len(early) >= EARLY_MAX_FRAMES:
            early[:] = essential_early(early)
            self._early_gap = True
        early.append(frame)

    @property
    def epoch(self) -> str | None:
        return None if self._session is None else self._session.epoch

    def check_gap(self) -> None:
        if self._session is None:
            self._early_gap = True
            return
        self._session.check_gap()
        self._after_event()

    def shutdown(self) -> None:
        self._going_away = True
        if self._session is not None:
            self._session.shutdown()
            self._after_event()

    def revoke(self, reason: str) -> None:
        """Close with 4001: the user's tenant was disabled (``gateway.tenancy``)."""
        self._revoked = reason
        if self._session is not None:
            self._session.revoke(reason)
            self._after_event()

    # --- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        gateway = self._gateway
        started = time.monotonic()
        claims = self._claims
        limits = gateway.tenancy.limits(claims.tenant)
        try:
            admitted = await gateway.tenancy.connections.admit(
                claims.tenant, self, limits.max_connections
            )
        except ConnectRejected as exc:
            log.info("ws_rejected", reason="tenant_connections", limit=limits.max_connections)
            await reject(self._ws, gateway.metrics, exc)
            return
        except REDIS_ERRORS as exc:
            log.warning("ws_rejected", reason="redis_unavailable", error=str(exc))
            await reject(self._ws, gateway.metrics, exc)
            return
        try:
            await self._run_admitted(started, limits.max_connections_per_user)
        finally:
            gateway.tenancy.connections.end(claims.tenant, admitted)

    async def _run_admitted(self, started: float, max_per_user: int) -> None:
        gateway = self._gateway
        try:
            await gateway.hub.register(self, max_per_user=max_per_user)
        except TooManyConnections as exc:
            log.info("ws_rejected", reason="too_many_connections", limit=exc.limit)
            await reject(self._ws, gateway.metrics, exc)
            return
        except HubUnavailable as exc:
            log.warning("ws_rejected", reason="pubsub_unavailable")
            await reject(self._ws, gateway.metrics, exc)
            return
        session: Session | None = None
        gateway.metrics.connections.inc()
        if tracing.ENABLED:
            self._span = tracing.tracer().start_span(
                "ws session", attributes={"feed.user": self._claims.user}
            )
        try:
            try:
                presence = await gateway.presence.attach(self.user)
                # A connected user is active: fan-out writes their Redis timeline (and a user
                # back from a quiet period gets it rebuilt from history, single-flight).
                claims = self._claims
                await gateway.reader_for(claims.tenant).touch(claims.user)
                # Shared with a refresh in flight for this user (a follow just changed): the
                # connection must not be cancelled out of it, nor cancel it for others.
                await asyncio.shield(gateway.big_accounts.request_refresh(self.user))
                reset_through, caught_up_seq = await gateway.big_accounts.catch_up(
                    self.user, presence.epoch
                )
            except REDIS_ERRORS as exc:
                log.warning("ws_rejected", reason="redis_unavailable", error=str(exc))
                await reject(self._ws, gateway.metrics, exc)
                return
            session = self._start_session(presence.epoch, presence.seq, reset_through)
            if caught_up_seq is not None:
                session.rebase(presence.epoch, caught_up_seq)  # frames the catch-up added
            with tracing.using(self._span):  # the connection's log lines carry its ids
                await self._serve(session)
        finally:
            gateway.metrics.connections.dec()
            gateway.hub.unregister(self)
            with tracing.using(self._span):
                self._log_summary(session, time.monotonic() - started)

    def _start_session(self, epoch: str, seq: int, reset_through: int | None = None) -> Session:
        settings = self._gateway.settings
        hold = self._gateway.hold_live_s
        session = Session(
            self._claims.user,
            epoch,
            seq,
            max_queue_bytes=settings.send_queue_bytes,
            hold_live=hold > 0,
            reset_through=reset_through,
        )
        self._session = session
        if self._early is not None:
            for frame in self._early:
                session.receive_live(frame)
            self._early = None
        if self._early_gap:
            session.check_gap()
        if self._going_away:
            session.shutdown()
        if self._revoked is not None:
            session.revoke(self._revoked)
        return session

    async def _serve(self, session: Session) -> None:
        """Read client frames until the session closes or the client leaves, then close.

        The reading happens here, in the connection's own task, rather than in a task of its
        own: an idle connection then costs one task.
        """
        loop = asyncio.get_running_loop()
        self._main = main = asyncio.current_task()
        self._context = contextvars.copy_context()  # the pump logs with this connection's context
        if self._gateway.hold_live_s > 0:
            self._hold = loop.call_later(self._gateway.hold_live_s, self._end_hold)
        expires_in = self._claims.expires_at + self._gateway.settings.jwt_leeway_s - time.time()
        expiry = timers().call_later(expires_in, StreamConnection._expire, self)
        self._after_event()  # the welcome (or the close, if the session closed already)
        receive = self._ws.receive
        try:
            while not session.closed:
                self._reading = True
                try:
                    message = await receive()
                except asyncio.CancelledError:
                    if self._interrupted and main is not None and main.uncancel() == 0:
                        break  # our own interruption (the session closed), nobody else's
                    raise
                finally:
                    self._reading = False
                if not self._client_message(session, message):
                    break
        except OSError:
            pass
        except Exception:
            log.exception("ws_task_failed", task="ws-read")
        finally:
            expiry.cancel()
            if self._hold is not None:
                self._hold.cancel()
                self._hold = None
            self._main = None
            pump = self._pump_task
            if pump is not None:
                pump.cancel()
                try:
                    await pump  # ends at once; it logs its own failures
                except asyncio.CancelledError:
                    # The pump's own cancellation, or this task's: only the latter goes on.
                    if main is not None and main.cancelling():
                        raise
        close = session.close_code()
        if close is not None and self._client_code is None:
            code, reason = close
            if code == closecodes.TOO_SLOW.code:
                self._gateway.metrics.slow_client_closes.inc()
            await close_connection(self._ws, self._gateway.metrics, code, reason)

    def _client_message(self, session: Session, message: Message) -> bool:
        """Feed one ASGI message to the session; False once the client has gone."""
        kind = message["type"]
        if kind == "websocket.disconnect":
            self._client_code = int(message.get("code") or _NO_STATUS)
            return False
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                session.receive_text(text, now=time.monotonic())
            else:
                session.receive_bytes(message.get("bytes") or b"")
            self._after_event()
        return True

    def _end_hold(self) -> None:
        self._hold = None  # fired: not kept for the connection's lifetime
        if self._session is not None:
            self._session.start_live()
            self._after_event()

    def _expire(self) -> None:
        if self._session is not None:
            self._session.token_expired()
            self._after_event()

    def _after_event(self) -> None:
        """The session may have output or have closed: start the pump, or stop everything."""
        session = self._session
        if session is None or self._main is None:
            return  # not serving yet (run() calls this again when it starts) or any more
        if session.closed:
            pump = self._pump_task
            if pump is not None and not pump.done():
                # A pump blocked on a slow socket must not delay the close.
                pump.cancel()
            self._interrupt_reader()
            return
        pump = self._pump_task
        if pump is not None and not pump.done():
            self._pump_again = True
            return
        self._pump_again = False
        frames: list[bytes] | None = None
        if not session.wants_history:
            # The hot path: live frames for a socket that takes them are written right here,
            # with no task (the pump is for history reads and for sockets that push back).
            frames = session.frames_to_send()
            if not frames or self._write_now(session, frames):
                return
        self._pump_task = asyncio.get_running_loop().create_task(
            self._pump(session, frames), context=self._context
        )

    def _write_now(self, session: Session, frames: list[bytes]) -> bool:
        written = self._ws.write_now(frames)
        if written is None:
            return False
        session.frame_sent(written)
        self._delivered(frames, self._sent(len(frames)))
        return True

    def _delivered(self, frames: list[bytes], since: float | None = None) -> None:
        """Count the activity frames just written, and the delivery latency of the live ones
        (``feed.stages``). While tracing, a live frame that carries a ``traceparent`` gets its
        push span: from ``since`` (when the connection had frames to write, ``perf_counter``)
        to now."""
        at = now_ms()
        opened = self._opened_ms
        metrics = self._gateway.metrics
        latency = metrics.delivery_latency
        traced = tracing.ENABLED
        delivered = 0
        for frame in frames:
            if not frame.startswith(ACTIVITY_HEAD):
                continue
            delivered += 1
            ts = frame_ts_ms(frame)
            if ts is not None and ts >= opened:
                latency.observe_ms("", at - ts)
                if traced and frame[_TRACED_AT:_TRACED_END] == ACTIVITY_TRACEPARENT:
                    self._trace_push(frame, since, at - ts)
        if delivered:
            metrics.activities_delivered.inc(delivered)

    def _trace_push(self, frame: bytes, since: float | None, latency_ms: float) -> None:
        """The push span of a live frame that carries the worker's ``traceparent``, and the
        delivery latency's exemplar (the latest traced delivery of its bucket)."""
        parent = frame_traceparent(frame)
        if parent is None:
            return
        now_ns = time.time_ns()
        start_ns = now_ns
        if since is not None:
            start_ns -= int((time.perf_counter() - since) * 1e9)
        trace_id, span_id = tracing.record_push(parent, start_ns, now_ns, self._claims.user)
        self._gateway.metrics.delivery_latency.exemplar_ms("", latency_ms, trace_id, span_id)

    def _sent(self, count: int) -> float | None:
        """Count ``count`` frames written; returns since when they waited (``perf_counter``)."""
        metrics = self._gateway.metrics
        self._pushed += count
        metrics.messages_pushed.inc(count)
        since = self._pending_since
        if since is not None:
            self._pending_since = None
            metrics.push_latency.observe(time.perf_counter() - since)
        return since

    def _interrupt_reader(self) -> None:
        """Get the reader out of its wait for a client frame (the session closed)."""
        main = self._main
        if main is not None and self._reading and not self._interrupted:
            self._interrupted = True
            main.cancel()

    def _mark_pending(self) -> None:
        if self._pending_since is None:
            self._pending_since = time.perf_counter()

    async def _pump(self, session: Session, frames: list[bytes] | None = None) -> None:
        """Write ``frames`` (handed out by the session already), then read history and write
        frames until there is nothing left to do, then end."""
        try:
            if frames:
                await self._send_frames(session, frames)
            await self._pump_loop(session)
        except asyncio.CancelledError:
            self._interrupt_reader()
            raise
        except OSError:
            pass  # the client is gone (its disconnect reaches the reader too)
        except Exception:
            log.exception("ws_task_failed", task="ws-pump")
        else:
            if not session.closed:
                self._pump_task = None  # done: an idle connection keeps no task of it
                return
        # The session closed or the pump failed: the connection ends.
        self._interrupt_reader()

    async def _send_frames(self, session: Session, frames: list[bytes]) -> None:
        if self._write_now(session, frames):
            return
        websocket = self._ws
        for frame in frames:
            await websocket.send_text(frame.decode())
            session.frame_sent(len(frame))
            self._delivered([frame], self._sent(1))

    async def _pump_loop(self, session: Session) -> None:
        presence = self._gateway.presence
        while not session.closed:
            self._pump_again = False
            busy = False
            after = session.history_request()
            if after is not None:
                busy = True
                try:
                    oldest = await presence.oldest_seq(self.user)
                    frames = await presence.frames_after(self.user, after, HISTORY_PAGE)
                except REDIS_ERRORS as exc:
                    log.warning("history_read_failed", error=str(exc))
                    session.history_failed()
                    await asyncio.sleep(0.5)  # back off before the next attempt
                    continue
                session.receive_history(frames, oldest)
                self._mark_pending()
            frames_out = session.frames_to_send()
            if frames_out:
                busy = True  # a withheld history request may be due once these are written
                await self._send_frames(session, frames_out)
            if not busy and not self._pump_again:
                return

    def _log_summary(self, session: Session | None, duration_s: float) -> None:
        fields: dict[str, Any] = {
            "duration_s": round(duration_s, 3),
            "pushed": self._pushed,
            "client_close_code": self._client_code,
        }
        if session is not None:
            close = session.close_code()
            fields.update(
                close_code=close[0] if close else None,
                close_reason=close[1] if close else None,
                replayed=session.replayed,
                duplicates=session.duplicates,
                gaps=session.gaps,
                resets=session.resets,
            )
            if session.resets:
                self._gateway.metrics.resets.inc(session.resets)
        log.info("ws_connection", **fields)
        span, self._span = self._span, None
        if span is not None:
            span.set_attributes({k: v for k, v in fields.items() if v is not None})
            span.end()


def essential_early(frames: list[bytes]) -> list[bytes]:
    """Of the frames kept before a session started, those it cannot read again from the stream:
    the newest stream frame (its seq says how far the stream goes), the newest presence frame
    and a reset request, in their order."""
    keep: set[int] = set()
    found_live = found_presence = found_reset = False
    for index in range(len(frames) - 1, -1, -1):
        frame = frames[index]
        if frame.startswith(PRESENCE_PREFIX):
            if not found_presence:
                found_presence = True
                keep.add(index)
        elif frame == RESET_CONTROL:
            if not found_reset:
                found_reset = True
                keep.add(index)
        elif not found_live:
            found_live = True
            keep.add(index)
    return [frames[index] for index in sorted(keep)]
