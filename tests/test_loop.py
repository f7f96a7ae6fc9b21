"""The loop's Wakeup: coalesces arms, runs on the loop, and costs no memory per run.

The memory test is why Wakeup exists: PyGObject 3.42 (GLib 2.74) leaks about 27 bytes of C
memory for every GLib source made from Python, so a ``call_soon`` per burst of a peer's
activity grew the daemon without bound (tests/test_churn.py, docs/PERFORMANCE.md).
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
