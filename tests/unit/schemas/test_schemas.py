"""Schemas: valid input, and each kind of invalid input named by field and limit."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import msgspec
import pytest

from schemas import (
    MAX_BATCH,
    UnknownFrameType,
    ValidationError,
    decode_activities,
    decode_activity,
    decode_client_frame,
    decode_follow_event,
    decode_follow_request,
    encode_activity,
    frames,
    published_us,
)
from schemas.activity import ID_RE, is_valid_id

GOOD = {
    "id": "a-123",
    "type": "Create",
    "actor": "u1",
    "object": "post:9",
    "published": "2026-11-22T10:00:00Z",
}


def enc(value: object) -> bytes:
    return msgspec.json.encode(value)


def error_of_at(data: bytes, *, now: float) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        decode_activity(data, now=now)
    return info.value


def error_of(data: bytes) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        decode_activity(data)
    return info.value


def test_valid_activity_round_trips() -> None:
    activity = decode_activity(enc({**GOOD, "target": "group:4", "to": ["u7"], "extra": {"k": 1}}))
    assert activity.to == ["u7"] and activity.extra == {"k": 1}
    again = decode_activity(encode_activity(activity))
    assert again == activity


def test_published_accepts_fractions_and_offsets() -> None:
    a = decode_activity(enc({**GOOD, "published": "2026-11-22T11:00:00.25+01:00"}))
    b = decode_activity(enc({**GOOD, "published": "2026-11-22T10:00:00.25Z"}))
    assert published_us(a) == published_us(b)
    assert published_us(b) % 1_000_000 == 250_000


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert decode_activity(enc({**GOOD, "future": 1})).id == "a-123"


@pytest.mark.parametrize("field", ["id", "type", "actor", "object", "published"])
def test_missing_required_field_is_named(field: str) -> None:
    body = {k: v for k, v in GOOD.items() if k != field}
    err = error_of(enc(body))
    assert (err.field, err.code) == (field, "missing")


@pytest.mark.parametrize(
    ("field", "limit"), [("id", 128), ("type", 64), ("actor", 128), ("object", 512)]
)
def test_length_limits_are_named(field: str, limit: int) -> None:
    err = error_of(enc({**GOOD, field: "x" * (limit + 1)}))
    assert (err.field, err.code) == (field, "too_long")
    assert str(limit) in err.message
    decode_activity(enc({**GOOD, field: "x" * limit}))


def test_wrong_type_is_named() -> None:
    err = error_of(enc({**GOOD, "actor": 5}))
    assert (err.field, err.code) == ("actor", "wrong_type")


def test_ids_reject_whitespace_and_control_characters() -> None:
    for bad in ("a b", "a\x00", "", "tab\t"):
        err = error_of(enc({**GOOD, "actor": bad}))
        assert err.field == "actor"


@pytest.mark.parametrize("bad", ["x\n", "x\r\n", "\nx", "x\x85", "x\u2028", "x\x9f"])
@pytest.mark.parametrize("field", ["id", "actor", "type"])
def test_ids_reject_a_trailing_newline_and_c1_controls(field: str, bad: str) -> None:
    # The old rule's "$" matched before a trailing newline: "x\n" passed as an id, and broke the
    # newline-joined recipient lists and Lua arguments that deletes rely on.
    err = error_of(enc({**GOOD, field: bad}))
    assert (err.field, err.code) == (field, "invalid_chars")


def test_to_entries_and_follow_ids_reject_a_trailing_newline() -> None:
    err = error_of(enc({**GOOD, "to": ["u2", "victim\n"]}))
    assert err.field == "to[1]"
    with pytest.raises(ValidationError) as info:
        decode_follow_request(enc({"follower": "u1\n", "followee": "u2"}))
    assert info.value.field == "follower"
    with pytest.raises(ValidationError) as info:
        decode_follow_event(
            enc(
                {
                    "type": "follow",
                    "follower": "u1",
                    "followee": "u2\n",
                    "at": "2026-11-22T10:00:00Z",
                }
            )
        )
    assert info.value.field == "followee"


def test_a_delete_names_a_valid_activity_id() -> None:
    err = error_of(enc({**GOOD, "type": "Delete", "object": "victim-id\n"}))
    assert (err.field, err.code) == ("object", "invalid_chars")
    assert decode_activity(enc({**GOOD, "type": "Delete", "object": "victim-id"})).is_delete
    # Anything else's object is a free reference (a URL, "post:9 v2"), as before.
    assert decode_activity(enc({**GOOD, "object": "post 9"})).object == "post 9"


def test_is_valid_id_is_the_same_rule_as_the_decoder() -> None:
    for value in ["u1", "a:b/c", "é", "x" * 128]:
        assert is_valid_id(value) and ID_RE.match(value)
        assert decode_activity(enc({**GOOD, "actor": value})).actor == value
    for value in ["", "x\n", "a b", "x" * 129, "\x00"]:
        assert not is_valid_id(value)


def test_published_more_than_the_skew_ahead_is_refused() -> None:
    now = time.time()
    ahead = datetime.fromtimestamp(now + 301, UTC).isoformat()
    err = error_of_at(enc({**GOOD, "published": ahead}), now=now)
    assert (err.field, err.code) == ("published", "in_the_future")
    assert "300" in err.message
    within = datetime.fromtimestamp(now + 299, UTC).isoformat()
    assert decode_activity(enc({**GOOD, "published": within}), now=now).published
    # The year 9999 was accepted before (up to 2200 for published).
    err = error_of_at(enc({**GOOD, "published": "2199-01-01T00:00:00Z"}), now=now)
    assert err.code == "in_the_future"
    # The bound is a setting.
    assert decode_activity(enc({**GOOD, "published": ahead}), now=now, max_skew_s=600)
    with pytest.raises(ValidationError) as info:
        decode_activities(enc([GOOD, {**GOOD, "published": ahead}]), now=now)
    assert info.value.field == "[1].published"


def test_a_follow_dated_far_ahead_is_refused() -> None:
    # A follow dated 9999 could never be undone by an unfollow (the later event wins).
    with pytest.raises(ValidationError) as info:
        decode_follow_event(
            enc(
                {"type": "follow", "follower": "u2", "followee": "u1", "at": "9999-01-01T00:00:00Z"}
            )
        )
    assert (info.value.field, info.value.code) == ("at", "in_the_future")


def test_invalid_utf8_inside_a_string_is_invalid_utf8_whatever_the_msgspec_version() -> None:
    # msgspec < 0.23 raised UnicodeDecodeError here; 0.23 raises DecodeError("Invalid UTF-8
    # encoded string"), which the project answered as malformed_json.
    assert error_of(enc(GOOD).replace(b"a-123", b"a-\xff\xfe")).code == "invalid_utf8"
    assert error_of(b'{"id": "\xc3\x28"}').code == "invalid_utf8"


def test_published_needs_a_timezone_and_a_sane_range() -> None:
    assert error_of(enc({**GOOD, "published": "2026-11-22T10:00:00"})).field == "published"
    assert error_of(enc({**GOOD, "published": "yesterday"})).field == "published"
    err = error_of(enc({**GOOD, "published": "1969-12-31T23:59:59Z"}))
    assert (err.field, err.code) == ("published", "out_of_range")


def test_to_is_limited_to_100_recipients() -> None:
    err = error_of(enc({**GOOD, "to": [f"u{n}" for n in range(101)]}))
    assert (err.field, err.code) == ("to", "too_long")
    assert error_of(enc({**GOOD, "to": ["ok", "bad id"]})).field == "to[1]"


def test_notify_is_limited_to_100_valid_user_ids() -> None:
    ok = decode_activity(enc({**GOOD, "notify": [f"u{n}" for n in range(100)]}))
    assert len(ok.notify) == 100
    err = error_of(enc({**GOOD, "notify": [f"u{n}" for n in range(101)]}))
    assert (err.field, err.code) == ("notify", "too_long")
    assert error_of(enc({**GOOD, "notify": ["ok", "bad id"]})).field == "notify[1]"


def test_extra_is_limited_to_4_kib() -> None:
    err = error_of(enc({**GOOD, "extra": {"blob": "x" * 5000}}))
    assert (err.field, err.code) == ("extra", "too_large")
    assert "4096" in err.message


def test_malformed_json_and_oversized_events() -> None:
    assert error_of(b'{"id": ').code == "malformed_json"
    assert error_of(b"\xff\xfe").code == "malformed_json"
    assert error_of(b"[1]").code == "wrong_type"
    assert error_of(b" " * 40_000).code == "too_large"


def test_batches() -> None:
    assert len(decode_activities(enc([GOOD, {**GOOD, "id": "a-2"}]))) == 2
    assert len(decode_activities(enc(GOOD))) == 1
    with pytest.raises(ValidationError) as info:
        decode_activities(enc([GOOD] * (MAX_BATCH + 1)))
    assert info.value.code == "too_many" and "500" in info.value.message
    with pytest.raises(ValidationError) as info:
        decode_activities(enc([GOOD, {**GOOD, "id": ""}]))
    assert info.value.field == "[1].id"
    with pytest.raises(ValidationError):
        decode_activities(b"[]")


def test_follow_events() -> None:
    event = decode_follow_event(
        enc({"type": "follow", "follower": "u2", "followee": "u1", "at": "2026-11-22T10:00:00Z"})
    )
    assert event.type == "follow"
    with pytest.raises(ValidationError) as info:
        decode_follow_event(
            enc({"type": "block", "follower": "u2", "followee": "u1", "at": "2026-11-22T10:00:00Z"})
        )
    assert info.value.field == "type"
    with pytest.raises(ValidationError) as info:
        decode_follow_request(enc({"follower": "u1", "followee": "u1"}))
    assert info.value.field == "followee"
    with pytest.raises(ValidationError) as info:
        decode_follow_request(enc({"follower": "u1"}))
    assert (info.value.field, info.value.code) == ("followee", "missing")


def test_client_frames() -> None:
    assert decode_client_frame(enc({"type": "resume", "cursor": "abc.1"})).cursor == "abc.1"
    with pytest.raises(UnknownFrameType):
        decode_client_frame(enc({"type": "subscribe"}))
    with pytest.raises(ValidationError) as info:
        decode_client_frame(b"{nope")
    assert not isinstance(info.value, UnknownFrameType)
    with pytest.raises(ValidationError) as info:
        decode_client_frame(enc({"type": "resume"}))
    assert info.value.field == "cursor"
    with pytest.raises(ValidationError) as info:
        decode_client_frame(b" " * (64 * 1024 + 1))
    assert info.value.code == "too_large"


def test_error_as_dict_for_http() -> None:
    err = error_of(enc({**GOOD, "id": "x" * 200}))
    assert set(err.as_dict()) == {"code", "message", "field"}


# --- frames spliced by the Redis scripts from schemas.frames' pieces --------------------------
def _activity_frame(cursor: str, body: bytes) -> bytes:
    """Exactly what feed/lua/fanout.lua splices (head .. cursor .. middle .. body .. tail)."""
    return (
        frames.ACTIVITY_HEAD
        + cursor.encode()
        + frames.ACTIVITY_MIDDLE
        + body
        + frames.ACTIVITY_TAIL
    )


def _removed_frame(cursor: str, activity_id: str) -> bytes:
    """Exactly what feed/lua/remove.lua splices (the id as a JSON string)."""
    return (
        frames.REMOVED_HEAD
        + cursor.encode()
        + frames.REMOVED_MIDDLE
        + msgspec.json.encode(activity_id)
        + frames.REMOVED_TAIL
    )


def test_a_spliced_activity_frame_is_the_activity_frame_type() -> None:
    body = b'{"id":"a-1","actor":"u\\"1","extra":{"cursor":"x.1"}}'
    frame = _activity_frame("ab12.7", body)
    decoded = msgspec.json.decode(frame, type=frames.ActivityFrame)
    assert (decoded.cursor, bytes(decoded.activity)) == ("ab12.7", body)
    # byte for byte what the struct encodes: the pieces and the struct cannot drift apart
    assert frame == frames.encode_frame(frames.ActivityFrame("ab12.7", msgspec.Raw(body)))


def test_a_spliced_activity_frame_with_its_ts_is_the_activity_frame_type() -> None:
    body = b'{"id":"a-1","actor":"u1","extra":{"ts":17}}'
    frame = _activity_frame("ab12.7", body)[: -len(frames.ACTIVITY_TAIL)] + frames.activity_tail(
        1_765_000_000_123
    )
    decoded = msgspec.json.decode(frame, type=frames.ActivityFrame)
    assert (decoded.cursor, bytes(decoded.activity), decoded.ts) == (
        "ab12.7",
        body,
        1_765_000_000_123,
    )
    assert frame == frames.encode_frame(
        frames.ActivityFrame("ab12.7", msgspec.Raw(body), ts=1_765_000_000_123)
    )
    assert frames.frame_ts_ms(frame) == 1_765_000_000_123
    assert frames.frame_traceparent(frame) is None


_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("ts", [1_765_000_000_123, None])
def test_a_spliced_activity_frame_with_its_traceparent_is_the_activity_frame_type(
    ts: int | None,
) -> None:
    body = b'{"id":"a-1","actor":"u1"}'
    tail = frames.activity_tail(ts, _TRACEPARENT)
    frame = _activity_frame("ab12.7", body)[: -len(frames.ACTIVITY_TAIL)] + tail
    decoded = msgspec.json.decode(frame, type=frames.ActivityFrame)
    assert (decoded.traceparent, decoded.ts) == (_TRACEPARENT, ts)
    assert frame == frames.encode_frame(
        frames.ActivityFrame("ab12.7", msgspec.Raw(body), traceparent=_TRACEPARENT, ts=ts)
    )
    # read back from the frame's last bytes, with or without the ts after it
    assert frames.frame_traceparent(frame) == _TRACEPARENT
    assert frames.frame_ts_ms(frame) == ts


@pytest.mark.parametrize(
    "body",
    [
        b'{"id":"a-1"}',
        # a body's own traceparent, even the last field, is never taken for the frame's
        b'{"id":"a-1","x":{"traceparent":"' + _TRACEPARENT.encode() + b'"}}',
        b'{"id":"a-1","traceparent":"' + _TRACEPARENT.encode() + b'"}',
    ],
)
def test_a_frame_without_traceparent_has_none(body: bytes) -> None:
    assert frames.frame_traceparent(_activity_frame("ab12.7", body)) is None
    tail = frames.activity_tail(1_765_000_000_123)
    assert frames.frame_traceparent(_activity_frame("ab12.7", body)[:-1] + tail) is None
    assert frames.frame_traceparent(b"") is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"id":"a-1"}',
        b'{"id":"a-1","extra":{"ts":1765000000123}}',  # a body's own ts is never taken for it
        b'{"id":"a-1","x":","ts":1765000000123"}',
    ],
)
def test_a_frame_without_ts_has_none(body: bytes) -> None:
    assert frames.frame_ts_ms(_activity_frame("ab12.7", body)) is None
    assert frames.activity_tail(None) == frames.activity_tail(0) == frames.ACTIVITY_TAIL
    assert frames.frame_ts_ms(b"") is None and frames.frame_ts_ms(b"}") is None


def test_a_spliced_removed_frame_is_the_removed_type() -> None:
    decoded = msgspec.json.decode(_removed_frame("ab12.8", 'a "quoted" id'), type=frames.Removed)
    assert (decoded.cursor, decoded.id) == ("ab12.8", 'a "quoted" id')


def test_stream_position_reads_the_cursor_after_the_known_heads() -> None:
    assert frames.stream_position(_activity_frame("ab12.42", b"{}")) == ("ab12", 42)
    assert frames.stream_position(_removed_frame("e1.7", "x")) == ("e1", 7)
    assert frames.stream_position(frames.PRESENCE_HEAD + b'e9.0"}') == ("e9", 0)
    # a body that carries a "cursor" key of its own is never read
    body = b'{"cursor":"ff.999","pad":"' + b"x" * 100 + b'"}'
    assert frames.stream_position(_activity_frame("ab12.5", body)) == ("ab12", 5)


@pytest.mark.parametrize(
    "frame",
    [
        b"{}",
        b'{"type":"welcome","user":"u","cursor":"e1.5"}',  # no frame of the stream
        b'{"type":"activity","cursor":"e1"}',
        b'{"type":"activity","cursor":"e1.x"}',
        b'{"type":"activity","cursor":".5"}',
        b'{"type":"activity","cursor":"E1.5"}',
        b'{"type":"activity","cursor":"e1.5',
        b'{"type":"activity","cursor":"e1.1234567890123456789"}',
        b'{"type":"activity","cursor":"e1.\xd9\xa3"}',  # an Arabic-Indic digit
        b' {"type":"activity","cursor":"e1.5"}',
    ],
)
def test_stream_position_rejects_what_the_scripts_never_build(frame: bytes) -> None:
    assert frames.stream_position(frame) is None
