"""Log output as the contract has it: with JSON logs, every line a process writes to stderr is
one JSON object, third-party libraries' lines (stdlib ``logging``), tracebacks, warnings and
uncaught exceptions included. Each case runs in a fresh interpreter (``configure`` changes
process-wide state), with stderr a pipe, not a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]


def _run(code: str) -> tuple[list[dict[str, Any]], str]:
    script = "from feed.logging import configure\nconfigure('info', 'json')\n"
    proc = subprocess.run(
        [sys.executable, "-c", script + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    output = proc.stdout + proc.stderr
    records = []
    for line in output.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\nwhole output:\n{output}") from None
        assert isinstance(record, dict), line
        records.append(record)
    return records, output


def test_a_third_party_logger_with_a_traceback_is_one_json_line() -> None:
    records, output = _run(
        """
        import logging
        try:
            {}["missing"]
        except KeyError:
            logging.getLogger("some.library").exception("it failed:\\nsecond line")
        logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
        logging.getLogger("chatty").info("dropped below WARNING")
        """
    )
    by_logger = {r.get("logger"): r for r in records}
    failed = by_logger["some.library"]
    assert failed["event"] == "it failed:\nsecond line"
    assert failed["level"] == "error"
    assert "KeyError: 'missing'" in failed["exception"]
    assert "Traceback" in failed["exception"]
    assert by_logger["uvicorn.error"]["level"] == "warning"
    assert "timestamp" in failed
    assert "chatty" not in by_logger, output


def test_warnings_and_uncaught_exceptions_are_json_lines() -> None:
    records, output = _run(
        """
        import threading, warnings

        warnings.warn("old API", DeprecationWarning, stacklevel=1)
        warnings.warn("careful", UserWarning, stacklevel=1)

        def boom() -> None:
            raise ValueError("in a thread")

        thread = threading.Thread(target=boom, name="worker-1")
        thread.start()
        thread.join()

        class Bad:
            def __del__(self) -> None:
                raise RuntimeError("in __del__")

        Bad()
        raise SystemError("uncaught in main")
        """
    )
    text = json.dumps(records)
    assert "careful" in text  # a UserWarning through logging ("py.warnings")
    assert "ValueError: in a thread" in text and "worker-1" in text
    assert "RuntimeError: in __del__" in text
    main = [r for r in records if r.get("event") == "uncaught_exception"]
    assert main and "SystemError: uncaught in main" in main[0]["exception"], output


def test_structlog_events_and_stdlib_records_share_the_context() -> None:
    records, _ = _run(
        """
        import logging
        import structlog

        structlog.contextvars.bind_contextvars(conn_id="c-1")
        structlog.get_logger("ours").warning("ours", token="abc")
        logging.getLogger("theirs").warning("theirs")
        """
    )
    ours, theirs = records
    assert ours["conn_id"] == theirs["conn_id"] == "c-1"
    assert ours["token"] == "**********"
    assert theirs["logger"] == "theirs" and theirs["event"] == "theirs"


def test_every_event_name_of_the_product_is_a_snake_case_identifier() -> None:
    """Operators filter and alert on ``event``: it is a stable identifier, never prose (the
    details go in fields)."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    levels = {"debug", "info", "warning", "error", "exception", "critical"}
    found = []
    for package in ("feed", "fanout", "gateway", "schemas"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in levels
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in ("log", "logger")
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                ):
                    continue
                event = node.args[0].value
                if not re.fullmatch(r"[a-z][a-z0-9_]*", event):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {event!r}")
            assert path.suffix == ".py"
    assert found == [], "\n".join(found)
