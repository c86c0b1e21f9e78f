"""Fitting a DLQ copy under the producer's size limit (key + value + headers)."""

from __future__ import annotations

import pytest
from confluent_kafka import Producer

from fanout.dlq import (
    DLQ_MESSAGE_MAX_BYTES,
    MIN_COPY_BYTES,
    RECORD_FRAMING_BYTES,
    DeadLetters,
    fit_record,
)

HEADERS = [("feed.error", b"too_large"), ("feed.error.message", b"m" * 1024)]


def _size(key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    return len(key or b"") + len(value) + sum(len(k) + len(v) + 10 for k, v in headers) + 5


def test_a_record_that_fits_is_unchanged() -> None:
    assert fit_record(b"k", b"v" * 100, HEADERS, 10_000) == (b"k", b"v" * 100, HEADERS)
    assert fit_record(None, b"", HEADERS, 10_000) == (None, b"", HEADERS)


@pytest.mark.parametrize("value_size", [10_000, 999_800, 5_000_000])
def test_a_large_value_is_cut_to_its_first_bytes_with_its_size_in_a_header(
    value_size: int,
) -> None:
    value = bytes(range(256)) * (value_size // 256 + 1)
    value = value[:value_size]
    limit = 8_000
    key, cut, headers = fit_record(b"u1", value, HEADERS, limit)
    assert key == b"u1" and value.startswith(cut) and 0 < len(cut) < len(value)
    extra = dict(headers[len(HEADERS) :])
    assert extra == {"feed.truncated": b"true", "feed.original.size": str(value_size).encode()}
    assert headers[: len(HEADERS)] == HEADERS
    assert _size(key, cut, headers) <= limit
    # As much as fits: at most the key-size header's room is left unused.
    assert limit - _size(key, cut, headers) <= len("feed.original.key.size") + 10 + 10


def test_a_key_that_takes_most_of_the_room_is_cut_too() -> None:
    key = b"k" * 50_000
    out_key, value, headers = fit_record(key, b"{oops", HEADERS, 8_000)
    assert out_key is not None and key.startswith(out_key) and 0 < len(out_key) < len(key)
    assert value == b"{oops"
    extra = dict(headers[len(HEADERS) :])
    assert extra["feed.original.key.size"] == b"50000"
    assert extra["feed.original.size"] == b"5" and extra["feed.truncated"] == b"true"
    assert _size(out_key, value, headers) <= 8_000


def test_a_limit_with_no_room_for_the_headers_is_refused() -> None:
    with pytest.raises(ValueError, match="no room"):
        fit_record(b"k", b"v" * 10_000, HEADERS, 1_000)


def test_the_limit_comes_from_the_producers_message_max_bytes() -> None:
    config = {"bootstrap.servers": "127.0.0.1:1", "message.max.bytes": 200_000, "log_level": 0}
    letters = DeadLetters.from_config(config, "dlq")
    assert letters.limit == 200_000 - RECORD_FRAMING_BYTES
    with pytest.raises(ValueError, match=r"message\.max\.bytes"):
        DeadLetters(Producer(config), "dlq", max_message_bytes=MIN_COPY_BYTES)
    assert DLQ_MESSAGE_MAX_BYTES - RECORD_FRAMING_BYTES > 32 * 1024  # a valid event fits whole


class _CountingProducer:
    def __init__(self) -> None:
        self.flushes = 0

    def flush(self, timeout: float) -> int:
        self.flushes += 1
        return 0


def test_a_flush_with_nothing_sent_is_not_a_producer_call() -> None:
    """The worker flushes the DLQ after every batch; nearly every batch sent nothing to it, and
    a librdkafka flush costs a wait in the batch loop even then."""
    producer = _CountingProducer()
    letters = DeadLetters(producer, "feed.activities.dlq", max_message_bytes=DLQ_MESSAGE_MAX_BYTES)  # type: ignore[arg-type]
    letters.flush(5.0)
    assert producer.flushes == 0 and letters.pending == 0
