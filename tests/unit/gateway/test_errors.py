"""gateway/errors.py: the product's exceptions share one base, and one mapping turns each into
the HTTP response or the WebSocket close code the client gets (no server needed)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import redis.exceptions
from starlette.exceptions import HTTPException

from feed.cursor import CursorError
from feed.kafka import KafkaUnavailable
from feed.settings import Secret, Settings
from gateway import closecodes
from gateway.app import create_app
from gateway.auth import AuthError
from gateway.errors import (
    HANDLED,
    ConnectRejected,
    GatewayError,
    close_for,
    error_response,
    http_error,
)
from gateway.hub import HubUnavailable, TooManyConnections
from schemas import ValidationError
from schemas.errors import FeedError

#: Exceptions of the product that are not errors (control flow inside one module).
NOT_ERRORS = {"fanout.worker._Stopping"}
PACKAGES = ("schemas", "feed", "fanout", "gateway")


def _product_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names = [package_name]
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package_name + ".")]
        for name in names:
            module = importlib.import_module(name)
            for value in vars(module).values():
                if (
                    inspect.isclass(value)
                    and issubclass(value, BaseException)
                    and value.__module__ == name
                ):
                    found[f"{name}.{value.__qualname__}"] = value
    return found


def test_every_exception_of_the_product_derives_from_one_base() -> None:
    found = _product_exceptions()
    assert "gateway.errors.GatewayError" in found and "feed.cursor.CursorError" in found
    errors = {name: cls for name, cls in found.items() if name not in NOT_ERRORS}
    strays = [name for name, cls in errors.items() if not issubclass(cls, FeedError)]
    assert not strays, strays


def test_subclasses_keep_the_builtin_base_callers_catch() -> None:
    assert issubclass(ValidationError, ValueError) and issubclass(CursorError, ValueError)
    assert issubclass(KafkaUnavailable, RuntimeError) and issubclass(HubUnavailable, RuntimeError)


@pytest.mark.parametrize(
    ("exc", "status", "code", "field"),
    [
        (GatewayError(429, "throttled", "slow down", field="x"), 429, "throttled", "x"),
        (ValidationError("to[3]", "too_long", "at most 128"), 400, "too_long", "to[3]"),
        (CursorError("malformed"), 400, "invalid_cursor", "cursor"),
        (AuthError("expired", "token expired"), 401, "unauthorized", ""),
        (KafkaUnavailable("timed out"), 503, "kafka_unavailable", ""),
        (redis.exceptions.ConnectionError("refused"), 503, "unavailable", ""),
        (redis.exceptions.TimeoutError("slow"), 503, "unavailable", ""),
        (redis.exceptions.ReadOnlyError("replica"), 503, "unavailable", ""),
        (HTTPException(405), 405, "method_not_allowed", ""),
        (HTTPException(418), 418, "http_error", ""),
        (RuntimeError("a bug"), 500, "internal", ""),
        (redis.exceptions.ResponseError("WRONGTYPE"), 500, "internal", ""),
    ],
)
def test_http_error_maps_each_exception(exc: Exception, status: int, code: str, field: str) -> None:
    error = http_error(exc)
    assert (error.status, error.code, error.field) == (status, code, field)
    if status == 401:
        assert error.headers == {"WWW-Authenticate": "Bearer"}
    if status == 503:
        assert error.headers["Retry-After"]
    if status == 500:
        assert error.message == "internal server error"  # nothing of the exception leaks


@pytest.mark.parametrize(
    ("exc", "close"),
    [
        (AuthError("expired", "token expired"), closecodes.UNAUTHORIZED),
        (TooManyConnections("u1", 20), closecodes.RATE_LIMITED),
        (HubUnavailable("no confirm"), closecodes.TRY_AGAIN_LATER),
        (redis.exceptions.ConnectionError("refused"), closecodes.TRY_AGAIN_LATER),
        (OSError("reset"), closecodes.TRY_AGAIN_LATER),
        (ConnectRejected(closecodes.FORBIDDEN, "origin not allowed"), closecodes.FORBIDDEN),
    ],
)
def test_close_for_maps_each_exception_to_an_entry_of_the_table(
    exc: Exception, close: closecodes.CloseCode
) -> None:
    decided = close_for(exc)
    assert decided is not None
    entry, reason = decided
    assert entry is close and entry in closecodes.TABLE
    assert reason and len(reason.encode()) <= 123


def test_close_for_names_the_limit_of_too_many_connections() -> None:
    decided = close_for(TooManyConnections("u1", 7))
    assert decided is not None and "at most 7 per user" in decided[1]


def test_close_for_leaves_a_bug_to_propagate() -> None:
    assert close_for(RuntimeError("a bug")) is None
    assert close_for(ValueError("a bug")) is None


def test_create_app_registers_the_base_once_and_one_handler() -> None:
    settings = Settings(jwt_secret=Secret("errors-test-secret-" + "e" * 40))
    app = create_app(settings)
    handlers = app.exception_handlers
    assert set(handlers) == set(HANDLED)
    assert FeedError in handlers and ValidationError not in handlers and AuthError not in handlers
    assert set(handlers.values()) == {error_response}
