"""The pump's own admission of a peer's OPEN (ring_core.c fast_accept): a service in the link's
admission table is connected and ACCEPTed without Python, which hears of it by an ACCEPTED
event; anything the pump cannot settle at once (a name not in the table, no token left, a
missing socket, a full backlog, an unreachable path) is an OPEN_REQUEST as before.

Also run under AddressSanitizer and UBSan by tests/test_ring_sanitizers.py.
"""

from __future__ import annotations

import errno
import socket
import time
from pathlib import Path

import pytest

from tests.ringpair import FakePeer, RingPair
from xsockd import ring
from xsockd.ring import AdmitEntry, EventType, OpenGate, Reason, Role

F_OPEN, F_ACCEPT, F_RESET = 1, 2, 6


_OPEN: list[socket.socket] = []  # closed after each test


@pytest.fixture(autouse=True)
def _close_sockets():
    yield
    while _OPEN:
        _OPEN.pop().close()


def _listener(path: Path, backlog: int = 64) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _OPEN.append(srv)
    srv.bind(str(path))
    srv.listen(backlog)
    srv.settimeout(5)
    return srv


@pytest.fixture
def pair():
    p = RingPair(ring_size=16384, window=65536)
    yield p
    p.close()


def _open_from_a(pair: RingPair, service: str) -> tuple[socket.socket, int, int]:
    app, a_end = socket.socketpair()
    _OPEN.append(app)
    sid, serial = pair.a.open_stream(a_end, service)
    return app, sid, serial


def test_a_service_in_the_table_is_accepted_by_the_pump_with_its_caller_header(pair, tmp_path):
    srv = _listener(tmp_path / "svc.sock")
    gate = OpenGate(0, 1000)  # no refill: the token taken shows
    pair.b.set_admission([AdmitEntry("svc", str(tmp_path / "svc.sock"), b"XSOCK/1 hello\n")],
                         gate)
    app, sid, serial = _open_from_a(pair, "svc")
    acc = pair.wait_event(pair.b, EventType.ACCEPTED)
    assert (acc.stream, acc.name) == (sid, "svc")
    opened = pair.wait_event(pair.a, EventType.OPENED)
    assert opened.serial == serial
    conn, _ = srv.accept()
    _OPEN.append(conn)
    app.sendall(b"ping")
    got = b""
    while len(got) < len(b"XSOCK/1 hello\nping"):
        got += conn.recv(100)
    assert got == b"XSOCK/1 hello\nping"
    conn.sendall(b"pong")
    app.settimeout(5)
    assert app.recv(4) == b"pong"
    assert not [e for e in pair.drain(pair.b) if e.type == EventType.OPEN_REQUEST]
    assert gate.tokens() == 999  # the pump took a token
    conn.close()
    app.close()
    closed = pair.wait_event(pair.b, EventType.CLOSED)
    assert closed.serial == acc.serial


def test_the_default_service_is_the_empty_name(pair, tmp_path):
    srv = _listener(tmp_path / "d.sock")
    pair.b.set_admission([AdmitEntry("", str(tmp_path / "d.sock"))], OpenGate(10, 10))
    _open_from_a(pair, "")
    assert pair.wait_event(pair.b, EventType.ACCEPTED).name == ""
    srv.accept()[0].close()
    _open_from_a(pair, "other")  # not in the table: Python decides
    assert pair.wait_event(pair.b, EventType.OPEN_REQUEST).name == "other"


@pytest.mark.parametrize("case", ["not-in-table", "no-socket", "no-listener", "no-gate"])
def test_what_the_pump_cannot_settle_goes_to_python(pair, tmp_path, case):
    path = tmp_path / "svc.sock"
    if case == "no-listener":  # a socket file nobody listens on: ECONNREFUSED
        dead = _listener(path)
        dead.close()
    name = "other" if case == "not-in-table" else "svc"
    pair.b.set_admission([AdmitEntry("svc", str(path))],
                         None if case == "no-gate" else OpenGate(10, 10))
    _, sid, _ = _open_from_a(pair, name)
    req = pair.wait_event(pair.b, EventType.OPEN_REQUEST)
    assert (req.stream, req.name) == (sid, name)
    assert not [e for e in pair.drain(pair.b) if e.type == EventType.ACCEPTED]
    # Python's answer works as before.
    assert pair.b.reject_stream(req.stream, req.serial, Reason.NO_SERVICE)
    assert pair.wait_event(pair.a, EventType.CLOSED).arg == Reason.NO_SERVICE


def test_the_budget_bounds_fast_accepts_and_python_charges_it(pair, tmp_path):
    srv = _listener(tmp_path / "svc.sock")
    gate = OpenGate(0, 3)  # three tokens, never refilled
    gate.charge()  # one open Python admitted: two left for the pump
    pair.b.set_admission([AdmitEntry("svc", str(tmp_path / "svc.sock"))], gate)
    for _ in range(4):
        _open_from_a(pair, "svc")
    kinds = []
    deadline = time.monotonic() + 5
    while len(kinds) < 4 and time.monotonic() < deadline:
        kinds += [e.type for e in pair.drain(pair.b) if e.type != EventType.PEER_UP]
        time.sleep(0.01)
    assert kinds == [EventType.ACCEPTED] * 2 + [EventType.OPEN_REQUEST] * 2
    assert gate.tokens() < 1
    srv.close()


def test_a_full_backlog_is_left_to_python_and_its_token_given_back(pair, tmp_path):
    srv = _listener(tmp_path / "svc.sock", backlog=0)
    gate = OpenGate(0, 50)
    pair.b.set_admission([AdmitEntry("svc", str(tmp_path / "svc.sock"))], gate)
    events = []
    for _ in range(8):  # a backlog of 0 holds one or two connections: the rest see EAGAIN
        _open_from_a(pair, "svc")
    deadline = time.monotonic() + 5
    while len(events) < 8 and time.monotonic() < deadline:
        events += [e for e in pair.drain(pair.b) if e.type != EventType.PEER_UP]
        time.sleep(0.01)
    accepted = [e for e in events if e.type == EventType.ACCEPTED]
    requests = [e for e in events if e.type == EventType.OPEN_REQUEST]
    assert len(accepted) + len(requests) == 8
    assert 1 <= len(accepted) <= 3 and requests
    assert 50 - len(accepted) - 1 < gate.tokens() <= 50 - len(accepted)
    srv.close()


def test_a_new_table_applies_to_the_next_open(pair, tmp_path):
    srv = _listener(tmp_path / "svc.sock")
    gate = OpenGate(100, 100)
    pair.b.set_admission([AdmitEntry("svc", str(tmp_path / "svc.sock"))], gate)
    _open_from_a(pair, "svc")
    pair.wait_event(pair.b, EventType.ACCEPTED)
    pair.b.set_admission([], gate)  # a reload that took the service away
    _open_from_a(pair, "svc")
    assert pair.wait_event(pair.b, EventType.OPEN_REQUEST).name == "svc"
    pair.b.set_admission([AdmitEntry("svc", str(tmp_path / "svc.sock"))], gate)
    _open_from_a(pair, "svc")
    pair.wait_event(pair.b, EventType.ACCEPTED)
    del gate  # the link keeps its own reference to the budget
    _open_from_a(pair, "svc")
    pair.wait_event(pair.b, EventType.ACCEPTED)
    srv.close()


def test_entries_the_table_cannot_hold_are_left_out_and_bad_tables_refused(pair, tmp_path):
    long_path = "/" + "x" * 120
    assert not AdmitEntry("svc", long_path).fits()
    assert not AdmitEntry(".hidden", "/run/s").fits()
    assert AdmitEntry("", "/run/s").fits()
    pair.b.set_admission([AdmitEntry("svc", long_path)], OpenGate(1, 1))
    _open_from_a(pair, "svc")
    pair.wait_event(pair.b, EventType.OPEN_REQUEST)  # left to Python, which reports the path
    table = ring.ffi.new("struct xsk_admit_entry[]", 2)
    for slot in table:
        slot.name, slot.path = b"same", b"/run/s"
    gate = OpenGate(1, 1)
    rc = ring.lib.xsk_link_set_admission(pair.b._ptr, table, 2, gate._ptr)
    assert rc == -errno.EINVAL  # names must be unique and sorted
    assert ring.lib.xsk_link_set_admission(pair.b._ptr, table, ring.lib.XSK_ADMIT_MAX + 1,
                                           gate._ptr) == -errno.EINVAL


def test_a_peer_flooding_opens_at_a_service_that_never_accepts_is_bounded(tmp_path):
    """A hostile peer sends OPEN after OPEN for a service whose backlog fills: the pump never
    blocks, holds at most max_streams, and what it cannot connect goes to Python."""
    max_streams = 32
    peer = FakePeer(ring_size=65536, max_streams=max_streams, role=Role.ACCEPTOR)
    srv = _listener(tmp_path / "svc.sock", backlog=4)  # never accepts
    try:
        peer.link.set_admission([AdmitEntry("svc", str(tmp_path / "svc.sock"))],
                                OpenGate(1000, 1000))
        sent = 0
        start = time.monotonic()
        for _round in range(8):
            for _ in range(100):
                if peer.free() < 64:
                    break
                peer.put(1 + 2 * sent, F_OPEN, 65536, b"svc")
                sent += 1
            peer.publish()
            time.sleep(0.05)
            peer.frames()  # consume ACCEPTs and RESETs, as a peer must for room
        events = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            events += peer.drain(peer.link)
            if peer.link.stats()["streams"] >= max_streams:
                break
            time.sleep(0.02)
        assert time.monotonic() - start < 10  # the pump never waited on the service
        accepted = [e for e in events if e.type == EventType.ACCEPTED]
        assert not [e for e in events if e.type == EventType.LINK_DOWN]
        # The backlog (4, a few more on Linux) bounds what the pump connected; the others
        # are Python's, within max_streams; the rest of the flood was answered TOO_MANY.
        assert 1 <= len(accepted) <= 8
        assert peer.link.stats()["streams"] <= max_streams
        frames = peer.frames()
        resets = [f for f in frames if f[1] == F_RESET and f[3] == Reason.TOO_MANY]
        assert sent > max_streams and (resets or peer.link.stats()["streams"] == max_streams)
    finally:
        srv.close()
        peer.close()
