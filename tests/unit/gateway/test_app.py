"""``GET /dev/token`` mints a token for any user: a gateway serves it only on a loopback address.

A gateway asked for dev mode on any other address refuses to start, with an error naming
``FEED_DEV_MODE`` and ``FEED_GATEWAY_HOST`` (no server is needed: it stops before connecting).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from feed.settings import Secret, Settings, SettingsError
from gateway.app import create_app

ROOT = Path(__file__).resolve().parents[3]
SECRET = "exposure-test-secret-" + "q" * 40
INGEST = "exposure-ingest-token-0123456789"

LOOPBACK = ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"]
EXPOSED = ["0.0.0.0", "::", "[::]", "192.168.1.4", "10.0.0.1", "gateway.example.com", "::ffff:0:0"]


def _settings(host: str, *, dev_mode: bool = True) -> Settings:
    return Settings(
        jwt_secret=Secret(SECRET),
        ingest_token=Secret(INGEST),
        gateway_host=host,
        dev_mode=dev_mode,
    )


@pytest.mark.parametrize("host", EXPOSED)
def test_dev_mode_on_a_non_loopback_address_refuses_to_start(host: str) -> None:
    with pytest.raises(SettingsError) as settings_error:
        _settings(host).require_gateway()
    with pytest.raises(SettingsError) as app_error:
        create_app(_settings(host, dev_mode=False), dev_mode=True)
    for error in (settings_error, app_error):
        message = str(error.value)
        assert "FEED_DEV_MODE" in message and "FEED_GATEWAY_HOST" in message, message
        assert SECRET not in message


@pytest.mark.parametrize("host", LOOPBACK)
def test_dev_mode_on_loopback_is_allowed(host: str) -> None:
    _settings(host).require_gateway()
    app = create_app(_settings(host), dev_mode=True)
    assert any(getattr(route, "path", "") == "/dev/token" for route in app.routes)


@pytest.mark.parametrize("host", EXPOSED)
def test_without_dev_mode_any_address_is_fine_and_no_dev_route(host: str) -> None:
    _settings(host, dev_mode=False).require_gateway()
    app = create_app(_settings(host, dev_mode=False))
    assert not any(getattr(route, "path", "") == "/dev/token" for route in app.routes)


def test_feed_gateway_command_says_why_it_will_not_start() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FEED_")}
    env.update(
        PYTHONPATH=str(ROOT),
        FEED_JWT_SECRET=SECRET,
        FEED_INGEST_TOKEN=INGEST,
        FEED_DEV_MODE="true",
        # Not loopback, and not an address of this machine (TEST-NET-1): even a gateway that
        # failed to refuse could not listen there.
        FEED_GATEWAY_HOST="192.0.2.1",
        FEED_GATEWAY_PORT="0",
        FEED_LOG_FORMAT="json",
    )
    done = subprocess.run(
        [sys.executable, "-m", "feed.cli", "gateway"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "FEED_DEV_MODE" in done.stderr and "FEED_GATEWAY_HOST" in done.stderr, done.stderr
    assert SECRET not in done.stderr + done.stdout
