"""Session: the delivery stream lost with Redis (a new epoch) is noticed and answered with reset."""

from __future__ import annotations

from gateway.session import PRESENCE_PREFIX, presence_frame
from tests.support.stream_session import EPOCH, activity, drain, seqs, started, stream

NEW = "ffff0000"


def test_presence_frame_is_never_forwarded() -> None:
    frame = presence_frame(EPOCH, 0)
    assert frame.startswith(PRESENCE_PREFIX)
    session = started(0)
    session.receive_live(frame)
    session.receive_live(b'{"type":"_following"}')
    assert drain(session) == []
    assert session.history_request() is None


def test_presence_of_a_new_epoch_resets_then_follows_the_new_stream() -> None:
    session = started(0)
    session.receive_live(activity(1))
    session.receive_live(activity(2))
    assert seqs(drain(session)) == [1, 2]
    session.receive_live(presence_frame(NEW, 0))  # Redis restarted: presence re-attached
    assert [f["type"] for f in drain(session)] == ["reset"]
    assert session.cursor == f"{NEW}.0"
    session.check_gap()  # what the hub does next
    assert session.history_request() == 0
    session.receive_history([], None)
    session.receive_live(activity(1, NEW))
    session.receive_live(activity(2, NEW))
    frames = drain(session)
    assert seqs(frames) == [1, 2] and all(f["cursor"].startswith(NEW) for f in frames)
    assert session.resets == 1


def test_presence_after_a_live_frame_of_the_new_epoch_does_not_reset_twice() -> None:
    session = started(0)
    session.receive_live(activity(1))
    session.receive_live(activity(1, NEW))  # the new stream's first frame came first
    session.receive_live(presence_frame(NEW, 0))
    session.receive_live(activity(2, NEW))
    frames = drain(session)
    assert [f["type"] for f in frames] == ["activity", "reset", "activity", "activity"]
    assert session.resets == 1
    assert seqs(frames[2:]) == [1, 2]


def test_presence_of_the_same_epoch_ahead_reads_the_stream() -> None:
    session = started(0)
    session.receive_live(activity(1))
    drain(session)
    session.receive_live(presence_frame(EPOCH, 3))  # frames 2 and 3 were lost in transit
    assert session.history_request() == 1
    session.receive_history(stream(2, 3), 1)
    assert seqs(drain(session)) == [2, 3]
    assert session.resets == 0


def test_history_of_a_new_epoch_resets_instead_of_splicing_streams() -> None:
    session = started(0)
    for seq in (1, 2):
        session.receive_live(activity(seq))
    drain(session)
    session.check_gap()  # Pub/Sub reconnected; meanwhile the stream was recreated and grew
    assert session.history_request() == 2
    session.receive_history(stream(3, 5, epoch=NEW), 1)
    frames = drain(session)
    assert [f["type"] for f in frames] == ["reset"]
    assert session.cursor == f"{NEW}.5"
    session.receive_live(activity(6, NEW))
    assert seqs(drain(session)) == [6]


def test_resume_with_a_cursor_of_the_lost_stream_resets() -> None:
    session = started(0)
    session.receive_live(presence_frame(NEW, 4))
    drain(session)
    session.receive_text('{"type":"resume","cursor":"' + EPOCH + '.2"}')
    assert [f["type"] for f in drain(session)] == ["reset"]
