"""Graceful stop: what the ring core says it still holds, and SIGTERM draining real daemons."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time

import pytest
from ringpair import RingPair
from simworld import SimWorld, assert_ended

from xsockd.rendezvous import offer_path, request_dir
from xsockd.ring import EventType

MiB = 1 << 20


def wait_until(what: str, cond, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


# ---- the ring core's held-bytes query ------------------------------------------------------

def test_held_counts_what_an_application_wrote_before_the_stream_opened():
    """Bytes written before the acceptor decided went out as early data: the opener counts
    them unacknowledged, the acceptor undelivered, until the stream is accepted and credited."""
    p = RingPair(ring_size=65536, window=65536)
    try:
        app, a_end = socket.socketpair()
        sid, _ = p.a.open_stream(a_end, "svc")
        app.sendall(b"e" * 3000)
        serial = p.wait_event(p.b, EventType.OPEN_REQUEST).serial
        held = wait_until("the early bytes", lambda: p.a.held()["unacked"] == 3000 and
                          p.a.held())
        assert held["streams"] == 1 and held["app_unread"] == 0
        assert wait_until("the acceptor's copy", lambda: p.b.held()["undelivered"] == 3000)
        svc, b_end = socket.socketpair()
        assert p.b.accept_stream(sid, serial, b_end)
        got = b""
        while len(got) < 3000:
            got += svc.recv(4096)
        assert got == b"e" * 3000
        assert wait_until("the credit back", lambda: p.a.held()["unacked"] == 0)
        assert p.b.held()["undelivered"] == 0
        app.close()
        svc.close()
    finally:
        p.close()


def test_an_idle_stream_returns_its_credit_without_fin():
    """Regression: credit came back only in quarter windows or with FIN, so a stream that
    went quiet after a small write looked unacknowledged forever, and a graceful stop waited
    its whole stop_timeout for an idle interactive connection.  The receiver now returns the
    remainder when its pump goes idle."""
    p = RingPair(ring_size=65536, window=65536)
    try:
        app, svc, _ = p.open()
        app.sendall(b"u" * 5000)  # below a quarter window
        got = b""
        while len(got) < 5000:
            got += svc.recv(8192)
        held = wait_until("the idle credit", lambda: p.a.held()["unacked"] == 0 and p.a.held())
        assert held["app_unread"] == 0 and held["tx_ring"] == 0 and held["streams"] == 1
        # Bytes the application has not taken yet are still held, and count.
        app.sendall(b"v" * 3000)
        time.sleep(0.2)
        assert p.b.held()["undelivered"] + p.b.held()["app_unread"] == 0  # socket took them
        app.shutdown(socket.SHUT_WR)
        assert svc.recv(3000) == b"v" * 3000
        assert svc.recv(10) == b""  # FIN delivered
        assert wait_until("the final credit", lambda: p.a.held()["unacked"] == 0)
        svc.sendall(b"back")  # half-closed, not gone
        assert app.recv(10) == b"back"
        app.close()
        svc.close()
    finally:
        p.close()


def test_held_counts_bytes_a_slow_application_has_not_taken():
    p = RingPair(ring_size=65536, window=65536)
    try:
        app, svc, _ = p.open()
        app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        svc.setblocking(False)
        sent = 0
        try:
            while sent < 4 * MiB:
                sent += svc.send(b"s" * 65536)
        except BlockingIOError:
            pass
        # Everything is stuck somewhere between the service and the application.
        wait_until("bytes to be held", lambda: p.b.held()["app_unread"] + p.b.held()["unacked"]
                   + p.a.held()["undelivered"] > 0)
        svc.setblocking(True)
        svc.close()
        got = 0
        while chunk := app.recv(65536):
            got += len(chunk)
        assert got == sent
        assert wait_until("nothing held", lambda: not any(
            v for k, v in p.a.held().items() if k != "streams")
            and not any(v for k, v in p.b.held().items() if k != "streams"))
        app.close()
    finally:
        p.close()


# ---- SIGTERM on real daemons ---------------------------------------------------------------

class SlowSink:
    """A service that reads slowly, hashes what it got and notes whether it saw EOF."""

    def __init__(self, path, pause: float) -> None:
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(16)
        self.pause = pause
        self.sha = hashlib.sha256()
        self.total = 0
        self.eof = False
        self.error: str | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.srv.accept()
        buf = bytearray(65536)
        view = memoryview(buf)
        with conn:
            try:
                while n := conn.recv_into(buf):
                    self.sha.update(view[:n])
                    self.total += n
                    time.sleep(self.pause)
                self.eof = True
            except OSError as e:
                self.error = str(e)

    def close(self) -> None:
        self.srv.close()


def set_stop_timeout(world: SimWorld, dom: int, seconds: float) -> None:
    conf = world.daemons[dom].config
    conf.write_text(conf.read_text().replace('backend = "sim"',
                                             f'backend = "sim"\nstop_timeout = {seconds}'))


def assert_link_released(world: SimWorld, gone: int, survivor: int) -> None:
    acct = world.accounting(gone)
    assert acct["granted"] == 0 and acct["mapped"] == 0 and acct["ports"] == 0, acct
    world.wait_for("the survivor to release its side", lambda: all(
        world.accounting(survivor)[k] == 0 for k in ("granted", "mapped", "ports")))
    assert world.xs_tree(f"/local/domain/{gone}/data/xsock") == []
    assert world.xs_tree(offer_path(gone, survivor)) == []
    # The survivor's request node for its peer stays (protocol v2: it is the survivor's, made
    # for that peer), idle again once the link it carried is gone.
    with world.host.xenstore(0) as xs0:
        world.wait_for("the request node to be idle",
                       lambda: xs0.read(f"{request_dir(survivor)}/{gone}") == b"")


def test_sigterm_lets_a_finished_transfer_drain_then_releases_everything(tmp_path):
    world = SimWorld(tmp_path, peers={1: [2], 2: [1]})
    sink = SlowSink(world.echo_path, pause=0.004)  # ~16 MB/s: bytes are in flight at SIGTERM
    try:
        world.start(1, 2, echo=False)
        total = 24 * MiB
        data = os.urandom(total)
        with world.connect(1, 2) as s:
            s.sendall(data)
        d1 = world.daemons[1]
        start = time.monotonic()
        d1.signal(signal.SIGTERM)
        sink.thread.join(30)
        assert not sink.thread.is_alive()
        assert sink.total == total and sink.eof and sink.error is None
        assert sink.sha.hexdigest() == hashlib.sha256(data).hexdigest()
        assert d1.proc.wait(15) == 0
        took = time.monotonic() - start
        log1 = d1.log()
        assert "drained" in log1 and "stop_timeout" not in log1, log1[-2000:]
        assert took < 10, f"stop took {took:.1f} s although the stream finished"
        assert not (world.rundir(1) / "2.sock").exists()
        assert_link_released(world, gone=1, survivor=2)
        # The goodbye in the ring and the removal of domain 1's XenStore nodes race: domain 2
        # may learn of the stop by either, and must say so by one of them.
        world.wait_for("domain 2 to hear the goodbye",
                       lambda: "the peer closed the link" in (log2 := world.daemons[2].log())
                       or "/local/domain/1/data/xsock/link/2 is gone" in log2)
        world.daemons[2].stop()
        assert world.host.leftovers() == {}
    finally:
        sink.close()
        world.close()


def test_an_idle_open_stream_does_not_hold_up_a_stop(tmp_path):
    world = SimWorld(tmp_path, peers={1: [2], 2: [1]})
    try:
        world.start(1, 2)
        s = world.connect(1, 2)
        s.sendall(b"hello")  # an interactive session that then goes quiet
        assert s.recv(5) == b"hello"
        time.sleep(0.3)
        d1 = world.daemons[1]
        start = time.monotonic()
        d1.signal(signal.SIGTERM)
        assert d1.proc.wait(15) == 0
        took = time.monotonic() - start
        log1 = d1.log()
        assert "drained: closing 1 idle stream\n" in log1, log1[-2000:]
        assert took < 5, f"stop took {took:.1f} s with one idle stream (stop_timeout 10)"
        assert_ended(s)
        assert_link_released(world, gone=1, survivor=2)
    finally:
        world.close()


def test_a_stream_that_never_finishes_is_cut_at_stop_timeout(tmp_path):
    # Domain 1 also offers the echo to domain 2, to show that it refuses new streams meanwhile.
    world = SimWorld(tmp_path, peers={1: [2], 2: [1]}, echo_on=(1, 2))
    try:
        set_stop_timeout(world, 1, 1.5)
        world.start(1, 2)
        s = world.connect(1, 2)
        s.sendall(b"x" * 1000)
        assert s.recv(1000)
        stop = threading.Event()

        def keep_writing() -> None:  # never reads the echo: everything backs up
            s.setblocking(False)
            while not stop.is_set():
                try:
                    s.send(b"w" * 65536)
                except BlockingIOError:
                    time.sleep(0.01)
                except OSError:
                    return
        writer = threading.Thread(target=keep_writing)
        writer.start()
        time.sleep(0.5)
        d1 = world.daemons[1]
        start = time.monotonic()
        d1.signal(signal.SIGTERM)
        # Draining: our socket is gone at once, and a stream domain 2 opens now is refused.
        world.wait_for("the socket to go", lambda: not (world.rundir(1) / "2.sock").exists(),
                       timeout=1)
        with world.connect(2, 1) as other:
            assert other.recv(10) == b""
        assert d1.proc.wait(15) == 0
        took = time.monotonic() - start
        stop.set()
        writer.join(5)
        assert 1.4 <= took < 6, f"stop took {took:.2f} s with stop_timeout 1.5"
        log1 = d1.log()
        assert "stop_timeout of 1.5 s reached: closing 1 stream with " in log1, log1[-2000:]
        assert "to service '(default)': we are stopping" in log1
        # The cut stream ended for its application: EOF or a reset, not a hang.
        s.setblocking(True)
        s.settimeout(5)
        with pytest.raises((ConnectionResetError, EOFError)):
            while True:
                if not s.recv(1 << 20):
                    raise EOFError
        s.close()
        assert_link_released(world, gone=1, survivor=2)
        world.daemons[2].stop()
        assert world.host.leftovers() == {}
    finally:
        world.close()
