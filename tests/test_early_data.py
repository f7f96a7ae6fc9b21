"""Early data (docs/PROTOCOL.md "Early data"): an opener sends a stream's first bytes, and its
FIN, right behind the OPEN, within the early credit the acceptor advertised in the control page,
instead of waiting a ring round trip for the ACCEPT; the acceptor answers such an open with a
lazy ACCEPT (no signal) unless the opener used up that credit and asked for it (WANT).

The peer here is the test itself (tests/ringpair.py FakePeer), writing and reading raw frames,
so that the rules are checked from the wire.  Also run under AddressSanitizer and UBSan by
tests/test_ring_sanitizers.py.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Callable

import pytest

from tests.ringpair import EARLY_OFF, FakePeer, RingPair
from xsockd.ring import EventType, Reason, Role

# From docs/PROTOCOL.md, not from the C core: the test is a second implementation of the wire.
F_OPEN, F_ACCEPT, F_DATA, F_CREDIT, F_FIN, F_RESET = 1, 2, 3, 4, 5, 6
FL_EARLY = 1  # on OPEN
FL_WANT = 1   # on DATA before ACCEPT
EARLY_WINDOW = 65536  # the most early credit a side uses, whatever its peer advertised

Frame = tuple[int, int, int, int, int, bytes]  # stream, type, flags, len, arg, payload

_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets():
    yield
    while _OPEN:
        _OPEN.pop().close()


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    _OPEN.extend((a, b))
    return a, b


def _collect(fp: FakePeer, until: Callable[[list[Frame]], bool], timeout: float = 5.0,
             settle: float = 0.0) -> list[Frame]:
    """Reads the link's frames until ``until`` holds on all of them so far (then ``settle``
    seconds more, to catch anything that should not have followed), or fails."""
    got: list[Frame] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        if time.monotonic() > deadline:
            raise AssertionError(f"frames so far: {[(f[0], f[1], f[2], f[3]) for f in got]}")
        got += fp.flagged_frames()
        time.sleep(0.005)
    if settle:
        time.sleep(settle)
        got += fp.flagged_frames()
    return got


def _send_what_fits(sock: socket.socket, data: bytes) -> int:
    """Writes as much of ``data`` as a non-blocking ``sock`` takes now; returns how much."""
    sent = 0
    try:
        while sent < len(data):
            sent += sock.send(data[sent:])
    except BlockingIOError:
        pass
    return sent


def _accept_request(fp: FakePeer, stream: int) -> socket.socket:
    """Waits for the link's OPEN_REQUEST of ``stream``, accepts it on a fresh socket pair and
    returns the service's end."""
    req = fp.wait_event(fp.link, EventType.OPEN_REQUEST)
    assert req.stream == stream
    svc, end = _pair()
    assert fp.link.accept_stream(stream, req.serial, end)
    return svc


def _data(frames: list[Frame], stream: int) -> bytes:
    return b"".join(f[5] for f in frames if f[0] == stream and f[1] == F_DATA)


def _types(frames: list[Frame]) -> list[int]:
    return [f[1] for f in frames]


# ---- the opener (the link under test opens; the test accepts) ------------------------------

def _opener(early: int, ring_size: int = 4096) -> FakePeer:
    # The link is the initiator; the test, its acceptor, advertises ``early``.
    return FakePeer(role=Role.INITIATOR, early=early, ring_size=ring_size)


def test_the_first_bytes_and_fin_follow_the_open_without_waiting_for_accept():
    fp = _opener(early=4096)
    try:
        app, end = _pair()
        sid, _ = fp.link.open_stream(end, "svc")
        app.sendall(b"hello")
        app.shutdown(socket.SHUT_WR)
        frames = _collect(fp, lambda fs: F_FIN in _types(fs), settle=0.1)
        assert _types(frames) == [F_OPEN, F_DATA, F_FIN], frames
        assert frames[0][2] == FL_EARLY
        assert _data(frames, sid) == b"hello"
        assert frames[1][2] == 0  # 5 of 4096 bytes: no WANT
        # The late ACCEPT (its window counts the 5 bytes) and the test's FIN close the stream.
        fp.put(sid, F_ACCEPT, 65536)
        fp.put(sid, F_FIN)
        fp.publish()
        app.settimeout(5)
        assert app.recv(10) == b""
        closed = fp.wait_event(fp.link, EventType.CLOSED)
        assert (closed.stream, closed.arg) == (sid, Reason.DONE)
    finally:
        fp.close()


def test_without_early_credit_the_opener_waits_for_accept():
    fp = _opener(early=0)  # an acceptor of before early data
    try:
        app, end = _pair()
        sid, _ = fp.link.open_stream(end, "svc")
        app.sendall(b"hello")
        frames = _collect(fp, lambda fs: F_OPEN in _types(fs), settle=0.3)
        assert [(f[1], f[2]) for f in frames] == [(F_OPEN, 0)], frames
        fp.put(sid, F_ACCEPT, 65536)
        fp.publish()
        frames = _collect(fp, lambda fs: _data(fs, sid) == b"hello")
        assert _types(frames) == [F_DATA]
    finally:
        fp.close()


def test_early_bytes_stop_at_the_credit_and_the_last_asks_for_accept():
    fp = _opener(early=4096, ring_size=65536)
    try:
        app, end = _pair()
        sid, _ = fp.link.open_stream(end, "svc")
        msg = bytes(range(256)) * 40  # 10240 bytes
        app.sendall(msg)
        frames = _collect(fp, lambda fs: len(_data(fs, sid)) >= 4096, settle=0.3)
        assert _data(frames, sid) == msg[:4096]
        data = [f for f in frames if f[1] == F_DATA]
        assert [f[2] for f in data] == [0] * (len(data) - 1) + [FL_WANT]
        fp.put(sid, F_ACCEPT, 65536)
        fp.publish()
        frames = _collect(fp, lambda fs: len(_data(fs, sid)) >= len(msg) - 4096)
        assert _data(frames, sid) == msg[4096:]
        assert all(f[2] == 0 for f in frames)  # after ACCEPT: no flags
    finally:
        fp.close()


def test_a_huge_advertised_early_credit_is_capped():
    fp = _opener(early=0xFFFFFFFF, ring_size=262144)
    try:
        app, end = _pair()
        app.setblocking(False)
        sid, _ = fp.link.open_stream(end, "svc")
        _send_what_fits(app, b"z" * 200_000)
        frames = _collect(fp, lambda fs: len(_data(fs, sid)) >= EARLY_WINDOW, settle=0.3)
        assert len(_data(frames, sid)) == EARLY_WINDOW
    finally:
        fp.close()


def test_an_accept_smaller_than_the_early_bytes_sent_is_a_violation():
    fp = _opener(early=4096)
    try:
        app, end = _pair()
        sid, _ = fp.link.open_stream(end, "svc")
        app.sendall(b"x" * 3000)
        _collect(fp, lambda fs: len(_data(fs, sid)) == 3000)
        fp.put(sid, F_ACCEPT, 2048)  # a window that does not even hold what was sent
        fp.publish()
        down = fp.wait_event(fp.link, EventType.LINK_DOWN)
        assert down.arg == -errno.EPROTO
    finally:
        fp.close()


# ---- the acceptor (the test opens; the link under test accepts) ----------------------------

def _acceptor(window: int = 65536) -> FakePeer:
    fp = FakePeer(role=Role.ACCEPTOR, window=window, ring_size=16384)
    deadline = time.monotonic() + 5
    while fp.control[int(Role.ACCEPTOR)] != 1:  # the link is live: its hello signal is sent
        assert time.monotonic() < deadline, "the link never set its live byte"
        time.sleep(0.01)
    time.sleep(0.05)
    fp.signals()
    return fp


@pytest.mark.parametrize("window", [4096, 65536, 1 << 20])
def test_a_side_advertises_its_early_credit_before_it_is_live(window):
    fp = _acceptor(window)
    try:
        early = struct.unpack_from("<I", fp.control, EARLY_OFF + 4 * int(Role.ACCEPTOR))[0]
        assert early == min(window, EARLY_WINDOW)
    finally:
        fp.close()


def test_early_bytes_and_fin_wait_for_the_control_planes_accept():
    fp = _acceptor()
    try:
        fp.put(1, F_OPEN, 65536, b"svc", flags=FL_EARLY)
        fp.put(1, F_DATA, 0, b"abc")
        fp.put(1, F_DATA, 0, b"defg")
        fp.put(1, F_FIN)
        fp.publish()
        svc = _accept_request(fp, 1)
        svc.settimeout(5)
        got = b""
        while (chunk := svc.recv(100)):
            got += chunk
        assert got == b"abcdefg"  # then EOF: the early FIN, after the early bytes
        frames = _collect(fp, lambda fs: F_ACCEPT in _types(fs))
        assert frames[0][1] == F_ACCEPT and frames[0][4] == 65536
    finally:
        fp.close()


def test_early_bytes_beyond_the_advertised_credit_are_a_violation():
    fp = _acceptor(window=4096)  # early credit 4096
    try:
        fp.put(1, F_OPEN, 65536, b"svc", flags=FL_EARLY)
        fp.put(1, F_DATA, 0, b"a" * 3000)
        fp.put(1, F_DATA, 0, b"b" * 3000)
        fp.publish()
        down = fp.wait_event(fp.link, EventType.LINK_DOWN)
        assert down.arg == -errno.EPROTO
    finally:
        fp.close()


@pytest.mark.parametrize("frame", [F_DATA, F_FIN])
def test_data_or_fin_before_accept_without_the_early_flag_is_a_violation(frame):
    fp = _acceptor()
    try:
        fp.put(1, F_OPEN, 65536, b"svc")  # no EARLY
        fp.put(1, frame, 0, b"abc" if frame == F_DATA else b"")
        fp.publish()
        down = fp.wait_event(fp.link, EventType.LINK_DOWN)
        assert down.arg == -errno.EPROTO
    finally:
        fp.close()


def test_early_bytes_of_a_refused_stream_are_dropped_and_the_link_stays():
    fp = _acceptor()
    try:
        fp.put(1, F_OPEN, 65536, b"nosuch", flags=FL_EARLY)
        fp.put(1, F_DATA, 0, b"x" * 1000)
        fp.publish()
        req = fp.wait_event(fp.link, EventType.OPEN_REQUEST)
        assert fp.link.reject_stream(1, req.serial, Reason.NO_SERVICE)
        frames = _collect(fp, lambda fs: F_RESET in _types(fs))
        assert (frames[-1][0], frames[-1][4]) == (1, Reason.NO_SERVICE)
        fp.put(1, F_DATA, 0, b"y" * 1000)  # crossed the RESET: discarded
        fp.put(1, F_FIN)
        fp.put(3, F_OPEN, 65536, b"svc", flags=FL_EARLY)
        fp.put(3, F_DATA, 0, b"next")
        fp.publish()
        svc = _accept_request(fp, 3)
        svc.settimeout(5)
        assert svc.recv(100) == b"next"
        assert fp.link.stats()["streams"] == 1  # the refused one is gone
    finally:
        fp.close()


def test_the_accept_of_an_early_open_is_lazy_unless_the_opener_asks():
    fp = _acceptor()
    try:
        rx_cons_wants = fp.rx_idx + 68  # the test's "wake me" flag for its rx ring
        for sid, flags in ((1, 0), (3, FL_WANT)):
            fp.frames()
            fp.signals()
            fp.set_u32(rx_cons_wants, 1)  # the test sleeps, as a pump would
            fp.put(sid, F_OPEN, 65536, b"svc", flags=FL_EARLY)
            fp.put(sid, F_DATA, 0, b"q", flags=flags)
            fp.publish()
            _accept_request(fp, sid)
            _collect(fp, lambda fs, sid=sid: (sid, F_ACCEPT) in [(f[0], f[1]) for f in fs])
            time.sleep(0.1)
            if flags & FL_WANT:
                assert fp.signals() > 0, "the opener asked for its ACCEPT: it must be signalled"
            else:
                assert fp.signals() == 0, "an ACCEPT nobody waits for must not wake the opener"
    finally:
        fp.close()


def test_a_want_after_a_lazy_accept_signals_the_opener():
    fp = _acceptor()
    try:
        rx_cons_wants = fp.rx_idx + 68
        fp.put(1, F_OPEN, 65536, b"svc", flags=FL_EARLY)
        fp.publish()
        svc = _accept_request(fp, 1)
        _collect(fp, lambda fs: F_ACCEPT in _types(fs))
        fp.signals()
        fp.set_u32(rx_cons_wants, 1)
        # The opener had not seen the lazy ACCEPT when it used up its early credit.
        fp.put(1, F_DATA, 0, b"w", flags=FL_WANT)
        fp.publish()
        svc.settimeout(5)
        assert svc.recv(10) == b"w"
        deadline = time.monotonic() + 5
        while not fp.signals():
            assert time.monotonic() < deadline, "the opener waiting for credit was not woken"
            time.sleep(0.01)
    finally:
        fp.close()


# ---- both sides xsockd --------------------------------------------------------------------

def test_bytes_written_before_the_acceptor_decides_all_arrive_in_order():
    p = RingPair(ring_size=16384, window=65536)
    try:
        app, a_end = _pair()
        sid, _ = p.a.open_stream(a_end, "svc")
        msg = bytes(i % 251 for i in range(300_000))  # past the early credit and the window
        app.setblocking(False)
        sent = _send_what_fits(app, msg)
        req = p.wait_event(p.b, EventType.OPEN_REQUEST)
        time.sleep(0.2)  # early bytes pile up at the acceptor meanwhile
        svc, b_end = _pair()
        assert p.b.accept_stream(sid, req.serial, b_end)
        svc.settimeout(10)
        got = bytearray()
        while len(got) < len(msg):
            sent += _send_what_fits(app, msg[sent:])
            got += svc.recv(65536)
        assert bytes(got) == msg
    finally:
        p.close()
