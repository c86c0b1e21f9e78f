"""Pure parts of the Redis timelines: the argument chunking of the grouped insert call."""

from __future__ import annotations

from typing import Any

import pytest

from feed.timelines_redis import _MAX_USERS, _chunks, _execute_packed, _inserts_per_call


@pytest.mark.parametrize("sizes", [[1], [0, 3], [10_000], [5000, 5000, 5000], [1] * 3000])
def test_chunks_keep_every_user_once_and_stay_bounded(sizes: list[int]) -> None:
    groups = [
        ((f"m{g}", f"b{g}"), [f"u{g}-{n}" for n in range(size)]) for g, size in enumerate(sizes)
    ]
    calls = _chunks(groups)
    assert all(sum(len(users) for _, users in call) <= _MAX_USERS for call in calls)
    flat = [(fixed, list(users)) for call in calls for fixed, users in call]
    users = [u for _, us in flat for u in us]
    assert users == [u for _, us in groups for u in us]
    assert all(us and all(us) for _, us in flat)
    assert all(
        fixed == (f"m{u[0][1 : u[0].index('-')]}", f"b{u[0][1 : u[0].index('-')]}")
        for fixed, u in flat
    )


class _Connection:
    """Records what the fan-out sends and reads, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.retry = self

    def call_with_retry(self, run: Any, _fail: Any) -> Any:
        return run()

    def send_packed_command(self, packed: list[bytes]) -> None:
        self.events.append(f"send {b''.join(packed).count(b'*')}")

    def read_response(self) -> bytes:
        self.events.append("read")
        return b"OK"


class _Pool:
    def __init__(self) -> None:
        self.connection = _Connection()

    def get_connection(self) -> _Connection:
        return self.connection

    def release(self, _connection: _Connection) -> None:
        pass


def test_a_fanout_sends_one_round_trip_per_script_call() -> None:
    """Redis runs every command of a pipeline it has read before it serves another client: the
    script calls go one round trip each (the bodies with the first), so another client's command
    waits for one call, not for the whole batch."""
    client = type("Client", (), {"connection_pool": _Pool()})()
    commands: list[tuple[str | int | bytes, ...]] = [("SET", "a", "1"), ("SET", "b", "2")]
    commands += [("EVALSHA", "x", 0), ("EVALSHA", "y", 0), ("EVALSHA", "z", 0), ("DEL", "c")]
    replies = _execute_packed(client, commands, [3, 1])  # type: ignore[arg-type]
    assert replies == [b"OK"] * 6
    assert client.connection_pool.connection.events == [
        "send 3", "read", "read", "read", "send 1", "read", "send 2", "read", "read",
    ]  # fmt: skip


def test_small_batches_get_small_script_calls_and_large_ones_few() -> None:
    assert _inserts_per_call(1) == _inserts_per_call(16) == 256
    assert _inserts_per_call(100) == 1_600
    assert _inserts_per_call(500) == 8_000
    assert _inserts_per_call(10_000) == _MAX_USERS
