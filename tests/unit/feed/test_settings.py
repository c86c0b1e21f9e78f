"""Settings: defaults from the contract, typed parsing, errors that name the variable."""

from __future__ import annotations

import pytest

from feed.settings import Secret, Settings, SettingsError, redact_url


def test_contract_defaults() -> None:
    s = Settings.from_env({})
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.cassandra_hosts == ("127.0.0.1",) and s.cassandra_port == 9042
    assert s.cassandra_keyspace == "feed" and s.cassandra_protocol_version is None
    assert (s.gateway_host, s.gateway_port) == ("127.0.0.1", 8080)
    assert s.timeline_max == 800 and s.follow_backfill == 200
    assert s.kafka_group == "feed-fanout"
    assert (s.topic_activities, s.topic_follows, s.topic_dlq) == (
        "feed.activities",
        "feed.follows",
        "feed.activities.dlq",
    )


def test_parsing() -> None:
    s = Settings.from_env(
        {
            "FEED_CASSANDRA_HOSTS": "a, b,c",
            "FEED_CASSANDRA_PROTOCOL_VERSION": "3",
            "FEED_TIMELINE_MAX": "10",
            "FEED_FANOUT_HISTORY": "false",
            "FEED_ALLOWED_ORIGINS": "https://x.example,https://y.example",
        }
    )
    assert s.cassandra_hosts == ("a", "b", "c")
    assert s.cassandra_protocol_version == 3
    assert s.timeline_max == 10 and s.fanout_history is False
    assert s.allowed_origins == ("https://x.example", "https://y.example")


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("FEED_TIMELINE_MAX", "abc"),
        ("FEED_TIMELINE_MAX", "0"),
        ("FEED_CASSANDRA_PORT", "70000"),
        ("FEED_REDIS_URL", "http://x"),
        ("FEED_FANOUT_HISTORY", "maybe"),
        ("FEED_CASSANDRA_KEYSPACE", "bad-name"),
        ("FEED_CASSANDRA_HOSTS", " , "),
        ("FEED_LOG_LEVEL", "loud"),
    ],
)
def test_errors_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({var: value})
    assert str(info.value).startswith(var + ":")


def test_jwt_secret_needs_32_bytes_and_never_prints() -> None:
    weak = "short-secret-value"
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"FEED_JWT_SECRET": weak})
    assert "FEED_JWT_SECRET" in str(info.value) and weak not in str(info.value)
    strong = "k" * 32
    s = Settings.from_env({"FEED_JWT_SECRET": strong, "FEED_INGEST_TOKEN": "t" * 20})
    assert strong not in repr(s) and "t" * 20 not in repr(s)
    assert s.jwt_secret is not None and s.jwt_secret.reveal() == strong


def test_gateway_requirements() -> None:
    with pytest.raises(SettingsError, match="FEED_JWT_SECRET"):
        Settings.from_env({}).require_gateway()
    with pytest.raises(SettingsError, match="FEED_INGEST_TOKEN"):
        Settings.from_env({"FEED_JWT_SECRET": "k" * 32}).require_gateway()


def test_secret_compare_is_constant_time_api() -> None:
    secret = Secret("abc")
    assert secret.matches("abc") and not secret.matches("abd")
    assert str(secret) == repr(secret) == "Secret('**********')"


def test_env_round_trip() -> None:
    s = Settings.from_env({"FEED_JWT_SECRET": "k" * 32, "FEED_CASSANDRA_HOSTS": "a,b"})
    assert Settings.from_env(s.env()) == s


def test_a_redis_password_never_reaches_an_error_or_a_repr() -> None:
    # A malformed FEED_REDIS_URL used to be echoed whole, password included, and so was
    # repr(Settings) (which a log line or a traceback may show).
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"FEED_REDIS_URL": "redis//:hunter2@10.0.0.5:6379/0"})
    assert "hunter2" not in str(info.value) and "FEED_REDIS_URL" in str(info.value)
    settings = Settings.from_env({"FEED_REDIS_URL": "redis://app:hunter2@10.0.0.5:6379/0"})
    assert settings.redis_url == "redis://app:hunter2@10.0.0.5:6379/0"  # still usable
    assert "hunter2" not in repr(settings) and "redis://app:***@10.0.0.5:6379/0" in repr(settings)
    for secret in ("jwt_secret", "ingest_token"):
        assert secret in repr(settings)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:pw@h:6380", "rediss://user:***@h:6380"),
        ("redis://token@h", "redis://***@h"),
        ("redis://u:p@ss@h", "redis://u:***@h"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_cassandra_replication_and_consistency() -> None:
    s = Settings.from_env({})
    assert s.cassandra_replication_strategy == "SimpleStrategy"
    assert (s.cassandra_read_consistency, s.cassandra_write_consistency) == (
        "LOCAL_QUORUM",
        "LOCAL_QUORUM",
    )
    s = Settings.from_env(
        {
            "FEED_CASSANDRA_REPLICATION_STRATEGY": "NetworkTopologyStrategy",
            "FEED_CASSANDRA_DATACENTERS": " dc1:3 , eu-west.2:2",
            "FEED_CASSANDRA_LOCAL_DC": "dc1",
            "FEED_CASSANDRA_READ_CONSISTENCY": "ONE",
            "FEED_CASSANDRA_WRITE_CONSISTENCY": "QUORUM",
        }
    )
    assert s.cassandra_datacenters == ("dc1:3", "eu-west.2:2")
    assert (s.cassandra_local_dc, s.cassandra_read_consistency) == ("dc1", "ONE")
    assert Settings.from_env(s.env()) == s


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("FEED_CASSANDRA_REPLICATION_STRATEGY", "OldNetworkTopologyStrategy", "must be one of"),
        ("FEED_CASSANDRA_DATACENTERS", "dc1", "not name:factor"),
        ("FEED_CASSANDRA_DATACENTERS", "dc1:0", "1 to 9"),
        ("FEED_CASSANDRA_DATACENTERS", "dc1:3,dc1:2", "named twice"),
        ("FEED_CASSANDRA_DATACENTERS", "dc'1:3", "no data centre name"),
        ("FEED_CASSANDRA_LOCAL_DC", "a b", "no data centre name"),
        ("FEED_CASSANDRA_WRITE_CONSISTENCY", "ANY", "must be one of"),
        ("FEED_CASSANDRA_READ_CONSISTENCY", "local_quorum", "must be one of"),
    ],
)
def test_cassandra_setting_errors(var: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({var: value})
    assert str(info.value).startswith(var + ":") and says in str(info.value)


def test_tenant_settings_defaults_and_bounds() -> None:
    s = Settings.from_env({})
    assert (s.tenant_refresh_s, s.tenant_rotate_grace_s, s.tenant_metrics_max) == (10, 3600, 20)
    assert (s.tenant_max_connections, s.tenant_fanout_rate, s.tenant_fanout_burst) == (0, 0, 1000)
    assert Settings.from_env({"FEED_TENANT_REFRESH_S": "0.5"}).tenant_refresh_s == 0.5
    for var, value in [
        ("FEED_TENANT_REFRESH_S", "0"),
        ("FEED_TENANT_REFRESH_S", "11"),  # at most the default: a disable takes seconds
        ("FEED_TENANT_ROTATE_GRACE_S", "-1"),
        ("FEED_TENANT_ROTATE_GRACE_S", str(30 * 86_400 + 1)),
        ("FEED_TENANT_MAX_CONNECTIONS", "-1"),
        ("FEED_TENANT_FANOUT_RATE", "-1"),
        ("FEED_TENANT_FANOUT_BURST", "0"),
    ]:
        with pytest.raises(SettingsError) as info:
            Settings.from_env({var: value})
        assert str(info.value).startswith(var + ":")
