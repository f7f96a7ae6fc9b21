"""Streams that cannot be made: the application sees only EOF, so the daemons' log lines say
why and what to do, and their statistics count refusals and failures apart."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from privatebus import PrivateBus
from simworld import SimWorld, assert_ended

from xsockd.advice import link_refused, stream_refused
from xsockd.ring import Reason

XSOCKCTL = str(Path(sys.executable).with_name("xsockctl"))


def stats(address: str) -> dict[str, object]:
    r = subprocess.run([XSOCKCTL, "--address", address, "stats", "--json"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def world(tmp_path):
    """Domain 0 (which may ask xenstored whether a domain exists) reaches domain 1's
    services; domain 2 exists but runs no xsockd; domain 9 does not exist."""
    bus = PrivateBus()
    dead = tmp_path / "dead.sock"  # configured, but nobody listens there
    w = SimWorld(tmp_path, peers={0: [1, 2, 9], 1: [0, 3]}, echo_on=(1,),
                 dbus={0: bus.address},
                 extra={0: '\n[remote.1]\nservices = ["x", "web", "dead"]\n',
                        1: f'\n[services.web]\nsocket = "{tmp_path}/web.sock"\nallow = [3]\n'
                           f'\n[services.dead]\nsocket = "{dead}"\n'})
    w.bus = bus  # type: ignore[attr-defined]
    try:
        w.start(0, 1)
        yield w
    finally:
        w.close()
        bus.close()


def connect(world: SimWorld, src: int, name: str) -> None:
    """Connects as an application of ``src`` to rundir/``name`` and asserts a quick EOF."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(world.rundir(src) / name))
    assert_ended(s, timeout=10)


def test_each_failure_logs_what_to_do_and_is_counted(world):
    log0, log1 = (lambda: world.daemons[0].log()), (lambda: world.daemons[1].log())
    connect(world, 0, "9.sock")
    world.wait_for("the missing domain in the log", lambda: "domain 9 does not exist "
                   "(xenstored does not know it): start that domain, or remove 9 from "
                   "[daemon] peers" in log0())
    connect(world, 0, "2.sock")
    world.wait_for("no daemon on the peer in the log", lambda: "domain 2 has no link request "
                   "node for us (/local/domain/2/data/xsock/request/0): start xsockd in "
                   "domain 2" in log0() and "or add 0 to [daemon] peers in its configuration"
                   in log0())
    assert "the application sees EOF" in log0()
    connect(world, 0, "1/x.sock")
    world.wait_for("the unknown service on both sides", lambda: "no service 'x': add "
                   "[services.x] to this domain's configuration" in log1()
                   and "domain 1 refused service 'x': it has no [services.x], does not list 0 "
                   "in that service's allow" in log0())
    connect(world, 0, "1/web.sock")
    world.wait_for("the allow list", lambda: "not in that service's allow list: add 0 to its "
                   "allow" in log1())
    connect(world, 0, "1/dead.sock")
    world.wait_for("the dead service on both sides", lambda: "start the service (or fix "
                   "[services.dead] socket)" in log1() and "domain 1 could not reach its "
                   "service 'dead'" in log0())
    s0 = world.wait_for("domain 0's counters", lambda: (s := stats(world.bus.address))
                        ["streams_failed"] == 3 and s)
    assert (s0["domid"], s0["streams_refused"], s0["links_failed"], s0["links_refused"],
            s0["streams_opened"], s0["links_opened"]) == (0, 2, 2, 0, 3, 1), s0
    for d in (0, 1):
        assert world.daemons[d].proc.poll() is None, f"daemon {d} died"
        assert "Traceback" not in world.daemons[d].log()
    # xsockctl's table shows them too.
    r = subprocess.run([XSOCKCTL, "--address", world.bus.address, "stats"],
                       capture_output=True, text=True, timeout=30)
    assert "streams_failed" in r.stdout and "links_failed" in r.stdout, r.stdout


def test_domain_1_counts_what_it_refused_and_failed(tmp_path):
    bus = PrivateBus()
    world = SimWorld(tmp_path, peers={0: [1], 1: [0, 3]}, echo_on=(1,), dbus={1: bus.address},
                     extra={0: '\n[remote.1]\nservices = ["x", "dead"]\n',
                            1: f'\n[services.dead]\nsocket = "{tmp_path}/dead.sock"\n'})
    try:
        world.start(0, 1)
        connect(world, 0, "1/x.sock")
        connect(world, 0, "1/dead.sock")
        s1 = world.wait_for("domain 1's counters", lambda: (s := stats(bus.address))
                            ["streams_failed"] == 1 and s)
        assert (s1["streams_refused"], s1["links_failed"], s1["links_refused"]) == (1, 0, 0)
    finally:
        world.close()
        bus.close()


@pytest.mark.parametrize("reason,words", [
    (Reason.REFUSED, "it has no [services.web], does not list 1 in that service's allow, or "
                     "is stopping"),
    (Reason.NO_SERVICE, "nothing listens on the service's socket there; start the service"),
    (Reason.TOO_MANY, "[link] max_streams, open_rate, max_connecting there"),
])
def test_a_stream_refused_by_the_peer_says_what_to_do(reason, words):
    assert words in stream_refused(2, 1, "web", reason)


def test_the_default_service_refused_names_default_service():
    assert "[daemon] default_service" in stream_refused(2, 1, "", Reason.REFUSED)


@pytest.mark.parametrize("answer,words", [
    ("not-allowed", "it does not list domain 1 in [daemon] peers: add 1 there"),
    ("busy", "at most 5 link offers in 5 s"),
    ("stopping", "its xsockd is stopping"),
    ("version 3; we speak 2", "run the same xsockd version on both"),
    ("attach-failed-22", "could not map our pages"),
    ("what\\n", "its log says why"),
])
def test_a_link_refused_by_the_peer_says_what_to_do(answer, words):
    line = link_refused(2, 1, answer)
    assert line.startswith(f"domain 2 refused our link ({answer}): ") and words in line


def test_a_link_refused_by_a_stopping_peer_is_counted_on_both_sides(tmp_path):
    """Domain 2 is draining (an unread echo holds bytes on their way) when domain 3 offers
    its first link: refused "stopping", counted as a refused link and a refused stream."""
    bus = PrivateBus()
    world = SimWorld(tmp_path, peers={1: [2], 2: [1, 3], 3: [2]}, dbus={3: bus.address})
    conf2 = world.daemons[2].config
    conf2.write_text(conf2.read_text().replace("[daemon]\n", "[daemon]\nstop_timeout = 20\n"))
    try:
        world.start(1, 2, 3)
        stuck = world.connect(1, 2)
        stuck.settimeout(0.2)
        try:
            while True:  # never read: the echo's answer piles up on its way back
                stuck.send(b"x" * 65536)
        except TimeoutError:
            pass
        world.daemons[2].signal(signal.SIGTERM)
        world.wait_for("domain 2 to drain", lambda: "may drain" in world.daemons[2].log())
        connect(world, 3, "2.sock")
        world.wait_for("the refusal on both sides", lambda: (
            "refused link from domain 3: we are stopping" in world.daemons[2].log()
            and "domain 2 refused our link (stopping): its xsockd is stopping" in
            world.daemons[3].log()))
        s3 = stats(bus.address)
        assert (s3["links_refused"], s3["streams_refused"], s3["links_failed"],
                s3["streams_failed"]) == (1, 1, 0, 0), s3
        stuck.close()
    finally:
        world.close()
        bus.close()


def test_advice_names_the_default_service_once():
    from xsockd.advice import stream_refused
    from xsockd.ring import Reason
    line = stream_refused(2, 1, "", Reason.NO_SERVICE)
    assert "domain 2 could not reach its default service:" in line and "its its" not in line
    assert "could not reach its service 'web':" in stream_refused(2, 1, "web", Reason.NO_SERVICE)
