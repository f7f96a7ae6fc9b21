"""Daemons whose pumps admit the peer's streams by themselves (the admission table): the
channels are still recorded and counted, and a reload or a graceful stop changes what the pump
admits at once."""

from __future__ import annotations

import signal

import pytest
from privatebus import PrivateBus
from simworld import EchoService, SimWorld, assert_ended, echo_roundtrip
from test_refusals import stats


@pytest.fixture
def world(tmp_path):
    bus, bus1 = PrivateBus(), PrivateBus()
    w = SimWorld(tmp_path, peers={1: [2], 2: [1, 3]}, dbus={2: bus.address, 1: bus1.address})
    w.bus, w.bus1 = bus, bus1  # type: ignore[attr-defined]
    try:
        w.start(1, 2)
        yield w
    finally:
        w.close()
        bus.close()
        bus1.close()


def _reload(world: SimWorld, old: str, new: str) -> None:
    conf = world.daemons[2].config
    text = conf.read_text()
    assert old in text
    conf.write_text(text.replace(old, new))
    before = world.daemons[2].log().count("configuration reloaded")
    world.daemons[2].signal(signal.SIGHUP)
    world.wait_for("the reload", lambda: world.daemons[2].log().count(
        "configuration reloaded") > before)


def test_streams_the_pump_accepts_are_channels_and_counted(world):
    for i in range(5):
        with world.connect(1, 2) as s:
            assert echo_roundtrip(s, b"x%d" % i) == b"x%d" % i
    s2 = world.wait_for("the closed channels", lambda: (s := stats(world.bus.address))
                        ["channels"] == 0 and s["streams_opened"] == 5 and s)
    assert s2["streams_fast"] == 5, s2
    assert s2["core_streams"] == s2["admitting"] == 0, s2
    # Domain 1: the first stream set the link up through the loop; once it was up, its pump
    # accepted the application's connections itself.
    s1 = world.wait_for("domain 1's channels", lambda: (s := stats(world.bus1.address))
                        ["channels"] == 0 and s["streams_opened"] == 5 and s)
    assert s1["streams_fast"] == 4, s1
    for d in (1, 2):  # one record per channel, as before
        assert world.daemons[d].log().count("closed (done)") == 5, world.daemons[d].log()


def test_a_link_lost_gives_the_listener_back_to_the_loop(world):
    with world.connect(1, 2) as s:
        assert echo_roundtrip(s, b"up") == b"up"
    world.restart(2)  # the link goes down; domain 1's loop takes its socket back
    world.wait_for("the link down", lambda: "link with domain 2 down" in
                   world.daemons[1].log())
    for i in range(3):  # a new link through the loop, then the pump again
        with world.connect(1, 2) as s:
            assert echo_roundtrip(s, b"again%d" % i) == b"again%d" % i
    s1 = world.wait_for("domain 1's channels", lambda: (s := stats(world.bus1.address))
                        ["channels"] == 0 and s["streams_opened"] == 4 and s)
    assert s1["streams_fast"] == 2, s1


def test_a_reload_that_takes_the_service_away_refuses_the_next_stream(world):
    with world.connect(1, 2) as s:
        assert echo_roundtrip(s, b"a") == b"a"
    sock_line = f'socket = "{world.echo_path}"\n'
    _reload(world, sock_line, sock_line + "allow = [3]\n")
    s = world.connect(1, 2)
    assert_ended(s, timeout=10)
    s.close()
    world.wait_for("the refusal", lambda: "not in that service's allow list" in
                   world.daemons[2].log())
    s2 = stats(world.bus.address)
    assert (s2["streams_fast"], s2["streams_refused"]) == (1, 1), s2
    _reload(world, sock_line + "allow = [3]\n", sock_line)
    with world.connect(1, 2) as s:
        assert echo_roundtrip(s, b"b") == b"b"
    world.wait_for("the second fast stream",
                   lambda: stats(world.bus.address)["streams_fast"] == 2)


def test_a_service_not_listening_yet_is_still_waited_for_by_python(world):
    """ENOENT is not settled by the pump: Python's patience (SERVICE_START_PATIENCE) still
    lets a service that starts a moment later take the stream."""
    assert world.echo is not None
    world.echo.close()
    world.echo = None
    s = world.connect(1, 2)
    s.sendall(b"late")
    world.echo = EchoService(world.echo_path)  # back within the patience
    s.settimeout(10)
    assert s.recv(10) == b"late"
    s.close()
    s2 = world.wait_for("the channel", lambda: (st := stats(world.bus.address))
                        ["streams_opened"] == 1 and st)
    assert s2["streams_fast"] == 0, s2
