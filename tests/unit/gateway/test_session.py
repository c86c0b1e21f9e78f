"""The sans-I/O stream protocol (gateway.session.Session), driven without sockets or Redis."""

from __future__ import annotations

import json
from typing import Any

import hypothesis.strategies as st
from hypothesis import given, settings

from feed.cursor import encode_position, order_key
from gateway.session import (
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_FRAME,
    CLOSE_RATE_LIMITED,
    CLOSE_TOO_BIG,
    CLOSE_TOO_SLOW,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNSUPPORTED,
    Session,
    stream_position,
)
from tests.support.stream_session import (
    EPOCH,
    activity,
    drain,
    new,
    removed,
    seqs,
    started,
    stream,
)


# --- welcome --------------------------------------------------------------------------------------
def test_welcome_is_the_first_frame() -> None:
    frames = drain(new(7))
    assert frames == [{"type": "welcome", "user": "u1", "cursor": f"{EPOCH}.7"}]


def test_welcome_is_sent_once() -> None:
    session = new(0)
    drain(session)
    assert drain(session) == []


def test_new_session_asks_nothing_and_stays_open() -> None:
    session = new(3)
    assert session.history_request() is None
    assert session.close_code() is None
    assert session.cursor == f"{EPOCH}.3"


# --- live frames ----------------------------------------------------------------------------------
def test_live_frames_in_order_are_sent() -> None:
    session = started(0)
    for seq in (1, 2, 3):
        session.receive_live(activity(seq))
    assert seqs(drain(session)) == [1, 2, 3]
    assert session.cursor == f"{EPOCH}.3"


def test_live_frame_bytes_are_forwarded_unchanged() -> None:
    session = started(0)
    frame = activity(1)
    session.receive_live(frame)
    assert session.frames_to_send() == [frame]


def test_removed_frames_flow_like_activities() -> None:
    session = started(0)
    session.receive_live(activity(1))
    session.receive_live(removed(2, "a-1"))
    frames = drain(session)
    assert [f["type"] for f in frames] == ["activity", "removed"]
    assert frames[1]["id"] == "a-1"


def test_duplicate_live_frame_is_dropped() -> None:
    session = started(0)
    session.receive_live(activity(1))
    session.receive_live(activity(1))
    assert seqs(drain(session)) == [1]
    assert session.duplicates == 1


def test_live_frame_at_or_before_welcome_is_dropped() -> None:
    session = started(5)
    session.receive_live(activity(4))
    session.receive_live(activity(5))
    assert drain(session) == []


def test_malformed_live_frame_is_ignored() -> None:
    session = started(0)
    session.receive_live(b'{"type":"activity","activity":{}}')
    session.receive_live(b"garbage")
    assert drain(session) == []
    assert session.close_code() is None


# --- gaps -----------------------------------------------------------------------------------------
def test_gap_asks_for_history_after_last() -> None:
    session = started(0)
    session.receive_live(activity(1))
    session.receive_live(activity(3))
    assert seqs(drain(session)) == [1]
    assert session.history_request() == 1
    assert session.gaps == 1


def test_wants_history_from_the_gap_until_the_answer() -> None:
    session = started(0)
    session.receive_live(activity(1))
    assert not session.wants_history  # in order: the adapter may write it at once
    session.receive_live(activity(3))
    assert session.wants_history  # a gap: the adapter must read the stream (its pump)
    assert session.history_request() == 1
    assert session.wants_history  # asked, not answered
    session.receive_history(stream(2, 3), 1)
    assert not session.wants_history
    assert seqs(drain(session)) == [1, 2, 3]
    session.receive_live(activity(9))
    session.shutdown()
    assert not session.wants_history  # closed: nothing more to read


def test_history_request_is_returned_once() -> None:
    session = started(0)
    session.receive_live(activity(2))
    assert session.history_request() == 0
    assert session.history_request() is None


def test_gap_is_filled_from_history_then_buffer() -> None:
    session = started(0)
    session.receive_live(activity(3))
    session.receive_live(activity(4))
    assert session.history_request() == 0
    session.receive_live(activity(5))  # still buffered while the read is in flight
    assert drain(session) == []
    session.receive_history(stream(1, 4), 1)
    assert seqs(drain(session)) == [1, 2, 3, 4, 5]


def test_history_overlapping_buffer_sends_no_repeat() -> None:
    session = started(0)
    session.receive_live(activity(2))
    assert session.history_request() == 0
    session.receive_live(activity(3))
    session.receive_history(stream(1, 3), 1)
    assert seqs(drain(session)) == [1, 2, 3]


def test_gap_that_the_stream_no_longer_holds_resets() -> None:
    session = started(0)
    session.receive_live(activity(1))
    session.receive_live(activity(9))
    assert session.history_request() == 1
    session.receive_history(stream(5, 9), 5)  # seq 2..4 trimmed
    frames = drain(session)
    assert [f["type"] for f in frames] == ["activity", "reset"]
    assert session.cursor == f"{EPOCH}.9"
    session.receive_live(activity(10))
    assert seqs(drain(session)) == [10]


def test_empty_history_when_frames_must_exist_resets() -> None:
    session = started(0)
    session.receive_live(activity(4))
    session.history_request()
    session.receive_history([], None)
    assert [f["type"] for f in drain(session)] == ["reset"]
    assert session.resets == 1


def test_hole_inside_history_resets() -> None:
    session = started(0)
    session.receive_live(activity(5))
    session.history_request()
    session.receive_history([(1, activity(1)), (3, activity(3))], 1)
    assert [f["type"] for f in drain(session)] == ["activity", "reset"]


def test_partial_history_asks_for_the_rest() -> None:
    session = started(0)
    session.receive_live(activity(300))
    assert session.history_request() == 0
    session.receive_history(stream(1, 100), 1)
    assert session.history_request() == 100
    session.receive_history(stream(101, 299), 1)
    assert seqs(drain(session)) == list(range(1, 301))
    assert session.history_request() is None


def test_history_answer_without_request_is_ignored() -> None:
    session = started(0)
    session.receive_history(stream(1, 3), 1)
    assert drain(session) == []


def test_failed_history_read_is_asked_again() -> None:
    session = started(0)
    session.receive_live(activity(2))
    assert session.history_request() == 0
    session.history_failed()
    assert session.history_request() == 0
    session.receive_history(stream(1, 1), 1)
    assert seqs(drain(session)) == [1, 2]


def test_check_gap_reads_the_stream_after_last() -> None:
    session = started(4)
    session.check_gap()
    assert session.history_request() == 4
    session.receive_history(stream(5, 6), 1)
    assert seqs(drain(session)) == [5, 6]


def test_check_gap_with_nothing_missed_sends_nothing() -> None:
    session = started(4)
    session.check_gap()
    session.history_request()
    session.receive_history([], 1)
    assert drain(session) == []
    assert session.resets == 0


def test_check_gap_while_a_read_is_pending_reads_again() -> None:
    session = started(0)
    session.receive_live(activity(2))
    assert session.history_request() == 0
    session.check_gap()
    session.receive_history(stream(1, 2), 1)
    assert session.history_request() == 2
    session.receive_history(stream(3, 3), 1)
    assert seqs(drain(session)) == [1, 2, 3]


# --- epochs ---------------------------------------------------------------------------------------
def test_live_frame_of_a_new_epoch_resets_and_follows_it() -> None:
    session = started(5)
    session.receive_live(activity(1, epoch="ffff0000"))
    frames = drain(session)
    assert [f["type"] for f in frames] == ["reset", "activity"]
    assert frames[1]["cursor"] == "ffff0000.1"
    session.receive_live(activity(2, epoch="ffff0000"))
    assert seqs(drain(session)) == [2]
    assert session.cursor == "ffff0000.2"


# --- hold after the welcome -----------------------------------------------------------------------
def test_live_frames_are_held_until_start_live() -> None:
    session = new(0, hold=True)
    drain(session)
    session.receive_live(activity(1))
    assert drain(session) == []
    session.start_live()
    assert seqs(drain(session)) == [1]


def test_client_frame_ends_the_hold() -> None:
    session = new(2, hold=True)
    drain(session)
    session.receive_live(activity(3))
    session.receive_text(json.dumps({"type": "resume", "cursor": f"{EPOCH}.2"}))
    assert seqs(drain(session)) == [3]


def test_resume_during_hold_replays_before_held_frames() -> None:
    session = new(10, hold=True)
    drain(session)
    session.receive_live(activity(11))
    session.receive_live(activity(12))
    session.receive_text(json.dumps({"type": "resume", "cursor": f"{EPOCH}.7"}))
    assert drain(session) == []
    assert session.history_request() == 7
    session.receive_history(stream(8, 12), 1)
    assert seqs(drain(session)) == [8, 9, 10, 11, 12]


def test_start_live_after_hold_with_gap_asks_history() -> None:
    session = new(0, hold=True)
    drain(session)
    session.receive_live(activity(2))
    assert session.history_request() is None
    session.start_live()
    assert session.history_request() == 0


# --- resume ---------------------------------------------------------------------------------------
def resume(session: Session, cursor: str) -> None:
    session.receive_text(json.dumps({"type": "resume", "cursor": cursor}))


def test_resume_replays_after_the_cursor_then_continues_live() -> None:
    session = started(10)
    resume(session, f"{EPOCH}.7")
    assert session.history_request() == 7
    session.receive_history(stream(8, 10), 1)
    session.receive_live(activity(11))
    assert seqs(drain(session)) == [8, 9, 10, 11]
    assert session.replayed == 3


def test_live_frames_during_resume_read_wait_for_the_replay() -> None:
    session = started(10)
    resume(session, f"{EPOCH}.8")
    session.history_request()
    session.receive_live(activity(11))
    assert drain(session) == []
    session.receive_history(stream(9, 11), 1)
    assert seqs(drain(session)) == [9, 10, 11]


def test_resume_at_the_current_position_replays_nothing() -> None:
    session = started(10)
    resume(session, f"{EPOCH}.10")
    assert session.history_request() is None
    assert drain(session) == []


def test_resume_at_or_before_reset_through_resets_and_continues_live() -> None:
    """Items may be missing from the stream up to ``reset_through`` (a large account followed
    while offline): a resume there is answered with reset, one after it is replayed."""
    session = started(12, reset_through=10)
    resume(session, f"{EPOCH}.10")
    assert [f["type"] for f in drain(session)] == ["reset"]
    assert session.history_request() is None
    session.receive_live(activity(13))
    assert seqs(drain(session)) == [13]
    later = started(12, reset_through=10)
    resume(later, f"{EPOCH}.11")
    assert later.history_request() == 11
    later.receive_history(stream(12, 12), 1)
    assert seqs(drain(later)) == [12]


def test_rebase_after_start_reads_the_frames_added_before_the_welcome() -> None:
    """The connect's catch-up added frames after the welcome's position: they are read from
    the stream once the hold ends."""
    session = new(5, hold=True)
    drain(session)
    session.rebase(EPOCH, 7)
    session.start_live()
    assert session.history_request() == 5
    session.receive_history(stream(6, 7), 1)
    assert seqs(drain(session)) == [6, 7]


def test_resume_with_foreign_epoch_resets_and_continues_live() -> None:
    session = started(10)
    resume(session, "00000000.3")
    assert [f["type"] for f in drain(session)] == ["reset"]
    assert session.history_request() is None
    session.receive_live(activity(11))
    assert seqs(drain(session)) == [11]


def test_resume_with_a_position_cursor_resets() -> None:
    session = started(10)
    resume(session, encode_position(order_key(1_700_000_000_000_000, "a-1")))
    assert [f["type"] for f in drain(session)] == ["reset"]


def test_resume_with_garbage_cursor_resets() -> None:
    session = started(10)
    resume(session, "not a cursor")
    assert [f["type"] for f in drain(session)] == ["reset"]
    assert session.close_code() is None


def test_resume_ahead_of_the_stream_resets() -> None:
    session = started(10)
    resume(session, f"{EPOCH}.11")
    assert [f["type"] for f in drain(session)] == ["reset"]
    assert session.cursor == f"{EPOCH}.10"


def test_resume_older_than_the_stream_resets() -> None:
    session = started(50)
    resume(session, f"{EPOCH}.5")
    assert session.history_request() == 5
    session.receive_history(stream(20, 50), 20)
    frames = drain(session)
    assert [f["type"] for f in frames] == ["reset"]
    session.receive_live(activity(51))
    assert seqs(drain(session)) == [51]


def test_resume_too_old_detected_from_oldest_seq_alone() -> None:
    session = started(50)
    resume(session, f"{EPOCH}.5")
    session.history_request()
    session.receive_history([], 20)
    assert [f["type"] for f in drain(session)] == ["reset"]


def test_resume_while_a_read_is_in_flight_ignores_the_stale_answer() -> None:
    session = started(0)
    session.receive_live(activity(5))
    assert session.history_request() == 0
    resume(session, f"{EPOCH}.3")
    assert session.history_request() is None  # one read at a time
    session.receive_history(stream(1, 5), 1)  # answer to the old request
    assert drain(session) == []
    assert session.history_request() == 3
    session.receive_history(stream(4, 5), 1)
    assert seqs(drain(session)) == [4, 5]


def test_resume_drops_queued_frames_after_the_cursor() -> None:
    session = started(0)
    session.receive_live(activity(1))
    session.receive_live(activity(2))
    resume(session, f"{EPOCH}.1")  # frame 2 was queued but not written: it comes again once
    assert session.history_request() == 1
    session.receive_history(stream(2, 2), 1)
    assert seqs(drain(session)) == [1, 2]


def test_resume_rewinds_past_frames_already_sent() -> None:
    session = started(0)
    session.receive_live(activity(1))
    session.receive_live(activity(2))
    assert seqs(drain(session)) == [1, 2]
    resume(session, f"{EPOCH}.0")
    assert session.history_request() == 0
    session.receive_history(stream(1, 2), 1)
    assert seqs(drain(session)) == [1, 2]


def test_resume_can_follow_a_reset() -> None:
    session = started(10)
    resume(session, "zz.1")
    drain(session)
    resume(session, f"{EPOCH}.9")
    assert session.history_request() == 9
    session.receive_history(stream(10, 10), 1)
    assert seqs(drain(session)) == [10]


# --- invalid client frames ------------------------------------------------------------------------
def test_invalid_json_closes_1007() -> None:
    session = started(0)
    session.receive_text("{not json")
    code, reason = session.close_code() or (0, "")
    assert code == CLOSE_INVALID_FRAME
    assert reason


def test_resume_without_cursor_closes_1007() -> None:
    session = started(0)
    session.receive_text('{"type":"resume"}')
    assert session.close_code() == (CLOSE_INVALID_FRAME, session.close_code()[1])  # type: ignore[index]
    assert "cursor" in session.close_code()[1]  # type: ignore[index]


def test_non_object_json_closes_1007() -> None:
    session = started(0)
    session.receive_text("[1,2]")
    assert session.close_code()[0] == CLOSE_INVALID_FRAME  # type: ignore[index]


def test_unknown_type_closes_1003() -> None:
    session = started(0)
    session.receive_text('{"type":"subscribe","user":"u2"}')
    assert session.close_code()[0] == CLOSE_UNSUPPORTED  # type: ignore[index]


def test_binary_frame_closes_1003() -> None:
    session = started(0)
    session.receive_bytes(b'{"type":"resume","cursor":"x.1"}')
    assert session.close_code()[0] == CLOSE_UNSUPPORTED  # type: ignore[index]


def test_text_frame_over_64k_closes_1009() -> None:
    session = started(0)
    session.receive_text('{"type":"resume","cursor":"' + "x" * 70_000 + '"}')
    assert session.close_code()[0] == CLOSE_TOO_BIG  # type: ignore[index]


def test_non_ascii_frame_is_measured_in_bytes() -> None:
    session = started(0)
    session.receive_text("é" * 40_000)  # 40 000 characters, 80 000 bytes
    assert session.close_code()[0] == CLOSE_TOO_BIG  # type: ignore[index]


def test_frame_of_exactly_the_limit_is_not_too_big() -> None:
    session = Session("u1", EPOCH, 0, max_frame_bytes=100, hold_live=False)
    session.receive_text(" " * 100)
    assert session.close_code()[0] == CLOSE_INVALID_FRAME  # type: ignore[index]


def test_binary_frame_over_64k_closes_1009() -> None:
    session = started(0)
    session.receive_bytes(b"x" * 70_000)
    assert session.close_code()[0] == CLOSE_TOO_BIG  # type: ignore[index]


def test_close_reason_fits_a_close_frame() -> None:
    session = started(0)
    session.receive_text('{"type":"' + "y" * 60 + '"}')
    assert len(session.close_code()[1].encode()) <= 123  # type: ignore[index]


def test_nothing_is_sent_after_close() -> None:
    session = started(0)
    session.receive_live(activity(1))
    session.receive_text("nope")
    session.receive_live(activity(2))
    assert session.frames_to_send() == []
    assert session.history_request() is None


# --- client rate limit ----------------------------------------------------------------------------
def test_burst_of_client_frames_past_the_limit_closes_4029() -> None:
    session = new(5, client_burst=3, client_rate_per_s=1.0)
    for _ in range(3):
        session.receive_text(json.dumps({"type": "resume", "cursor": f"{EPOCH}.5"}), now=100.0)
    assert session.close_code() is None
    session.receive_text(json.dumps({"type": "resume", "cursor": f"{EPOCH}.5"}), now=100.0)
    assert session.close_code()[0] == CLOSE_RATE_LIMITED  # type: ignore[index]


def test_client_frames_within_the_rate_are_fine() -> None:
    session = new(5, client_burst=2, client_rate_per_s=1.0)
    for second in range(20):
        session.receive_text(
            json.dumps({"type": "resume", "cursor": f"{EPOCH}.5"}), now=100.0 + second
        )
    assert session.close_code() is None


def test_no_clock_means_no_rate_limit() -> None:
    session = new(5, client_burst=1)
    for _ in range(5):
        session.receive_text(json.dumps({"type": "resume", "cursor": f"{EPOCH}.5"}))
    assert session.close_code() is None


# --- slow clients ---------------------------------------------------------------------------------
def test_queue_over_its_bound_closes_4008() -> None:
    session = started(0, max_queue=4096)
    for seq in range(1, 10):
        session.receive_live(activity(seq, pad=1000))
    assert session.close_code()[0] == CLOSE_TOO_SLOW  # type: ignore[index]
    assert session.frames_to_send() == []


def test_frames_handed_out_but_not_confirmed_still_count() -> None:
    session = started(0, max_queue=4096)
    for seq in range(1, 4):
        session.receive_live(activity(seq, pad=1000))
        session.frames_to_send()  # written to the socket buffer, never confirmed
    assert session.close_code() is None
    session.receive_live(activity(4, pad=1000))
    assert session.close_code()[0] == CLOSE_TOO_SLOW  # type: ignore[index]


def test_a_client_that_keeps_up_is_never_closed() -> None:
    session = started(0, max_queue=4096)
    for seq in range(1, 200):
        session.receive_live(activity(seq, pad=1000))
        drain(session)
    assert session.close_code() is None
    assert session.pending_bytes == 0


def test_buffered_live_frames_count_against_the_bound() -> None:
    session = new(0, hold=True, max_queue=4096)
    drain(session)
    for seq in range(1, 6):
        session.receive_live(activity(seq, pad=1000))
    assert session.close_code()[0] == CLOSE_TOO_SLOW  # type: ignore[index]


def test_history_waits_while_the_client_drains() -> None:
    session = started(0, max_queue=8192)
    session.receive_live(activity(1, pad=2500))
    session.receive_live(activity(2, pad=2500))
    frames = session.frames_to_send()  # > half the bound not yet confirmed
    session.receive_live(activity(4))
    assert session.history_request() is None
    for frame in frames:
        session.frame_sent(len(frame))
    assert session.history_request() == 2


# --- lifecycle events -----------------------------------------------------------------------------
def test_token_expiry_closes_4001() -> None:
    session = started(0)
    session.token_expired()
    assert session.close_code()[0] == CLOSE_UNAUTHORIZED  # type: ignore[index]


def test_shutdown_closes_1001() -> None:
    session = started(0)
    session.shutdown()
    assert session.close_code()[0] == CLOSE_GOING_AWAY  # type: ignore[index]


def test_first_close_code_wins() -> None:
    session = started(0)
    session.receive_text("{")
    session.shutdown()
    assert session.close_code()[0] == CLOSE_INVALID_FRAME  # type: ignore[index]


# --- stream_position ----------------------------------------------------------------------------
def test_stream_position_of_activity_and_removed_frames() -> None:
    assert stream_position(activity(42)) == (EPOCH, 42)
    assert stream_position(removed(7, "a-1")) == (EPOCH, 7)


def test_stream_position_ignores_cursor_keys_inside_the_body() -> None:
    frame = b'{"type":"activity","cursor":"e1.5","activity":{"cursor":"e1.99"}}'
    assert stream_position(frame) == ("e1", 5)


def test_stream_position_rejects_malformed_frames() -> None:
    assert stream_position(b"{}") is None
    assert stream_position(b'{"type":"activity","cursor":"e1"}') is None
    assert stream_position(b'{"type":"activity","cursor":"e1.x"}') is None
    assert stream_position(b'{"type":"activity","cursor":".5"}') is None
    assert stream_position(b'{"type":"activity","cursor":"e1.5') is None


# --- property: whatever Pub/Sub loses or repeats, the client sees 1..N once, in order -----------
@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=60),
    fate=st.lists(st.sampled_from(["ok", "lost", "twice"]), min_size=60, max_size=60),
    answer_late=st.lists(st.booleans(), min_size=60, max_size=60),
    hold=st.booleans(),
)
def test_live_delivery_is_gap_free_and_repeat_free(
    n: int, fate: list[str], answer_late: list[bool], hold: bool
) -> None:
    full = dict(stream(1, n))
    session = new(0, hold=hold)
    received: list[dict[str, Any]] = []
    pending: int | None = None

    def serve() -> None:
        nonlocal pending
        if pending is not None:
            session.receive_history([(s, full[s]) for s in sorted(full) if s > pending], 1)
            pending = None
        pending = session.history_request()

    for seq in range(1, n + 1):
        copies = {"ok": 1, "lost": 0, "twice": 2}[fate[seq - 1]]
        for _ in range(copies):
            session.receive_live(full[seq])
        if not answer_late[seq - 1]:
            serve()
        received += drain(session)
    session.start_live()
    session.check_gap()  # what the hub does after a Pub/Sub reconnect
    for _ in range(4):
        serve()
        received += drain(session)
    assert received[0]["type"] == "welcome"
    assert seqs(received) == list(range(1, n + 1))


def test_a_history_page_of_large_frames_is_paced_by_bytes_not_frames() -> None:
    """A page whose frames together exceed the bound does not close a client that reads: the
    replay stops at half the bound and asks again once the client has drained."""
    frames = [(seq, activity(seq, pad=3000)) for seq in range(1, 101)]  # ~300 KB in one page
    session = started(0, max_queue=64 * 1024)
    session.receive_live(activity(101, pad=3000))
    got: list[int] = []
    for _ in range(100):  # bounded: each round drains at least one frame
        after = session.history_request()
        if after is None:
            break
        session.receive_history([f for f in frames if f[0] > after], 1)
        assert session.pending_bytes <= 64 * 1024 // 2 + len(frames[0][1])
        got += seqs(drain(session))
    got += seqs(drain(session))
    assert session.close_code() is None
    assert got == list(range(1, 102))


# --- cursors only as issued, and items that missed the stream ------------------------------------
def test_resume_cursor_must_be_ascii_as_issued() -> None:
    # ``\d`` takes U+0665 (Arabic-Indic five) for 5 and ``$`` lets a trailing newline through:
    # such a cursor was never issued, so it is a reset, not a replay from seq 5.
    for cursor in (f"{EPOCH}.\u0665", f"{EPOCH}.5\n", f"{EPOCH}.\uff15"):
        session = started(9)
        session.receive_text(json.dumps({"type": "resume", "cursor": cursor}))
        assert session.history_request() is None, cursor
        assert [f["type"] for f in drain(session)] == ["reset"], cursor
    session = started(9)
    session.receive_text(json.dumps({"type": "resume", "cursor": f"{EPOCH}.5"}))
    assert session.history_request() == 5  # the same position in ASCII is a replay


def test_reset_request_from_the_hub_sends_reset_and_keeps_the_stream_position() -> None:
    from gateway.session import RESET_CONTROL

    session = started(3)
    session.receive_live(activity(4))
    session.receive_live(RESET_CONTROL)
    session.receive_live(activity(5))
    frames = drain(session)
    assert [f["type"] for f in frames] == ["activity", "reset", "activity"]
    assert seqs([f for f in frames if f["type"] == "activity"]) == [4, 5]
    assert session.resets == 1
