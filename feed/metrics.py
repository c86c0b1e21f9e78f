"""What both processes' Prometheus registries share.

Each process keeps its metrics in a registry of its own (``fanout.metrics``,
``gateway.metrics``), not in ``prometheus_client``'s global one, so that several apps in one
process (the tests) do not collide. The global registry is where ``prometheus_client`` puts its
process, platform and GC collectors, so each registry registers them itself.
"""

from __future__ import annotations

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry

__all__ = ["process_collectors"]


def process_collectors(registry: CollectorRegistry) -> None:
    """Register the process (``process_*``: RSS, CPU seconds, open fds, start time), platform
    (``python_info``) and GC (``python_gc_*``) collectors in ``registry``."""
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
