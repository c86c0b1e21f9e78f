"""The bench's switches (``FEED_BENCH_*``), read once from the environment it is handed.

:class:`BenchOptions` is the bench's only view of the environment: ``feed bench`` (``feed.cli``)
hands ``os.environ`` to :func:`bench.run_bench`, which builds the options once with
:meth:`BenchOptions.from_env` before it starts anything and passes them to every scenario on
``ctx.options``. No other bench module reads ``os.environ``; the processes the bench starts get
their environment from :meth:`BenchOptions.inherited` (the caller's environment without its
``FEED_*`` variables, which the bench sets itself) or :meth:`BenchOptions.install_env` (without
the project's virtualenv markers, for the peer's own virtualenv). The load processes of the
gateway scenario (``python -m bench.ws_clients``) are entry points of their own: they read their
one variable through :func:`client_jwt_secret`.

Guarantees: a bad value raises :class:`BenchOptionsError` whose message names the variable and
what it accepts, before any server starts. An unset or empty variable means its default. The
message never includes the value of a secret.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

__all__ = [
    "FANOUT_PHASES",
    "GATEWAY_SIDES",
    "BenchOptions",
    "BenchOptionsError",
    "client_jwt_secret",
]

T = TypeVar("T")

#: The fan-out scenario's phases, in order; ``FEED_BENCH_PHASES=redis_only,history`` runs a subset.
#: ``redis_work`` (Redis under callgrind: :mod:`bench.redis_work`) runs unasked only in a full run.
FANOUT_PHASES = (
    "redis_only",
    "drain_2_workers",
    "skewed",
    "history",
    "sweep",
    "soak",
    "redis_work",
)
#: The sides of the gateway scenario; ``FEED_BENCH_GATEWAY_SIDES=peer`` measures only that one.
GATEWAY_SIDES = ("ours", "peer")
#: Variables the processes of the peer's own virtualenv must not inherit from the project's.
_VENV_MARKERS = frozenset({"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class BenchOptionsError(ValueError):
    """A ``FEED_BENCH_*`` variable (or the bench client's ``FEED_JWT_SECRET``) is invalid or
    missing. The message names the variable and what it accepts."""


@dataclass(frozen=True)
class BenchOptions:
    """Every switch of one ``feed bench`` run (docs/benchmarks.md lists them). ``None`` means the
    variable is unset and the plan's preset applies."""

    #: ``FEED_BENCH_SKIP_PEERS=1``: do not install or run the peers.
    skip_peers: bool = False
    #: ``FEED_BENCH_PROFILE=1``: py-spy the first worker during the first drain.
    profile: bool = False
    #: ``FEED_BENCH_KEEP=1``: keep the stack's data folder after the run.
    keep: bool = False
    #: ``FEED_BENCH_E2E_HISTORY=1`` / ``=0``: the e2e sweep runs only with / only without
    #: per-follower Cassandra rows (``None``, unset: with both, one after the other).
    e2e_history: bool | None = None
    #: ``FEED_BENCH_WORKDIR=DIR``: where the stack's data and the peer's virtualenv live.
    workdir: Path | None = None
    #: ``FEED_BENCH_BACKLOG=N``: activities of the 1- vs 2-worker backlog (at least 100).
    backlog: int | None = None
    #: ``FEED_BENCH_E2E_RATE=N``: the e2e scenario's only offered rate, in activities/s (at
    #: least 1).
    e2e_rate: float | None = None
    #: ``FEED_BENCH_E2E_RATES=50,100,250``: the offered rates the e2e scenario sweeps.
    e2e_rates: tuple[float, ...] | None = None
    #: ``FEED_BENCH_SOAK_S=N``: seconds of the memory soak (at least 5).
    soak_s: float | None = None
    #: ``FEED_BENCH_PHASES=a,b``: the fan-out phases to run (``None``: all of them).
    phases: frozenset[str] | None = None
    #: ``FEED_BENCH_GATEWAY_RATES=8000,10000``: the only offered rates (msg/s) the gateway sweeps.
    gateway_rates: tuple[int, ...] | None = None
    #: ``FEED_BENCH_GATEWAY_SIDES=peer``: the only sides of the gateway scenario to measure.
    gateway_sides: tuple[str, ...] | None = None
    #: ``FEED_BENCH_GATEWAY_BURN_US=36``: during each gateway step, a process of the bench
    #: burns this many µs of CPU per offered message (at most one core): a control that puts a
    #: known load on the cores the gateway shares (e.g. a cluster's extra Redis and publisher
    #: work, on one Redis).
    gateway_burn_us: float | None = None
    #: ``FEED_BENCH_TRACING=0.1``: the bench's workers and gateways trace (OpenTelemetry), sampling
    #: this share of new traces, and export to an OTLP sink the bench runs; the gateway
    #: scenario's publisher puts a sampled ``traceparent`` on this share of frames (as a traced
    #: worker does). ``None``, unset: no tracing.
    tracing: float | None = None
    #: ``FEED_BENCH_REDIS_CLUSTER=1``: the stack's Redis is a Redis Cluster of 3 masters (the
    #: processes use it as a cluster; Redis CPU is read per node; no ZADD ceiling, no peers).
    redis_cluster: bool = False
    #: The rest of the environment the bench was handed (read-only), the base of its children's.
    environ: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> BenchOptions:
        """Parse ``environ`` once; raises :class:`BenchOptionsError` naming the bad variable."""

        def get(name: str, parse: Callable[[str, str], T]) -> T | None:
            raw = environ.get(name, "").strip()
            return parse(name, raw) if raw else None

        return cls(
            skip_peers=bool(get("FEED_BENCH_SKIP_PEERS", _flag)),
            profile=bool(get("FEED_BENCH_PROFILE", _flag)),
            keep=bool(get("FEED_BENCH_KEEP", _flag)),
            e2e_history=get("FEED_BENCH_E2E_HISTORY", _flag),
            workdir=get("FEED_BENCH_WORKDIR", lambda _name, raw: Path(raw)),
            backlog=get("FEED_BENCH_BACKLOG", _at_least_int(100)),
            e2e_rate=get("FEED_BENCH_E2E_RATE", _at_least_float(1.0)),
            e2e_rates=get("FEED_BENCH_E2E_RATES", _float_rates),
            soak_s=get("FEED_BENCH_SOAK_S", _at_least_float(5.0)),
            phases=get("FEED_BENCH_PHASES", _phases),
            gateway_rates=get("FEED_BENCH_GATEWAY_RATES", _rates),
            gateway_sides=get("FEED_BENCH_GATEWAY_SIDES", _sides),
            gateway_burn_us=get("FEED_BENCH_GATEWAY_BURN_US", _at_least_float(0.0)),
            tracing=get("FEED_BENCH_TRACING", _share),
            redis_cluster=bool(get("FEED_BENCH_REDIS_CLUSTER", _flag)),
            environ=MappingProxyType(dict(environ)),
        )

    def inherited(self) -> dict[str, str]:
        """The environment without its ``FEED_*`` and ``OTEL_*`` variables: the base of every
        process of the bench's stack (the bench sets the ``FEED_*`` settings of its children
        itself, and their tracing from ``FEED_BENCH_TRACING`` only)."""
        return {
            k: v
            for k, v in self.environ.items()
            if not k.startswith("FEED_") and not k.startswith("OTEL_")
        }

    def install_env(self) -> dict[str, str]:
        """The environment minus the project's virtualenv markers, for the peer's own venv."""
        env = {k: v for k, v in self.environ.items() if k not in _VENV_MARKERS}
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        return env


def client_jwt_secret(environ: Mapping[str, str]) -> str:
    """``FEED_JWT_SECRET`` of a bench load process (the bench sets it for its own gateway);
    raises :class:`BenchOptionsError` when it is missing, without showing any value."""
    secret = environ.get("FEED_JWT_SECRET", "")
    if not secret:
        raise BenchOptionsError(
            "FEED_JWT_SECRET is not set: the bench's client processes mint their tokens with it "
            "(feed bench sets it for them)"
        )
    return secret


def _flag(name: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise BenchOptionsError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {raw!r}")


def _at_least_int(low: int) -> Callable[[str, str], int]:
    """An integer; smaller values are raised to ``low`` (the documented floor of the switch)."""

    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise BenchOptionsError(f"{name} must be an integer, got {raw!r}") from None
        return max(low, value)

    return parse


def _at_least_float(low: float) -> Callable[[str, str], float]:
    """A finite number; smaller values are raised to ``low`` (the documented floor)."""

    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise BenchOptionsError(f"{name} must be a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise BenchOptionsError(f"{name} must be a finite number, got {raw!r}")
        return max(low, value)

    return parse


def _share(name: str, raw: str) -> float:
    """A share: a number above 0 and at most 1."""
    try:
        value = float(raw)
    except ValueError:
        raise BenchOptionsError(
            f"{name} must be a number above 0 and at most 1, got {raw!r}"
        ) from None
    if not 0 < value <= 1:
        raise BenchOptionsError(f"{name} must be a number above 0 and at most 1, got {raw!r}")
    return value


def _phases(name: str, raw: str) -> frozenset[str]:
    wanted = frozenset(p.strip() for p in raw.split(",") if p.strip())
    unknown = wanted - set(FANOUT_PHASES)
    if unknown:
        raise BenchOptionsError(
            f"{name}: unknown phase(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(FANOUT_PHASES)}"
        )
    if not wanted:
        raise BenchOptionsError(f"{name} must list phases; known: {', '.join(FANOUT_PHASES)}")
    return wanted


def _rates(name: str, raw: str) -> tuple[int, ...]:
    try:
        rates = tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise BenchOptionsError(f"{name} must be comma-separated integers, got {raw!r}") from None
    if not rates or any(rate <= 0 for rate in rates):
        raise BenchOptionsError(f"{name} must list rates > 0, got {raw!r}")
    return rates


def _float_rates(name: str, raw: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise BenchOptionsError(f"{name} must be comma-separated numbers, got {raw!r}") from None
    if not rates or any(not math.isfinite(rate) or rate < 1 for rate in rates):
        raise BenchOptionsError(f"{name} must list finite rates of at least 1, got {raw!r}")
    return rates


def _sides(name: str, raw: str) -> tuple[str, ...]:
    only = tuple(key for key in raw.replace(" ", "").split(",") if key)
    unknown = sorted(set(only) - set(GATEWAY_SIDES))
    if unknown:
        raise BenchOptionsError(
            f"{name}: unknown side(s) {', '.join(unknown)} (expected ours and/or peer)"
        )
    if not only:
        raise BenchOptionsError(f"{name} must list sides (expected ours and/or peer)")
    return only
