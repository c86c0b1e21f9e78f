"""Every ``feed`` command that cannot reach what it needs fails fast and says so in one line.

Each command runs as a subprocess, as an operator runs it, against a closed port (a free port
that nothing listens on): exit code 1 within its time bound, exactly one line on stderr naming
the command and what it could not reach, no traceback, no client library log lines, no secret.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import TEST_INGEST_TOKEN, TEST_JWT_SECRET
from tests.support.procs import free_port

#: Python start-up and imports on a loaded 2-core machine, on top of a command's own bound.
STARTUP_S = 4.0
DEFAULT_TIMEOUT_S = 5.0  # feed.cli.DEFAULT_TIMEOUT_S, the documented default


def _closed_env(**extra: str) -> tuple[dict[str, str], int]:
    port = free_port()  # bound and released: nothing listens on it
    env = {
        **os.environ,
        "FEED_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
        "FEED_CASSANDRA_HOSTS": "127.0.0.1",
        "FEED_CASSANDRA_PORT": str(port),
        "FEED_REDIS_URL": f"redis://:{TEST_INGEST_TOKEN}@127.0.0.1:{port}/0",
        "FEED_JWT_SECRET": TEST_JWT_SECRET,
        "FEED_INGEST_TOKEN": TEST_INGEST_TOKEN,
        "FEED_WORKER_METRICS_PORT": str(free_port()),
        "FEED_LOG_FORMAT": "json",
        **extra,
    }
    return env, port


def _run(args: list[str], env: dict[str, str]) -> tuple[int, str, str, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "feed.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout, result.stderr, time.monotonic() - started


def _assert_one_line(stderr: str, prefix: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[:3000]}"
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in stderr and "rdkafka" not in stderr
    assert TEST_JWT_SECRET not in stderr and TEST_INGEST_TOKEN not in stderr


KAFKA_COMMANDS = [
    (["lag", "--json"], "lag"),
    (["lag"], "lag"),
    (["lag", "--watch"], "lag"),
    (["dlq", "list", "--json"], "dlq list"),
    (["dlq", "list"], "dlq list"),
    (["dlq", "replay"], "dlq replay"),
]


@pytest.mark.parametrize(
    ("args", "command"), KAFKA_COMMANDS, ids=[" ".join(args) for args, _ in KAFKA_COMMANDS]
)
def test_kafka_commands_fail_within_their_timeout_in_one_line(
    args: list[str], command: str
) -> None:
    env, port = _closed_env()
    code, stdout, stderr, elapsed = _run(args, env)
    assert code == 1, (code, stderr[-2000:])
    assert elapsed < DEFAULT_TIMEOUT_S + STARTUP_S, elapsed
    _assert_one_line(stderr, f"feed {command}: cannot reach Kafka at 127.0.0.1:{port} within 5 s")
    assert stdout == ""


def test_timeout_flag_bounds_the_wait() -> None:
    env, port = _closed_env()
    code, _stdout, stderr, elapsed = _run(["dlq", "list", "--timeout", "1.5"], env)
    assert code == 1 and elapsed < 1.5 + STARTUP_S, (code, elapsed)
    _assert_one_line(stderr, f"feed dlq list: cannot reach Kafka at 127.0.0.1:{port} within 1.5 s")
    code, _stdout, stderr, _elapsed = _run(["lag", "--timeout", "0"], env)
    assert code == 2 and "--timeout: must be more than 0" in stderr


def test_migrate_fails_after_its_wait_naming_kafka() -> None:
    env, port = _closed_env()
    code, stdout, stderr, elapsed = _run(["migrate", "--wait", "2"], env)
    assert code == 1 and elapsed < 2 + 5 + STARTUP_S, (code, elapsed)  # + one attempt's 5 s
    _assert_one_line(stderr, f"feed migrate: cannot reach Kafka at 127.0.0.1:{port} within ")
    assert stdout == ""


def test_fanout_fails_at_once_naming_cassandra() -> None:
    env, port = _closed_env()
    code, _stdout, stderr, elapsed = _run(["fanout"], env)
    assert code == 1 and elapsed < 10 + STARTUP_S, (code, elapsed)
    _assert_one_line(stderr, f"feed fanout: cannot reach Cassandra at 127.0.0.1:{port}")


def test_migrate_with_kafka_up_fails_naming_cassandra(stack_env: dict[str, str]) -> None:
    env, port = _closed_env(FEED_KAFKA_BOOTSTRAP=stack_env["FEED_KAFKA_BOOTSTRAP"])
    code, _stdout, stderr, elapsed = _run(["migrate", "--wait", "2"], env)
    assert code == 1 and elapsed < 2 + 5 + STARTUP_S, (code, elapsed)
    _assert_one_line(stderr, f"feed migrate: cannot reach Cassandra at 127.0.0.1:{port} within ")


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["lag", "--lag-threshold", "0"], "--lag-threshold"),
        (["lag", "--watch", "--interval", "-1"], "--interval"),
        (["lag", "--max-replicas", "0"], "--max-replicas"),
        (["dlq", "list", "--limit", "0"], "--limit"),
    ],
    ids=["lag-threshold", "interval", "max-replicas", "limit"],
)
def test_bad_flags_are_refused_before_anything_is_reached(args: list[str], flag: str) -> None:
    """Refused by the parser, exit code 2, naming the flag (a zero lag threshold used to
    raise from the replica computation, a negative interval from the sleep)."""
    env, _port = _closed_env()
    code, _stdout, stderr, elapsed = _run(args, env)
    assert code == 2 and elapsed < STARTUP_S, (code, elapsed, stderr)
    assert f"argument {flag}: must be" in stderr and "Traceback" not in stderr


def test_tenant_commands_fail_within_their_timeout_naming_cassandra() -> None:
    env, port = _closed_env()
    code, stdout, stderr, elapsed = _run(["tenant", "list", "--timeout", "1"], env)
    assert code == 1 and elapsed < 1 + STARTUP_S, (code, elapsed)
    _assert_one_line(
        stderr, f"feed tenant list: cannot reach Cassandra at 127.0.0.1:{port} within 1 s"
    )
    assert stdout == ""
