"""Listeners handed to a link's pump (xsk_link_listen): it accepts local applications'
connections and opens their streams itself, telling Python by LOCAL_OPEN; it gives them back
on unlisten or when it stops, never spins when out of descriptors, and keeps max_streams.

Also run under AddressSanitizer and UBSan by tests/test_ring_sanitizers.py.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from pathlib import Path

import pytest

from tests.ringpair import RingPair
from xsockd.ring import LISTEN_RETRY, AdmitEntry, EventType, OpenGate, Reason

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
    srv.setblocking(False)
    return srv


def _client(path: Path) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _OPEN.append(c)
    c.connect(str(path))
    c.settimeout(5)
    return c


@pytest.fixture
def pair(tmp_path):
    """A's pump listens on app.sock for service "svc"; B's pump admits "svc" (svc.sock)."""
    p = RingPair(ring_size=16384, window=65536, max_streams=4)
    p.app_path = tmp_path / "app.sock"  # type: ignore[attr-defined]
    p.listener = _listener(p.app_path)  # type: ignore[attr-defined]
    p.service = _listener(tmp_path / "svc.sock")  # type: ignore[attr-defined]
    p.service.setblocking(True)  # type: ignore[attr-defined]
    p.service.settimeout(5)  # type: ignore[attr-defined]
    p.b.set_admission([AdmitEntry("svc", str(tmp_path / "svc.sock"))], OpenGate(1000, 1000))
    assert p.a.listen(p.listener, "svc")  # type: ignore[attr-defined]
    yield p
    p.close()


def test_the_pump_accepts_and_opens_the_stream_itself(pair):
    app = _client(pair.app_path)
    local = pair.wait_event(pair.a, EventType.LOCAL_OPEN)
    assert local.name == "svc"
    acc = pair.wait_event(pair.b, EventType.ACCEPTED)
    assert acc.stream == local.stream
    opened = pair.wait_event(pair.a, EventType.OPENED)
    assert opened.serial == local.serial
    svc, _ = pair.service.accept()
    _OPEN.append(svc)
    app.sendall(b"hello")
    assert svc.recv(5) == b"hello"
    svc.sendall(b"world")
    assert app.recv(5) == b"world"
    app.close()
    svc.close()
    assert pair.wait_event(pair.a, EventType.CLOSED).serial == local.serial


def test_a_burst_of_connections_is_all_accepted_and_then_one_at_a_time(tmp_path):
    """The pump accepts one connection per report of a level-triggered listener and more only
    while a burst keeps it ready: a burst larger than any batch must all be opened (nothing
    left queued without a report), and connections arriving alone afterwards too."""
    p = RingPair(ring_size=65536, window=16384, max_streams=512)
    try:
        app_path = tmp_path / "app.sock"
        listener = _listener(app_path, backlog=512)
        service = _listener(tmp_path / "svc.sock", backlog=512)
        p.b.set_admission([AdmitEntry("svc", str(tmp_path / "svc.sock"))],
                          OpenGate(10_000, 10_000))
        burst = [_client(app_path) for _ in range(300)]  # queued before the pump listens
        assert p.a.listen(listener, "svc")
        accepted = 0
        deadline = time.monotonic() + 20
        while accepted < len(burst) and time.monotonic() < deadline:
            accepted += sum(e.type == EventType.ACCEPTED for e in p.drain(p.b))
            time.sleep(0.01)
        assert accepted == len(burst)
        opened = []
        service.setblocking(True)
        service.settimeout(5)
        for _ in range(len(burst)):
            conn, _ = service.accept()
            _OPEN.append(conn)
            opened.append(conn)
        for i in range(3):  # alone, each waiting for the one before
            app = _client(app_path)
            svc, _ = service.accept()
            _OPEN.append(svc)
            app.sendall(b"%d" % i)
            assert svc.recv(1) == b"%d" % i
        for i, c in enumerate(burst):  # every stream of the burst carries its bytes
            c.sendall(b"%03d" % i)
        got = set()
        for conn in opened:
            conn.settimeout(5)
            msg = b""
            while len(msg) < 3:
                msg += conn.recv(3 - len(msg))
            got.add(msg)
        assert got == {b"%03d" % i for i in range(len(burst))}
    finally:
        p.close()


def test_after_unlisten_connections_stay_queued_for_python(pair):
    assert pair.a.unlisten("svc")
    time.sleep(0.1)  # the pump has run the command
    _client(pair.app_path)
    time.sleep(0.3)
    assert not [e for e in pair.drain(pair.a) if e.type == EventType.LOCAL_OPEN]
    conn, _ = pair.listener.accept()  # still there, for the loop to take
    conn.close()


def test_a_stopped_pump_leaves_the_listener_to_python(pair):
    pair.a.stop()
    _client(pair.app_path)
    conn, _ = pair.listener.accept()
    conn.close()
    assert not pair.a.listen(pair.listener, "svc")  # the pump has ended


def test_streams_past_max_streams_are_opened_and_closed_too_many(pair):
    clients = [_client(pair.app_path) for _ in range(5)]  # max_streams is 4
    events = []
    deadline = time.monotonic() + 5
    while len([e for e in events if e.type == EventType.LOCAL_OPEN]) < 5 and \
            time.monotonic() < deadline:
        events += pair.drain(pair.a)
        time.sleep(0.01)
    opens = [e for e in events if e.type == EventType.LOCAL_OPEN]
    closed = [e for e in events if e.type == EventType.CLOSED and e.arg == Reason.TOO_MANY]
    assert len(opens) == 5 and len(closed) == 1
    assert closed[0].serial == opens[-1].serial  # its CLOSED, after its LOCAL_OPEN
    assert clients[-1].recv(1) == b""  # that application sees EOF


def test_out_of_descriptors_the_pump_waits_instead_of_spinning(pair):
    """accept4 failing with EMFILE leaves the connection queued and the listener readable:
    the pump must pause its listener (LISTEN_FAILED), not loop on it, and take the
    connection once descriptors are back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.dup(0)  # the lowest free descriptor: the limit leaves none free
    os.close(probe)
    app = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _OPEN.append(app)
    wakeups = pair.a.stats()["wakeups"]
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(probe, app.fileno() + 1), hard))
    try:
        app.connect(str(pair.app_path))
        failed = pair.wait_event(pair.a, EventType.LISTEN_FAILED)
        time.sleep(0.5)
        spins = pair.a.stats()["wakeups"] - wakeups
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert failed.name == "svc" and -failed.arg in (24, 23)  # EMFILE, ENFILE
    # One look every LISTEN_RETRY at most (and a few wake-ups of its own), not a spin.
    assert spins <= 3 * 0.5 / LISTEN_RETRY + 10, spins
    local = pair.wait_event(pair.a, EventType.LOCAL_OPEN)  # taken once descriptors are back
    assert local.name == "svc"
