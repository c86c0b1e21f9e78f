"""The shared suite of ``feed.interfaces.DeliveryStream`` (presence and the delivery stream)."""

from __future__ import annotations

from collections.abc import Callable

from tests.support.backends import Backend
from tests.support.suites.timelines import insert

Ids = Callable[[str], str]


class DeliveryStreamSuite:
    async def test_attach_keeps_the_epoch_and_seq(self, backend: Backend, ids: Ids) -> None:
        delivery = backend.delivery()
        user = ids("u")
        first = await delivery.attach(user)
        assert first.seq == 0
        assert await delivery.attach(user) == first
        backend.timelines(10, 10, False).insert([insert(1, ids("a"), [user])])
        again = await delivery.attach(user)
        assert (again.epoch, again.seq) == (first.epoch, 1)

    async def test_frames_come_in_seq_order_up_to_the_limit(
        self, backend: Backend, ids: Ids
    ) -> None:
        delivery = backend.delivery()
        t = backend.timelines(100, 100, False)
        user, a = ids("u"), ids("a")
        await delivery.attach(user)
        for ts in range(6):
            t.insert([insert(ts, f"{a}-{ts}", [user])])
        assert [s for s, _ in await delivery.frames_after(user, 2, 3)] == [3, 4, 5]
        assert [s for s, _ in await delivery.frames_after(user, 0, 100)] == [1, 2, 3, 4, 5, 6]
        assert await delivery.oldest_seq(user) == 1
        assert await delivery.frames_after(user, 6, 10) == []

    async def test_the_stream_is_bounded_and_says_where_it_starts(
        self, backend: Backend, ids: Ids
    ) -> None:
        delivery = backend.delivery()
        hist, total = 5, 400
        t = backend.timelines(1000, hist, False)
        user, a = ids("u"), ids("a")
        await delivery.attach(user)
        for ts in range(total):
            t.insert([insert(ts, f"{a}-{ts}", [user])])
        kept = await delivery.frames_after(user, 0, total)
        seqs = [s for s, _ in kept]
        assert seqs[-hist:] == list(range(total - hist + 1, total + 1))  # the newest are all kept
        assert len(kept) < total  # trimmed (Redis trims approximately: maybe more than hist)
        oldest = await delivery.oldest_seq(user)
        assert oldest == seqs[0] and oldest > 1  # a resume from seq 0 sees the gap

    async def test_a_lost_presence_is_reported_and_attach_starts_a_new_epoch(
        self, backend: Backend, ids: Ids
    ) -> None:
        delivery = backend.delivery()
        lost, kept = ids("lost"), ids("kept")
        before = await delivery.attach(lost)
        await delivery.attach(kept)
        backend.timelines(10, 10, False).insert([insert(1, ids("a"), [lost])])
        backend.lose_presence(lost)
        assert await delivery.refresh([lost, kept]) == [lost]
        after = await delivery.attach(lost)
        assert after.epoch != before.epoch and after.seq == 0
        assert await delivery.frames_after(lost, 0, 10) == []
        assert await delivery.refresh([lost, kept]) == []

    async def test_renew_starts_a_new_epoch_once_for_the_epoch_it_names(
        self, backend: Backend, ids: Ids
    ) -> None:
        delivery = backend.delivery()
        user = ids("u")
        first = await delivery.attach(user)
        backend.timelines(10, 10, False).insert([insert(1, ids("a"), [user])])
        renewed = await delivery.renew(user, first.epoch)
        assert renewed.epoch != first.epoch and renewed.seq == 0
        assert await delivery.frames_after(user, 0, 10) == []  # the old epoch's frames are gone
        # Compare-and-set: a caller that saw the old epoch gets the new one, unchanged.
        assert await delivery.renew(user, first.epoch) == renewed
        assert await delivery.attach(user) == renewed
        backend.timelines(10, 10, False).insert([insert(2, ids("b"), [user])])
        assert [s for s, _ in await delivery.frames_after(user, 0, 10)] == [1]
        # Renewing a user with no presence is an attach: a new epoch.
        other = ids("v")
        fresh = await delivery.renew(other, "gone")
        assert fresh.seq == 0 and await delivery.attach(other) == fresh
