"""Both processes export process metrics (``feed.metrics.process_collectors``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from fanout.metrics import WorkerMetrics
from feed.metrics import process_collectors
from gateway.metrics import GatewayMetrics

PROCESS_SERIES = (
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "python_gc_objects_collected_total",
    "python_info",
)


def test_both_processes_registries_export_process_metrics() -> None:
    for registry in (WorkerMetrics().registry, GatewayMetrics().registry):
        text = generate_latest(registry).decode()
        for name in PROCESS_SERIES:
            assert f"\n{name}" in text, name


def test_a_registry_of_our_own_has_none_until_registered() -> None:
    registry = CollectorRegistry()
    assert "process_resident_memory_bytes" not in generate_latest(registry).decode()
    process_collectors(registry)
    assert "process_resident_memory_bytes" in generate_latest(registry).decode()
