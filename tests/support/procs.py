"""Running the project's own processes (``feed fanout``, ``feed gateway``) in tests.

Each process gets its own log file; ``stop()`` sends SIGTERM and waits, then SIGKILL; ``kill()``
is ``kill -9``. Readiness is waited for with deadlines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from infra.servers import free_port

__all__ = [
    "FeedProcess",
    "feed_cli",
    "free_port",
    "http_get",
    "json_log_records",
    "metric_value",
    "stop_process",
]


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM to a server started by a test, then SIGKILL if it has not exited in ``timeout``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def http_get(
    url: str, *, headers: dict[str, str] | None = None, timeout: float = 2.0
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:  # the error holds the response and its socket
            return exc.code, exc.read()
    except OSError:
        return 0, b""


def metric_value(text: str, name: str) -> float:
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M):
        total += float(match.group(1))
    return total


class FeedProcess:
    """``python -m feed.cli <command>`` with the given environment."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.command = command
        self.env = {**os.environ, **env}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FeedProcess:
        handle = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "feed.cli", *self.command],
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_http(self, url: str, *, timeout: float, status: int = 200) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.command} exited; log:\n{self.log_tail()}")
            if http_get(url, timeout=1)[0] == status:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{url} not {status} after {timeout}s; log:\n{self.log_tail()}")


def json_log_records(path: Path) -> list[dict[str, Any]]:
    """Every line of a process's output file, each of which must be one JSON object with an
    ``event`` (the contract's logs when not on a terminal); fails the test on any other line."""
    lines = path.read_text(errors="replace").splitlines()
    assert lines, f"{path} is empty"
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not one JSON object: {line!r}\nlog:\n" + "\n".join(lines[:60]))
        assert isinstance(record, dict) and "event" in record, line
        records.append(record)
    return records


def feed_cli(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m feed.cli <args>`` as an operator runs it, with ``env`` over this process's:
    its exit code, stdout and stderr (text)."""
    return subprocess.run(
        [sys.executable, "-m", "feed.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
