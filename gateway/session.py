"""The ``GET /v1/stream`` protocol of one connection, as a state machine with no I/O.

Like the protocol core of python-websockets, :class:`Session` never touches a socket, Redis or a
clock. The adapter (``gateway.connection``) feeds it *events* and asks it for *output*:

Events in
    :meth:`~Session.receive_text` / :meth:`~Session.receive_bytes` — a client frame;
    :meth:`~Session.receive_live` — a frame published on the user's Pub/Sub channel;
    :meth:`~Session.receive_history` — the answer to a delivery-stream read it asked for
    (:meth:`~Session.history_failed` if the read failed);
    :meth:`~Session.frame_sent` — the socket accepted that many bytes;
    :meth:`~Session.start_live`, :meth:`~Session.check_gap`, :meth:`~Session.token_expired`,
    :meth:`~Session.shutdown` — timers and process events.

Output
    :meth:`~Session.frames_to_send` — frames to write, in order;
    :meth:`~Session.history_request` — ``None`` or the seq after which stream frames are needed;
    :meth:`~Session.close_code` — ``None`` or ``(code, reason)``: close the socket with it.

Delivery model. Every frame the gateway pushes comes from the user's delivery stream
(``feed.delivery_redis``): it carries a stream cursor ``<epoch>.<seq>`` and seqs are consecutive.
The session keeps ``last``, the seq of the last frame it queued for the client, and only ever queues
``last + 1`` — so the client sees no repeat and no gap:

* a live frame with ``seq <= last`` is a duplicate and is dropped;
* a live frame with ``seq > last + 1`` shows a gap (Pub/Sub is at-most-once): the session buffers
  live frames and asks for the stream after ``last``; the answer fills the gap, then the buffer
  drains in seq order;
* ``{"type": "resume", "cursor": c}`` moves ``last`` back to ``c`` (the client has seen everything
  up to ``c`` and nothing after) and replays the stream after it, then the buffered live frames;
* when the stream cannot serve a position gap-free (foreign epoch, not a stream cursor, a cursor
  ahead of the stream, or frames already trimmed) the session sends ``{"type": "reset"}`` and
  continues live from the newest position it knows; the client refetches over HTTP.

Lost streams. Redis may lose the delivery stream with the user's presence (a restart): the next
attach starts a new *epoch*. The session notices it three ways, and each time sends ``reset``
and follows the new epoch: a live frame of another epoch, a history answer of another epoch, or
a presence frame (:func:`presence_frame`, handed in through :meth:`~Session.receive_live` by the
hub after it re-attached the user's presence; never forwarded to the client).

Items outside the stream. A large account's activity reaches a connected follower's stream only if
a gateway inserts it (``gateway.big_accounts``); when that could not be done (Redis failed, or whom
the user follows could not be read at connect), the hub hands in :data:`RESET_CONTROL` and the
session sends ``reset``: the client refetches over HTTP, where the item is (merged from the
account's outbox), instead of never learning it missed it. Items such an account posted while the
user was offline are added to the stream before the session starts (``BigAccounts.catch_up``); when
that cannot be done for a position (an account followed while offline), the session is given
``reset_through``: a resume at or before that seq is answered with ``reset``.

Hold. Until the client's first frame (or :meth:`start_live`, which the adapter calls after a short
grace period) live frames are held, so that a client that resumes right after the welcome gets its
replay strictly before any newer live frame.

Abuse. Client frames are rate limited (a token bucket, 4029), given the time they arrived.

Slow clients. Frames queued but not yet confirmed by :meth:`frame_sent`, plus held/buffered live
frames, count against ``max_queue_bytes``; past it the session closes with 4008. History is only
requested while that total is at most half the bound, so a long replay streams at the client's pace.
"""

from __future__ import annotations

from feed.cursor import CursorError, decode_stream
from gateway import closecodes
from schemas.errors import ValidationError
from schemas.frames import (
    MAX_INBOUND_FRAME,
    PRESENCE_HEAD,
    Reset,
    UnknownFrameType,
    Welcome,
    decode_client_frame,
    encode_frame,
    stream_position,
)

__all__ = [
    "CLOSE_FORBIDDEN",
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID_FRAME",
    "CLOSE_RATE_LIMITED",
    "CLOSE_TOO_BIG",
    "CLOSE_TOO_SLOW",
    "CLOSE_UNAUTHORIZED",
    "CLOSE_UNSUPPORTED",
    "MAX_CLOSE_REASON_BYTES",
    "PRESENCE_PREFIX",
    "RESET_CONTROL",
    "Session",
    "fit_close_reason",
    "presence_frame",
    "stream_position",
]

# Close codes of the public contract (CONTRACT.md, "WebSocket"), from the one table.
CLOSE_GOING_AWAY = closecodes.GOING_AWAY.code
CLOSE_UNSUPPORTED = closecodes.UNSUPPORTED.code
CLOSE_INVALID_FRAME = closecodes.INVALID_FRAME.code
CLOSE_TOO_BIG = closecodes.TOO_BIG.code
CLOSE_UNAUTHORIZED = closecodes.UNAUTHORIZED.code
CLOSE_FORBIDDEN = closecodes.FORBIDDEN.code
CLOSE_TOO_SLOW = closecodes.TOO_SLOW.code
CLOSE_RATE_LIMITED = closecodes.RATE_LIMITED.code

_RESET = encode_frame(Reset())
#: Frames of the gateway itself (never forwarded to a client) start with this.
_CONTROL_PREFIX = b'{"type":"_'
#: ``notification``, ``notification_removed`` and ``notification_counts`` frames.
_NOTIFICATION_PREFIX = b'{"type":"notification'
#: The user's presence is attached at the given position (see :func:`presence_frame`).
PRESENCE_PREFIX = PRESENCE_HEAD[: PRESENCE_HEAD.index(b",")]
#: Items may have missed the user's delivery stream (the hub hands this in, see
#: :meth:`Session.missed_outside_stream`): the client must refetch.
RESET_CONTROL = b'{"type":"_reset"}'


#: A close frame's payload is at most 125 bytes: the code (2) and the reason in UTF-8.
MAX_CLOSE_REASON_BYTES = 123


def fit_close_reason(reason: str) -> str:
    """``reason`` cut to at most :data:`MAX_CLOSE_REASON_BYTES` bytes of UTF-8, at a character
    boundary (a cut by characters is not enough: "\u20ac" is 3 bytes). A lone surrogate, which
    UTF-8 cannot carry, becomes "?"."""
    if reason.isascii():
        return reason[:MAX_CLOSE_REASON_BYTES]
    encoded = reason.encode("utf-8", "replace")[:MAX_CLOSE_REASON_BYTES]
    return encoded.decode("utf-8", "ignore")


def presence_frame(epoch: str, seq: int) -> bytes:
    """The in-process frame saying "the user's delivery stream is at ``epoch.seq``" (the hub
    hands it to the user's connections after re-attaching presence)."""
    return PRESENCE_HEAD + f"{epoch}.{seq}".encode() + b'"}'


class Session:
    """One WebSocket connection of ``user``, attached to its delivery stream at ``epoch.seq``."""

    def __init__(
        self,
        user: str,
        epoch: str,
        seq: int,
        *,
        max_queue_bytes: int = 1 << 20,
        max_frame_bytes: int = MAX_INBOUND_FRAME,
        hold_live: bool = True,
        client_burst: int = 10,
        client_rate_per_s: float = 1.0,
        reset_through: int | None = None,
    ) -> None:
        self.user = user
        self._epoch = epoch
        #: A resume at or before this seq of ``epoch`` is answered with ``reset``: items may be
        #: missing from the stream before it (``gateway.big_accounts.BigAccounts.catch_up``).
        self._reset_through = reset_through
        self._last = seq  # seq of the last frame queued for the client
        self._known = seq  # highest seq known to exist in the stream
        self._max_queue = max_queue_bytes
        self._max_frame = max_frame_bytes
        self._holding = hold_live
        self._out: list[tuple[int | None, bytes]] = []
        self._out_bytes = 0
        self._unconfirmed = 0  # handed out by frames_to_send, not yet confirmed by frame_sent
        self._buffer: list[tuple[int, bytes]] = []
        self._buffer_bytes = 0
        self._wanted = False  # history needed after `last`, not asked yet
        self._asked: int | None = None  # history asked after this seq, answer pending
        self._stale = False  # the pending answer was overtaken and must be ignored
        self._close: tuple[int, str] | None = None
        # Client frames: a token bucket (each resume costs a stream read).
        self._burst = float(client_burst)
        self._rate = client_rate_per_s
        self._tokens = float(client_burst)
        self._tokens_at: float | None = None
        #: Counters for logs and metrics.
        self.duplicates = 0
        self.gaps = 0
        self.resets = 0
        self.replayed = 0
        self._enqueue(encode_frame(Welcome(user=user, cursor=f"{epoch}.{seq}")), None)

    # --- state -----------------------------------------------------------------------------------
    @property
    def cursor(self) -> str:
        """The stream cursor of the last frame queued for the client."""
        return f"{self._epoch}.{self._last}"

    @property
    def epoch(self) -> str:
        """The delivery stream epoch the session follows."""
        return self._epoch

    @property
    def pending_bytes(self) -> int:
        """Bytes counted against the send-queue bound."""
        return self._out_bytes + self._unconfirmed + self._buffer_bytes

    @property
    def closed(self) -> bool:
        return self._close is not None

    # --- output ----------------------------------------------------------------------------------
    def frames_to_send(self) -> list[bytes]:
        """Frames to write now, in order. They count as pending until :meth:`frame_sent`."""
        if self._close is not None or not self._out:
            return []
        frames = [frame for _, frame in self._out]
        self._unconfirmed += self._out_bytes
        self._out.clear()
        self._out_bytes = 0
        return frames

    def history_request(self) -> int | None:
        """The seq after which stream frames are needed (once per request), or None.

        Answer with :meth:`receive_history`. Withheld while the frames the client still has to
        drain exceed half the send-queue bound, so a long replay goes at the client's pace.
        """
        if self._close is not None or not self._wanted or self._asked is not None:
            return None
        if self._out_bytes + self._unconfirmed > self._max_queue // 2:
            return None
        self._wanted = False
        self._asked = self._last
        return self._asked

    def close_code(self) -> tuple[int, str] | None:
        return self._close

    @property
    def wants_history(self) -> bool:
        """A delivery-stream read is due or pending (:meth:`history_request` may say when)."""
        return self._close is None and (self._wanted or self._asked is not None)

    # --- events ----------------------------------------------------------------------------------
    def frame_sent(self, nbytes: int) -> None:
        """The socket accepted ``nbytes`` of the frames handed out."""
        self._unconfirmed = max(0, self._unconfirmed - nbytes)

    def receive_text(self, data: str, *, now: float | None = None) -> None:
        """A text frame from the client, received at ``now`` (monotonic seconds).

        With ``now`` given, client frames are limited to ``client_burst`` at once and
        ``client_rate_per_s`` sustained; past that the session closes with 4029.
        """
        if self._close is not None:
            return
        # "surrogatepass": a str with lone surrogates is not valid UTF-8; the decoder below
        # turns it into 1007 instead of this line raising.
        size = len(data) if data.isascii() else len(data.encode(errors="surrogatepass"))
        if size > self._max_frame:
            self._fail(CLOSE_TOO_BIG, f"frame of {size} bytes exceeds {self._max_frame} bytes")
            return
        if now is not None and not self._take_token(now):
            self._fail(CLOSE_RATE_LIMITED, "too many client frames")
            return
        self._holding = False
        try:
            frame = decode_client_frame(data)
        except UnknownFrameType as exc:
            self._fail(CLOSE_UNSUPPORTED, exc.message)
            return
        except ValidationError as exc:
            field = f" ({exc.field})" if exc.field else ""
            self._fail(CLOSE_INVALID_FRAME, f"invalid frame{field}: {exc.message}")
            return
        self._resume(frame.cursor)
        self._advance()

    def receive_bytes(self, data: bytes) -> None:
        """A binary frame from the client: the protocol is JSON text only."""
        if self._close is not None:
            return
        if len(data) > self._max_frame:
            self._fail(CLOSE_TOO_BIG, f"frame of {len(data)} bytes exceeds {self._max_frame} bytes")
            return
        self._fail(CLOSE_UNSUPPORTED, "binary frames are not supported; send JSON text")

    def receive_live(self, frame: bytes) -> None:
        """A frame published on the user's channel (the same bytes for every local session)."""
        if self._close is not None:
            return
        position = stream_position(frame)
        if frame.startswith(_CONTROL_PREFIX):
            if position is not None and frame.startswith(PRESENCE_PREFIX):
                self.rebase(*position)
            elif frame == RESET_CONTROL:
                self.missed_outside_stream()
            return  # the gateway's own frames never reach the client
        if position is None:
            if frame.startswith(_NOTIFICATION_PREFIX):
                # notification feeds (feed.notify): live hints outside the stream, at-most-once;
                # GET /v1/notifications is their source of truth
                self._enqueue(frame, None)
                self._check_bound()
            return  # not a stream frame: nothing the contract lets us forward
        epoch, seq = position
        if epoch != self._epoch:
            # The delivery stream was recreated (presence expired, Redis lost its data): positions
            # of the old epoch mean nothing now. Tell the client, then follow the new stream.
            self._epoch = epoch
            self._reset()
            self._last = self._known = seq - 1
        if seq > self._known:
            self._known = seq
        if seq <= self._last:
            self.duplicates += 1
            return
        if self._buffering() or seq != self._last + 1:
            if not self._buffering():
                self.gaps += 1
                self._wanted = True
            self._buffer.append((seq, frame))
            self._buffer_bytes += len(frame)
            self._check_bound()
            return
        self._enqueue(frame, seq)
        self._last = seq

    def receive_history(
        self, frames: list[tuple[int, bytes]], oldest_available_seq: int | None
    ) -> None:
        """Stream frames after the requested seq (oldest first) and the stream's oldest seq."""
        if self._asked is None or self._close is not None:
            return
        after, self._asked = self._asked, None
        if self._stale:
            self._stale = False
            self._advance()
            return
        position = stream_position(frames[0][1]) if frames else None
        if position is not None and position[0] != self._epoch:
            # The stream was recreated (Redis lost it): positions of the old epoch mean nothing.
            # Tell the client, then follow the new stream from the newest frame seen.
            self._epoch = position[0]
            self._known = max(seq for seq, _ in frames)
            self._reset()
            self._advance()
            return
        lost = (
            (oldest_available_seq is not None and oldest_available_seq > after + 1)
            or (bool(frames) and frames[0][0] > after + 1)
            or (not frames and self._known > after)
        )
        if lost:
            self._reset()
            return
        for seq, frame in frames:
            if seq <= self._last:
                continue
            if seq != self._last + 1:  # a hole inside the stream: cannot be served gap-free
                self._reset()
                return
            if seq > self._known:
                self._known = seq
            in_flight = self._out_bytes + self._unconfirmed
            if in_flight and self.pending_bytes + len(frame) > self._max_queue // 2:
                # Paced by bytes, not frames: the rest is read again once the client has drained
                # what it has (a page of large frames must not trip the bound of a client that
                # reads promptly).
                self._known = max(self._known, max(seq for seq, _ in frames))
                self._wanted = True
                break
            self._enqueue(frame, seq)
            self._last = seq
            self.replayed += 1
            if self._close is not None:
                return
        self._advance()

    def history_failed(self) -> None:
        """The stream read asked for could not be done: ask again (the adapter backs off)."""
        if self._asked is None:
            return
        self._asked = None
        self._stale = False
        self._wanted = True

    def rebase(self, epoch: str, seq: int) -> None:
        """The user's presence is attached at ``epoch.seq`` (the hub re-attached it).

        Same epoch: the stream is intact and at least at ``seq``. Another epoch: the stream was
        recreated (Redis lost it), so positions of the old one mean nothing: send ``reset`` and
        follow the new stream after ``seq``.
        """
        if self._close is not None:
            return
        if epoch == self._epoch:
            if seq > self._known:
                self._known = seq
                self._advance()
            return
        self._epoch = epoch
        self._known = seq
        self._reset()
        self._advance()

    def missed_outside_stream(self) -> None:
        """Items may have reached the user's timeline without passing through the delivery
        stream (a large account's push that could not be written, or whose channel was not
        subscribed): no replay can bring them, so the client is sent ``reset`` (it refetches
        over HTTP, where they are) and the stream carries on where it is."""
        if self._close is not None:
            return
        self.resets += 1
        self._enqueue(_RESET, None)

    def start_live(self) -> None:
        """The hold after the welcome is over (no resume came): push live frames from now on."""
        if self._holding:
            self._holding = False
            self._advance()

    def check_gap(self) -> None:
        """Live frames may have been lost (Pub/Sub reconnected): read the stream after ``last``."""
        if self._close is not None:
            return
        # If an answer is pending, it may predate the loss: read again once it has arrived.
        self._wanted = True

    def token_expired(self) -> None:
        self._fail(CLOSE_UNAUTHORIZED, "token expired")

    def revoke(self, reason: str) -> None:
        """The user's credentials no longer hold (their tenant was disabled): close with 4001."""
        self._fail(CLOSE_UNAUTHORIZED, reason)

    def shutdown(self) -> None:
        self._fail(CLOSE_GOING_AWAY, "server shutting down")

    # --- internals -------------------------------------------------------------------------------
    def _take_token(self, now: float) -> bool:
        if self._tokens_at is not None:
            elapsed = max(0.0, now - self._tokens_at)
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _buffering(self) -> bool:
        return self._holding or self._asked is not None or self._wanted

    def _resume(self, cursor: str) -> None:
        try:
            position = decode_stream(cursor)  # only what this server issues (feed.cursor)
        except CursorError:
            self._reset()
            return
        if position.epoch != self._epoch or position.seq > self._known:
            self._reset()
            return
        if self._reset_through is not None and position.seq <= self._reset_through:
            # The stream may lack items from before that position (a large account followed
            # while the user was offline): no replay can bring them, a refetch can.
            self._reset()
            return
        # The client has seen everything up to the cursor and nothing after it: frames after it that
        # are still queued here will come again, in order, from the replay.
        kept = [(seq, frame) for seq, frame in self._out if seq is None or seq <= position.seq]
        if len(kept) != len(self._out):
            self._out = kept
            self._out_bytes = sum(len(frame) for _, frame in kept)
        self._last = position.seq
        if self._asked is not None:
            self._stale = True

    def _advance(self) -> None:
        """Move buffered live frames to the queue in seq order; ask for history on a gap."""
        if self._close is not None or self._holding or self._asked is not None or self._wanted:
            return
        if self._buffer:
            self._buffer.sort(key=_seq)
            rest = 0
            for index, (seq, frame) in enumerate(self._buffer):
                if seq > self._last + 1:
                    rest = index
                    break
                self._buffer_bytes -= len(frame)
                if seq <= self._last:
                    self.duplicates += 1
                    continue
                self._enqueue(frame, seq)
                self._last = seq
                if self._close is not None:
                    return
            else:
                rest = len(self._buffer)
            del self._buffer[:rest]
        if self._known > self._last:
            self._wanted = True

    def _reset(self) -> None:
        """The position cannot be served gap-free: tell the client, continue from the newest."""
        self.resets += 1
        if self._asked is not None:
            self._stale = True
        self._wanted = False
        self._buffer.clear()
        self._buffer_bytes = 0
        self._last = self._known
        self._enqueue(_RESET, None)

    def _enqueue(self, frame: bytes, seq: int | None) -> None:
        self._out.append((seq, frame))
        self._out_bytes += len(frame)
        self._check_bound()

    def _check_bound(self) -> None:
        pending = self.pending_bytes
        if pending > self._max_queue:
            self._fail(
                CLOSE_TOO_SLOW,
                f"send queue over its bound ({pending} > {self._max_queue} bytes)",
            )

    def _fail(self, code: int, reason: str) -> None:
        if self._close is not None:
            return
        self._close = (code, fit_close_reason(reason))
        self._out.clear()
        self._out_bytes = 0
        self._buffer.clear()
        self._buffer_bytes = 0
        self._wanted = False


def _seq(item: tuple[int, bytes]) -> int:
    return item[0]
