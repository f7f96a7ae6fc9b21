"""Regressions against a hostile peer that speaks the raw link protocol (tests/hostile.py).

The victim is domain 1's real daemon; domain 2 is the hostile fixture; domain 3's daemon keeps
a bystander stream with domain 1 running through every attack, whose bytes must come back
intact.  Each test also asserts that the victim is still alive afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hostile import (
    ACCEPT,
    OPEN,
    RESET,
    Arena,
    HostileDomain,
    accept_frame,
    channel_table,
    data_frame,
    fin_frame,
    goodbye_frame,
    log_size,
    open_frame,
    proc_status,
    read_log,
    record_lines,
    reset_frame,
    warning_lines,
)


@pytest.fixture
def arena(tmp_path) -> Iterator[Arena]:
    a = Arena(tmp_path)
    yield a
    a.close()


@pytest.fixture
def arena16(tmp_path) -> Iterator[Arena]:
    a = Arena(tmp_path, max_streams=16)
    yield a
    a.close()


def assert_alive(arena: Arena, what: str) -> None:
    assert arena.alive(), (f"the victim died {what}:\n"
                           f"{read_log(arena.log_path)[-3000:]}")


def assert_serves(arena: Arena) -> None:
    """A fresh hostile link still works end to end: OPEN is ACCEPTed, DATA echoes back."""
    h, app = arena.attack_link()
    try:
        h.send(open_frame(2, Arena.SERVICE))
        got = h.recv_until(lambda f: f.stream == 2 and f.type in (ACCEPT, RESET))
        assert got and got[-1].type == ACCEPT, f"the victim answered {got}"
        h.send(data_frame(2, b"ping"), fin_frame(2))
        got = h.recv_until(lambda f: f.stream == 2 and f.payload == b"ping")
        assert got and got[-1].payload == b"ping"
        h.goodbye()
    finally:
        h.close()
        app.close()
    assert arena.wait_link_gone()


def test_the_fixture_speaks_the_protocol(arena):
    """Sanity check of the fixture itself against the victim: no attack."""
    with arena.bystander() as by:
        assert_serves(arena)
        # The victim's own application stream reaches the fixture as an OPEN on an odd id.
        h, app = arena.attack_link()
        try:
            got = h.recv_until(lambda f: f.type == OPEN)
            assert got and got[-1].type == OPEN and got[-1].stream % 2 == 1
            sid = got[-1].stream
            h.send(accept_frame(sid))
            app.sendall(b"hello")
            got = h.recv_until(lambda f: f.stream == sid and f.payload == b"hello")
            assert got[-1].payload == b"hello"
            h.send(data_frame(sid, b"world"))
            assert app.recv(5) == b"world"
            h.die()
            app.settimeout(5)
            assert app.recv(10) == b""  # the victim saw the death at once and ended the stream
        finally:
            h.close()
            app.close()
        assert arena.wait_link_gone()
        by.check()
    assert_alive(arena, "during a plain exchange")


@pytest.mark.parametrize("ending", ["goodbye", "death"])
def test_open_then_the_peer_leaves_at_once(arena, ending):
    """OPEN followed in the same burst by GOODBYE (or by the peer's death): the victim's control
    plane sees OPEN_REQUEST and LINK_DOWN together; accepting or refusing the stream on the
    stopped link must not take the daemon down (v1: BrokenPipeError from accept_stream)."""
    with arena.bystander() as by:
        for i in range(5):
            h, app = arena.attack_link()
            try:
                if ending == "goodbye":
                    h.send(open_frame(2, Arena.SERVICE), goodbye_frame())
                else:
                    h.send(open_frame(2, Arena.SERVICE))
                    h.die()
            finally:
                h.close()
                app.close()
            assert arena.wait_link_gone(), "the victim kept the link"
            assert_alive(arena, f"after OPEN then {ending} (round {i})")
        by.check()
    assert_alive(arena, f"after OPEN then {ending}")
    assert_serves(arena)


def test_open_reset_open_of_one_id_does_not_grow_the_channel_table(arena):
    """OPEN X, RESET X, OPEN X in one burst, over and over: every incarnation of X must leave
    the victim's channel table (v1 leaks one channel per round: the table maps (link, id) to
    one channel, the second incarnation overwrites the first)."""
    with arena.bystander() as by:
        h, app = arena.attack_link()
        rss0 = proc_status(arena.pid, "VmRSS")
        rounds = 0
        try:
            end = time.monotonic() + 3
            while time.monotonic() < end:
                x = 2
                h.send(open_frame(x, Arena.SERVICE), reset_frame(x), open_frame(x, Arena.SERVICE))
                # The victim answers the live incarnation (ACCEPT or RESET); then we end it, so
                # that the id is free again for the next round.
                h.recv_until(lambda f, x=x: f.stream == x and f.type in (ACCEPT, RESET), 1.0)
                h.send(reset_frame(x))
                rounds += 1
            time.sleep(0.5)  # the last RESETs are consumed, the service connections closed
            table = channel_table(arena.pid, arena.log_path)
            rss1 = proc_status(arena.pid, "VmRSS")
        finally:
            h.close()
            app.close()
        assert arena.wait_link_gone()
        by.check()
    assert_alive(arena, "under OPEN/RESET/OPEN")
    hostile_rows = [p for p in table.peers if p == Arena.HOSTILE]
    # At most the application stream that made the victim offer the link (it is "opening").
    assert len(hostile_rows) <= 1, (
        f"after {rounds} rounds of OPEN/RESET/OPEN, all of them reset, the victim still holds "
        f"{len(hostile_rows)} channels for domain 2:\n{table.text[:1500]}")
    assert rss1 - rss0 < 32 * 1024, f"VmRSS grew by {rss1 - rss0} kB in {rounds} rounds"


def test_open_reset_flood_is_bounded(arena16):
    """OPEN immediately followed by RESET, a flood of them, against max_streams = 16.

    A stream reset before the victim decided on it should (nearly) never cost a connection to
    the local service, and refusals must not write a warning each (rate-limited).  v1 connects
    the service once per OPEN and logs one warning per refused OPEN.
    """
    arena = arena16
    with arena.bystander() as by:
        h, app = arena.attack_link()
        start = log_size(arena.log_path)
        before = arena.service.accepted
        pairs = 1600
        counted = pairs // 2  # half of them name the service, half a service not offered to us
        burst = 16
        try:
            x = 2
            for i in range(0, pairs, burst):
                frames = []
                for j in range(i, i + burst):
                    name = Arena.SERVICE if j % 2 == 0 else "not-offered"
                    frames += [open_frame(x, name), reset_frame(x)]
                    x = x + 2 if x < 0xFFFF0 else 2
                h.send(*frames)
                h.recv()  # keep ring 0 empty: whatever the victim answers, it is never stuck on us
            time.sleep(1.0)  # the victim catches up
            h.recv()
            connections = arena.service.accepted - before
            flood_log = read_log(arena.log_path, start)
        finally:
            h.close()
            app.close()
        assert arena.wait_link_gone()
        by.check()
    assert_alive(arena, "under an OPEN/RESET flood")
    warnings = warning_lines(flood_log)
    # Bounds: a quarter of the OPENs that named the service (a stream reset before the victim
    # looked at it should cost nothing; the slack is for the races of a real scheduler), and
    # 100 warning lines for 800 refusals (a rate limit, or a summary line per burst of them).
    problems = []
    if connections > counted // 4:
        problems.append(f"the service received {connections} connections for {counted} OPENs "
                        "that were all reset at once (max_streams = 16)")
    if len(warnings) > 100:
        problems.append(f"{len(warnings)} warning lines for {pairs} OPEN/RESET pairs, e.g.:\n"
                        + "\n".join(warnings[:3]))
    assert not problems, "\n".join(problems)


FORGED = "FORGED-BY-DOMAIN-2"


@pytest.mark.parametrize("sep", ["\n", "\r\n", "\r", "\n\x1b[2K", "\x0b", "\x85", "\u2028"])
def test_peer_written_text_cannot_forge_log_lines(arena, sep):
    """The peer's refusal reason goes into the victim's log: a newline (or any line break or
    terminal control) in it must not start a line of the peer's choosing."""
    start = log_size(arena.log_path)
    assert arena.wait_link_gone()
    h = HostileDomain(arena.world.sim_dir, Arena.HOSTILE, Arena.VICTIM)
    try:
        h.prepare()
        app = arena.world.connect(Arena.VICTIM, Arena.HOSTILE, 10)
        try:
            offer = h.wait_offer()
            h.answer(f"refused {offer.generation} x{sep}{FORGED} xsockd[1] ERROR all links "
                     "down")
            app.settimeout(15)
            assert app.recv(10) == b""  # refused: the victim ends the stream
        finally:
            app.close()
    finally:
        h.close()
    arena.world.wait_for("the refusal to be logged", lambda: "refused our link" in
                         read_log(arena.log_path, start))
    text = read_log(arena.log_path, start)
    assert_alive(arena, "after a forged refusal")
    lines = text.splitlines()  # every line break Python knows, \r \x0b \x85 \u2028 included
    forged = [ln for ln in lines if ln.lstrip().startswith(FORGED)]
    assert not forged, f"the peer wrote a line of the victim's log: {forged!r}"
    assert "\x1b" not in text, "the peer wrote a terminal escape into the victim's log"
    assert len(record_lines(text)) >= 1
