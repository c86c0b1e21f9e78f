"""Child processes of the bench: started, watched and stopped by pid.

Every process the bench starts (workers, the gateway, the peer's interpreter, redis-benchmark) is
registered in a :class:`Children` set, in its own session (so a Ctrl-C in the terminal reaches the
bench, not the children directly), and stopped by pid when the bench ends, whatever way it ends:
SIGTERM, then SIGKILL after a grace period.

Also here: reading a Prometheus ``/metrics`` page, and a process's resident memory
(``psutil`` when installed, else ``/proc/<pid>/status``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from infra.servers import free_port

__all__ = [
    "Children",
    "cpu_seconds",
    "free_port",
    "histogram_buckets",
    "metric_sum",
    "read_metrics",
    "rss_bytes",
    "wait_http",
]


class Children:
    """The processes this bench started; :meth:`stop_all` stops each by its pid."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str],
        log: Path,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with ``env``; stderr (and stdout, unless given) go to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = log.open("ab")
        try:
            proc = subprocess.Popen(
                list(argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=handle if stdout is None else stdout,
                stderr=handle,
                start_new_session=True,
            )
        finally:
            handle.close()
        with self._lock:
            self._procs.append(proc)
        return proc

    def feed(
        self, command: Sequence[str], *, env: dict[str, str], log: Path
    ) -> subprocess.Popen[bytes]:
        """``python -m feed.cli <command>`` with ``env``."""
        return self.spawn([sys.executable, "-m", "feed.cli", *command], env=env, log=log)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int | None:
        """SIGTERM to the pid, wait up to ``timeout``, then SIGKILL."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        with self._lock:
            if proc in self._procs:
                self._procs.remove(proc)
        return proc.returncode

    def stop_all(self, timeout: float = 20.0) -> None:
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        with self._lock:
            self._procs.clear()


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Poll ``url`` until it answers 200 (False after ``timeout`` or when ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    return False


def read_metrics(url: str, timeout: float = 2.0) -> str | None:
    """The text of a Prometheus page, or None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode())
    except (OSError, urllib.error.URLError):
        return None


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([-+0-9.eEinfNa]+)$", re.M)


def metric_sum(text: str | None, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of every sample of ``name`` (optionally only those carrying ``labels``)."""
    if not text:
        return 0.0
    total = 0.0
    for match in _SAMPLE.finditer(text):
        if match.group(1) != name:
            continue
        if labels:
            label_text = match.group(2) or ""
            if not all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                continue
        try:
            total += float(match.group(3))
        except ValueError:
            continue
    return total


def histogram_buckets(
    text: str | None, name: str, labels: dict[str, str] | None = None
) -> list[tuple[float, float]]:
    """Cumulative ``(le, count)`` pairs of a histogram, summed over its label sets (only those
    carrying ``labels``, when given)."""
    if not text:
        return []
    buckets: dict[float, float] = {}
    for match in _SAMPLE.finditer(text):
        if match.group(1) != f"{name}_bucket":
            continue
        label_text = match.group(2) or ""
        if labels and not all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            continue
        le = re.search(r'le="([^"]+)"', label_text)
        if not le:
            continue
        bound = float("inf") if le.group(1) == "+Inf" else float(le.group(1))
        buckets[bound] = buckets.get(bound, 0.0) + float(match.group(3))
    return sorted(buckets.items())


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` (psutil if installed, else /proc), or None if it is gone."""
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) * 1024 if match else None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by ``pid`` (psutil, else /proc), or None."""
    try:
        import psutil

        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    except ImportError:
        pass
    except Exception:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
