"""The WebSocket close codes of ``/v1/stream``: what each means and what a client should do.

This table is the one source of the close codes (as centrifuge's ``disconnect.go`` is for its
disconnects): every close the gateway decides names an entry (``closecodes.TOO_SLOW.code``),
never a literal; :mod:`gateway.session`'s ``CLOSE_*`` constants are the same codes (a unit test
holds them to this table); the table in ``docs/gateway.md`` and the list in ``README.md`` are
rendered from it (:func:`markdown_table`, :func:`readme_list`) and a unit test fails when they
differ. The codes named by the public contract (CONTRACT.md, "WebSocket") are all here.

Each entry says who sends it (``sent_by``): the gateway's own decisions, uvicorn's (a keepalive
ping left unanswered, a restart before the drain ended), the client's, or none (1006 is what a
client sees when the connection broke without a close frame), and what a client should do
(``advice``: reconnect at once and resume, reconnect with backoff and resume, get a new token
first, or do not reconnect with the same frame / from this page).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "ABNORMAL",
    "FORBIDDEN",
    "GOING_AWAY",
    "INVALID_FRAME",
    "NORMAL",
    "PING_TIMEOUT",
    "RATE_LIMITED",
    "SERVICE_RESTART",
    "TABLE",
    "TOO_BIG",
    "TOO_SLOW",
    "TRY_AGAIN_LATER",
    "UNAUTHORIZED",
    "UNSUPPORTED",
    "Advice",
    "CloseCode",
    "SentBy",
    "by_code",
    "markdown_table",
    "readme_list",
]


class Advice(enum.Enum):
    """What a client does after a close (the reconnect policy, as ``Reconnect`` in centrifuge)."""

    NOTHING = "nothing"  # the client closed
    RECONNECT_NOW = "reconnect at once and resume"
    RECONNECT_BACKOFF = "reconnect with backoff and resume"
    NEW_TOKEN = "get a new token, then reconnect and resume"
    FIX_CLIENT = "do not reconnect with the same frames: fix the client"
    STOP = "do not reconnect"


class SentBy(enum.Enum):
    """Who decides the close."""

    GATEWAY = "gateway"  # this package (gateway.session, gateway.admission, gateway.connection)
    SERVER = "server"  # uvicorn, under the gateway (keepalive, restart)
    CLIENT = "client"
    NONE = "none"  # no close frame: the connection broke


@dataclass(frozen=True, slots=True)
class CloseCode:
    """One close code: the number, a short name, what it means, what the client should do."""

    code: int
    name: str
    #: For the README's one-line list.
    summary: str
    #: For docs/gateway.md's table (Markdown).
    meaning: str
    #: What the client should do, as the docs say it (Markdown).
    client: str
    advice: Advice
    sent_by: SentBy
    #: How the code column is shown (1006 never travels in a close frame).
    label: str = ""

    def __int__(self) -> int:
        return self.code


NORMAL = CloseCode(
    1000,
    "normal",
    "normal close",
    "normal close",
    "nothing (you closed)",
    Advice.NOTHING,
    SentBy.CLIENT,
)
GOING_AWAY = CloseCode(
    1001,
    "going_away",
    "going away",
    "the gateway is going away (deploy, scale-in)",
    "reconnect at once (another gateway) and resume",
    Advice.RECONNECT_NOW,
    SentBy.GATEWAY,
)
UNSUPPORTED = CloseCode(
    1003,
    "unsupported",
    "unknown frame type",
    "unknown client frame type",
    "fix the client; do not retry the same frame",
    Advice.FIX_CLIENT,
    SentBy.GATEWAY,
)
INVALID_FRAME = CloseCode(
    1007,
    "invalid_frame",
    "invalid JSON",
    "client frame is not valid JSON / not a valid frame",
    "fix the client",
    Advice.FIX_CLIENT,
    SentBy.GATEWAY,
)
TOO_BIG = CloseCode(
    1009,
    "too_big",
    "too big",
    "client frame over 64 KiB",
    "fix the client",
    Advice.FIX_CLIENT,
    SentBy.GATEWAY,
)
PING_TIMEOUT = CloseCode(
    1011,
    "ping_timeout",
    "keepalive ping unanswered",
    "no pong to the server's keepalive ping within `FEED_PING_TIMEOUT_S` (the connection is dead"
    " or the client stalled)",
    "reconnect with backoff and resume",
    Advice.RECONNECT_BACKOFF,
    SentBy.SERVER,
)
SERVICE_RESTART = CloseCode(
    1012,
    "service_restart",
    "gateway restarted before the connection drained",
    "the gateway restarted while the connection was still open after the drain budget"
    " (`FEED_DRAIN_S`)",
    "reconnect at once and resume",
    Advice.RECONNECT_NOW,
    SentBy.SERVER,
)
TRY_AGAIN_LATER = CloseCode(
    1013,
    "try_again_later",
    "try again later (Redis unreachable)",
    "try again later (the gateway could not reach Redis to subscribe you)",
    "reconnect with backoff and resume",
    Advice.RECONNECT_BACKOFF,
    SentBy.GATEWAY,
)
UNAUTHORIZED = CloseCode(
    4001,
    "unauthorized",
    "unauthorized",
    "token missing, invalid or expired (also sent when the token expires mid-connection)",
    "get a new token, then reconnect and resume",
    Advice.NEW_TOKEN,
    SentBy.GATEWAY,
)
FORBIDDEN = CloseCode(
    4003,
    "forbidden",
    "forbidden origin",
    "`Origin` not in `FEED_ALLOWED_ORIGINS`",
    "stop; this page may not connect",
    Advice.STOP,
    SentBy.GATEWAY,
)
TOO_SLOW = CloseCode(
    4008,
    "too_slow",
    "too slow",
    "too slow: more than `FEED_SEND_QUEUE_BYTES` (1 MiB) waiting to be sent",
    "reconnect with backoff and resume: the replay comes at your pace",
    Advice.RECONNECT_BACKOFF,
    SentBy.GATEWAY,
)
RATE_LIMITED = CloseCode(
    4029,
    "rate_limited",
    "rate limited or too many connections of the user (`FEED_MAX_CONNECTIONS_PER_USER` per"
    " gateway)",
    "too many connects (per IP or per user: the reason says how long to wait), or too many open"
    " connections of this user on this gateway (more than `FEED_MAX_CONNECTIONS_PER_USER`,"
    " default 20: the reason says so)",
    "reconnect with backoff; for too many connections, close one of the user's other"
    " connections (a tab) first",
    Advice.RECONNECT_BACKOFF,
    SentBy.GATEWAY,
)
ABNORMAL = CloseCode(
    1006,
    "abnormal",
    "connection broke",
    "the connection broke (gateway crash, network)",
    "reconnect with backoff and resume",
    Advice.RECONNECT_BACKOFF,
    SentBy.NONE,
    label="`1006` (no close frame)",
)

#: Every close code, in the order the docs list them.
TABLE: tuple[CloseCode, ...] = (
    NORMAL,
    GOING_AWAY,
    UNSUPPORTED,
    INVALID_FRAME,
    TOO_BIG,
    PING_TIMEOUT,
    SERVICE_RESTART,
    TRY_AGAIN_LATER,
    UNAUTHORIZED,
    FORBIDDEN,
    TOO_SLOW,
    RATE_LIMITED,
    ABNORMAL,
)
_BY_CODE = {entry.code: entry for entry in TABLE}


def by_code(code: int) -> CloseCode:
    """The entry of ``code`` (KeyError for a code the gateway never uses)."""
    return _BY_CODE[code]


def markdown_table() -> str:
    """The close-code table of ``docs/gateway.md`` (between its ``close-codes`` markers)."""
    lines = ["| code | meaning | client |", "|---|---|---|"]
    for entry in TABLE:
        label = entry.label or f"`{entry.code}`"
        lines.append(f"| {label} | {entry.meaning} | {entry.client} |")
    return "\n".join(lines) + "\n"


def readme_list() -> str:
    """The one-line list of ``README.md``: every code a server sends (the gateway's and
    uvicorn's), with its summary, in table order."""
    sent = [e for e in TABLE if e.sent_by in (SentBy.GATEWAY, SentBy.SERVER)]
    return "Close codes: " + ", ".join(f"{e.code} {e.summary}" for e in sent) + "."
