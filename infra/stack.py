"""The whole local stack (Kafka-protocol broker, Redis, Cassandra) for tests and dev.

:class:`LocalStack` starts the three servers in parallel threads under one work
directory and hands out the ``FEED_*`` settings that point at them.  It does not
create topics or schema: that is ``feed migrate``'s job.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from infra.servers import (
    CassandraServer,
    KafkaBroker,
    RedisCluster,
    RedisServer,
    ServerError,
    install_signal_cleanup,
)

__all__ = ["LocalStack"]

log = logging.getLogger(__name__)


class LocalStack:
    """Kafka broker + Redis (+ Cassandra) on free ports under ``workdir``.

    Args:
        workdir: parent directory; each server gets a sub-directory
            (``kafka/``, ``redis/``, ``cassandra/``) holding its log and data.
        partitions: Kafka partition count, handed out as ``FEED_KAFKA_PARTITIONS``
            by :meth:`env` (topics are created by ``feed migrate``, not here).
        with_cassandra: start Cassandra too (about 2-5 s more).
        keyspace: value of ``FEED_CASSANDRA_KEYSPACE``.
        cassandra_kwargs: extra keyword arguments for :class:`CassandraServer`.
        redis_cluster: a Redis Cluster of 3 masters instead of one Redis server.

    Attributes ``kafka``, ``redis`` and ``cassandra`` (None without Cassandra)
    are the server objects, so fault tests can ``kill()``/``restart()`` them.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        partitions: int = 4,
        with_cassandra: bool = True,
        keyspace: str = "feed",
        cassandra_kwargs: dict[str, Any] | None = None,
        redis_cluster: bool = False,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.partitions = partitions
        self.keyspace = keyspace
        self.kafka = KafkaBroker(self.workdir / "kafka")
        #: One Redis server, or with ``redis_cluster`` a Redis Cluster of 3 masters.
        self.redis: RedisServer | RedisCluster = (
            RedisCluster(self.workdir / "redis", masters=3)
            if redis_cluster
            else RedisServer(self.workdir / "redis")
        )
        self.cassandra: CassandraServer | None = (
            CassandraServer(self.workdir / "cassandra", **(cassandra_kwargs or {}))
            if with_cassandra
            else None
        )
        self._lock = threading.Lock()
        #: Seconds the last start() took (all servers, in parallel).
        self.startup_seconds: float | None = None

    @property
    def servers(self) -> list[KafkaBroker | RedisServer | RedisCluster | CassandraServer]:
        """The server objects of this stack."""
        result: list[KafkaBroker | RedisServer | RedisCluster | CassandraServer] = [
            self.kafka,
            self.redis,
        ]
        if self.cassandra is not None:
            result.append(self.cassandra)
        return result

    def start(self) -> Self:
        """Start every server in parallel; on any failure stop them all and raise."""
        with self._lock:
            install_signal_cleanup()  # atexit clean-up is registered by infra.servers
            t0 = time.monotonic()
            servers = self.servers
            with ThreadPoolExecutor(
                max_workers=len(servers), thread_name_prefix="localstack"
            ) as pool:
                futures = [pool.submit(server.start) for server in servers]
                errors = [f.exception() for f in futures]
            failed = [e for e in errors if e is not None]
            if failed:
                self._stop_all()
                if len(failed) == 1:
                    raise failed[0]
                raise ServerError("; ".join(str(e) for e in failed)) from failed[0]
            self.startup_seconds = time.monotonic() - t0
            log.info("local stack ready in %.2fs: %s", self.startup_seconds, self.env())
            return self

    def stop(self) -> None:
        """Stop every server (in parallel); safe to call more than once."""
        with self._lock:
            self._stop_all()

    def _stop_all(self) -> None:
        servers = self.servers
        with ThreadPoolExecutor(
            max_workers=len(servers), thread_name_prefix="localstack-stop"
        ) as pool:
            for future in [pool.submit(server.stop) for server in servers]:
                exc = future.exception()
                if exc is not None:
                    log.error("stopping a server failed: %s", exc)

    def env(self) -> dict[str, str]:
        """``FEED_*`` settings pointing at the running servers."""
        env = {
            "FEED_KAFKA_BOOTSTRAP": self.kafka.bootstrap,
            "FEED_KAFKA_PARTITIONS": str(self.partitions),
            "FEED_REDIS_URL": self.redis.url,
        }
        if self.cassandra is not None:
            env.update(
                FEED_CASSANDRA_HOSTS=self.cassandra.hosts,
                FEED_CASSANDRA_PORT=str(self.cassandra.native_port),
                FEED_CASSANDRA_PROTOCOL_VERSION=str(self.cassandra.protocol_version),
                FEED_CASSANDRA_KEYSPACE=self.keyspace,
            )
        return env

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<LocalStack workdir={self.workdir} servers={self.servers}>"
