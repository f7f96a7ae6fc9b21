"""The libxenvchan endpoint (vchan_core.c through xsockd/vchan.py) on plain memory.

Layout rules and the server's page field by field, data both ways for every kind of ring
placement, the notify-bit handshake, end of stream, and a hostile peer: garbage indices, live
bytes and orders, and a peer that never consumes.  Each violation must end that vchan only,
with EPROTO, and never touch memory outside the rings (tests/test_ring_sanitizers.py runs
this file again under AddressSanitizer and UBSan).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import struct
import threading
import time

import pytest

from tests.vchanpair import (
    CLI_LIVE,
    CLI_NOTIFY,
    GRANTS,
    INDEX_BASE,
    LEFT_CONS,
    LEFT_ORDER,
    LEFT_PROD,
    PAGE,
    RIGHT_CONS,
    RIGHT_ORDER,
    RIGHT_PROD,
    SRV_LIVE,
    SRV_NOTIFY,
    VchanPair,
    fake_grants,
    pump,
)
from xsockd import vchan
from xsockd.vchan import Live, Role, VchanEndpoint

FUZZ_ITERATIONS = int(os.environ.get("XSOCKD_RING_FUZZ_ITERATIONS", "200"))
WRITE, READ = 1, 2  # VCHAN_NOTIFY_WRITE, VCHAN_NOTIFY_READ

# Every placement: both rings in the page, one in the page and one in pages, both in pages.
ORDERS = [(10, 11), (11, 10), (10, 12), (12, 11), (11, 13), (12, 12), (16, 10), (14, 17)]


@pytest.fixture
def pair():
    p = VchanPair()
    yield p
    p.close()


def _eproto(call, *args):
    with pytest.raises(OSError) as e:
        call(*args)
    assert e.value.errno == errno.EPROTO, e.value
    return e.value


# ---- layout and the server's page ------------------------------------------------------------

def test_layout_places_rings_as_libxenvchan_does():
    assert vchan.layout(10, 11) == vchan.Layout(10, 11, 1024, 2048, 0, 0, 24)
    assert vchan.layout(11, 10) == vchan.Layout(11, 10, 2048, 1024, 0, 0, 24)
    lay = vchan.layout(12, 14)
    assert (lay.left_offset, lay.right_offset, lay.left_pages, lay.right_pages) == (0, 0, 1, 4)
    assert lay.grants_end == 24 + 4 * 5
    lay = vchan.layout(20, 20)  # the largest: 256 + 256 grants still fit the page
    assert lay.grants == 512 and lay.grants_end == 24 + 4 * 512 <= PAGE
    assert vchan.layout(20, 11).grants_end <= 2048  # grants end before the in-page ring


@pytest.mark.parametrize("orders", [(9, 11), (10, 21), (0, 12), (12, 0xFFFF), (10, 10),
                                    (11, 11), (10, 20), (20, 10), (-1, 12), (2**40, 12)])
def test_layout_refuses_what_libxenvchan_forbids(orders):
    """Out of 10..20, two rings in one in-page slot, a grant list running into a ring."""
    with pytest.raises(OSError) as e:
        vchan.layout(*orders)
    assert e.value.errno == errno.EINVAL


def test_server_page_field_by_field():
    page = bytearray(PAGE)
    page[:] = b"\xa5" * PAGE  # server_init must set every byte it depends on
    lay = vchan.server_init(page, 12, 13, [7, 8, 9])
    assert lay.grants == 3
    left_cons, left_prod, right_cons, right_prod = struct.unpack_from("<4I", page, 0)
    assert {left_cons, left_prod, right_cons, right_prod} == {INDEX_BASE}
    assert struct.unpack_from("<2H", page, LEFT_ORDER) == (12, 13)
    assert RIGHT_ORDER == LEFT_ORDER + 2
    assert (page[CLI_LIVE], page[SRV_LIVE]) == (Live.WAITING, Live.CONNECTED)
    assert (page[CLI_NOTIFY], page[SRV_NOTIFY]) == (WRITE, 0)  # the server wants writes
    assert struct.unpack_from("<3I", page, GRANTS) == (7, 8, 9)
    assert page[GRANTS + 12:] == bytes(PAGE - GRANTS - 12)
    with pytest.raises(OSError):
        vchan.server_init(page, 12, 13, [7, 8])  # one grant short


def test_client_probe_reads_orders_and_grants():
    pair = VchanPair(14, 12, attach_client=False)
    try:
        lay, grants = vchan.client_probe(pair.page)
        assert lay == vchan.layout(14, 12)
        assert grants == fake_grants(lay) and len(grants) == 5
    finally:
        pair.close()


@pytest.mark.parametrize("orders", [(9, 11), (21, 12), (10, 10), (11, 11), (10, 20), (0, 0),
                                    (0xFFFF, 0xFFFF)])
def test_client_refuses_a_server_with_bad_orders(orders):
    pair = VchanPair(attach_client=False)
    try:
        struct.pack_into("<2H", pair.page, LEFT_ORDER, *orders)
        _eproto(vchan.client_probe, pair.page)
    finally:
        pair.close()


def test_attach_refuses_memory_that_does_not_match_the_orders(pair):
    lay = pair.layout  # 10/11: both rings in the page, no pages to give
    with pytest.raises(OSError) as e:
        VchanEndpoint(pair.page, Role.CLIENT, lay, bytearray(PAGE), None)
    assert e.value.errno == errno.EINVAL
    big = vchan.layout(12, 11)
    with pytest.raises(OSError) as e:
        VchanEndpoint(pair.page, Role.CLIENT, big, None, None)  # the left ring's pages missing
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        VchanEndpoint(pair.page, Role.CLIENT, big, bytearray(PAGE // 2), None)  # too short
    assert e.value.errno == errno.EINVAL


# ---- data ----------------------------------------------------------------------------------

@pytest.mark.parametrize("orders", ORDERS)
def test_data_both_ways_intact(orders):
    pair = VchanPair(*orders)
    rng = random.Random(hash(orders))
    try:
        assert pair.client is not None
        for src, dst in ((pair.client, pair.server), (pair.server, pair.client)):
            data = rng.randbytes(3 * (1 << max(orders)) + 12345)
            chunks = [rng.choice([1, 7, 100, 1000, 4096, 65536]) for _ in range(50)]
            got = pump(src, dst, data, chunks)
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
            assert dst.read(1 << 20) == b""
        st = pair.server.status()
        assert st["bytes_in"] == pair.client.status()["bytes_out"] > 0
        assert (st["tx_size"], st["rx_size"]) == (1 << orders[1], 1 << orders[0])
    finally:
        pair.close()


def test_data_both_ways_at_once_from_two_threads():
    """Each end in its own thread, both directions concurrently, sleeping on nothing but
    the rings: the barriers must keep every byte."""
    pair = VchanPair(12, 13)
    size = 4 << 20
    data = {Role.CLIENT: os.urandom(size), Role.SERVER: os.urandom(size)}
    got: dict[Role, bytes] = {}
    errors: list[BaseException] = []

    def run(end: VchanEndpoint) -> None:
        try:
            out, sent, inbuf = data[end.role], 0, bytearray()
            deadline = time.monotonic() + 60
            while (sent < size or len(inbuf) < size) and time.monotonic() < deadline:
                if sent < size:
                    sent += end.write(out[sent:sent + 9000])
                inbuf += end.read(1 << 16)
            got[end.role] = bytes(inbuf)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    try:
        assert pair.client is not None
        threads = [threading.Thread(target=run, args=(e,)) for e in (pair.client, pair.server)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert got[Role.SERVER] == data[Role.CLIENT]
        assert got[Role.CLIENT] == data[Role.SERVER]
    finally:
        pair.close()


def test_server_writes_before_any_client_and_a_late_client_reads_them():
    """A libxenvchan server may write before a client comes (cli_live 2); and a client finds
    the indices wherever the server's page has them."""
    pair = VchanPair(11, 12, attach_client=False)
    try:
        assert pair.server.peer_live() == Live.WAITING
        assert pair.server.write(b"early bird") == 10
        client = pair.attach_client()
        assert pair.u8(CLI_LIVE) == Live.CONNECTED
        assert pair.server.peer_live() == Live.CONNECTED
        assert client.read(100) == b"early bird"
    finally:
        pair.close()


def test_a_second_client_is_refused_while_one_is_connected(pair):
    with pytest.raises(OSError) as e:
        pair.attach_client()
    assert e.value.errno == errno.EBUSY


def test_a_client_on_a_reused_page_skips_what_was_for_the_previous_client(pair):
    """A libxenvchan server keeps its page for the next client (vchan-socket-proxy -m
    server does): a new client continues the indices and does not read the old reply."""
    first = pair.client
    assert first is not None
    assert first.write(b"request 1") == 9
    assert pair.server.read(100) == b"request 1"
    assert pair.server.write(b"stale reply") == 11
    assert first.close()
    pair.attach_client()  # what a libxenvchan server then waits for: cli_live 1 again
    second = pair.client
    assert second is not None
    assert pair.u8(CLI_LIVE) == Live.CONNECTED
    assert second.read(100) == b""
    assert pair.server.write(b"reply 2") == 7
    assert second.read(100) == b"reply 2"
    assert second.write(b"request 2") == 9
    assert pair.server.read(100) == b"request 2"


def test_a_client_refuses_a_garbage_client_live_byte():
    pair = VchanPair(attach_client=False)
    try:
        pair.set_u8(CLI_LIVE, 9)
        _eproto(pair.attach_client)
    finally:
        pair.close()


# ---- notifications -------------------------------------------------------------------------

def test_notify_bits_handshake(pair):
    client, server = pair.client, pair.server
    assert client is not None
    assert client.take_notify()  # attaching: the client wakes the server
    assert not client.take_notify()
    assert pair.u8(SRV_NOTIFY) & WRITE  # the client asked to hear of the server's writes
    # The server asked for the client's writes (server_init): the first write owes one
    # notification, and clears the request; the next owes none.
    assert client.write(b"a") == 1 and client.take_notify()
    assert pair.u8(CLI_NOTIFY) & WRITE == 0
    assert client.write(b"b") == 1 and not client.take_notify()
    # The server re-arms for data: data is there already, so arm says so...
    assert server.arm(for_data=True)
    assert server.read(10) == b"ab" and not server.take_notify()  # nobody asked for reads
    # ...and once drained, arm asks; the next client write notifies again.
    assert not server.arm(for_data=True)
    assert client.write(b"c") == 1 and client.take_notify()
    # Waiting for space: a full ring, the writer arms, the reader's read notifies.
    while server.write(b"x" * 4096):
        pass
    server.take_notify()
    assert not server.arm(for_space=True)
    assert pair.u8(CLI_NOTIFY) & READ
    assert client.read(1) == b"x" and client.take_notify()
    assert server.arm(for_space=True)  # space now: no need to sleep


def test_arm_sees_the_peer_gone(pair):
    assert pair.client is not None
    assert not pair.server.arm(for_data=True)
    assert pair.client.close() and not pair.client.close()
    assert pair.server.arm(for_data=True)  # something to do: the end of the stream


# ---- end of stream -------------------------------------------------------------------------

def test_end_of_stream_after_every_byte(pair):
    client, server = pair.client, pair.server
    assert client is not None
    assert client.write(b"last words") == 10
    assert client.close()
    assert pair.u8(CLI_LIVE) == Live.GONE
    assert server.peer_live() == Live.GONE
    assert server.read(4) == b"last"  # what the peer wrote before going is still read
    assert server.read(100) == b" words"
    with pytest.raises(BrokenPipeError):
        server.read(100)
    with pytest.raises(BrokenPipeError):
        server.write(b"nobody will read this")


def test_a_gone_peer_stays_gone(pair):
    """A peer that comes back to life after its live byte said gone is still gone."""
    assert pair.client is not None
    pair.set_u8(CLI_LIVE, Live.GONE)
    assert pair.server.peer_live() == Live.GONE
    pair.set_u8(CLI_LIVE, Live.CONNECTED)
    assert pair.server.peer_live() == Live.GONE
    with pytest.raises(BrokenPipeError):
        pair.server.read(1)


def test_closed_endpoint_refuses_calls(pair):
    assert pair.server.close()
    with pytest.raises(OSError) as e:
        pair.server.write(b"x")
    assert e.value.errno == errno.ESHUTDOWN
    assert pair.client is not None
    assert pair.client.peer_live() == Live.GONE
    with pytest.raises(BrokenPipeError):
        pair.client.read(1)


# ---- a hostile peer ------------------------------------------------------------------------

def test_prod_more_than_a_ring_ahead_breaks_the_reader(pair):
    """The client's left.prod claims more data than the server's ring holds."""
    size = 1 << pair.layout.left_order
    pair.set_u32(LEFT_PROD, pair.u32(LEFT_CONS) + size + 1)
    _eproto(pair.server.read, 10)
    _eproto(pair.server.read, 10)  # broken for good
    _eproto(pair.server.write, b"x")
    st = pair.server.status()
    assert st["broken"] == -errno.EPROTO and st["rx_ready"] == 0 and st["tx_space"] == 0


def test_prod_behind_cons_breaks_the_reader(pair):
    pair.set_u32(LEFT_PROD, pair.u32(LEFT_CONS) - 1)
    _eproto(pair.server.read, 10)


def test_cons_ahead_of_prod_breaks_the_writer(pair):
    """The client's right.cons claims it consumed bytes never produced."""
    pair.set_u32(RIGHT_CONS, pair.u32(RIGHT_PROD) + 16)
    _eproto(pair.server.write, b"data")
    _eproto(lambda: pair.server.arm(for_data=True))


def test_a_full_ring_exactly_is_not_a_violation(pair):
    size = 1 << pair.layout.left_order
    pair.set_u32(LEFT_PROD, pair.u32(LEFT_CONS) + size)
    assert len(pair.server.read(1 << 20)) == size


def test_server_indices_out_of_range_break_the_client_at_attach():
    pair = VchanPair(attach_client=False)
    try:
        pair.set_u32(RIGHT_PROD, pair.u32(RIGHT_CONS) + 5000)  # more than the 2 KiB ring
        _eproto(pair.attach_client)
        assert pair.u8(CLI_LIVE) == Live.WAITING  # never said it was connected
    finally:
        pair.close()


@pytest.mark.parametrize("value", [3, 7, 0xFF])
def test_garbage_client_live_byte_breaks_the_server(pair, value):
    pair.set_u8(CLI_LIVE, value)
    _eproto(pair.server.peer_live)
    _eproto(pair.server.read, 1)


def test_a_server_live_byte_of_waiting_breaks_the_client(pair):
    """2 means "not yet connected" only for a client; a server never writes it."""
    assert pair.client is not None
    pair.set_u8(SRV_LIVE, Live.WAITING)
    _eproto(pair.client.read, 1)


def test_orders_rewritten_after_attach_change_nothing():
    """The orders were read once; a server rewriting them cannot make the client reach past
    its rings (the sanitizer run would see it)."""
    pair = VchanPair(10, 11)
    try:
        assert pair.client is not None
        struct.pack_into("<2H", pair.page, LEFT_ORDER, 20, 20)
        data = os.urandom(50000)
        assert pump(pair.client, pair.server, data, [4096]) == data
        assert pump(pair.server, pair.client, data, [4096]) == data
    finally:
        pair.close()


def test_own_index_scribbled_by_the_peer_is_ignored_and_repaired(pair):
    """Our own prod is private: a peer writing the shared copy misleads only itself, and our
    next publication puts it right."""
    assert pair.client is not None
    assert pair.server.write(b"12345") == 5
    good = pair.u32(RIGHT_PROD)
    pair.set_u32(RIGHT_PROD, good + 1000)
    assert pair.server.write(b"678") == 3
    assert pair.u32(RIGHT_PROD) == (good + 3) & 0xFFFFFFFF
    assert pair.client.read(100) == b"12345678"


def test_a_peer_that_never_consumes_blocks_the_writer_without_growth(pair):
    """The client reads nothing: the server fills its ring exactly, then every write takes
    0 bytes; nothing is buffered beside the ring, and the vchan stays usable."""
    size = 1 << pair.layout.right_order
    total = 0
    for _ in range(3 * size // 1000 + 10):
        total += pair.server.write(b"y" * 1000)
    assert total == size
    for _ in range(100):
        assert pair.server.write(os.urandom(4096)) == 0
    st = pair.server.status()
    assert (st["bytes_out"], st["tx_space"]) == (size, 0)
    assert not pair.server.arm(for_space=True)
    assert pair.client is not None
    assert pair.client.read(1 << 20) == b"y" * size  # nothing lost, nothing extra


def test_a_broken_vchan_leaves_another_untouched():
    a, b = VchanPair(), VchanPair(12, 12)
    try:
        assert a.client is not None and b.client is not None
        a.set_u32(LEFT_PROD, 0xDEADBEEF)
        _eproto(a.server.read, 1)
        data = os.urandom(100000)
        assert pump(b.client, b.server, data, [5000]) == data
        assert pump(b.server, b.client, data, [5000]) == data
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("orders", [(10, 11), (12, 11), (13, 14)])
def test_fuzz_random_garbage_in_the_shared_page(orders):
    """Random values in every field a peer writes, between random calls: each call moves
    bytes, finds nothing, or ends the vchan with EPROTO or EOF; nothing else."""
    rng = random.Random(1234 + orders[0])
    fields = [(LEFT_CONS, 4), (LEFT_PROD, 4), (RIGHT_CONS, 4), (RIGHT_PROD, 4),
              (LEFT_ORDER, 2), (RIGHT_ORDER, 2), (CLI_LIVE, 1), (SRV_LIVE, 1),
              (CLI_NOTIFY, 1), (SRV_NOTIFY, 1), (GRANTS, 4)]
    ends = 0
    for _ in range(FUZZ_ITERATIONS // 10 + 1):
        pair = VchanPair(*orders)
        try:
            assert pair.client is not None
            for _ in range(10):
                off, width = rng.choice(fields)
                near = pair.u32(off & ~3) + rng.randint(-4096, 4096) if width == 4 else 0
                value = rng.choice([near, rng.getrandbits(32), 0, 0xFFFFFFFF])
                pair.page[off:off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(
                    width, "little")
                end = rng.choice([pair.server, pair.client])
                try:
                    if rng.random() < 0.5:
                        end.write(rng.randbytes(rng.randint(1, 5000)))
                    else:
                        end.read(rng.randint(1, 5000))
                    end.arm(for_data=True, for_space=True)
                except BrokenPipeError:
                    ends += 1
                except OSError as e:
                    assert e.errno == errno.EPROTO, e
                    ends += 1
        finally:
            pair.close()
    assert ends > 0  # the garbage did reach the checks
