"""The Python peers, run beside the project in the same bench (host side).

Stream-Framework 1.4.0 gets its OWN virtualenv in the bench work folder (``python -m venv``, then
``pip install stream-framework==1.4.0 redis==2.10.6 celery==5.4.0``: PEERS.md), reused by later runs
while its marker file names the same pins. :mod:`bench.peer_stream_framework` runs inside it
as a subprocess, on the same graph (handed over as a JSON file) and the same Redis (another db).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.processes import Children

__all__ = ["PEER_PINS", "PeerError", "ensure_stream_framework_venv", "run_stream_framework"]

PEER_PINS = ("stream-framework==1.4.0", "redis==2.10.6", "celery==5.4.0")
_SCRIPT = Path(__file__).with_name("peer_stream_framework.py")


class PeerError(RuntimeError):
    """The peer could not be installed or run (the bench records it and goes on)."""


def ensure_stream_framework_venv(
    children: Children, workdir: Path, *, timeout: float = 600.0, env: Mapping[str, str]
) -> Path:
    """The peer venv's python, creating the venv and installing the pins if needed.

    The installer's processes are the bench's children: stopped by pid if the bench stops. They
    run in ``env``: the caller's environment without the project's virtualenv markers
    (:meth:`bench.options.BenchOptions.install_env`).
    """
    venv = workdir / "peer-stream-framework"
    python = venv / "bin" / "python"
    marker = venv / ".bench-installed"
    wanted = "\n".join(PEER_PINS)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    log = workdir / "peer-stream-framework-install.log"
    workdir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    log.write_text("")
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        # Never Django in this venv: its settings module switches to Django when importable.
        [str(python), "-m", "pip", "install", "--no-input", *PEER_PINS],
    ]
    for argv in steps:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PeerError(f"peer install timed out after {timeout}s (see {log})")
        proc = children.spawn(argv, env=dict(env), log=log)
        try:
            proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            children.stop(proc, timeout=5)
            raise PeerError(f"peer install timed out after {timeout}s (see {log})") from None
        children.stop(proc, timeout=5)
        if proc.returncode != 0:
            raise PeerError(
                f"`{' '.join(argv[-4:])}` failed ({proc.returncode}): {_tail(log, 300)}"
            )
    marker.write_text(wanted)
    return python


def run_stream_framework(
    children: Children,
    python: Path,
    *,
    graph_file: Path,
    activities: int,
    redis_port: int,
    redis_db: int,
    log: Path,
    timeout: float,
    env: Mapping[str, str],
) -> dict[str, Any]:
    """Run the peer script in its venv (in ``env``, as the install); returns its JSON result."""
    argv = [
        str(python),
        str(_SCRIPT),
        "--graph",
        str(graph_file),
        "--activities",
        str(activities),
        "--redis-host",
        "127.0.0.1",
        "--redis-port",
        str(redis_port),
        "--redis-db",
        str(redis_db),
        "--max-seconds",
        str(max(5.0, timeout - 30)),
    ]
    out = log.with_suffix(".json")
    with out.open("wb") as stdout:
        proc = children.spawn(argv, env=dict(env), log=log, stdout=stdout.fileno())
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            children.stop(proc, timeout=5)
            raise PeerError(f"peer run timed out after {timeout}s (see {log})") from None
        finally:
            children.stop(proc, timeout=5)
    if proc.returncode != 0:
        raise PeerError(f"peer run failed ({proc.returncode}): {_tail(log)}")
    lines = [line for line in out.read_text().splitlines() if line.strip()]
    if not lines:
        raise PeerError(f"peer printed nothing: {_tail(log)}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _tail(path: Path, chars: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"
