"""Test only: a fan-out worker that dies (SIGKILL) between applying a batch and committing it.

``python -m tests.support.crash_after_apply N ARM_FILE`` runs the same worker as ``feed fanout``
(settings from ``FEED_*``), with an ``after_apply`` hook: once ``ARM_FILE`` exists, the Nth batch
applied after that is followed by ``kill -9`` of the process itself — its writes to Redis and
Cassandra are done, its offsets are not committed, so a restarted worker replays it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from fanout.metrics import WorkerMetrics
from fanout.worker import build_worker, install_signal_handlers
from feed.logging import configure, get_logger
from feed.settings import Settings


def main(argv: list[str]) -> int:
    crash_at, arm_file = int(argv[0]), Path(argv[1])
    settings = Settings.from_env(os.environ)
    configure(settings.log_level, settings.log_format)
    log = get_logger("fanout")
    armed = 0

    def after_apply() -> None:
        nonlocal armed
        if not arm_file.exists():
            return
        armed += 1
        if armed >= crash_at:
            log.warning("crashing between apply and commit", batch_after_arming=armed)
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    worker = build_worker(settings, WorkerMetrics(), after_apply=after_apply)
    install_signal_handlers(worker.stop)
    worker.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
