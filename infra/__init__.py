"""Development/test infrastructure: real servers as subprocesses, and the local stack."""

from infra.servers import (
    CassandraCluster,
    CassandraServer,
    KafkaBroker,
    RedisCluster,
    RedisServer,
    ServerError,
    ServerStartError,
    cassandra_home,
    free_ports,
    install_signal_cleanup,
    stop_all_servers,
)
from infra.stack import LocalStack

__all__ = [
    "CassandraCluster",
    "CassandraServer",
    "KafkaBroker",
    "LocalStack",
    "RedisCluster",
    "RedisServer",
    "ServerError",
    "ServerStartError",
    "cassandra_home",
    "free_ports",
    "install_signal_cleanup",
    "stop_all_servers",
]
