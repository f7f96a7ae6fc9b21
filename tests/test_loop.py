"""The loop's Wakeup and timers: Wakeup coalesces arms; call_later keeps deadline order and
cancels; neither costs memory per run.

The memory tests are why both sit on one long-lived GLib source each: PyGObject 3.42 (GLib 2.74)
leaks about 27 bytes of C memory for every GLib source made from Python, so a ``call_soon`` per
burst of a peer's activity, or a ``call_later`` per retry, grew the daemon without bound
(tests/test_churn.py, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import ctypes

import pytest

from xsockd.loop import Loop

RUNS = 100_000
# glibc's bytes in use may move by a few pages of bookkeeping; a leak of even 8 bytes a run
# would be 800 KiB.
ALLOWED_KIB = 256


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _malloc_in_use_kib() -> int:
    """Bytes glibc's malloc has handed out and not had back, all arenas (KiB)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd) // 1024


def _turn(loop: Loop) -> None:
    context = loop._loop.get_context()
    while context.iteration(False):
        pass


def test_arms_between_turns_make_one_call() -> None:
    loop = Loop()
    calls: list[int] = []
    wakeup = loop.wakeup(lambda: calls.append(1))
    for _ in range(3):
        wakeup.arm()
    _turn(loop)
    assert calls == [1]
    _turn(loop)
    assert calls == [1], "ran again without being armed"
    wakeup.arm()
    _turn(loop)
    assert calls == [1, 1]
    wakeup.close()
    wakeup.close()
    wakeup.arm()
    _turn(loop)
    assert calls == [1, 1], "ran after close()"


def test_an_exception_stops_the_loop_and_comes_out_of_run() -> None:
    loop = Loop()

    def boom() -> None:
        raise RuntimeError("bug")

    wakeup = loop.wakeup(boom)  # held: a Wakeup no longer referenced is gone
    wakeup.arm()
    with pytest.raises(RuntimeError, match="bug"):
        loop.run()
    wakeup.close()


def test_runs_cost_no_memory() -> None:
    loop = Loop()
    calls = [0]

    def count() -> None:
        calls[0] += 1

    wakeup = loop.wakeup(count)
    for _ in range(1000):  # warm: first-time allocations of GLib and PyGObject
        wakeup.arm()
        _turn(loop)
    before = _malloc_in_use_kib()
    for _ in range(RUNS):
        wakeup.arm()
        _turn(loop)
    grown = _malloc_in_use_kib() - before
    wakeup.close()
    assert calls[0] == RUNS + 1000
    assert grown < ALLOWED_KIB, f"{RUNS} runs of a Wakeup grew malloc's bytes in use by " \
                                f"{grown} KiB"


# --- call_later: one GLib source and a heap of deadlines ---------------------------------


def test_timers_run_in_deadline_order_and_never_early() -> None:
    loop = Loop()
    ran: list[tuple[str, float]] = []
    start = loop.time()
    for name, delay in (("a", 0.06), ("b", 0.02), ("c", 0.04), ("d", 0.02), ("e", 0.0)):
        loop.call_later(delay, lambda n=name, d=delay: ran.append((n, loop.time() - start - d)))
    loop.call_later(0.1, loop.stop)
    loop.run()
    assert [n for n, _ in ran] == ["e", "b", "d", "c", "a"], "equal deadlines keep call order"
    assert all(late >= 0 for _, late in ran), f"a timer ran before its deadline: {ran}"


def test_cancel_before_run_and_after_run() -> None:
    loop = Loop()
    ran: list[str] = []
    kept = loop.call_later(0.01, lambda: ran.append("kept"))
    dropped = loop.call_later(0.005, lambda: ran.append("dropped"))
    dropped.cancel()
    dropped.cancel()
    loop.call_later(0.03, loop.stop)
    loop.run()
    kept.cancel()  # after it ran: nothing to do, and nothing breaks
    assert ran == ["kept"]


def test_cancelling_the_earliest_rearms_to_the_next() -> None:
    loop = Loop()
    ran: list[str] = []
    first = loop.call_later(0.0, lambda: ran.append("first"))
    loop.call_later(0.01, lambda: ran.append("second"))
    first.cancel()
    loop.call_later(0.03, loop.stop)
    loop.run()
    assert ran == ["second"]


def test_call_soon_from_a_timer_runs_on_a_later_turn() -> None:
    loop = Loop()
    ran: list[str] = []

    def outer() -> None:
        ran.append("outer")
        loop.call_soon(lambda: ran.append("inner"))

    loop.call_soon(outer)
    loop._loop.get_context().iteration(False)
    assert ran == ["outer"], "a timer added while timers run must wait for the next turn"
    _turn(loop)
    assert ran == ["outer", "inner"]


def test_a_raising_timer_ends_run_but_not_the_other_timers() -> None:
    loop = Loop()
    ran: list[str] = []

    def boom() -> None:
        raise RuntimeError("bug")

    loop.call_later(0.0, boom)
    loop.call_later(0.0, lambda: ran.append("same turn"))
    loop.call_later(0.02, lambda: ran.append("later"))
    with pytest.raises(RuntimeError, match="bug"):
        loop.run()
    loop.call_later(0.04, loop.stop)
    loop.run()  # the loop and its timer source still work
    assert ran == ["same turn", "later"]


def test_close_drops_pending_timers() -> None:
    loop = Loop()
    ran: list[str] = []
    timer = loop.call_later(0.0, lambda: ran.append("x"))
    loop.close()
    late = loop.call_later(0.0, lambda: ran.append("after close"))
    _turn(loop)
    timer.cancel()
    late.cancel()
    assert ran == [] and loop._timers.pending() == 0


def test_timers_cost_no_memory() -> None:
    loop = Loop()
    calls = [0]

    def count() -> None:
        calls[0] += 1

    for _ in range(1000):  # warm, as for Wakeup
        loop.call_soon(count)
        _turn(loop)
    before = _malloc_in_use_kib()
    for _ in range(RUNS):
        loop.call_later(0, count)
        _turn(loop)
    grown = _malloc_in_use_kib() - before
    assert calls[0] == RUNS + 1000
    assert grown < ALLOWED_KIB, f"{RUNS} call_later runs grew malloc's bytes in use by " \
                                f"{grown} KiB (a GLib source per call leaks ~27 bytes each)"


def test_cancelled_timers_do_not_pile_up() -> None:
    """A retry armed and cancelled at any rate (an hour-long set-up timer per link, say) keeps
    the heap at the live timers plus a bounded slack, not one entry per call."""
    loop = Loop()
    live = [loop.call_later(3600, lambda: None) for _ in range(10)]
    for _ in range(RUNS):
        loop.call_later(3600, lambda: None).cancel()
    pending = loop._timers.pending()
    assert pending <= 2 * len(live) + 2 * loop._timers.COMPACT_AT, \
        f"{RUNS} cancelled timers left {pending} heap entries"
    for timer in live:
        timer.cancel()
    loop.close()


def test_a_timer_may_cancel_many_others_while_timers_run() -> None:
    """Cancelling enough to rebuild the heap from inside a timer leaves the due ones to run
    and the cancelled ones not."""
    loop = Loop()
    ran: list[int] = []
    many = 3 * loop._timers.COMPACT_AT
    timers = [loop.call_later(0.0, lambda i=i: ran.append(i)) for i in range(1, many + 1)]

    def cancel_three_in_four() -> None:  # enough to rebuild the heap once
        for i, timer in enumerate(timers, start=1):
            if i % 4:
                timer.cancel()

    loop._timers.add(0.0, cancel_three_in_four)  # deadline 0: first of all
    loop.call_later(0.02, loop.stop)
    loop.run()
    assert ran == list(range(4, many + 1, 4))
    # The heap's books balance: nothing left, no cancelled entry counted twice.
    assert (loop._timers.pending(), loop._timers._dead) == (0, 0)
