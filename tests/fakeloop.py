"""A loop for in-process tests of the Manager: real descriptors, its own clock.

Readers are polled with ``select``; timers fire when the test moves the clock (``advance``),
never because real time passed, so timeouts and budgets are tested without sleeping.  A
callback that raises is re-raised at once, as GLib's loop would end the daemon: a test then
sees exactly what would have escaped the Manager.
"""

from __future__ import annotations

import heapq
import itertools
import select
import time
from collections.abc import Callable


class FakeTimer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    def __init__(self) -> None:
        self.now = 1000.0
        self._readers: dict[int, Callable[[], object]] = {}
        self._timers: list[tuple[float, int, FakeTimer, Callable[[], object]]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        self._readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self._readers.pop(fd, None)

    def call_later(self, delay: float, callback: Callable[[], object]) -> FakeTimer:
        timer = FakeTimer()
        heapq.heappush(self._timers, (self.now + delay, next(self._seq), timer, callback))
        return timer

    def call_soon(self, callback: Callable[[], object]) -> FakeTimer:
        return self.call_later(0, callback)

    def advance(self, seconds: float) -> None:
        """Moves the clock and fires every timer that came due, in order."""
        self.now += seconds
        self._fire_due()

    def _fire_due(self) -> None:
        while self._timers and self._timers[0][0] <= self.now:
            _, _, timer, callback = heapq.heappop(self._timers)
            if not timer.cancelled:
                callback()

    def run_once(self, wait: float = 0.01) -> int:
        """Runs the callbacks of ready descriptors and due timers; returns how many ran."""
        self._fire_due()
        fds = list(self._readers)
        if not fds:
            return 0
        ready, _, _ = select.select(fds, [], [], wait)
        for fd in ready:
            callback = self._readers.get(fd)
            if callback is not None:
                callback()
        return len(ready)

    def run_until(self, cond: Callable[[], object], timeout: float = 10.0,
                  what: str = "the condition") -> object:
        """Runs the loop until ``cond()`` is true (real seconds, for the pumps' threads)."""
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            self.run_once()
