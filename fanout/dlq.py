"""The dead-letter topic: records that cannot be applied, with why and where they came from.

Each DLQ record is the original key and value bytes, with headers: ``feed.error`` (code),
``feed.error.message``, ``feed.error.field``, ``feed.attempts``, ``feed.origin.topic``,
``feed.origin.partition``, ``feed.origin.offset``, ``feed.failed.at`` (RFC 3339), and the
original's ``feed.tenant`` if it had one (``feed dlq replay`` sends it again with the record, so
a replayed record lands in its tenant).

A record too large to copy whole (key + value + headers over what the DLQ producer may send,
``message.max.bytes`` of :func:`dead_letter_producer_config` less the record framing) is copied
truncated: its value (and, when the key alone takes more than half the room, its key) cut to
its first bytes, with the headers ``feed.truncated`` = ``true``, ``feed.original.size`` (the
value's size in bytes) and, when the key was cut, ``feed.original.key.size``. If the broker
still refuses a copy as too large (a topic with a lower ``max.message.bytes``), the copy is cut
to half as much, and so on down to a floor.

:class:`DeadLetters` keeps every record until the broker has acknowledged it: a record that
could not be produced (local queue full, topic missing, broker refusing, delivery error) is
produced again by the next :meth:`DeadLetters.flush`, which raises
:class:`DeadLetterUnavailable` while any record is not in the broker. The worker treats that
like a store outage (pauses, retries, never commits past the records).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from feed import tenants
from feed.kafka import KafkaUnavailable, producer_config, quiet
from feed.settings import Settings
from feed.stages import record_ts_ms
from schemas.errors import FeedError

__all__ = [
    "DLQ_MESSAGE_MAX_BYTES",
    "DeadLetter",
    "DeadLetterUnavailable",
    "DeadLetters",
    "ReplayResult",
    "dead_letter_producer_config",
    "fit_record",
    "read_dead_letters",
    "replay_dead_letters",
]

#: ``message.max.bytes`` of the DLQ producer: librdkafka's default, below Apache Kafka's default
#: broker and topic limit (1,048,588 bytes per record batch).
DLQ_MESSAGE_MAX_BYTES = 1_000_000
#: Bytes kept free under ``message.max.bytes`` for the record and batch framing (a one-record
#: batch adds at most ~100 bytes to key + value + headers).
RECORD_FRAMING_BYTES = 512
#: The smallest size a copy is cut to after the broker refused it as too large.
MIN_COPY_BYTES = 8192

_QUEUED, _IN_FLIGHT, _DELIVERED = 0, 1, 2


class DeadLetterUnavailable(FeedError):
    """Some dead-letter records are not in the broker yet (retry :meth:`DeadLetters.flush`)."""


def dead_letter_producer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """The DLQ producer's configuration, with its size limit explicit.

    It never creates the topic (``feed migrate`` does, with the configured partition count): a
    missing topic is an outage that the worker waits out. A topic reported missing is asked
    for again after 5 s (not the default 30 s), so the wait ends soon after it is created.
    """
    config = producer_config(
        settings,
        **{
            "message.max.bytes": DLQ_MESSAGE_MAX_BYTES,
            "allow.auto.create.topics": False,
            "topic.metadata.propagation.max.ms": 5000,
        },
    )
    config.update(extra)
    return config


def _headers_size(headers: list[tuple[str, bytes]]) -> int:
    """An upper bound of the headers' serialized size (two varints of <= 5 bytes each)."""
    return 5 + sum(len(name.encode()) + len(value) + 10 for name, value in headers)


def fit_record(
    key: bytes | None, value: bytes, headers: list[tuple[str, bytes]], limit: int
) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """``(key, value, headers)`` whose key + value + headers take at most ``limit`` bytes.

    Unchanged when they fit. Otherwise the value is cut to its first bytes (the key too, to
    half the room, when it alone takes more than that) and the truncation headers are added.
    ``limit`` must leave room for the headers themselves (:class:`DeadLetters` ensures it).
    """
    key_bytes = key or b""
    if len(key_bytes) + len(value) + _headers_size(headers) <= limit:
        return key, value, headers
    marks = [("feed.truncated", b"true"), ("feed.original.size", str(len(value)).encode())]
    key_mark = ("feed.original.key.size", str(len(key_bytes)).encode())
    room = limit - _headers_size([*headers, *marks, key_mark])
    if room < 0:
        raise ValueError(f"limit {limit} leaves no room for the headers")
    if len(key_bytes) > room // 2:
        key_bytes = key_bytes[: room // 2]
        marks.append(key_mark)
        key = key_bytes
    return key, value[: room - len(key_bytes)], [*headers, *marks]


@dataclass(slots=True, eq=False)
class _Letter:
    """One DLQ record until the broker has it (the original bytes, kept for a re-send)."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    limit: int
    state: int = _QUEUED
    error: str = ""
    origin: str = ""
    #: The copy's timestamp (ms; 0: when it is produced).
    timestamp: int = 0


class DeadLetters:
    """Sends records to the dead-letter topic and tells when the broker has them all."""

    def __init__(self, producer: Producer, topic: str, *, max_message_bytes: int) -> None:
        """``max_message_bytes``: the producer's ``message.max.bytes`` (a copy is cut to fit)."""
        if max_message_bytes < MIN_COPY_BYTES + RECORD_FRAMING_BYTES:
            raise ValueError(
                f"message.max.bytes {max_message_bytes} is below the DLQ minimum "
                f"{MIN_COPY_BYTES + RECORD_FRAMING_BYTES}"
            )
        self._producer = producer
        self._topic = topic
        self._limit = max_message_bytes - RECORD_FRAMING_BYTES
        #: Records the broker has not acknowledged yet, in the order they were sent.
        self._letters: list[_Letter] = []

    @classmethod
    def from_config(cls, config: Mapping[str, Any], topic: str) -> DeadLetters:
        """A producer made from ``config``; the size limit is its ``message.max.bytes``."""
        return cls(
            Producer(dict(config)), topic, max_message_bytes=int(config["message.max.bytes"])
        )

    @property
    def limit(self) -> int:
        """The most bytes (key + value + headers) one DLQ record takes."""
        return self._limit

    @property
    def pending(self) -> int:
        """Records sent and not yet acknowledged by the broker."""
        return sum(1 for letter in self._letters if letter.state != _DELIVERED)

    def send(
        self,
        message: Any,
        *,
        code: str,
        reason: str,
        field: str = "",
        attempts: int = 1,
        key: bytes | None = None,
        keep_timestamp: bool = False,
    ) -> None:
        """Copy ``message`` to the DLQ. Never raises for a Kafka reason: a record the producer
        does not take now is kept and produced again by :meth:`flush`. ``key``: the copy's key,
        if not the original's (the deferral topic keys by tenant); ``keep_timestamp``: the copy
        keeps the original's timestamp (the deferral topic: the frames' ``ts`` and the stage
        latencies stay the record's, from when it entered the pipeline)."""
        carried = message.headers() or []
        # A record read back from the deferral topic (a copy itself) keeps its original's
        # origin and key: a replay goes where the original came from, keyed as it was.
        origin = {n: v for n, v in carried if n.startswith("feed.origin.") and v is not None}
        if "feed.origin.topic" not in origin:
            origin = {
                "feed.origin.topic": _utf8(message.topic()),
                "feed.origin.partition": str(message.partition()).encode(),
                "feed.origin.offset": str(message.offset()).encode(),
            }
            if key is not None:  # a copy keyed otherwise (by tenant): the key it had
                origin[ORIGIN_KEY] = message.key() or b""
        original_key = origin.pop(ORIGIN_KEY, None)
        headers = [
            ("feed.error", _utf8(code)),
            ("feed.error.message", _utf8(reason)[:1024]),
            ("feed.error.field", _utf8(field)[:1024]),
            ("feed.attempts", str(attempts).encode()),
            ("feed.origin.topic", origin["feed.origin.topic"]),
            ("feed.origin.partition", origin["feed.origin.partition"]),
            ("feed.origin.offset", origin["feed.origin.offset"]),
            ("feed.failed.at", datetime.now(UTC).isoformat().encode()),
        ]
        if key is not None and original_key is not None:
            headers.append((ORIGIN_KEY, original_key))
        tenant = tenants.header_tenant(carried)
        if tenant is not None:  # kept, so a replay lands in the tenant it came from
            headers.append((tenants.HEADER, _utf8(tenant)[:64]))
        if key is None and original_key is not None:
            key = original_key
        letter = _Letter(
            key=message.key() if key is None else key,
            value=message.value() or b"",
            headers=headers,
            limit=self._limit,
            origin=f"{message.topic()}/{message.partition()}/{message.offset()}",
            timestamp=(record_ts_ms(message) or 0) if keep_timestamp else 0,
        )
        self._letters.append(letter)
        self._produce(letter)

    def _produce(self, letter: _Letter) -> None:
        key, value, fitted = fit_record(letter.key, letter.value, letter.headers, letter.limit)
        headers: list[tuple[str, str | bytes | None]] = [*fitted]
        try:
            self._producer.produce(
                self._topic,
                key=key,
                value=value,
                headers=headers,
                timestamp=letter.timestamp,
                on_delivery=lambda err, _msg: self._delivered(letter, err),
            )
        except BufferError:
            letter.error = "the producer's local queue is full"
        except KafkaException as exc:
            self._failed(letter, exc.args[0] if exc.args else exc)
        else:
            letter.state = _IN_FLIGHT

    def _delivered(self, letter: _Letter, err: Any) -> None:
        if err is None:
            letter.state = _DELIVERED
        else:
            self._failed(letter, err)

    def _failed(self, letter: _Letter, err: Any) -> None:
        letter.state = _QUEUED
        letter.error = str(err)
        if isinstance(err, KafkaError) and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
            # The broker (or the topic) takes less than our limit: cut the copy further.
            letter.limit = max(MIN_COPY_BYTES, letter.limit // 2)

    def flush(self, timeout: float = 5.0) -> None:
        """Produce again what was not taken, wait up to ``timeout`` s for the broker, and raise
        :class:`DeadLetterUnavailable` unless every record sent so far is in it."""
        if not self._letters:
            return  # nothing sent since the last flush (the common case: no producer call)
        deadline = time.monotonic() + timeout
        for letter in self._letters:
            if letter.state == _QUEUED:
                self._produce(letter)
        self._producer.flush(max(0.0, deadline - time.monotonic()))
        self._letters = [letter for letter in self._letters if letter.state != _DELIVERED]
        if self._letters:
            errors = sorted({letter.error or "no acknowledgement yet" for letter in self._letters})
            raise DeadLetterUnavailable(
                f"{len(self._letters)} record(s) not in {self._topic!r} "
                f"(first from {self._letters[0].origin}): {'; '.join(errors)[:500]}"
            )


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "backslashreplace")


class DeadLetter:
    """One record read back from the dead-letter topic."""

    __slots__ = ("headers", "key", "offset", "partition", "value")

    def __init__(self, message: Any) -> None:
        self.key: bytes | None = message.key()
        self.value: bytes | None = message.value()
        self.partition: int = message.partition()
        self.offset: int = message.offset()
        self.headers = {k: (v or b"").decode(errors="replace") for k, v in message.headers() or []}

    @property
    def truncated(self) -> bool:
        return self.headers.get("feed.truncated") == "true"

    def as_dict(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "offset": self.offset,
            "key": (self.key or b"").decode(errors="replace")[:2000],
            "value": (self.value or b"").decode(errors="replace")[:2000],
            "headers": self.headers,
        }


def _unreachable(bootstrap: str, timeout: float) -> KafkaUnavailable:
    return KafkaUnavailable(f"cannot reach Kafka at {bootstrap} within {timeout:g} s")


def read_dead_letters(
    bootstrap: str,
    topic: str,
    *,
    group: str | None,
    limit: int,
    timeout: float = 5.0,
    idle_s: float = 0.5,
    on_commit: Callable[[Any, Any], None] | None = None,
) -> tuple[list[DeadLetter], Consumer]:
    """Read up to ``limit`` DLQ records. With ``group``, from that group's committed position
    (the caller commits with the returned consumer, which it closes); without, everything from
    the start.

    Reads each partition up to its end (the high watermark, or the broker's end-of-partition
    event), then for ``idle_s`` more in case the broker under-reports the watermark (INFRA.md).
    Raises :class:`KafkaUnavailable` (one line, naming the broker) when Kafka does not answer
    any request within ``timeout`` s, and ``LookupError`` when the topic does not exist.
    ``on_commit``: the consumer's commit callback (served by ``poll``).
    """
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group or f"feed-dlq-list-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
    }
    if on_commit is not None:
        config["on_commit"] = on_commit
    consumer = Consumer(quiet(config))
    try:
        records = _read(consumer, bootstrap, topic, group, limit, timeout, idle_s)
    except BaseException:
        consumer.close()
        raise
    return records, consumer


def _read(
    consumer: Consumer,
    bootstrap: str,
    topic: str,
    group: str | None,
    limit: int,
    timeout: float,
    idle_s: float,
) -> list[DeadLetter]:
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
    except KafkaException:
        raise _unreachable(bootstrap, timeout) from None
    described = metadata.topics.get(topic)
    if described is None or described.error is not None or not described.partitions:
        raise LookupError(f"topic {topic!r} does not exist at {bootstrap}")
    partitions = [TopicPartition(topic, p) for p in sorted(described.partitions)]
    try:
        if group is not None:
            starts = {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout)}
        else:
            starts = {}
        ends: dict[int, int] = {}
        for tp in partitions:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
            start = starts.get(tp.partition, -1)
            ends[tp.partition] = high
            starts[tp.partition] = start if start >= 0 else low
    except KafkaException:
        raise _unreachable(bootstrap, timeout) from None
    behind = {p for p in ends if starts[p] < ends[p]}
    if not behind or limit <= 0:
        return []
    consumer.assign([TopicPartition(topic, p, starts[p]) for p in sorted(behind)])
    records: list[DeadLetter] = []
    last_progress = time.monotonic()
    while len(records) < limit:
        message = consumer.poll(0.1)
        now = time.monotonic()
        if message is None:
            if not behind and now - last_progress >= idle_s:
                break
            if behind and now - last_progress >= timeout:
                raise _unreachable(bootstrap, timeout)
            continue
        last_progress = now
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                behind.discard(message.partition())
            continue
        record = DeadLetter(message)
        records.append(record)
        if record.offset + 1 >= ends[record.partition]:
            behind.discard(record.partition)
    return records


@dataclass(slots=True)
class ReplayResult:
    """What :func:`replay_dead_letters` did."""

    replayed: list[DeadLetter]
    #: Truncated copies (``feed.truncated``): only their first bytes are left, so they are
    #: passed over for good rather than replayed as garbage.
    truncated: list[DeadLetter]


#: The header of a copy keyed otherwise (the deferral topic's, by tenant): its original key.
ORIGIN_KEY = "feed.origin.key"


def _replay_headers(record: DeadLetter, source: str) -> list[tuple[str, str | bytes | None]]:
    """A replayed record's headers: where it was replayed from, and its tenant, if any."""
    headers: list[tuple[str, str | bytes | None]] = [("feed.replayed.from", source.encode())]
    tenant = record.headers.get(tenants.HEADER)
    if tenant is not None:
        headers.append((tenants.HEADER, tenant.encode()))
    return headers


def replay_dead_letters(
    bootstrap: str,
    topic: str,
    *,
    group: str,
    limit: int,
    code: str | None = None,
    timeout: float = 5.0,
) -> ReplayResult:
    """Produce DLQ records back to their origin topic, then commit the replay group's position so
    no record is replayed twice. Records whose ``feed.error`` differs from ``code``, truncated
    copies and records without an origin are passed over for good.

    Raises :class:`KafkaUnavailable` (one line) when Kafka does not answer within ``timeout`` s
    or does not take every replayed record; nothing is committed then."""
    commits: list[Any] = []
    records, consumer = read_dead_letters(
        bootstrap,
        topic,
        group=group,
        limit=limit,
        timeout=timeout,
        on_commit=lambda err, _partitions: commits.append(err),
    )
    try:
        producer = Producer(
            quiet(
                {
                    "bootstrap.servers": bootstrap,
                    "acks": "all",
                    "enable.idempotence": True,
                    "allow.auto.create.topics": False,
                    "message.timeout.ms": max(1, int(timeout * 1000)),
                }
            )
        )
        replayed: list[DeadLetter] = []
        truncated: list[DeadLetter] = []
        errors: list[str] = []
        for record in records:
            if code is not None and record.headers.get("feed.error") != code:
                continue
            if record.truncated:
                truncated.append(record)
                continue
            origin = record.headers.get("feed.origin.topic")
            if not origin:
                continue
            source = f"{topic}/{record.partition}/{record.offset}"
            try:
                producer.produce(
                    origin,
                    key=record.key,
                    value=record.value,
                    headers=_replay_headers(record, source),
                    on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
                )
            except (BufferError, KafkaException) as exc:
                errors.append(str(exc))
                break
            replayed.append(record)
        pending = producer.flush(timeout + 1)
        if pending or errors:
            detail = errors[0] if errors else "no acknowledgement"
            raise KafkaUnavailable(
                f"Kafka at {bootstrap} did not take every replayed record within {timeout:g} s "
                f"({len(errors) or pending} not taken: {detail}); nothing was committed"
            )
        if records:
            last: dict[int, int] = {}
            for record in records:
                last[record.partition] = max(last.get(record.partition, -1), record.offset)
            offsets = [TopicPartition(topic, p, o + 1) for p, o in last.items()]
            try:
                _commit(consumer, offsets, commits, timeout=timeout)
            except KafkaUnavailable as exc:
                raise KafkaUnavailable(
                    f"replayed {len(replayed)} record(s) to their origin topics, but Kafka at "
                    f"{bootstrap} {exc}"
                ) from None
    finally:
        consumer.close()
    return ReplayResult(replayed=replayed, truncated=truncated)


def _commit(
    consumer: Consumer, offsets: list[TopicPartition], commits: list[Any], *, timeout: float
) -> None:
    """Commit ``offsets`` within ``timeout`` s (a synchronous commit has no time limit);
    ``commits`` is filled by the consumer's ``on_commit`` callback."""
    consumer.unassign()
    consumer.commit(offsets=offsets, asynchronous=True)
    deadline = time.monotonic() + timeout
    while not commits and time.monotonic() < deadline:
        consumer.poll(0.1)  # serves the commit callback (no records: nothing is assigned)
    error = commits[0] if commits else f"no answer within {timeout:g} s"
    if error is not None:
        raise KafkaUnavailable(f"could not commit the replay position: {error}")
