"""The one event loop of the daemon: GLib's, so that pydbus can serve on it too.

Only the control plane runs here: XenStore watches, accepted connections, link events, signals,
timers.  Bytes never pass through it; the C pumps move them.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import math
import signal
import time
import weakref
from collections.abc import Callable

from gi.repository import GLib  # type: ignore[import-not-found]

__all__ = ["Loop", "Timer", "Wakeup"]


class Timer:
    """A pending ``call_later``; ``cancel()`` is idempotent, and does nothing once it ran."""

    __slots__ = ("_callback", "_timers")

    def __init__(self, timers: _Timers, callback: Callable[[], object]) -> None:
        self._timers = timers
        self._callback: Callable[[], object] | None = callback

    def cancel(self) -> None:
        if self._callback is not None:
            self._callback = None  # dropped now: a closure may hold a whole link
            self._timers.cancelled()


class _ReadySource(GLib.Source):  # type: ignore[misc]
    """A GLib source that fires only when its ready time is set; it stays attached."""

    def __init__(self, fire: Callable[[], object]) -> None:
        super().__init__()
        self._fire = fire

    def prepare(self) -> tuple[bool, int]:
        return False, -1

    def check(self) -> bool:
        return False

    def dispatch(self, _callback: object, _args: object) -> bool:
        self.set_ready_time(-1)  # disarmed until the next arm()
        self._fire()
        return True


class Wakeup:
    """Runs a callback once on a later loop turn after ``arm()``, however often it was armed
    meanwhile, through one GLib source kept for its whole life.

    PyGObject (3.42, GLib 2.74) leaks about 27 bytes of C memory for every GLib source made
    from Python (``timeout_add``, ``idle_add``, ``GLib.Idle``), so work scheduled per burst of
    a peer's activity must not make one; re-arming one source allocates nothing (``call_soon``
    is built the same way, on the loop's one timer source, but does not coalesce).  Keep a
    reference: PyGObject destroys the source with its Python object.  ``close()`` is
    idempotent; ``arm()`` after it does nothing.
    """

    def __init__(self, loop: Loop, callback: Callable[[], object]) -> None:
        self._source: _ReadySource | None = _ReadySource(lambda: loop._guard(callback))
        self._source.attach(loop._loop.get_context())

    def arm(self) -> None:
        if self._source is not None:
            self._source.set_ready_time(0)  # in the past: ready on the next iteration

    def close(self) -> None:
        if self._source is not None:
            self._source.destroy()
            self._source = None


def _ready_us(deadline: float) -> int:
    """A deadline on ``time.monotonic()`` as GLib's ready time: both read CLOCK_MONOTONIC, GLib
    in microseconds.  Rounded up, so that a timer never runs before its deadline."""
    return math.ceil(deadline * 1_000_000)


class _Timers:
    """Every ``call_later`` of a Loop: a heap of (deadline, sequence, Timer) behind one GLib
    source whose ready time is the earliest deadline.

    Why not a GLib source per call: each one made from Python leaks about 27 bytes of C memory
    (see Wakeup), and some timers repeat without bound (the retry of a stream whose service is
    busy, the accept backoff after EMFILE).  Here a call costs a Timer and a heap entry, both
    Python objects freed when it ran or was cancelled.  A cancelled Timer stays in the heap
    until its deadline, without its callback; when they are most of the heap it is rebuilt,
    so cancelling long timers at any rate keeps the heap bounded by the live ones.
    """

    COMPACT_AT = 64  # fewer cancelled entries than this are not worth a rebuild

    def __init__(self, loop: Loop) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()  # equal deadlines run in the order they were asked
        self._dead = 0                  # cancelled entries still in the heap
        self._guard = loop._guard
        self._source: _ReadySource | None = _ReadySource(self._run_due)
        self._source.attach(loop._loop.get_context())
        _open_timers.add(self)

    def add(self, deadline: float, callback: Callable[[], object]) -> Timer:
        timer = Timer(self, callback)
        if self._source is None:  # closed: it would never run, so it is not kept either
            timer._callback = None
            return timer
        entry = (deadline, next(self._seq), timer)
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry:
            self._arm()
        return timer

    def cancelled(self) -> None:
        self._dead += 1
        if self._dead >= self.COMPACT_AT and 2 * self._dead > len(self._heap):
            # In place: _run_due may be walking this list (a callback cancelling timers).
            self._heap[:] = [e for e in self._heap if e[2]._callback is not None]
            heapq.heapify(self._heap)
            self._dead = 0
            self._arm()

    def pending(self) -> int:
        """Heap entries, cancelled ones included (for tests of the bound)."""
        return len(self._heap)

    def _arm(self) -> None:
        if self._source is not None:
            self._source.set_ready_time(_ready_us(self._heap[0][0]) if self._heap else -1)

    def _run_due(self) -> None:
        # Only what was due when this turn began: a call_soon from a callback runs on the next
        # turn, after the descriptors that are ready now.
        now_us = GLib.get_monotonic_time()
        heap = self._heap
        while heap and _ready_us(heap[0][0]) <= now_us:
            timer = heapq.heappop(heap)[2]
            callback = timer._callback
            if callback is None:
                self._dead -= 1
                continue
            timer._callback = None
            # Guarded one by one: one that raises ends run() (see Loop) but leaves the others
            # in the heap and the source armed.
            self._guard(callback)
        self._arm()

    def close(self) -> None:
        if self._source is not None:
            self._source.destroy()
            self._source = None
        for _, _, timer in self._heap:
            timer._callback = None
        self._heap.clear()
        self._dead = 0


# Timer sources of loops never closed (a test's peers, say), destroyed at exit while Python
# can still run PyGObject's finalizer: left to interpreter teardown it prints an ImportError.
_open_timers: weakref.WeakSet[_Timers] = weakref.WeakSet()


@atexit.register
def _close_open_timers() -> None:
    for timers in list(_open_timers):
        timers.close()


class Loop:
    """add_reader / call_later / add_signal over a GLib main loop.

    Callbacks that raise propagate out of ``run()``: a bug stops the daemon (systemd restarts
    it) rather than being swallowed.
    """

    def __init__(self) -> None:
        self._loop = GLib.MainLoop()
        self._readers: dict[int, int] = {}
        self._error: BaseException | None = None
        self._timers = _Timers(self)

    def _guard(self, callback: Callable[[], object]) -> None:
        try:
            callback()
        except BaseException as e:
            if self._error is None:
                self._error = e
            self._loop.quit()

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        """Calls ``callback()`` whenever ``fd`` is readable (or hung up)."""
        self.remove_reader(fd)

        def on_io(_fd: int, _cond: int) -> bool:
            self._guard(callback)
            return fd in self._readers

        cond = GLib.IOCondition.IN | GLib.IOCondition.HUP | GLib.IOCondition.ERR
        self._readers[fd] = GLib.unix_fd_add_full(GLib.PRIORITY_DEFAULT, fd, cond, on_io)

    def remove_reader(self, fd: int) -> None:
        source = self._readers.pop(fd, None)
        if source is not None:
            GLib.source_remove(source)

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        """Returns a Timer that calls ``callback()`` once after ``delay`` seconds (on the
        loop's clock, ``time()``); timers due together run in the order they were asked."""
        return self._timers.add(self.time() + max(0.0, delay), callback)

    def time(self) -> float:
        """Returns the loop's clock: monotonic seconds (timers and budgets count in it)."""
        return time.monotonic()

    def call_soon(self, callback: Callable[[], object]) -> Timer:
        return self.call_later(0, callback)

    def wakeup(self, callback: Callable[[], object]) -> Wakeup:
        """Returns a Wakeup: ``arm()`` it to run ``callback()`` once, soon (see Wakeup)."""
        return Wakeup(self, callback)

    def add_signal(self, signum: signal.Signals, callback: Callable[[], object]) -> None:
        """Calls ``callback()`` from the loop when ``signum`` arrives."""

        def on_signal() -> bool:
            self._guard(callback)
            return True

        GLib.unix_signal_add(GLib.PRIORITY_HIGH, int(signum), on_signal)

    def run(self) -> None:
        """Runs until ``stop()``; re-raises the first exception a callback raised."""
        self._loop.run()
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def stop(self) -> None:
        self._loop.quit()

    def close(self) -> None:
        """Removes the readers and drops the pending timers (they never run)."""
        for fd in list(self._readers):
            self.remove_reader(fd)
        self._timers.close()
