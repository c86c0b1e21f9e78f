"""The keyspace's replication from the settings, and the CQL ``feed migrate`` runs for it."""

from __future__ import annotations

from feed.settings import Settings
from feed.stores import replication, schema_statements


def test_simple_strategy_by_default() -> None:
    spec = replication(Settings.from_env({"FEED_CASSANDRA_REPLICATION_FACTOR": "2"}))
    assert spec == {"class": "SimpleStrategy", "replication_factor": 2}
    assert schema_statements("feed", spec)[0] == (
        "CREATE KEYSPACE IF NOT EXISTS feed WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 2}"
    )


def test_network_topology_names_each_data_centre() -> None:
    nts = {"FEED_CASSANDRA_REPLICATION_STRATEGY": "NetworkTopologyStrategy"}
    spec = replication(Settings.from_env({**nts, "FEED_CASSANDRA_DATACENTERS": "dc1:3,dc2:2"}))
    assert spec == {"class": "NetworkTopologyStrategy", "dc1": 3, "dc2": 2}
    assert schema_statements("ks", spec)[0].endswith(
        "{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2}"
    )
    # None named: the local data centre (else Cassandra's default name) at the factor.
    alone = {**nts, "FEED_CASSANDRA_REPLICATION_FACTOR": "3"}
    assert replication(Settings.from_env(alone)) == {
        "class": "NetworkTopologyStrategy",
        "datacenter1": 3,
    }
    local = Settings.from_env({**alone, "FEED_CASSANDRA_LOCAL_DC": "eu"})
    assert replication(local) == {"class": "NetworkTopologyStrategy", "eu": 3}
