"""Helpers of the Pub/Sub link tests on real servers (one Redis and a Redis Cluster)."""

from __future__ import annotations

__all__ = ["DEADLINE_S", "Recorder"]

#: Seconds a Pub/Sub test waits for anything.
DEADLINE_S = 10.0


class Recorder:
    """The link's three callbacks, recording what they were given."""

    def __init__(self, fail_on: bytes | None = None) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.subscribed: list[bytes] = []
        self.pongs = 0
        self.fail_on = fail_on

    def message(self, channel: bytes, data: bytes) -> None:
        if data == self.fail_on:
            raise RuntimeError("a callback that fails")
        self.messages.append((channel, data))

    def subscribe(self, channel: bytes) -> None:
        self.subscribed.append(channel)

    def pong(self) -> None:
        self.pongs += 1
