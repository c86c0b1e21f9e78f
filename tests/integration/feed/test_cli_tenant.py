"""``feed tenant`` as an operator runs it (a subprocess) against the test session's Cassandra:
the JSON each command prints, credentials shown once and long enough, never a secret elsewhere,
and the exit codes of refused input."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from feed.tenants import QUOTA_NAMES, ingest_sha256
from tests.conftest import TEST_INGEST_TOKEN, TEST_JWT_SECRET
from tests.support.procs import feed_cli

SHOW_KEYS = {"tenant", "state", "created", "updated", "quotas", "overrides", "grace_until"}


def _feed(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = feed_cli(env, "tenant", *args)
    return result.returncode, result.stdout, result.stderr


def _json(env: dict[str, str], *args: str) -> Any:
    code, stdout, stderr = _feed(env, *args)
    assert code == 0, (code, stderr[-2000:])
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout  # exactly one JSON object
    return json.loads(lines[0])


def _no_secret(text: str, *credentials: dict[str, str]) -> None:
    for creds in credentials:
        token, secret = creds["ingest_token"], creds["jwt_secret"]
        assert token not in text and secret not in text
        assert ingest_sha256(token).hex() not in text
    assert TEST_JWT_SECRET not in text and TEST_INGEST_TOKEN not in text


def test_create_show_update_rotate_disable_enable_list(
    stack_env: dict[str, str], settings: Any, ids: Callable[[str], str]
) -> None:
    tid = ids("acme")
    created = _json(stack_env, "create", tid, "--ingest-rate", "2.5", "--max-connections", "3")
    assert set(created) == {"tenant", "ingest_token", "jwt_secret"} and created["tenant"] == tid
    assert len(created["jwt_secret"].encode()) >= 32 and len(created["ingest_token"]) >= 32

    shown = _json(stack_env, "show", tid, "--json")
    assert set(shown) == SHOW_KEYS
    assert shown["tenant"] == tid and shown["state"] == "active"
    assert shown["created"].endswith("Z") and shown["grace_until"] is None
    assert list(shown["quotas"]) == list(QUOTA_NAMES)
    assert shown["quotas"] == {
        "ingest_rate": 2.5,
        "ingest_burst": settings.ingest_burst,
        "max_connections": 3,
        "max_connections_per_user": settings.max_connections_per_user,
        "timeline_max": settings.timeline_max,
        "fanout_rate": settings.tenant_fanout_rate,
    }
    assert shown["overrides"] == ["ingest_rate", "max_connections"]

    updated = _json(stack_env, "update", tid, "--ingest-rate", "default", "--timeline-max", "5")
    assert set(updated) == SHOW_KEYS and updated["overrides"] == ["max_connections", "timeline_max"]
    assert updated["quotas"]["ingest_rate"] == settings.ingest_rate
    assert updated["quotas"]["timeline_max"] == 5

    rotated = _json(stack_env, "rotate", tid)
    assert set(rotated) == {"tenant", "ingest_token", "jwt_secret"}
    assert rotated["jwt_secret"] != created["jwt_secret"]
    assert rotated["ingest_token"] != created["ingest_token"]
    assert _json(stack_env, "show", tid, "--json")["grace_until"] is not None

    assert _json(stack_env, "disable", tid) == {"tenant": tid, "state": "disabled"}
    assert _json(stack_env, "show", tid, "--json")["state"] == "disabled"
    assert _json(stack_env, "enable", tid) == {"tenant": tid, "state": "active"}

    listed = _json(stack_env, "list", "--json")
    assert set(listed) == {"tenants"}
    assert listed["tenants"][0]["tenant"] == "default"
    mine = [t for t in listed["tenants"] if t["tenant"] == tid]
    assert len(mine) == 1 and set(mine[0]) == SHOW_KEYS

    # only create and rotate ever print a credential
    for args in (("show", tid), ("show", tid, "--json"), ("list",), ("list", "--json")):
        code, stdout, stderr = _feed(stack_env, *args)
        assert code == 0, stderr
        _no_secret(stdout + stderr, created, rotated)
    assert f"{tid}" in _feed(stack_env, "list")[1]


def test_a_duplicate_create_fails_and_prints_no_credentials(
    stack_env: dict[str, str], ids: Callable[[str], str]
) -> None:
    tid = ids("acme")
    first = _json(stack_env, "create", tid)
    code, stdout, stderr = _feed(stack_env, "create", tid)
    assert code == 1 and stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"feed tenant create: tenant '{tid}' exists")
    _no_secret(stderr, first)


def test_unknown_tenants_and_the_default_tenant(
    stack_env: dict[str, str], ids: Callable[[str], str]
) -> None:
    nobody = ids("nobody")
    for action in ("show", "rotate", "disable", "update"):
        args = [action, nobody] + (["--timeline-max", "5"] if action == "update" else [])
        code, stdout, stderr = _feed(stack_env, *args)
        assert code == 1 and stdout == "", (action, code, stderr)
        assert stderr.startswith(f"feed tenant {action}: no tenant '{nobody}'"), stderr
    for action in ("create", "rotate", "disable", "enable"):
        code, stdout, stderr = _feed(stack_env, action, "default")
        assert code == 2 and stdout == "", (action, code, stderr)
        assert "the default tenant cannot be" in stderr and len(stderr.splitlines()) == 1
    shown = _json(stack_env, "show", "default", "--json")
    assert shown["tenant"] == "default" and shown["state"] == "active"


@pytest.mark.parametrize(
    ("args", "flag", "limit"),
    [
        (["create", "x", "--ingest-rate", "-1"], "--ingest-rate", "from 0 to 1000000"),
        (["create", "x", "--ingest-burst", "0"], "--ingest-burst", "from 1 to 1000000"),
        (["update", "x", "--max-connections", "many"], "--max-connections", "from 0 to"),
        (["update", "x", "--timeline-max", "100001"], "--timeline-max", "from 1 to 100000"),
        (["create", "x", "--max-connections-per-user", "0"], "--max-connections-per-user", "1"),
        (["create", "x", "--fanout-rate", "nan"], "--fanout-rate", "from 0 to 1000000"),
        (["create", "Acme"], "NAME", "1-32 lowercase letters"),
        (["create", "acme\n"], "NAME", "1-32 lowercase letters"),
        (["show", "--", "-acme"], "NAME", "1-32 lowercase letters"),
    ],
)
def test_bad_values_exit_2_naming_the_flag_and_the_limit(
    args: list[str], flag: str, limit: str
) -> None:
    # refused before anything is reached: no Cassandra in this environment
    code, stdout, stderr = _feed({"FEED_CASSANDRA_PORT": "1"}, *args)
    assert code == 2 and stdout == "", (code, stderr)
    assert f"argument {flag}: must be" in stderr and limit in stderr, stderr
    assert "Traceback" not in stderr
