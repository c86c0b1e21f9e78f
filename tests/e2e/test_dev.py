"""``feed dev``, as a newcomer runs it (``make run``), here on a Redis Cluster: the whole stack
starts, the demo traffic flows, and alice's socket receives activities."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets

from tests.support.pipeline import frames_until, next_frame
from tests.support.procs import stop_process

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


async def _first_activity(url: str, token: str) -> dict[str, object]:
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        welcome = await next_frame(ws, 10)
        assert welcome["type"] == "welcome" and welcome["user"] == "alice"
        frames = await frames_until(ws, lambda f: f.get("type") == "activity", timeout=30)
        return frames[-1]


def test_dev_on_a_redis_cluster_delivers_the_demo(tmp_path: Path) -> None:
    out = tmp_path / "dev.out"
    with out.open("wb") as handle:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "feed.cli",
                "dev",
                "--redis-cluster",
                "--port",
                "0",
                "--rate",
                "20",
                "--duration",
                "90",
                "--workdir",
                str(tmp_path / "dev"),
            ],
            cwd=REPO,
            env={**os.environ, "FEED_LOG_FORMAT": "json"},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        lines: dict[str, str] = {}
        while "token (alice)" not in lines:
            assert proc.poll() is None, out.read_text()[-3000:]
            assert time.monotonic() < deadline, out.read_text()[-3000:]
            text = out.read_text()
            lines = dict(
                line.split(": ", 1)
                for line in text.splitlines()
                if line.startswith(("page: ", "token (alice): "))
            )
            time.sleep(0.2)  # polling the process's output file, bounded by the deadline
        assert "FEED_REDIS_CLUSTER=true" in out.read_text()
        ws_url = lines["page"].replace("http", "ws").rstrip("/") + "/v1/stream"
        frame = asyncio.run(_first_activity(ws_url, lines["token (alice)"]))
        assert frame["activity"]["id"]  # the demo's traffic, fanned out to alice
    finally:
        stop_process(proc, timeout=30)
