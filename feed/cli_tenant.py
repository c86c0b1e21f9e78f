"""``feed tenant``: the tenant registry's admin commands (docs/tenants.md).

``create`` and ``rotate`` print the new credentials, once, as one JSON object on stdout; nothing
else ever prints a credential (``show`` and ``list`` hold none). Exit codes: 0 done; 1 the
registry could not be reached or refused the change (the tenant exists, is unknown, kept
changing); 2 bad input (a flag out of its bounds, a name that is no tenant id, a change the
``default`` tenant does not take). Every failure is one line on stderr that names the command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec

from feed.cli import (
    DEFAULT_TIMEOUT_S,
    _cassandra_address,
    _driver_quiet,
    _fail,
    _logging,
    _positive_seconds,
    _settings,
)
from feed.settings import Settings
from feed.tenants import (
    DEFAULT,
    QUOTA_BOUNDS,
    QUOTA_NAMES,
    TENANT_ID,
    Credentials,
    DefaultTenantError,
    Quotas,
    Tenant,
    TenantError,
    check_quota,
    default_tenant,
    utcnow,
)
from schemas.errors import ValidationError

if TYPE_CHECKING:
    from feed.tenants_cassandra import CassandraTenants

__all__ = ["add_tenant_parser", "cmd_tenant"]

#: The value of a quota flag that clears the override (the setting applies again).
CLEAR = "default"


def _tenant_name(raw: str) -> str:
    if not TENANT_ID.fullmatch(raw):
        raise argparse.ArgumentTypeError(
            "must be a tenant id (1-32 lowercase letters, digits or '-', starting with a letter "
            f"or digit), got {raw[:40]!r}"
        )
    return raw


def _quota(name: str) -> Callable[[str], float | int | None]:
    kind, lo, hi = QUOTA_BOUNDS[name]
    what = "a whole number" if kind is int else "a number"

    def parse(raw: str) -> float | int | None:
        if raw == CLEAR:
            return None
        try:
            return check_quota(name, kind(raw))
        except (ValueError, ValidationError):
            # argparse names the flag: "argument --ingest-burst: must be a whole number ..."
            raise argparse.ArgumentTypeError(
                f"must be {what} from {lo:.0f} to {hi:.0f} or {CLEAR!r}, got {raw[:40]!r}"
            ) from None

    return parse


#: Each quota flag's value and help.
_QUOTA_HELP = {
    "ingest_rate": ("R", "HTTP ingest requests per second (FEED_INGEST_RATE; 0: no limit)"),
    "ingest_burst": ("B", "ingest requests at once (FEED_INGEST_BURST)"),
    "max_connections": ("N", "WebSocket connections (FEED_TENANT_MAX_CONNECTIONS; 0: no limit)"),
    "max_connections_per_user": ("N", "connections per user (FEED_MAX_CONNECTIONS_PER_USER)"),
    "timeline_max": ("N", "items per Redis timeline (FEED_TIMELINE_MAX)"),
    "fanout_rate": ("R", "fan-out records per second (FEED_TENANT_FANOUT_RATE; 0: no limit)"),
}


def add_tenant_parser(sub: Any) -> None:
    """``feed tenant ...`` on the ``feed`` parser's subcommands."""
    tenant = sub.add_parser("tenant", help="create, list, change and rotate tenants")
    tenant.set_defaults(func=cmd_tenant)
    actions = tenant.add_subparsers(dest="action", required=True)

    def command(name: str, help: str, *, quotas: bool = False, json: bool = False) -> None:
        p = actions.add_parser(name, help=help)
        if name != "list":
            p.add_argument("name", metavar="NAME", type=_tenant_name)
        if json:
            p.add_argument("--json", action="store_true", help="one JSON object on stdout")
        if name == "purge":
            p.add_argument("--yes", action="store_true", help="really delete (no undo)")
        if quotas:
            group = p.add_argument_group(
                "quotas", f"each overrides its setting for this tenant; {CLEAR!r} clears it"
            )
            for quota in QUOTA_NAMES:
                group.add_argument(
                    "--" + quota.replace("_", "-"),
                    dest=quota,
                    type=_quota(quota),
                    default=argparse.SUPPRESS,
                    metavar=_QUOTA_HELP[quota][0],
                    help=_QUOTA_HELP[quota][1],
                )
        p.add_argument(
            "--timeout",
            type=_positive_seconds,
            default=DEFAULT_TIMEOUT_S,
            help="seconds to wait for Cassandra before failing (default 5)",
        )

    command("create", "a new tenant; prints its credentials (shown once)", quotas=True)
    command("list", "every tenant", json=True)
    command("show", "a tenant's state and quotas (no credentials)", json=True)
    command("update", "change a tenant's quotas", quotas=True, json=True)
    command("rotate", "new credentials; the old ones stay valid FEED_TENANT_ROTATE_GRACE_S")
    command("disable", "refuse a tenant's ingest, records and connections")
    command("enable", "serve a disabled tenant again")
    command("purge", "delete a disabled tenant's data (--yes); its name stays taken")


def cmd_tenant(args: argparse.Namespace) -> int:
    from cassandra import DriverException, InvalidRequest
    from cassandra.cluster import NoHostAvailable

    from feed.stores import open_cassandra
    from feed.tenants_cassandra import CassandraTenants

    settings = _settings()
    _logging(settings)
    command = f"tenant {args.action}"
    address = _cassandra_address(settings)
    with _driver_quiet():
        try:
            session = open_cassandra(settings, timeout=args.timeout)
        except (NoHostAvailable, DriverException, OSError):
            return _fail(command, f"cannot reach Cassandra at {address} within {args.timeout:g} s")
        try:
            try:
                store = CassandraTenants(
                    session,
                    settings.cassandra_keyspace,
                    rotate_grace_s=settings.tenant_rotate_grace_s,
                )
            except InvalidRequest:
                table = f"{settings.cassandra_keyspace}.tenants"
                return _fail(
                    command, f"Cassandra at {address} has no table {table} (run feed migrate)"
                )
            return _run(args, settings, store)
        except DefaultTenantError as exc:
            print(f"feed {command}: {exc}", file=sys.stderr)
            return 2
        except TenantError as exc:
            return _fail(command, str(exc))
        except (NoHostAvailable, DriverException) as exc:
            return _fail(command, f"Cassandra at {address}: {exc}")
        finally:
            session.cluster.shutdown()


def _run(args: argparse.Namespace, settings: Settings, store: CassandraTenants) -> int:
    action = args.action
    changes = {name: getattr(args, name) for name in QUOTA_NAMES if hasattr(args, name)}
    if action == "create":
        quotas = Quotas(**{name: value for name, value in changes.items() if value is not None})
        credentials = Credentials.generate()
        created = store.create(args.name, credentials, quotas)
        _print_json(_credentials(created, credentials))
    elif action == "rotate":
        credentials = Credentials.generate()
        rotated = store.rotate(args.name, credentials)
        _print_json(_credentials(rotated, credentials))
    elif action == "purge":
        return _purge(args, settings, store)
    elif action in ("disable", "enable"):
        changed = store.set_state(args.name, "active" if action == "enable" else "disabled")
        _print_json({"tenant": changed.id, "state": changed.state})
    elif action == "list":
        rows = {t.id: t for t in store.load_all()}
        tenants = [_shown(DEFAULT, rows.pop(DEFAULT, None), settings)]
        tenants += [_shown(t.id, t, settings) for t in sorted(rows.values(), key=_age)]
        if args.json:
            _print_json({"tenants": tenants})
        else:
            print(f"{'TENANT':<34}{'STATE':<10}{'OVERRIDES':<40}GRACE UNTIL")
            for t in tenants:
                overrides = ",".join(t["overrides"]) or "-"
                print(f"{t['tenant']:<34}{t['state']:<10}{overrides:<40}{t['grace_until'] or '-'}")
    else:  # show, update
        if action == "update" and changes:
            tenant: Tenant | None = store.update_quotas(args.name, changes)
        else:
            tenant = store.get(args.name)
            if tenant is None and args.name != DEFAULT:
                raise TenantError(f"no tenant {args.name!r} (feed tenant create makes one)")
        shown = _shown(args.name, tenant, settings)
        if args.json or action == "update":
            _print_json(shown)
        else:
            for key in ("tenant", "state", "created", "updated", "grace_until"):
                print(f"{key}: {shown[key] if shown[key] is not None else '-'}")
            for name, value in shown["quotas"].items():
                source = "override" if name in shown["overrides"] else "setting"
                print(f"{name}: {value:g} ({source})")
    return 0


def _purge(args: argparse.Namespace, settings: Settings, store: CassandraTenants) -> int:
    """Delete a disabled tenant's Redis keys and Cassandra partitions; print what went. Refused
    (2) without ``--yes``, for ``default`` or an enabled tenant; (1) until every process has
    seen the disable (twice ``FEED_TENANT_REFRESH_S`` after it)."""
    from feed import redis_connect
    from feed.tenant_purge import purge_cassandra, purge_redis

    command = "tenant purge"
    if args.name == DEFAULT:
        raise DefaultTenantError("the default tenant is never purged")
    tenant = store.get(args.name)
    if tenant is None:
        raise TenantError(f"no tenant {args.name!r}")
    if tenant.enabled:
        print(f"feed {command}: disable {args.name!r} first (feed tenant disable)", file=sys.stderr)
        return 2
    settled = tenant.updated + timedelta(seconds=2 * settings.tenant_refresh_s)
    if utcnow() < settled:
        # every worker and gateway must know it is disabled first, or one could write its data
        # again behind the purge (a record in flight, a live socket)
        wait = (settled - utcnow()).total_seconds()
        return _fail(command, f"{args.name!r} was disabled a moment ago: retry in {wait:.0f} s")
    if not args.yes:
        print(
            f"feed {command}: this deletes {args.name!r}'s data for good: add --yes",
            file=sys.stderr,
        )
        return 2
    client = redis_connect.sync_client(settings, socket_timeout=30)
    try:
        redis_keys = purge_redis(client, args.name)
    finally:
        client.close()
    partitions = purge_cassandra(store.session, settings.cassandra_keyspace, args.name)
    # The row stays, disabled: the name is never served again with another's leftovers (a
    # record of the old tenant still in a topic, a socket of a process that missed the change).
    _print_json({"tenant": args.name, "redis_keys": redis_keys, "cassandra_partitions": partitions})
    return 0


def _age(tenant: Tenant) -> tuple[datetime, str]:
    return (tenant.created, tenant.id)


def _credentials(tenant: Tenant, credentials: Credentials) -> dict[str, str]:
    return {
        "tenant": tenant.id,
        "ingest_token": credentials.ingest_token,
        "jwt_secret": credentials.jwt_secret,
    }


def _shown(tid: str, row: Tenant | None, settings: Settings) -> dict[str, Any]:
    """What ``show`` prints: state, times, effective quotas, which are overrides, and when the
    last replaced credentials expire. Never a credential or its hash."""
    tenant = default_tenant(settings, row) if tid == DEFAULT else row
    assert tenant is not None
    limits = tenant.quotas.effective(settings)
    return {
        "tenant": tid,
        "state": tenant.state,
        "created": _time(row.created) if row is not None else None,
        "updated": _time(row.updated) if row is not None else None,
        "quotas": {name: getattr(limits, name) for name in QUOTA_NAMES},
        "overrides": tenant.quotas.overrides(),
        "grace_until": _time(tenant.grace_until(utcnow())),
    }


def _time(at: datetime | None) -> str | None:
    """RFC 3339 in UTC, to the millisecond: ``2026-11-22T10:00:00.000Z``."""
    if at is None:
        return None
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _print_json(value: object) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
