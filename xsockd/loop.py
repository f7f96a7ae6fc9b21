"""The one event loop of the daemon: GLib's, so that pydbus can serve on it too.

Only the control plane runs here: XenStore watches, accepted connections, link events, signals,
timers.  Bytes never pass through it; the C pumps move them.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from gi.repository import GLib  # type: ignore[import-not-found]

__all__ = ["Loop", "Timer", "Wakeup"]


class Timer:
    """A pending ``call_later``; ``cancel()`` is idempotent."""

    def __init__(self, source: int) -> None:
        self._source: int | None = source

    def _fired(self) -> None:
        self._source = None

    def cancel(self) -> None:
        if self._source is not None:
            GLib.source_remove(self._source)
            self._source = None


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

    Why not ``call_soon``: PyGObject (3.42, GLib 2.74) leaks about 27 bytes of C memory for
    every GLib source made from Python (``timeout_add``, ``idle_add``, ``GLib.Idle``), so
    work scheduled per burst of a peer's activity would grow the daemon without bound;
    re-arming one source allocates nothing.  Keep a reference: PyGObject destroys the source
    with its Python object.  ``close()`` is idempotent; ``arm()`` after it does nothing.
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


class Loop:
    """add_reader / call_later / add_signal over a GLib main loop.

    Callbacks that raise propagate out of ``run()``: a bug stops the daemon (systemd restarts
    it) rather than being swallowed.
    """

    def __init__(self) -> None:
        self._loop = GLib.MainLoop()
        self._readers: dict[int, int] = {}
        self._error: BaseException | None = None

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
        """Returns a Timer that calls ``callback()`` once after ``delay`` seconds."""
        timer: Timer

        def on_timeout() -> bool:
            timer._fired()
            self._guard(callback)
            return False

        timer = Timer(GLib.timeout_add(max(0, int(delay * 1000)), on_timeout))
        return timer

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
        for fd in list(self._readers):
            self.remove_reader(fd)
