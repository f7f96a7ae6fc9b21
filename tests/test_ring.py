"""The C ring core through its Python face: two pumps on one piece of shared memory."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ringpair import RingPair

from xsockd.ring import FRAME_HEADER, EventType, Reason, link_pages
from xsockd.ring import Role as _Role

RING0_PROD = 64
RING0_CONS = 128


def pump_bytes(src: socket.socket, dst: socket.socket, data: bytes, chunks: list[int],
               reads: list[int], close: bool = True) -> bytes:
    """Writes data to src in the given chunk sizes while reading dst in the read sizes."""
    def writer() -> None:
        pos, i = 0, 0
        while pos < len(data):
            n = chunks[i % len(chunks)]
            src.sendall(data[pos:pos + n])
            pos += n
            i += 1
        if close:
            src.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=writer)
    t.start()
    out = bytearray()
    i = 0
    dst.settimeout(20)
    while len(out) < len(data) or close:
        got = dst.recv(reads[i % len(reads)])
        i += 1
        if not got:
            break
        out += got
    t.join()
    return bytes(out)


@pytest.fixture
def pair():
    p = RingPair(ring_size=4096, window=8192)
    yield p
    p.close()


def test_link_pages_counts_control_page_and_both_rings():
    assert link_pages(4096) == 3
    assert link_pages(256 * 1024) == 1 + 2 * 64
    with pytest.raises(OSError) as e:
        link_pages(5000)
    assert e.value.errno == errno.EINVAL


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(0, 100_000),
       chunks=st.lists(st.integers(1, 20_000), min_size=1, max_size=8),
       reads=st.lists(st.integers(1, 20_000), min_size=1, max_size=8),
       ring_size=st.sampled_from([4096, 8192, 65536]),
       window=st.sampled_from([4096, 16384, 262144]))
def test_any_chunking_arrives_intact_both_ways(size, chunks, reads, ring_size, window):
    """Arbitrary write and read sizes, wraparound at every offset, full and empty rings."""
    p = RingPair(ring_size=ring_size, window=window)
    try:
        app, svc, _ = p.open()
        data = os.urandom(size)
        assert pump_bytes(app, svc, data, chunks, reads) == data
        assert pump_bytes(svc, app, data[::-1], reads, chunks) == data[::-1]
        app.close()
        svc.close()
        closed = p.wait_event(p.a, EventType.CLOSED)
        assert closed.arg == Reason.DONE
        assert (closed.bytes_out, closed.bytes_in) == (size, size)
    finally:
        p.close()


def test_exact_ring_multiples_and_single_bytes(pair):
    app, svc, _ = pair.open()
    for n in (1, 4096 - FRAME_HEADER, 4096, 3 * 4096, 1):
        data = os.urandom(n)
        assert pump_bytes(app, svc, data, [n], [n], close=False) == data
    app.close()
    svc.close()


def test_half_close_keeps_the_other_direction_flowing(pair):
    app, svc, _ = pair.open()
    app.sendall(b"request")
    app.shutdown(socket.SHUT_WR)
    svc.settimeout(5)
    assert svc.recv(100) == b"request"
    assert svc.recv(100) == b""  # EOF reached the service
    reply = os.urandom(200_000)
    assert pump_bytes(svc, app, reply, [7000], [5000]) == reply
    app.close()
    svc.close()
    assert pair.wait_event(pair.b, EventType.CLOSED).arg == Reason.DONE


def test_backpressure_stops_the_writer_without_unbounded_buffering(pair):
    app, svc, _ = pair.open()
    app.settimeout(1.0)
    sent = 0
    with pytest.raises(TimeoutError):
        while True:
            sent += app.send(b"x" * 65536)
    # What the writer got rid of is bounded by socket buffers, ring and window, not unbounded.
    bufs = 4 * 1024 * 1024
    assert sent < bufs
    app.settimeout(None)
    svc.settimeout(5)
    got = 0
    while got < sent:
        got += len(svc.recv(1 << 20))
    assert got == sent
    app.close()
    svc.close()


def test_a_stalled_reader_does_not_stall_other_streams():
    """Regression: a stalled stream whose frames filled the ring (all but the control reserve)
    was held there waiting for its reader, and no other stream had room to send.  A receiver
    now holds a blocked stream's frames in the ring only while they fill at most half of it."""
    p = RingPair(ring_size=65536, window=65536)
    try:
        slow_app, slow_svc, _ = p.open()
        fast_app, fast_svc, _ = p.open()
        slow_app.setblocking(False)
        stalled = 0
        try:
            while True:
                stalled += slow_app.send(b"s" * 65536)
        except BlockingIOError:
            pass
        data = os.urandom(32 << 20)
        start = time.monotonic()
        assert pump_bytes(fast_app, fast_svc, data, [65536], [65536]) == data
        assert time.monotonic() - start < 30
        slow_svc.settimeout(5)
        got = 0
        while got < stalled:
            got += len(slow_svc.recv(1 << 20))
        assert got == stalled
        for s in (slow_app, slow_svc, fast_app, fast_svc):
            s.close()
    finally:
        p.close()


def test_reject_reaches_the_opener_as_eof_and_refused():
    p = RingPair()
    try:
        app, a_end = socket.socketpair()
        sid = p.a.open_stream(a_end, "nosuch")
        req = p.wait_event(p.b, EventType.OPEN_REQUEST)
        assert req.name == "nosuch"
        p.b.reject_stream(sid, Reason.REFUSED)
        closed = p.wait_event(p.a, EventType.CLOSED)
        assert (closed.stream, closed.arg) == (sid, Reason.REFUSED)
        app.settimeout(5)
        assert app.recv(10) == b""
        app.close()
    finally:
        p.close()


def test_stream_limit_refuses_the_extra_stream():
    p = RingPair(max_streams=2)
    try:
        keep = [p.open() for _ in range(2)]
        app, a_end = socket.socketpair()
        p.a.open_stream(a_end, "svc")
        assert p.wait_event(p.a, EventType.CLOSED).arg == Reason.TOO_MANY
        app.close()
        for x, y, _ in keep:
            x.close()
            y.close()
    finally:
        p.close()


def test_close_stream_aborts_both_sides(pair):
    app, svc, sid = pair.open()
    pair.a.close_stream(sid)
    assert pair.wait_event(pair.a, EventType.CLOSED).arg == Reason.CLOSED
    assert pair.wait_event(pair.b, EventType.CLOSED).arg == Reason.CLOSED
    svc.settimeout(5)
    app.settimeout(5)
    assert svc.recv(10) == b""
    assert app.recv(10) == b""
    app.close()
    svc.close()


def test_peer_death_is_seen_through_its_live_byte(pair):
    app, svc, _ = pair.open()
    pair.wait_event(pair.a, EventType.PEER_UP)
    pair.control[_Role.ACCEPTOR] = 0  # what B's unmap notification does when B dies
    os.eventfd_write(pair._efds[0], 1)
    down = pair.wait_event(pair.a, EventType.LINK_DOWN)
    assert down.arg == -errno.ECONNRESET
    app.settimeout(5)
    assert app.recv(10) == b""
    app.close()
    svc.close()


# ---- hostile peer: each case is a named regression of a check in ring_core.c ----

def _corrupt_and_expect_eproto(pair: RingPair, poke) -> None:
    app, svc, _ = pair.open()
    app.sendall(b"hello")
    svc.settimeout(5)
    assert svc.recv(10) == b"hello"
    poke(pair)
    os.eventfd_write(pair._efds[1], 1)  # wake B, the victim reading ring 0
    try:
        down = pair.wait_event(pair.b, EventType.LINK_DOWN)
        assert down.arg == -errno.EPROTO
        # The victim's application sees EOF (after any bytes that were within its window).
        got = 0
        while chunk := svc.recv(65536):
            got += len(chunk)
            assert got < 65536
    finally:
        app.close()
        svc.close()


def test_hostile_prod_beyond_ring_size_kills_only_the_link(pair):
    def poke(p):
        prod = struct.unpack_from("<I", p.control, RING0_PROD)[0]
        struct.pack_into("<I", p.control, RING0_PROD, prod + 4096 + 16)
    _corrupt_and_expect_eproto(pair, poke)


def test_hostile_unaligned_prod(pair):
    def poke(p):
        prod = struct.unpack_from("<I", p.control, RING0_PROD)[0]
        struct.pack_into("<I", p.control, RING0_PROD, prod + 3)
    _corrupt_and_expect_eproto(pair, poke)


def test_hostile_frame_length_beyond_published_data(pair):
    def poke(p):
        prod = struct.unpack_from("<I", p.control, RING0_PROD)[0]
        off = prod & (p.ring_size - 1)
        struct.pack_into("<IHHII", p.rings, off, 1, 3, 0, 100_000, 0)
        struct.pack_into("<I", p.control, RING0_PROD, prod + 32)
    _corrupt_and_expect_eproto(pair, poke)


def test_hostile_unknown_frame_type(pair):
    def poke(p):
        prod = struct.unpack_from("<I", p.control, RING0_PROD)[0]
        struct.pack_into("<IHHII", p.rings, prod & 4095, 1, 99, 0, 0, 0)
        struct.pack_into("<I", p.control, RING0_PROD, prod + 16)
    _corrupt_and_expect_eproto(pair, poke)


def test_hostile_data_beyond_granted_window():
    p = RingPair(ring_size=65536, window=4096)

    def poke(p):
        prod = struct.unpack_from("<I", p.control, RING0_PROD)[0]
        for _ in range(2):  # 2 x 3000 bytes > the 4 KiB window, published at once
            struct.pack_into("<IHHII", p.rings, prod & 65535, 1, 3, 0, 3000, 0)
            prod += 16 + 3008
        struct.pack_into("<I", p.control, RING0_PROD, prod)
    try:
        _corrupt_and_expect_eproto(p, poke)
    finally:
        p.close()


def test_hostile_open_with_bad_service_name(pair):
    def poke(p):
        prod = struct.unpack_from("<I", p.control, RING0_PROD)[0]
        struct.pack_into("<IHHII", p.rings, prod & 4095, 7, 1, 0, 4, 4096)
        p.rings[(prod & 4095) + 16:(prod & 4095) + 20] = b"a/..".ljust(4)
        struct.pack_into("<I", p.control, RING0_PROD, prod + 32)
    _corrupt_and_expect_eproto(pair, poke)


def test_garbage_in_indices_while_data_flows_never_crashes():
    p = RingPair(ring_size=8192, window=16384)
    try:
        app, svc, _ = p.open()
        stop = threading.Event()

        def flood() -> None:
            try:
                while not stop.is_set():
                    app.send(os.urandom(4096))
            except OSError:
                pass

        t = threading.Thread(target=flood)
        t.start()
        rnd = os.urandom(4096)
        for i in range(0, 4000, 4):
            p.control[RING0_PROD:RING0_PROD + 4] = rnd[i:i + 4]
            p.control[RING0_CONS:RING0_CONS + 4] = rnd[i + 4:i + 8]
        os.eventfd_write(p._efds[0], 1)
        os.eventfd_write(p._efds[1], 1)
        downs = [p.wait_event(x, EventType.LINK_DOWN) for x in (p.a, p.b)]
        # The first side to read garbage stops with EPROTO; the other then sees it leave.
        assert -errno.EPROTO in {d.arg for d in downs}
        assert {d.arg for d in downs} <= {-errno.EPROTO, -errno.ECONNRESET}
        stop.set()
        app.close()
        t.join()
        svc.close()
    finally:
        p.close()


def test_many_streams_share_one_link():
    p = RingPair(ring_size=65536, window=16384, max_streams=256)
    try:
        streams = [p.open() for _ in range(200)]
        payloads = [os.urandom(3000 + i) for i in range(200)]
        for (app, _, _), data in zip(streams, payloads, strict=True):
            app.sendall(data)
            app.shutdown(socket.SHUT_WR)
        for (_, svc, _), data in zip(streams, payloads, strict=True):
            svc.settimeout(10)
            got = bytearray()
            while chunk := svc.recv(65536):
                got += chunk
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        for app, svc, _ in streams:
            app.close()
            svc.close()
    finally:
        p.close()
