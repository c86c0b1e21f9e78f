"""Property-based tests: hostile bytes and text never get past the decoders as anything but a
valid value or the one typed :class:`schemas.ValidationError`.

Covers the event decoders (``decode_activity``, ``decode_activities``, ``decode_follow_event``),
the WebSocket client-frame decoder (``decode_client_frame``, whose ``UnknownFrameType`` is a
``ValidationError``) and the session that uses it (``Session.receive_text``/``receive_bytes``:
any frame leaves the session open or closed with one of the contract's close codes).

Inputs: arbitrary bytes and text, arbitrary JSON documents (NaN/Infinity included), near-valid
events whose fields are replaced by hostile values, duplicate keys, invalid UTF-8 spliced in,
truncations, and fixed monsters (``[`` * 100000, multi-megabyte strings). Every decoder call is
bounded in time (hypothesis ``deadline``); the monsters in time (``MONSTER_SECONDS``, derived from
measurement) and in memory (``tracemalloc`` peak).

Every decoder call is counted; the total is printed at the end of the module
(``fuzz decoding: N inputs tried``).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.session import (
    CLOSE_INVALID_FRAME,
    CLOSE_RATE_LIMITED,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED,
    Session,
)
from schemas import (
    MAX_ACTIVITY_BYTES,
    MAX_BATCH,
    MAX_EXTRA_BYTES,
    MAX_INBOUND_FRAME,
    MAX_RECIPIENTS,
    Activity,
    FollowEvent,
    Resume,
    UnknownFrameType,
    ValidationError,
    decode_activities,
    decode_activity,
    decode_client_frame,
    decode_follow_event,
    encode_activity,
)

#: Decoder calls made by this module, by decoder.
TRIED: Counter[str] = Counter()

FUZZ = settings(
    max_examples=400,
    deadline=2000,  # ms per example: a hang fails the test
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Close codes a client frame may cause (CONTRACT.md, "WebSocket").
FRAME_CLOSE_CODES = {CLOSE_UNSUPPORTED, CLOSE_INVALID_FRAME, CLOSE_TOO_BIG, CLOSE_RATE_LIMITED}
_EPOCH_MIN = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_MAX = datetime(2200, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module", autouse=True)
def _report_count(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    total = sum(TRIED.values())
    detail = ", ".join(f"{name} {count}" for name, count in sorted(TRIED.items()))
    line = f"fuzz decoding: {total} inputs tried ({detail})"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(f"\n{line}")
    else:
        print(line)


# --- the properties ---------------------------------------------------------------------------
def check_activity(activity: Activity) -> None:
    """What a decoded activity must satisfy: the contract's limits, and a lossless re-encoding."""
    assert isinstance(activity, Activity)
    assert 1 <= len(activity.id) <= 128 and 1 <= len(activity.actor) <= 128
    assert 1 <= len(activity.type) <= 64 and 1 <= len(activity.object) <= 512
    assert activity.target is None or 1 <= len(activity.target) <= 512
    assert len(activity.to) <= MAX_RECIPIENTS
    assert _EPOCH_MIN <= activity.published < _EPOCH_MAX
    encoded = encode_activity(activity)  # what ingest produces and timelines store
    activity.actor.encode()  # the Kafka key
    if activity.extra is not None:
        assert len(msgspec.json.encode(activity.extra)) <= MAX_EXTRA_BYTES
    assert decode_activity(encoded) == activity


def activity_or_error(data: bytes | str) -> Activity | None:
    TRIED["decode_activity"] += 1
    try:
        activity = decode_activity(data)
    except ValidationError as exc:
        assert isinstance(exc.field, str) and exc.code and exc.message
        return None
    check_activity(activity)
    return activity


def activities_or_error(data: bytes) -> list[Activity] | None:
    TRIED["decode_activities"] += 1
    try:
        activities = decode_activities(data)
    except ValidationError as exc:
        assert isinstance(exc.field, str) and exc.code and exc.message
        return None
    assert 1 <= len(activities) <= MAX_BATCH
    for activity in activities:
        check_activity(activity)
    return activities


def follow_or_error(data: bytes) -> FollowEvent | None:
    TRIED["decode_follow_event"] += 1
    try:
        event = decode_follow_event(data)
    except ValidationError as exc:
        assert exc.code and exc.message
        return None
    assert isinstance(event, FollowEvent)
    assert event.type in ("follow", "unfollow") and event.follower != event.followee
    assert event.at.tzinfo is not None
    assert decode_follow_event(msgspec.json.encode(event)) == event
    return event


def frame_or_error(data: bytes | str) -> Resume | None:
    TRIED["decode_client_frame"] += 1
    try:
        frame = decode_client_frame(data)
    except UnknownFrameType as exc:
        assert exc.field == "type"
        return None
    except ValidationError as exc:
        assert exc.code and exc.message
        return None
    assert isinstance(frame, Resume) and 1 <= len(frame.cursor) <= 512
    return frame


def every_decoder(data: bytes) -> None:
    activity_or_error(data)
    activities_or_error(data)
    follow_or_error(data)
    frame_or_error(data)


# --- strategies -------------------------------------------------------------------------------
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=25,
)
hostile_strings = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=100, max_size=700),
    st.sampled_from(["", " ", "a b", "\x00", "\x7f", "\u2028", "\ufeff", "é" * 300, "x" * 129]),
    st.builds(lambda n: "x" * n, st.sampled_from([64, 65, 128, 129, 512, 513, 5000])),
)
hostile_values = st.one_of(hostile_strings, json_values)
offsets = st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))
timestamps = st.one_of(
    st.datetimes(timezones=offsets).map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat()),  # naive: no offset
    st.sampled_from(
        [
            "2026-11-22T10:00:00Z",
            "2026-11-22T10:00:00.123456789+05:30",
            "1969-12-31T23:59:59Z",
            "2200-01-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-22T23:59:60Z",
            "2026-11-22 10:00:00Z",
            "yesterday",
        ]
    ),
)
ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:._-@"
ids = st.one_of(st.text(ID_CHARS, min_size=1, max_size=20), hostile_strings)


@st.composite
def near_valid_activities(draw: st.DrawFn) -> dict[str, Any]:
    """An activity document whose fields are valid, hostile, missing or of the wrong type."""
    doc: dict[str, Any] = {
        "id": draw(ids),
        "type": draw(st.one_of(st.sampled_from(["Create", "Like", "Delete"]), hostile_strings)),
        "actor": draw(ids),
        "object": draw(st.one_of(st.from_regex(r"\Apost:[0-9]{1,6}\Z"), hostile_strings)),
        "published": draw(timestamps),
    }
    if draw(st.booleans()):
        doc["target"] = draw(st.one_of(st.none(), hostile_strings))
    if draw(st.booleans()):
        doc["to"] = draw(st.one_of(st.lists(ids, max_size=110), hostile_values))
    if draw(st.booleans()):
        doc["extra"] = draw(st.one_of(json_values, st.none()))
    return _perturb(draw, doc)


def _perturb(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any]:
    """Drop or replace with a hostile value up to two of ``doc``'s fields."""
    for name in draw(st.lists(st.sampled_from(sorted(doc)), max_size=2)):
        if draw(st.booleans()):
            doc.pop(name, None)
        else:
            doc[name] = draw(hostile_values)
    return doc


@st.composite
def near_valid_follows(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": draw(st.one_of(st.sampled_from(["follow", "unfollow"]), hostile_strings)),
        "follower": draw(ids),
        "followee": draw(ids),
        "at": draw(timestamps),
    }
    return _perturb(draw, doc)


@st.composite
def near_valid_frames(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": draw(st.one_of(st.sampled_from(["resume", "subscribe", "RESUME"]), hostile_values)),
        "cursor": draw(
            st.one_of(st.from_regex(r"\A[a-z0-9]{1,16}\.[0-9]{1,18}\Z"), hostile_values)
        ),
    }
    if draw(st.booleans()):
        doc[draw(st.text(max_size=8))] = draw(hostile_values)
    return doc


def render(doc: Any) -> bytes:
    """JSON text of ``doc``; non-finite floats come out as ``NaN``/``Infinity`` (not JSON)."""
    return json.dumps(doc, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def mangled(draw: st.DrawFn, documents: st.SearchStrategy[Any]) -> bytes:
    """A rendered document, then possibly: a duplicate key, invalid UTF-8 spliced in, a cut."""
    data = render(draw(documents))
    how = draw(st.sampled_from(["none", "duplicate", "splice", "truncate", "wrap", "bom"]))
    if how == "duplicate" and data.startswith(b"{") and len(data) > 2:
        extra = render(draw(st.text(max_size=8)))[0:] + b":" + render(draw(hostile_values))
        data = b"{" + extra + b"," + data[1:]
    elif how == "splice":
        at = draw(st.integers(0, len(data)))
        junk = draw(
            st.sampled_from(
                [
                    b"\xff",
                    b"\xc3",
                    b"\xed\xa0\x80",
                    b"\xf4\x90\x80\x80",
                    b"\x00",
                    b"\\ud800",
                    b'\\"',
                    b"\xc0\xaf",
                ]
            )
        )
        data = data[:at] + junk + data[at:]
    elif how == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "wrap":
        depth = draw(st.integers(1, 3000))
        data = b"[" * depth + data + b"]" * draw(st.integers(0, depth))
    elif how == "bom":
        data = b"\xef\xbb\xbf" + data
    return data


# --- event decoding ---------------------------------------------------------------------------
@settings(FUZZ, max_examples=3000)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(data: bytes) -> None:
    every_decoder(data)


@settings(FUZZ, max_examples=2000)
@given(st.text(max_size=1024))
def test_arbitrary_text(text: str) -> None:
    activity_or_error(text)
    frame_or_error(text)
    every_decoder(text.encode())


@FUZZ
@given(st.text(alphabet=st.characters(codec=None, categories=["Cs", "Ll", "Nd", "Po"])))
def test_text_with_lone_surrogates(text: str) -> None:
    """A ``str`` cannot always be encoded as UTF-8; that is invalid input, not a crash."""
    activity_or_error('{"id":"' + text + '"}')
    frame_or_error('{"type":"resume","cursor":"' + text + '"}')


@FUZZ
@given(mangled(json_values))
def test_arbitrary_json(data: bytes) -> None:
    every_decoder(data)


@FUZZ
@given(mangled(near_valid_activities()))
def test_near_valid_activities(data: bytes) -> None:
    activity_or_error(data)


@settings(FUZZ, max_examples=200)
@given(st.lists(st.one_of(near_valid_activities(), json_values), min_size=0, max_size=8))
def test_near_valid_batches(docs: list[Any]) -> None:
    activities_or_error(render(docs))


@FUZZ
@given(mangled(near_valid_follows()))
def test_near_valid_follow_events(data: bytes) -> None:
    follow_or_error(data)


@settings(FUZZ, max_examples=150)
@given(st.data())
def test_valid_activities_are_accepted(data: st.DataObject) -> None:
    """The generators above do reach the valid side: a well-formed activity decodes."""
    kind = data.draw(st.sampled_from(["Create", "Like", "Delete"]))
    doc = {
        "id": data.draw(st.text(ID_CHARS, min_size=1, max_size=128)),
        "type": kind,
        "actor": data.draw(st.text(ID_CHARS, min_size=1, max_size=128)),
        # A Delete's object is an activity id; anything else's is a free reference.
        "object": data.draw(
            st.text(ID_CHARS, min_size=1, max_size=128)
            if kind == "Delete"
            else st.text(min_size=1, max_size=512)
        ),
        # Up to a day before now (local times carry offsets of up to a day): never ahead of
        # the receiver's clock by more than the allowed skew.
        "published": data.draw(
            st.datetimes(
                min_value=datetime(1970, 1, 2),
                max_value=datetime.now() - timedelta(days=1),
                timezones=offsets,
            )
        ).isoformat(),
        "to": data.draw(st.lists(st.text(ID_CHARS, min_size=1, max_size=20), max_size=100)),
        "extra": data.draw(
            st.dictionaries(st.text(max_size=10), json_scalars.filter(_finite), max_size=10)
        ),
    }
    activity = activity_or_error(render(doc))
    assert activity is not None, doc
    assert activity.id == doc["id"] and activity.to == doc["to"]


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


# --- WebSocket frames -------------------------------------------------------------------------
@FUZZ
@given(mangled(near_valid_frames()))
def test_near_valid_client_frames(data: bytes) -> None:
    frame_or_error(data)
    frame_or_error(data.decode("utf-8", "replace"))


@settings(FUZZ, max_examples=300)
@given(
    st.lists(
        st.one_of(
            st.text(max_size=300),
            mangled(near_valid_frames()).map(lambda b: b.decode("utf-8", "replace")),
            st.builds(
                lambda n: '{"type":"resume","cursor":"' + "x" * n + '"}', st.integers(0, 70_000)
            ),
        ),
        min_size=1,
        max_size=12,
    ),
    st.floats(min_value=0, max_value=5),
)
def test_session_text_frames(frames: list[str], spacing: float) -> None:
    """Any sequence of text frames leaves the session open, or closed with a contract code."""
    session = Session("u1", "ep0", 5, max_queue_bytes=1 << 16)
    now = 100.0
    for text in frames:
        TRIED["Session.receive_text"] += 1
        session.receive_text(text, now=now)
        now += spacing
        for frame in session.frames_to_send():
            decoded = msgspec.json.decode(frame)
            assert decoded["type"] in {"welcome", "reset", "activity", "removed"}
            session.frame_sent(len(frame))
        close = session.close_code()
        if close is not None:
            assert close[0] in FRAME_CLOSE_CODES, close
            assert len(close[1].encode()) <= 123
    if session.closed:
        assert session.frames_to_send() == []


@settings(FUZZ, max_examples=500)
@given(st.binary(max_size=4096) | st.builds(lambda n: b"x" * n, st.integers(0, 70_000)))
def test_session_binary_frames(data: bytes) -> None:
    session = Session("u1", "ep0", 5)
    TRIED["Session.receive_bytes"] += 1
    session.receive_bytes(data)
    expected = CLOSE_TOO_BIG if len(data) > MAX_INBOUND_FRAME else CLOSE_UNSUPPORTED
    assert session.close_code() is not None and session.close_code()[0] == expected  # type: ignore[index]


# --- monsters: deep nesting, huge strings, bounded time and memory ----------------------------
#: Time bound of one monster decode. Derived from measurement: the slowest monster
#: (``batch_100k_numbers`` through ``decode_activities``) takes 4.7-4.9 ms on the 2-core CI-sized
#: machine while other test suites loaded both cores (every other monster < 1.1 ms). The bound is
#: 10x that worst case: a real regression (a Python-level pass over each byte of the 2 MB string,
#: ~100 ns/byte, or any quadratic step on the 100k-element inputs) takes 200 ms or more, while the
#: best of three tries removes scheduler stalls from the figure on a loaded machine.
MONSTER_SECONDS = 0.05


def bounded(
    decode: Callable[[Any], Any], data: bytes | str, *, seconds: float = MONSTER_SECONDS
) -> None:
    """``decode(data)`` returns or raises ValidationError, in bounded time and memory.

    Time is the best of three untraced calls (tracemalloc slows allocation-heavy decodes ~20x);
    memory is the peak of a fourth call under tracemalloc."""

    def call() -> None:
        with contextlib.suppress(ValidationError):
            decode(data)

    elapsed = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        call()
        elapsed = min(elapsed, time.perf_counter() - started)
    tracemalloc.start()
    try:
        call()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < seconds, f"{decode.__name__} took {elapsed * 1000:.1f} ms (bound {seconds}s)"
    # Linear in the input at worst, never a blow-up. The worst case is a batch of tiny items
    # (``[1,1,...]``): one ``msgspec.Raw`` (~64 bytes) per 2 input bytes before the count check.
    assert peak < 40 * len(data) + (4 << 20), f"{decode.__name__} peaked at {peak} bytes"


DECODERS: list[Callable[[Any], Any]] = [
    activity_or_error,
    activities_or_error,
    follow_or_error,
    frame_or_error,
]
_VALID = {
    "id": "a-1",
    "type": "Create",
    "actor": "u1",
    "object": "post:1",
    "published": "2026-11-22T10:00:00Z",
}
MONSTERS: dict[str, bytes] = {
    "open_arrays_100k": b"[" * 100_000,
    "open_objects_100k": b'{"a":' * 100_000,
    "closed_arrays_100k": b"[" * 100_000 + b"]" * 100_000,
    "nested_in_extra": render({**_VALID})[:-1]
    + b',"extra":{"x":'
    + b"[" * 5000
    + b"]" * 5000
    + b"}}",
    "nested_in_unknown_field": b'{"type":"resume","cursor":"x","z":'
    + b"[" * 20_000
    + b"]" * 20_000
    + b"}",
    "nested_in_batch": b"[" + render(_VALID) + b"," + b"[" * 50_000 + b"]" * 50_000 + b"]",
    "string_2mb": b'"' + b"x" * (2 << 20) + b'"',
    "id_1mb": render({**_VALID, "id": "x" * (1 << 20)}),
    "object_40k": render({**_VALID, "object": "o" * 40_000}),
    "extra_5k": render({**_VALID, "extra": {"k": "v" * 5000}}),
    "to_101": render({**_VALID, "to": [f"u{i}" for i in range(101)]}),
    "batch_501": render([{**_VALID, "id": f"a-{i}"} for i in range(501)]),
    "batch_100k_numbers": b"[" + b"1," * 100_000 + b"1]",
    "nan": render({**_VALID, "extra": {"x": float("nan")}}),
    "infinity": render({**_VALID, "extra": {"x": float("inf")}}),
    "negative_infinity": b'{"type":"resume","cursor":-Infinity}',
    "huge_number": render({**_VALID})[:-1] + b',"extra":{"x":1e999999}}',
    "long_integer": render({**_VALID})[:-1] + b',"extra":{"x":' + b"9" * 30_000 + b"}}",
    "duplicate_keys": b'{"id":"a","id":"b","id":' + b'"' + b"c" * 200 + b'",' + render(_VALID)[1:],
    "invalid_utf8_in_id": render(_VALID).replace(b"a-1", b"a-\xff\xfe"),
    "overlong_utf8": render(_VALID).replace(b"u1", b"u\xc0\xaf"),
    "lone_surrogate_escape": render(_VALID).replace(b"u1", b"u\\udc80"),
    "nul_bytes": b"\x00" * 10_000,
    "utf16": render(_VALID).decode().encode("utf-16"),
    "many_keys": b"{" + b",".join(b'"k%d":1' % i for i in range(20_000)) + b"}",
}


@pytest.mark.parametrize("name", sorted(MONSTERS))
@pytest.mark.parametrize("decode", DECODERS, ids=lambda d: d.__name__)
def test_monsters(name: str, decode: Callable[[Any], Any]) -> None:
    bounded(decode, MONSTERS[name])


@pytest.mark.parametrize("name", sorted(MONSTERS))
def test_monsters_as_text_frames(name: str) -> None:
    text = MONSTERS[name].decode("utf-8", "replace")
    bounded(frame_or_error, text)
    session = Session("u1", "ep0", 5)
    TRIED["Session.receive_text"] += 1
    session.receive_text(text, now=1.0)
    close = session.close_code()
    assert close is None or close[0] in FRAME_CLOSE_CODES


def test_limits_are_named() -> None:
    """The monsters that break a declared limit say which one."""
    cases = {
        "batch_501": ("", "too_many"),
        "to_101": ("to", "too_long"),
        "extra_5k": ("extra", "too_large"),
        "open_arrays_100k": ("", "too_large"),
    }
    for name, (field, code) in cases.items():
        with pytest.raises(ValidationError) as info:
            decode_activities(MONSTERS[name]) if name.startswith("batch") else decode_activity(
                MONSTERS[name]
            )
        TRIED["decode_activity"] += 1
        assert (info.value.field, info.value.code) == (field, code), name
    with pytest.raises(ValidationError) as deep:
        decode_activities(b"[" * 20_000)
    TRIED["decode_activities"] += 1
    assert deep.value.code == "too_deep"
    assert len(MONSTERS["object_40k"]) > MAX_ACTIVITY_BYTES
