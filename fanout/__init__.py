"""The fan-out worker (``feed fanout``): a Kafka consumer-group member that applies activity and
follow events to Redis timelines and Cassandra history.

* :mod:`fanout.worker` — the consume/apply/commit loop, retries, DLQ, graceful stop;
* :mod:`fanout.processor` — applying decoded events to the stores (no Kafka);
* :mod:`fanout.followers` — follower lists, cross-worker invalidation, large accounts;
* :mod:`fanout.dlq` — the dead-letter topic (write, list, replay);
* :mod:`fanout.metrics`, :mod:`fanout.http` — Prometheus metrics and health endpoints.
"""

__all__ = ["dlq", "followers", "http", "metrics", "processor", "worker"]
