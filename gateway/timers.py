"""Coarse timers for per-connection deadlines that are long and rarely fire early.

Each connection of the gateway keeps timers for its whole life: the keepalive ping (every
``FEED_PING_INTERVAL_S``) and the expiry of its token (hours away). ``loop.call_later`` costs about
0.6 KiB and four objects tracked by the garbage collector per timer under uvloop (the handle, its
libuv timer, a copy of the context and the bound method). Here a timer is one small object in a
heap, and one event-loop timer serves all of them: due timers run together, at most one tick
(:data:`TICK_S`) late. Callbacks run in the context of the loop, not of the code that scheduled
them.

:func:`timers` returns the instance of the running event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import weakref
from collections.abc import Callable
from typing import Any

import structlog

__all__ = ["TICK_S", "Timer", "Timers", "timers"]

log = structlog.get_logger("gateway.timers")

#: Resolution: a timer runs within this many seconds after it is due.
TICK_S = 0.25
#: ... and never earlier than this before (the event loop's own timers are millisecond-grained).
_EARLY_S = 0.005


class Timer:
    """One scheduled call of ``fn(arg)``; :meth:`cancel` drops it and its references."""

    __slots__ = ("arg", "fn", "owner", "when")

    def __init__(self, owner: Timers, when: float, fn: Callable[[Any], None], arg: Any) -> None:
        self.owner = owner
        self.when = when
        self.fn: Callable[[Any], None] | None = fn
        self.arg = arg

    def __lt__(self, other: Timer) -> bool:
        return self.when < other.when

    def cancel(self) -> None:
        if self.fn is not None:
            self.fn = self.arg = None
            self.owner.cancelled()


class Timers:
    """The coarse timers of one event loop."""

    def __init__(self) -> None:
        self._heap: list[Timer] = []
        self._cancelled = 0  # cancelled timers still in the heap
        self._handle: asyncio.TimerHandle | None = None
        self._tick: int | None = None  # the tick the loop timer is set for

    def __len__(self) -> int:
        """Timers scheduled and not cancelled."""
        return len(self._heap) - self._cancelled

    def call_later(self, delay: float, fn: Callable[[Any], None], arg: Any) -> Timer:
        """Call ``fn(arg)`` after ``delay`` seconds (up to :data:`TICK_S` later)."""
        loop = asyncio.get_running_loop()
        timer = Timer(self, loop.time() + max(0.0, delay), fn, arg)
        heapq.heappush(self._heap, timer)
        self._arm(loop)
        return timer

    def cancelled(self) -> None:
        """A timer was cancelled (it stays in the heap until due, or until a compaction)."""
        self._cancelled += 1
        if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
            # Cancelled timers (say, token expiries of connections that closed) would otherwise
            # stay until they were due, possibly hours from now.
            self._heap = [timer for timer in self._heap if timer.fn is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._heap:
            return
        tick = math.ceil(self._heap[0].when / TICK_S)
        if self._tick is not None and self._tick <= tick:
            return  # the loop timer already fires no later than needed
        if self._handle is not None:
            self._handle.cancel()
        self._tick = tick
        self._handle = loop.call_at(tick * TICK_S, self._run)

    def _run(self) -> None:
        self._handle = None
        self._tick = None
        loop = asyncio.get_running_loop()
        heap = self._heap
        limit = loop.time() + _EARLY_S
        while heap and heap[0].when <= limit:
            timer = heapq.heappop(heap)
            fn, arg = timer.fn, timer.arg
            if fn is None:
                self._cancelled -= 1
                continue
            timer.fn = timer.arg = None
            try:
                fn(arg)
            except Exception:
                log.exception("timer_callback_failed")
        self._arm(loop)


_Loop = asyncio.AbstractEventLoop
_BY_LOOP: weakref.WeakKeyDictionary[_Loop, Timers] = weakref.WeakKeyDictionary()


def timers() -> Timers:
    """The :class:`Timers` of the running event loop."""
    loop = asyncio.get_running_loop()
    found = _BY_LOOP.get(loop)
    if found is None:
        found = _BY_LOOP[loop] = Timers()
    return found
