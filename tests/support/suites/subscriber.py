"""The shared suite of ``feed.interfaces.Subscriber`` (the notifier, as the hub sees it)."""

from __future__ import annotations

from collections.abc import Callable

from tests.support.backends import Backend
from tests.support.wait import eventually

Ids = Callable[[str], str]


class _Recorder:
    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.confirmed: list[bytes] = []
        self.pongs = 0

    def pong(self) -> None:
        self.pongs += 1


class SubscriberSuite:
    async def test_confirmed_channels_get_messages_in_order_at_most_once(
        self, backend: Backend, ids: Ids
    ) -> None:
        rec = _Recorder()
        link = await backend.subscriber().open(
            timeout_s=5,
            on_message=lambda c, m: rec.messages.append((c, m)),
            on_subscribe=rec.confirmed.append,
            on_pong=rec.pong,
        )
        one, two = ids("one").encode(), ids("two").encode()
        try:
            await backend.publish(one, b"before")  # nobody subscribed: lost, never delivered
            link.subscribe(one, two)
            await eventually(lambda: len(rec.confirmed) == 2, "both subscriptions confirmed")
            assert sorted(rec.confirmed) == sorted([one, two])
            for n in range(20):
                await backend.publish(one if n % 2 else two, b"%d" % n)
            await eventually(lambda: len(rec.messages) == 20, "20 messages")
            assert [m for c, m in rec.messages if c == one] == [b"%d" % n for n in range(1, 20, 2)]
            assert [m for c, m in rec.messages if c == two] == [b"%d" % n for n in range(0, 20, 2)]
            link.unsubscribe(one)
            link.ping()  # answered after the UNSUBSCRIBE took effect
            await eventually(lambda: rec.pongs, "a pong")
            await backend.publish(one, b"after")
            await backend.publish(two, b"last")
            await eventually(lambda: rec.messages[-1] == (two, b"last"), "the last message")
            assert (one, b"after") not in rec.messages and (one, b"before") not in rec.messages
        finally:
            await link.aclose()
        assert link.closed.done()
