"""Core of the feed backend: settings, cursors, stores (Redis timelines, Cassandra history and
follow graph), the feed reader, Kafka plumbing, consumer lag, logging, and the ``feed`` CLI.

Import the submodules you need; this package imports nothing heavy on its own.
"""

__all__ = [
    "cli",
    "cursor",
    "delivery_redis",
    "dev",
    "graph_cassandra",
    "history_cassandra",
    "kafka",
    "keys",
    "lag",
    "logging",
    "reader",
    "settings",
    "stores",
    "timelines_redis",
]
