"""The shared suite of ``feed.interfaces.GraphVersions`` (and the follow-changed notice)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from feed import keys
from tests.support.backends import Backend
from tests.support.wait import eventually

Ids = Callable[[str], str]


class GraphVersionsSuite:
    def test_versions_are_installed_stable_and_never_repeated(
        self, backend: Backend, ids: Ids
    ) -> None:
        versions = backend.versions()
        a, b, fan = ids("a"), ids("b"), ids("fan")
        first = versions.follower_state([a, b], big=False)
        assert all(first.versions) and first.versions[0] != first.versions[1]
        assert versions.follower_state([a, b], big=False).versions == first.versions
        versions.follow_changed(fan, a)
        moved = versions.follower_state([a, b], big=False).versions
        assert moved[0] != first.versions[0] and moved[1] == first.versions[1]
        seen = {first.versions[0], moved[0]}
        for _ in range(3):  # the store loses the key (a restart): never an old value again
            backend.lose_key(backend.keyspace.graph_version(a))
            again = versions.follower_state([a], big=False).versions[0]
            assert again not in seen
            seen.add(again)

    def test_large_accounts_are_reported_and_sticky(self, backend: Backend, ids: Ids) -> None:
        versions = backend.versions()
        star, small, fan = ids("star"), ids("small"), ids("fan")
        versions.add_big([star])
        state = versions.follower_state([small, star], big=True)
        assert state.big == [False, True] and not state.big_lost
        assert versions.follow_changed(fan, star)
        assert not versions.follow_changed(fan, small)
        versions.add_big([star])
        assert versions.follower_state([star], big=True).big == [True]

    async def test_follow_changed_tells_the_followers_gateways(
        self, backend: Backend, ids: Ids
    ) -> None:
        fan, star = ids("fan"), ids("star")
        channel = backend.keyspace.channel(fan).encode()
        got: list[bytes] = []
        confirmed: list[bytes] = []
        link = await backend.subscriber().open(
            timeout_s=5,
            on_message=lambda _c, m: got.append(m),
            on_subscribe=confirmed.append,
            on_pong=lambda: None,
        )
        try:
            link.subscribe(channel)
            await eventually(lambda: confirmed, "the subscription confirmed")
            await asyncio.to_thread(backend.versions().follow_changed, fan, star)
            await eventually(lambda: got, "the control notice")
            assert got == [keys.CONTROL_FOLLOWING]
        finally:
            await link.aclose()
