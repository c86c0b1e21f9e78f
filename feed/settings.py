"""Typed settings, read once from the ``FEED_*`` environment.

Only the entry points read ``os.environ``; everything below them receives a :class:`Settings`
(or, in the bench, a :class:`bench.options.BenchOptions`). The entry points are:

- ``feed.cli``, the ``feed`` command: every subcommand builds its :class:`Settings` from it, and
  ``feed bench`` hands it to ``bench.run_bench``, which reads it once into ``BenchOptions``;
- ``feed.dev`` (``feed dev``, dev only), which copies it as the base environment of the local
  stack's processes;
- outside the runtime package: the bench's load processes (``python -m bench.ws_clients``, for
  ``FEED_JWT_SECRET``) and ``infra.servers`` (``FEED_CASSANDRA_HOME``, the test/dev servers).

A bad or missing value raises :class:`SettingsError` naming the variable. Secrets are wrapped in
:class:`Secret`, whose ``repr``/``str`` never show the value.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from schemas.errors import FeedError

if TYPE_CHECKING:
    from feed.notify import NotifyLimits

__all__ = ["Secret", "Settings", "SettingsError"]

T = TypeVar("T")


class SettingsError(FeedError, ValueError):
    """A FEED_* variable is missing or invalid. The message names it (never its secret value)."""


class Secret:
    """A string that never prints. Compare with :meth:`matches` (constant time)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def matches(self, candidate: str) -> bool:
        return hmac.compare_digest(self._value.encode(), candidate.encode())

    def __len__(self) -> int:
        return len(self._value.encode())

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and self.matches(other._value)

    def __hash__(self) -> int:
        return hash(self._value)


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"must be a whole number between {lo} and {hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"must be a number between {lo} and {hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return parse


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def _list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _nonempty(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return raw

    return parse


def _redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be a redis:// or rediss:// URL")
    return raw


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of every process. Names are ``FEED_`` + the upper-cased field name."""

    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: ``auto`` (ask the server ``redis_url`` names), ``true`` (a Redis Cluster: the URL names
    #: any seed node) or ``false`` (one server). ``feed.redis_connect``.
    redis_cluster: str = "auto"
    #: On a Redis Cluster, the worker's writes count only once this many replicas of the master
    #: acknowledged them (``WAIT``; capped at the replicas the master has; 0: never wait), within
    #: ``redis_wait_timeout_ms``, else the batch is retried (``feed.timelines_cluster``).
    redis_wait_replicas: int = 1
    redis_wait_timeout_ms: int = 1000
    cassandra_hosts: tuple[str, ...] = ("127.0.0.1",)
    cassandra_port: int = 9042
    cassandra_keyspace: str = "feed"
    cassandra_protocol_version: int | None = None
    cassandra_replication_factor: int = 1
    #: The keyspace ``feed migrate`` creates: ``SimpleStrategy`` (one data centre, for
    #: development) or ``NetworkTopologyStrategy`` (production; the manifests set it), with
    #: ``cassandra_datacenters`` (``name:factor`` pairs; empty = the local data centre, or
    #: ``datacenter1``, at ``cassandra_replication_factor``).
    cassandra_replication_strategy: str = "SimpleStrategy"
    cassandra_datacenters: tuple[str, ...] = ()
    #: The data centre whose nodes the driver sends requests to (empty: the contact points').
    cassandra_local_dc: str | None = None
    #: Consistency levels of every read and every write (``feed.cql``). LOCAL_QUORUM for both
    #: means a read always sees every acknowledged write (docs/feeds.md, "Durability").
    cassandra_read_consistency: str = "LOCAL_QUORUM"
    cassandra_write_consistency: str = "LOCAL_QUORUM"
    jwt_secret: Secret | None = None
    jwt_leeway_s: int = 30
    ingest_token: Secret | None = None
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    timeline_max: int = 800
    follow_backfill: int = 200
    kafka_group: str = "feed-fanout"
    kafka_partitions: int = 4
    kafka_replication_factor: int = 1
    topic_activities: str = "feed.activities"
    topic_follows: str = "feed.follows"
    topic_dlq: str = "feed.activities.dlq"
    #: A tenant's records over its fan-out rate wait here (``fanout.quota``; ``docs/tenants.md``).
    topic_deferred: str = "feed.activities.deferred"
    kafka_session_timeout_ms: int = 10_000
    kafka_heartbeat_ms: int = 1_000
    fanout_batch: int = 500
    fanout_history: bool = True
    fanout_attempts: int = 5
    commit_interval_ms: int = 100
    fanout_limit: int = 10_000
    active_days: int = 7
    #: Notification feeds (``feed.notify``): how long a group stays open from its first
    #: activity, the most activities in one group, the most groups a user keeps.
    notify_window_s: int = 86_400
    notify_group_max: int = 1000
    notify_max_groups: int = 200
    worker_metrics_port: int = 9100
    worker_metrics_host: str = "127.0.0.1"
    body_ttl_days: int = 14
    stream_history: int = 1000
    resume_window_s: int = 300
    send_queue_bytes: int = 1 << 20
    allowed_origins: tuple[str, ...] = ()
    ingest_rate: float = 200.0
    ingest_burst: int = 400
    connect_rate: float = 1.0
    connect_burst: int = 10
    connect_ip_rate: float = 100.0
    connect_ip_burst: int = 2000
    #: Concurrent WebSocket connections one user may hold on one gateway (4029 past it).
    max_connections_per_user: int = 20
    #: How far ahead of this process's clock an event time (``published``, a follow's ``at``)
    #: may be; further ahead is refused (400 over HTTP, DLQ ``in_the_future`` from Kafka).
    max_clock_skew_s: float = 300.0
    #: Tenants (``feed.tenants``, docs/tenants.md): every worker and gateway reloads the
    #: registry this often, so a change (create, rotate, disable, quotas) reaches them within it.
    tenant_refresh_s: float = 10.0
    #: How long a tenant's previous ingest token and JWT secret stay valid after ``rotate``.
    tenant_rotate_grace_s: int = 3600
    #: Tenants with their own label on the ``feed_tenant_*`` metrics (the oldest ones; the
    #: others share ``other``): bounds the series a deployment with many tenants exports.
    tenant_metrics_max: int = 20
    #: The quotas of a tenant that overrides none (``feed tenant create --max-connections``,
    #: ``--fanout-rate``): WebSocket connections across all gateways, fan-out records per
    #: second and their burst. 0: no limit. The other quotas default to ``ingest_rate``,
    #: ``ingest_burst``, ``max_connections_per_user`` and ``timeline_max``.
    tenant_max_connections: int = 0
    tenant_fanout_rate: float = 0.0
    tenant_fanout_burst: int = 1000
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    drain_s: float = 10.0
    log_level: str = "info"
    log_format: str = "auto"
    dev_mode: bool = False

    # --- reading -----------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read every ``FEED_*`` variable; unknown ``FEED_*`` names are ignored."""
        parsers: dict[str, Callable[[str], Any]] = {
            "kafka_bootstrap": _nonempty,
            "redis_url": _redis_url,
            "redis_cluster": _choice("auto", "true", "false"),
            "redis_wait_replicas": _int(0, 5),
            # under the worker's Redis socket timeout (10 s), with room for the commands before
            "redis_wait_timeout_ms": _int(10, 5_000),
            "cassandra_hosts": lambda raw: _list(raw) or _fail("must list at least one host"),
            "cassandra_port": _int(1, 65535),
            "cassandra_keyspace": _identifier,
            "cassandra_protocol_version": _optional(_int(1, 66)),
            "cassandra_replication_factor": _int(1, 9),
            "cassandra_replication_strategy": _choice("SimpleStrategy", "NetworkTopologyStrategy"),
            "cassandra_datacenters": _datacenters,
            "cassandra_local_dc": _optional(_dc_name),
            "cassandra_read_consistency": _choice(*_CONSISTENCY_LEVELS),
            "cassandra_write_consistency": _choice(*_CONSISTENCY_LEVELS),
            "jwt_secret": _jwt_secret,
            "jwt_leeway_s": _int(0, 600),
            "ingest_token": _ingest_token,
            "gateway_host": _nonempty,
            "gateway_port": _int(0, 65535),
            "timeline_max": _int(1, 100_000),
            "follow_backfill": _int(0, 10_000),
            "kafka_group": _nonempty,
            "kafka_partitions": _int(1, 10_000),
            "kafka_replication_factor": _int(1, 9),
            "topic_activities": _nonempty,
            "topic_follows": _nonempty,
            "topic_dlq": _nonempty,
            "topic_deferred": _nonempty,
            "kafka_session_timeout_ms": _int(1_000, 600_000),
            "kafka_heartbeat_ms": _int(100, 60_000),
            "fanout_batch": _int(1, 100_000),
            "fanout_history": _bool,
            "fanout_attempts": _int(1, 100),
            "commit_interval_ms": _int(0, 60_000),
            "fanout_limit": _int(0, 1_000_000_000),
            "active_days": _int(0, 3650),
            "notify_window_s": _int(1, 30 * 86_400),
            "notify_group_max": _int(1, 10_000),
            "notify_max_groups": _int(1, 10_000),
            "worker_metrics_port": _int(0, 65535),
            "worker_metrics_host": _nonempty,
            "body_ttl_days": _int(1, 3650),
            "stream_history": _int(10, 1_000_000),
            "resume_window_s": _int(10, 86_400 * 7),
            "send_queue_bytes": _int(1024, 1 << 30),
            "allowed_origins": _list,
            "ingest_rate": _float(0, 1_000_000),
            "ingest_burst": _int(1, 1_000_000),
            "connect_rate": _float(0, 1_000_000),
            "connect_burst": _int(1, 1_000_000),
            "connect_ip_rate": _float(0, 1_000_000),
            "connect_ip_burst": _int(1, 1_000_000),
            "max_connections_per_user": _int(1, 100_000),
            "max_clock_skew_s": _float(0, 86_400 * 365),
            # a disable or a rotation must take effect within seconds: at most the default
            "tenant_refresh_s": _float(0.1, 10),
            "tenant_rotate_grace_s": _int(0, 30 * 86_400),
            "tenant_metrics_max": _int(0, 1000),
            "tenant_max_connections": _int(0, 10_000_000),
            "tenant_fanout_rate": _float(0, 1_000_000),
            "tenant_fanout_burst": _int(1, 1_000_000),
            "ping_interval_s": _float(0.5, 3600),
            "ping_timeout_s": _float(0.5, 3600),
            "drain_s": _float(0, 600),
            "log_level": _choice("debug", "info", "warning", "error"),
            "log_format": _choice("auto", "json", "console"),
            "dev_mode": _bool,
        }
        values: dict[str, Any] = {}
        for name, parse in parsers.items():
            var = "FEED_" + name.upper()
            raw = environ.get(var)
            if raw is None:
                continue
            try:
                values[name] = parse(raw)
            except (ValueError, TypeError) as exc:
                if name in _SECRET_FIELDS:
                    shown = ""
                elif name in _URL_FIELDS:
                    shown = f" (got {redact_url(raw)!r})"
                else:
                    shown = f" (got {raw!r})"
                raise SettingsError(f"{var}: {exc}{shown}") from None
        return cls(**values)

    def __repr__(self) -> str:
        """Every setting, with secrets and URL passwords masked (safe to log)."""
        shown = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _URL_FIELDS and isinstance(value, str):
                value = redact_url(value)
            shown.append(f"{field.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    def env(self) -> dict[str, str]:
        """The settings as ``FEED_*`` variables (secrets included: for child processes only)."""
        out: dict[str, str] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, Secret):
                value = value.reveal()
            elif isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            out["FEED_" + field.name.upper()] = str(value)
        return out

    # --- requirements of each process ----------------------------------------------------------
    def notify_limits(self) -> NotifyLimits:
        """The bounds of every notification feed."""
        from feed.notify import NotifyLimits

        return NotifyLimits(self.notify_window_s, self.notify_group_max, self.notify_max_groups)

    @property
    def notify_ttl_s(self) -> int:
        """How long an unused notification feed stays in Redis (0: kept): ``active_days``."""
        return self.active_days * 86_400

    def require_gateway(self) -> None:
        if self.jwt_secret is None:
            raise SettingsError("FEED_JWT_SECRET: required by the gateway (at least 32 bytes)")
        if self.ingest_token is None:
            raise SettingsError("FEED_INGEST_TOKEN: required by the gateway for HTTP ingest")
        if self.dev_mode:
            self.require_loopback_for_dev()

    def require_loopback_for_dev(self) -> None:
        """``FEED_DEV_MODE`` adds ``GET /dev/token``, which mints a token for any user: it is
        allowed only for a gateway listening on a loopback address (``127.0.0.0/8``, ``::1``,
        ``localhost``). Any other ``FEED_GATEWAY_HOST`` (``0.0.0.0``, a LAN address, a host
        name) raises :class:`SettingsError` naming both variables."""
        host = self.gateway_host.strip().strip("[]")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host.lower() == "localhost"
        if not loopback:
            raise SettingsError(
                "FEED_DEV_MODE: /dev/token mints a token for any user and is served only on a "
                f"loopback address, but FEED_GATEWAY_HOST is {self.gateway_host!r}; set "
                "FEED_GATEWAY_HOST=127.0.0.1 or FEED_DEV_MODE=false"
            )

    def require_jwt(self) -> Secret:
        if self.jwt_secret is None:
            raise SettingsError("FEED_JWT_SECRET: required (at least 32 bytes)")
        return self.jwt_secret


_SECRET_FIELDS = {"jwt_secret", "ingest_token"}
#: Settings that are URLs and may carry a password (``redis://user:pass@host``).
_URL_FIELDS = {"redis_url"}


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (``redis://u:***@h:6379/0``), for logs and
    error messages. A malformed URL is redacted too: whatever stands before the last ``@`` may
    be a credential."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    slashes = head.find("//")
    prefix = head[: slashes + 2] if slashes >= 0 else ""
    user, colon, _password = head[len(prefix) :].partition(":")
    redacted = f"{user}:***" if colon else "***"
    return f"{prefix}{redacted}@{tail}"


def _fail(message: str) -> Any:
    raise ValueError(message)


def _optional(parse: Callable[[str], T]) -> Callable[[str], T | None]:
    def inner(raw: str) -> T | None:
        return None if raw.strip() == "" else parse(raw)

    return inner


def _identifier(raw: str) -> str:
    if not raw.isidentifier() or len(raw) > 48:
        raise ValueError("must be a CQL identifier (letters, digits, underscore; at most 48)")
    return raw


#: The consistency levels a setting may name (cassandra-driver's ``ConsistencyLevel`` names that
#: apply to both reads and writes; ANY and SERIAL do not).
_CONSISTENCY_LEVELS = ("ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_QUORUM", "LOCAL_ONE")


_DC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _dc_name(raw: str) -> str:
    """A data centre's name as the settings accept it (it is written into CQL: no quotes)."""
    name = raw.strip()
    if not _DC_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is no data centre name (letters, digits, '_', '.', '-'; at most 64)"
        )
    return name


def _datacenters(raw: str) -> tuple[str, ...]:
    """``name:factor`` pairs, comma-separated, each factor 1..9, each name once."""
    out: list[str] = []
    for pair in _list(raw):
        name, sep, factor = pair.partition(":")
        if not sep or not factor.strip().isdigit():
            raise ValueError(f"{pair!r} is not name:factor (e.g. dc1:3)")
        if not 1 <= int(factor) <= 9:
            raise ValueError(f"{pair!r}: the factor must be 1 to 9")
        name = _dc_name(name)
        if any(entry.partition(":")[0] == name for entry in out):
            raise ValueError(f"{name!r} is named twice")
        out.append(f"{name}:{int(factor)}")
    return tuple(out)


def _jwt_secret(raw: str) -> Secret:
    if len(raw.encode()) < 32:
        raise ValueError("must be at least 32 bytes (RFC 7518 for HS256)")
    return Secret(raw)


def _ingest_token(raw: str) -> Secret:
    if len(raw.encode()) < 16:
        raise ValueError("must be at least 16 bytes")
    return Secret(raw)
