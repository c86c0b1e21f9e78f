"""Cursor encoding (``feed.cursor``): order keys, feed positions and stream cursors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from feed.cursor import (
    CursorError,
    StreamCursor,
    decode_position,
    decode_stream,
    encode_position,
    order_key,
    split_order_key,
)

ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp")),
    min_size=1,
    max_size=40,
)


@given(st.integers(0, 10**16 - 1), ids)
def test_position_round_trip(ts: int, activity_id: str) -> None:
    key = order_key(ts, activity_id)
    assert decode_position(encode_position(key)) == key
    assert split_order_key(key) == (ts, activity_id)


@given(st.integers(0, 10**15), ids, st.integers(0, 10**15), ids)
def test_order_keys_sort_like_published_then_id(t1: int, a1: str, t2: int, a2: str) -> None:
    k1, k2 = order_key(t1, a1), order_key(t2, a2)
    # Redis compares members as bytes; Cassandra compares (bigint, UTF-8 text).
    assert (k1.encode() < k2.encode()) == ((t1, a1.encode()) < (t2, a2.encode()))


def test_order_key_range() -> None:
    with pytest.raises(ValueError):
        order_key(-1, "a")
    with pytest.raises(ValueError):
        order_key(10**16, "a")


@pytest.mark.parametrize("bad", ["", "x", "p", "p!!!", "pAAAA", "s1.2", "p" + "A" * 500])
def test_bad_positions(bad: str) -> None:
    with pytest.raises(CursorError):
        decode_position(bad)


def test_stream_cursor() -> None:
    assert decode_stream("8f3af4d3.42") == StreamCursor("8f3af4d3", 42)
    assert str(StreamCursor("ab", 3)) == "ab.3"
    for bad in ("", "ab", "ab.", ".3", "AB.3", "ab.-1", "ab.3.4", "p" + "x" * 30 + ".1"):
        with pytest.raises(CursorError):
            decode_stream(bad)


# Digits that are not ASCII: str.isdigit() and \d accept them, int() reads some of them.
_NOT_ASCII_DIGITS = ["\u00b2", "\u0663", "\u06f5", "\u0967", "\uff11", "\U0001d7d9"]


@given(st.integers(0, 10**16 - 1), ids, st.integers(0, 15), st.sampled_from(_NOT_ASCII_DIGITS))
def test_order_keys_with_digits_that_are_not_ascii_are_refused(
    ts: int, activity_id: str, at: int, digit: str
) -> None:
    key = order_key(ts, activity_id)
    bad = key[:at] + digit + key[at + 1 :]
    with pytest.raises(CursorError):
        split_order_key(bad)
    with pytest.raises(CursorError):
        decode_position(encode_position(bad))


@given(st.integers(0, 10**16 - 1), ids, st.sampled_from(["\n", "\r\n", "\x00", " "]))
def test_positions_with_a_trailing_newline_or_control_are_refused(
    ts: int, activity_id: str, tail: str
) -> None:
    key = order_key(ts, activity_id) + tail
    with pytest.raises(CursorError):
        decode_position(encode_position(key))
    cursor = encode_position(order_key(ts, activity_id))
    for bad in (cursor + tail, cursor + "=", cursor + "!", tail + cursor):
        with pytest.raises(CursorError):
            decode_position(bad)


@given(
    st.text(alphabet="abcdef0123456789", min_size=1, max_size=16),
    st.integers(0, 10**18 - 1),
    st.sampled_from(_NOT_ASCII_DIGITS),
)
def test_stream_cursors_are_ascii_and_matched_whole(epoch: str, seq: int, digit: str) -> None:
    good = f"{epoch}.{seq}"
    assert decode_stream(good) == StreamCursor(epoch, seq)
    for bad in (good + "\n", good + digit, f"{epoch}.{digit}", f"{digit}.{seq}", "\n" + good):
        with pytest.raises(CursorError):
            decode_stream(bad)


def test_position_ids_must_be_valid_activity_ids() -> None:
    with pytest.raises(CursorError):
        decode_position(encode_position(order_key(1, "a" * 129)))
    with pytest.raises(CursorError):
        decode_position(encode_position(order_key(1, "a b")))
    assert decode_position(encode_position(order_key(1, "a" * 128))) == order_key(1, "a" * 128)
