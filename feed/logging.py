"""structlog set-up: JSON lines when not on a terminal, readable console output otherwise.

Configure once per process with :func:`configure`. Bind per-request/connection/record context with
``structlog.contextvars.bind_contextvars`` (``user_id``, ``conn_id``, ``activity_id``,
``partition``, ``offset``). Secrets never reach a log: settings wrap them in ``Secret`` and the
``_redact`` processor masks any field whose name looks secret.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure", "get_logger"]

_SECRET_WORDS = ("token", "secret", "password", "authorization", "jwt")


def _redact(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in list(event):
        if any(word in key.lower() for word in _SECRET_WORDS):
            event[key] = "**********"
    return event


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Route structlog (and stdlib logging) to stderr, as JSON or console lines."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line (PrintLogger writes the newline separately, so lines from the
        # driver's threads could be glued onto ours).
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, force=True)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
