"""The gateway scenario's bookkeeping: whose CPU is the bench's own, and the burner control."""

from __future__ import annotations

import time
from types import SimpleNamespace

from bench.gateway import redis_pids
from bench.ws_clients import burn


def test_every_node_of_a_cluster_is_the_benchs_own_work() -> None:
    # A cluster's nodes are the stack's Redis: their CPU is not "other work on the machine"
    # (counted as such, every cluster step looked disturbed and ran again).
    one = SimpleNamespace(pid=11)
    cluster = SimpleNamespace(
        nodes=[SimpleNamespace(pid=21), SimpleNamespace(pid=22), SimpleNamespace(pid=None)]
    )
    assert redis_pids(one) == [11]
    assert redis_pids(cluster) == [21, 22]
    assert redis_pids(None) == []


def test_the_burner_burns_its_share_for_its_time_and_no_longer() -> None:
    started = time.monotonic()
    report = burn(0.5, 0.3)
    took = time.monotonic() - started
    assert took < 0.3 + 0.1
    assert report["seconds"] <= took
    # at most its share (plus the clock's granularity), and something: it did burn
    assert 0.0 < report["cpu_s"] <= 0.5 * 0.3 + 0.05
