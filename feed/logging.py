"""structlog set-up: JSON lines when not on a terminal, readable console output otherwise.

Configure once per process with :func:`configure`. Bind per-request/connection/record context with
``structlog.contextvars.bind_contextvars`` (``user_id``, ``conn_id``, ``activity_id``,
``partition``, ``offset``). Secrets never reach a log: settings wrap them in ``Secret`` and the
``_redact`` processor masks any field whose name looks secret.

Guarantee (CONTRACT.md, "Tracing and observability"): with JSON output, every line the process
writes to stderr through logging is one JSON object, third-party libraries' lines included.
stdlib ``logging`` records (uvicorn, the Cassandra driver, asyncio, ...) go through
``structlog.stdlib.ProcessorFormatter`` with the same processors and renderer as structlog's own
events: the message is ``event``, the logger's name ``logger``, and a traceback is one string
field (``exception``), never lines of its own. Python warnings, uncaught exceptions (in the main
thread or any other) and "Exception ignored" reports, which Python prints as plain text, are
logged as records too.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import TracebackType
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
    """Route structlog and stdlib logging to stderr, both as JSON lines or both as console
    lines. stdlib records below WARNING are dropped unless ``level`` asks for them (libraries
    are chatty at INFO)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    from feed.tracing import ids_processor  # feed.tracing logs through this module

    numeric = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        ids_processor,  # trace_id, span_id inside a sampled span (a flag check when not tracing)
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line (PrintLogger writes the newline separately, so lines from the
        # driver's threads could be glued onto ours).
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)  # one write per record: message + newline
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(),
                *shared,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger
    if use_json:
        _log_uncaught()


def _log_uncaught() -> None:
    """Uncaught exceptions and "Exception ignored" reports as log records (Python prints them
    as plain text otherwise)."""
    log = logging.getLogger("uncaught")

    def excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, exc, tb)
            return
        log.critical("uncaught_exception", exc_info=(kind, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return  # as threading's own hook: a thread's SystemExit is silent
        thread = args.thread.name if args.thread is not None else "?"
        exc = args.exc_value if args.exc_value is not None else args.exc_type()
        log.error(
            "uncaught_exception_in_thread",
            extra={"thread_name": thread},
            exc_info=(args.exc_type, exc, args.exc_traceback),
        )

    def unraisablehook(args: Any) -> None:
        message = args.err_msg or "Exception ignored in"
        where = "" if args.object is None else f": {args.object!r}"[:300]
        exc_info = None
        if args.exc_type is not None:
            exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
        log.error("unraisable_exception", extra={"detail": f"{message}{where}"}, exc_info=exc_info)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    sys.unraisablehook = unraisablehook


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
