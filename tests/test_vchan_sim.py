"""An xsockd vchan client against an xsockd vchan server between two sim domains.

Domain 2 serves its echo service as a vchan for domain 1 only ([vchan.echo1], role server);
domain 1's xsockd is the vchan client ([vchan.echo2]): <rundir1>/2/echo2.sock.  Everything
is real processes, shared memory and the sim's xenstored (docs/VCHAN.md).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import threading
import time

import pydbus
import pytest

from tests.privatebus import PrivateBus
from tests.simworld import SimWorld
from tests.vchanpair import CLI_LIVE, LEFT_CONS, LEFT_PROD, RIGHT_CONS, RIGHT_PROD, SRV_LIVE
from xsockd.backend import XenStorePerm
from xsockd.backend_sim import SimBackend
from xsockd.constants import DBUS_NAME, DBUS_PATH
from xsockd.vchan_client import _Opened, read_published
from xsockd.vchan_server import _Published

SERVER_PATH = "/local/domain/2/data/vchan/1/echo1"
SERVER = """
[vchan.echo1]
role = "server"
domain = 1
service = "echo"
path = "data/vchan/1/echo1"
ring_size = ["64KiB", "16KiB"]
linger = 2
"""
CLIENT = f"""
[vchan.echo2]
role = "client"
domain = 2
path = "{SERVER_PATH}"
"""


@pytest.fixture
def world(tmp_path):
    w = SimWorld(tmp_path, extra={1: CLIENT, 2: SERVER})
    yield w
    w.close()


def published(world: SimWorld) -> bool:
    return sorted(world.xs_tree(SERVER_PATH)) == sorted(
        [SERVER_PATH, f"{SERVER_PATH}/event-channel", f"{SERVER_PATH}/ring-ref"])


def vchan_connect(world: SimWorld) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(world.rundir(1) / "2" / "echo2.sock"))
    s.settimeout(30)
    return s


def echo_hashes(sock: socket.socket, total: int) -> tuple[str, str]:
    """Sends ``total`` random bytes and reads as many back (vchan has no half-close, so the
    writer does not shut down its side: the echo's reply would be cut off)."""
    data = os.urandom(total)
    t = threading.Thread(target=sock.sendall, args=(data,))
    t.start()
    got = hashlib.sha256()
    n = 0
    buf = bytearray(1 << 20)
    while n < total:
        k = sock.recv_into(buf)
        assert k, f"EOF after {n} of {total} bytes"
        got.update(memoryview(buf)[:k])
        n += k
    t.join()
    return hashlib.sha256(data).hexdigest(), got.hexdigest()


def test_vchan_client_against_vchan_server(world):
    world.start(1, 2)
    world.wait_for("domain 2's vchan published", lambda: published(world))
    # Only domain 2 (owner) and domain 1 (read) are named on the published nodes.
    with world.host.xenstore(0) as xs:
        for node in (SERVER_PATH, f"{SERVER_PATH}/ring-ref", f"{SERVER_PATH}/event-channel"):
            assert [str(p) for p in xs.get_perms(node)] == ["n2", "r1"]
    for _ in range(3):  # a fresh vchan after each stream
        s = vchan_connect(world)
        sent, got = echo_hashes(s, 8 << 20)
        assert sent == got
        s.close()
        world.wait_for("the server to republish", lambda: published(world))
    logs = world.logs()
    assert logs.count("vchan echo1: domain 1 connected") == 3
    assert logs.count("vchan echo2: connected to domain 2") == 3
    # Between streams each side holds exactly one published vchan: domain 2 grants the
    # shared page and 2 ring pages... and a port; domain 1 maps nothing.
    world.wait_for("domain 1 to release its vchan", lambda: not any(
        world.accounting(1).get(k) for k in ("mapped", "ports")))
    acct = world.accounting(2)
    assert acct.get("granted") == 1 + 16 + 4 and acct.get("ports") == 1, acct
    world.daemons[1].stop()
    world.daemons[2].stop()
    assert world.xs_tree("/local/domain/2/data/vchan") == []  # the directories it made too
    assert world.host.leftovers() == {}


def test_peer_daemon_killed_is_eof_within_a_second(world):
    world.start(1, 2)
    world.wait_for("domain 2's vchan published", lambda: published(world))
    s = vchan_connect(world)
    sent, got = echo_hashes(s, 1 << 20)
    assert sent == got
    world.kill9(2)
    t0 = time.monotonic()
    s.settimeout(5)
    try:
        assert s.recv(100) == b""
    except ConnectionResetError:
        pass
    assert time.monotonic() - t0 < 1.0
    s.close()
    # Domain 1 released its port and mappings; the dead daemon's were released by the host.
    world.wait_for("everything released", lambda: not any(
        v for acct in world.host.accounting().values()
        for k, v in acct.items() if k != "connections"))


def test_endpoint_of_an_unconfigured_domain_is_ignored_and_logged(world):
    # Domain 2 publishes nothing; something else (dom0, privileged, on behalf of domain 3)
    # puts nodes owned by domain 3 at the configured path.
    world.start(1, echo=False)
    with world.host.xenstore(0) as xs:
        xs.write(f"{SERVER_PATH}/ring-ref", "8")
        xs.write(f"{SERVER_PATH}/event-channel", "3")

        for node in (SERVER_PATH, f"{SERVER_PATH}/ring-ref", f"{SERVER_PATH}/event-channel"):
            xs.set_perms(node, [XenStorePerm(3, "n"), XenStorePerm(1, "r")])
    s = vchan_connect(world)
    s.settimeout(5)
    assert s.recv(100) == b""
    s.close()
    world.wait_for("the refusal logged", lambda: "owned by domain 3, not the configured "
                   "server, domain 2: ignored" in world.logs())
    assert not any(world.accounting(1).get(k) for k in ("mapped", "ports"))


class HostileClient:
    """Domain 1 without xsockd: a test process mapping domain 2's published vchan itself."""

    def __init__(self, world: SimWorld) -> None:
        self.backend = SimBackend(1, world.sim_dir)
        self.xs = self.backend.open_xenstore()
        self.pub = read_published(self.xs, SERVER_PATH, 2)

    def close(self) -> None:
        self.xs.close()
        self.backend.close()


@pytest.fixture
def server_only(world):
    world.start(2)
    world.wait_for("domain 2's vchan published", lambda: published(world))
    hostile = HostileClient(world)
    yield world, hostile
    hostile.close()


def test_a_client_breaking_the_ring_ends_that_vchan_only(server_only):
    world, hostile = server_only
    v = _Opened(hostile.backend, 2, hostile.pub)  # attaches as libxenvchan does, notifies
    try:
        world.wait_for("the nodes removed once a client attached",
                       lambda: world.xs_tree(SERVER_PATH) == [])
        assert v.shared is not None and v.evtchn is not None
        page = v.shared.buffer
        cons = struct.unpack_from("<I", page, LEFT_CONS)[0]
        struct.pack_into("<I", page, LEFT_PROD, (cons + (1 << 20)) & 0xFFFFFFFF)  # > the ring
        v.evtchn.notify()
        world.wait_for("the server to end that vchan and publish a fresh one",
                       lambda: "ended (proto" in world.logs() and published(world))
    finally:
        v.close()
    # A fresh page: the next client of the fresh vchan is served as usual.
    assert read_published(hostile.xs, SERVER_PATH, 2).ring_ref != hostile.pub.ring_ref


def test_a_live_byte_out_of_range_ends_that_vchan_only(server_only):
    world, hostile = server_only
    evtchn = hostile.backend.bind_interdomain(2, hostile.pub.port)
    page = hostile.backend.map(2, [hostile.pub.ring_ref])
    try:
        page.buffer[CLI_LIVE] = 7
        evtchn.notify()
        world.wait_for("the violation logged and a fresh vchan published", lambda: (
            "the client broke the protocol" in world.logs() and published(world)
            and read_published(hostile.xs, SERVER_PATH, 2) != hostile.pub))
    finally:
        page.close()
        evtchn.close()
    # The old vchan's grants and port are gone: one page of each ring and the shared page
    # remain granted, for the fresh vchan only.
    assert world.accounting(2).get("granted") == 1 + 16 + 4
    assert world.accounting(2).get("ports") == 1


def test_stopping_a_daemon_mid_stream_releases_everything(world):
    world.start(1, 2)
    world.wait_for("domain 2's vchan published", lambda: published(world))
    s = vchan_connect(world)
    sent, got = echo_hashes(s, 1 << 20)
    assert sent == got
    world.daemons[1].stop()
    s.settimeout(5)
    try:
        assert s.recv(100) == b""
    except ConnectionResetError:
        pass
    s.close()
    world.wait_for("domain 2 to republish", lambda: published(world))
    world.daemons[2].stop()
    assert world.host.leftovers() == {}
    assert world.xs_tree(SERVER_PATH) == []


def test_the_client_domain_destroyed_ends_the_servers_stream(tmp_path):
    # Only dom0 may ask whether a domain exists: the server is dom0's here.  Domain 1 is
    # destroyed with its xsockd still running, so no unmap notification reaches dom0.
    path = "/local/domain/0/data/vchan/1/echo1"
    w = SimWorld(tmp_path, peers={0: [1], 1: [0]}, echo_on=(0,), extra={
        0: SERVER, 1: CLIENT.replace("domain = 2", "domain = 0").replace(SERVER_PATH, path)})
    try:
        w.start(0, 1)
        w.wait_for("dom0's vchan published", lambda: len(w.xs_tree(path)) == 3)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(w.rundir(1) / "0" / "echo2.sock"))
        s.settimeout(30)
        sent, got = echo_hashes(s, 1 << 20)
        assert sent == got
        w.host.destroy_domain(1)
        w.wait_for("dom0 to notice through @releaseDomain",
                   lambda: "vchan echo1: domain 1: domain 1 was destroyed" in w.logs())
        s.close()
    finally:
        w.close()


def publish_as(world: SimWorld, owner: int, ring_ref: str, port: str) -> None:
    """Writes the two nodes at the configured path as dom0 would for ``owner``."""
    with world.host.xenstore(0) as xs:
        xs.write(f"{SERVER_PATH}/ring-ref", ring_ref)
        xs.write(f"{SERVER_PATH}/event-channel", port)
        for node in (SERVER_PATH, f"{SERVER_PATH}/ring-ref", f"{SERVER_PATH}/event-channel"):
            xs.set_perms(node, [XenStorePerm(owner, "n"), XenStorePerm(1, "r")])


@pytest.mark.parametrize("ref, port", [("012", "3"), ("8", "0"), ("x", "3"), ("8", "4294967296"),
                                       ("8", " 3")])
def test_a_server_publishing_garbage_is_refused(world, ref, port):
    world.start(1, echo=False)
    publish_as(world, 2, ref, port)
    s = vchan_connect(world)
    s.settimeout(5)
    assert s.recv(100) == b""
    s.close()
    world.wait_for("the refusal logged", lambda: "are not both decimal" in world.logs())
    assert not any(world.accounting(1).get(k) for k in ("mapped", "ports"))


def test_a_server_page_with_forbidden_orders_is_refused_before_mapping_rings(world):
    world.start(1, echo=False)
    with SimBackend(2, world.sim_dir) as b2:
        evtchn = b2.alloc_unbound(1)
        page = b2.grant(1, 1)
        struct.pack_into("<HH", page.buffer, 16, 9, 25)  # left_order, right_order
        page.buffer[CLI_LIVE] = 2
        page.buffer[CLI_LIVE + 1] = 1
        try:
            publish_as(world, 2, str(page.refs[0]), str(evtchn.port))
            s = vchan_connect(world)
            s.settimeout(5)
            assert s.recv(100) == b""
            s.close()
            world.wait_for("the refusal logged", lambda: "opening domain 2's vchan" in
                           world.logs() and "Protocol error" in world.logs())
            world.wait_for("domain 1 to release the page and port", lambda: not any(
                world.accounting(1).get(k) for k in ("mapped", "ports")))
        finally:
            page.close()
            evtchn.close()


def test_the_service_caller_header_names_the_vchan_client(tmp_path):
    hdr = tmp_path / "hdr.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(hdr))
    listener.listen()
    lines: list[bytes] = []

    def serve() -> None:  # sends back the line xsockd wrote first, then closes
        conn, _ = listener.accept()
        with conn:
            line = b""
            while not line.endswith(b"\n") and (b := conn.recv(1)):
                line += b
            lines.append(line)
            conn.sendall(line)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    extra = (f'\n[services.hdr]\nsocket = "{hdr}"\ncaller_header = true\n'
             + SERVER.replace('service = "echo"', 'service = "hdr"'))
    w = SimWorld(tmp_path, extra={1: CLIENT, 2: extra})
    try:
        w.start(1, 2, echo=False)
        w.wait_for("domain 2's vchan published", lambda: published(w))
        s = vchan_connect(w)
        s.settimeout(10)
        got = b""
        while chunk := s.recv(100):
            got += chunk
        s.close()
        t.join(10)
        assert lines == [b"XSOCK/1 domid=1 service=echo1\n"]
        assert got == lines[0]  # and the service's EOF reached the client after its bytes
    finally:
        w.close()
        listener.close()


def test_a_client_that_never_consumes_costs_only_its_rings(server_only):
    world, hostile = server_only
    v = _Opened(hostile.backend, 2, hostile.pub)
    try:
        assert v.endpoint is not None and v.evtchn is not None
        world.wait_for("the client spliced in", lambda: world.xs_tree(SERVER_PATH) == [])
        # The echo's replies fill the right ring (16 KiB) and stop there: the server stops
        # taking from the service, which stops taking from the left ring once the sockets'
        # kernel buffers between are full: nothing is buffered in xsockd.
        sent, idle = 0, 0.0
        while idle < 1.0 and sent < 64 << 20:
            n = v.endpoint.write(os.urandom(16 << 10))
            sent += n
            if v.endpoint.take_notify():
                v.evtchn.notify()
            if not n:
                time.sleep(0.05)
                idle += 0.05
            else:
                idle = 0.0
        st = v.endpoint.status()
        assert st["rx_ready"] == 16 << 10 and st["tx_space"] == 0, st
        assert sent < 64 << 20, "the left ring never stayed full"
        assert world.accounting(2).get("granted") == 1 + 16 + 4  # nothing more was granted
    finally:
        v.close()
    # The service waits to write its echo, so it takes none of the left ring: the server
    # stops waiting linger (2 s) after the client left, drops the rest, and republishes.
    t0 = time.monotonic()
    world.wait_for("the server to end that vchan and publish a fresh one",
                   lambda: "ended (undelivered" in world.logs() and published(world))
    assert time.monotonic() - t0 < 4


def fill_backlog(listener: socket.socket, path: str) -> list[socket.socket]:
    """Returns connections queued on ``listener`` (never accepted) until its backlog is full."""
    queued = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            return queued
        queued.append(s)
        assert len(queued) < 1000, "the backlog never filled"


def test_a_slow_service_does_not_block_the_daemon(tmp_path):
    # The service's backlog is full: xsockd retries its connect on the loop, and meanwhile
    # domain 2's control plane answers at once.  Once the service accepts, the client is served.
    path = str(tmp_path / "slow.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued = fill_backlog(listener, path)
    bus = PrivateBus()
    extra = (f'\n[services.slow]\nsocket = "{path}"\n'
             + SERVER.replace('service = "echo"', 'service = "slow"'))
    w = SimWorld(tmp_path, extra={1: CLIENT, 2: extra}, dbus={2: bus.address})
    try:
        w.start(1, 2, echo=False)
        w.wait_for("domain 2's vchan published", lambda: published(w))
        with pydbus.connect(bus.address) as b:
            proxy = b.get(DBUS_NAME, DBUS_PATH)
            s = vchan_connect(w)
            w.wait_for("the server connecting to its service",
                       lambda: proxy.ListVchans()[0]["state"] == "connecting")
            t0 = time.monotonic()
            slowest = 0.0
            while time.monotonic() - t0 < 1.5:  # the old blocking connect held the loop 2 s
                t = time.monotonic()
                assert proxy.ListVchans()[0]["state"] == "connecting"
                slowest = max(slowest, time.monotonic() - t)
                time.sleep(0.05)
            assert slowest < 1.0, f"a D-Bus call took {slowest:.2f} s while connecting"
            for q in queued:
                q.close()
            for _ in queued:  # the closed ones still take their places until accepted
                listener.accept()[0].close()
            listener.settimeout(10)
            conn, _ = listener.accept()
            with conn:
                s.sendall(b"ping")
                assert conn.recv(100) == b"ping"
                conn.sendall(b"pong")
                assert s.recv(100) == b"pong"
                assert proxy.ListVchans()[0]["state"] == "serving"
            s.close()
    finally:
        w.close()
        bus.close()
        listener.close()
    assert "Traceback" not in w.logs()


def test_a_missing_service_ends_that_vchan_and_republishes(tmp_path):
    extra = (f'\n[services.gone]\nsocket = "{tmp_path / "nothing.sock"}"\n'
             + SERVER.replace('service = "echo"', 'service = "gone"'))
    w = SimWorld(tmp_path, extra={1: CLIENT, 2: extra})
    try:
        w.start(1, 2, echo=False)
        w.wait_for("domain 2's vchan published", lambda: published(w))
        with w.host.xenstore(0) as xs:
            ref = xs.read(f"{SERVER_PATH}/ring-ref")
        s = vchan_connect(w)
        s.settimeout(10)
        t0 = time.monotonic()
        assert s.recv(100) == b""  # after the service's patience (2 s), EOF
        assert time.monotonic() - t0 >= 1.5
        s.close()
        w.wait_for("the failure logged and a fresh vchan published", lambda: (
            "vchan echo1: domain 1: the service 'gone'" in w.logs() and published(w)))
        with w.host.xenstore(0) as xs:
            assert xs.read(f"{SERVER_PATH}/ring-ref") != ref
    finally:
        w.close()


def test_stopping_waits_for_the_bytes_the_client_has_not_read(tmp_path):
    # A libxenvchan peer drops what is left in the ring once it sees us gone: a stopping
    # daemon keeps the vchan until the client consumed what the service wrote (stop_timeout).
    w = SimWorld(tmp_path, extra={1: CLIENT, 2: SERVER})
    conf = w.daemons[2].config
    conf.write_text(conf.read_text().replace("[daemon]\n", "[daemon]\nstop_timeout = 20\n", 1))
    try:
        w.start(2)
        w.wait_for("domain 2's vchan published", lambda: published(w))
        hostile = HostileClient(w)
        v = _Opened(hostile.backend, 2, hostile.pub)
        try:
            assert v.endpoint is not None and v.evtchn is not None and v.shared is not None
            data = os.urandom(48 << 10)  # fits the left ring (64 KiB); the echo fills the
            assert v.endpoint.write(data) == len(data)  # right one (16 KiB) and waits
            v.evtchn.notify()
            w.wait_for("the echo to fill the right ring",
                       lambda: v.endpoint.status()["rx_ready"] == 16 << 10)
            w.daemons[2].signal(signal.SIGTERM)
            w.wait_for("the drain to begin", lambda: "may drain" in w.daemons[2].log())
            time.sleep(1.5)
            proc = w.daemons[2].proc
            assert proc is not None and proc.poll() is None, "domain 2 stopped with bytes unread"
            assert v.shared.buffer[SRV_LIVE] == 1
            # Nothing more is published meanwhile: the nodes stay removed.
            assert w.xs_tree(SERVER_PATH) == []
            got = b""
            deadline = time.monotonic() + 10
            while len(got) < len(data) and time.monotonic() < deadline:
                chunk = v.endpoint.read(1 << 16)
                if v.endpoint.take_notify():
                    v.evtchn.notify()
                got += chunk
                if not chunk:
                    time.sleep(0.01)
            assert got == data
            assert proc.wait(10) == 0  # drained: it stops at once, not at stop_timeout
            assert v.shared.buffer[SRV_LIVE] == 0
        finally:
            v.close()
            hostile.close()
        assert "drained: closing 1 idle stream" in w.daemons[2].log()
    finally:
        w.close()


# ---- xsockd's vchan client against a hostile server (a test process acting as domain 2) ------

class HostileServer:
    """Domain 2 without xsockd: publishes a vchan for domain 1 itself (orders 16 and 14)."""

    def __init__(self, world: SimWorld) -> None:
        self.backend = SimBackend(2, world.sim_dir)
        self.v = _Published(self.backend, 1, 16, 14)
        assert self.v.evtchn is not None and self.v.shared is not None
        self.page = self.v.shared.buffer
        publish_as(world, 2, str(self.v.ring_ref), str(self.v.evtchn.port))

    def close(self) -> None:
        self.v.close()
        self.backend.close()


@pytest.fixture
def hostile_server(world):
    world.start(1, echo=False)
    server = HostileServer(world)
    yield world, server
    server.close()


def test_a_server_breaking_the_ring_ends_the_clients_vchan_only(hostile_server):
    world, server = hostile_server
    s = vchan_connect(world)
    world.wait_for("domain 1 attached", lambda: server.page[CLI_LIVE] == 1)
    assert server.v.endpoint is not None and server.v.evtchn is not None
    assert server.v.endpoint.write(b"hello") == 5
    server.v.evtchn.notify()
    assert s.recv(100) == b"hello"
    cons = struct.unpack_from("<I", server.page, RIGHT_CONS)[0]
    struct.pack_into("<I", server.page, RIGHT_PROD, (cons + (1 << 20)) & 0xFFFFFFFF)
    server.v.evtchn.notify()
    s.settimeout(5)
    try:
        assert s.recv(100) == b""
    except ConnectionResetError:
        pass
    s.close()
    world.wait_for("domain 1 to end that vchan and release it", lambda: (
        "ended (proto" in world.logs() and not any(
            world.accounting(1).get(k) for k in ("mapped", "ports"))))
    # Domain 1 left (its live byte 0); its daemon takes the next connection as usual.
    assert server.page[CLI_LIVE] == 0
    fresh = HostileServer(world)
    try:
        s = vchan_connect(world)
        world.wait_for("domain 1 attached again", lambda: fresh.page[CLI_LIVE] == 1)
        s.close()
    finally:
        fresh.close()


def test_a_server_that_never_consumes_costs_the_client_only_its_rings(hostile_server):
    world, server = hostile_server
    s = vchan_connect(world)
    world.wait_for("domain 1 attached", lambda: server.page[CLI_LIVE] == 1)
    assert server.v.endpoint is not None
    # The left ring (64 KiB) fills and stays full; then the socket's buffers; then the
    # application's writes would block: nothing is buffered in xsockd.
    s.setblocking(False)
    sent = 0
    stalled = 0.0
    while stalled < 1.0 and sent < 64 << 20:
        try:
            sent += s.send(os.urandom(16 << 10))
            stalled = 0.0
        except BlockingIOError:
            time.sleep(0.05)
            stalled += 0.05
    assert sent < 64 << 20, "the writes never stopped"
    assert server.v.endpoint.status()["rx_ready"] == 64 << 10
    assert world.accounting(1).get("mapped") == 1 + 16 + 4  # the shared page and the rings
    # The application leaves: after linger (5 s) with its bytes unconsumed, domain 1 leaves
    # too and releases everything.
    s.close()
    t0 = time.monotonic()
    world.wait_for("domain 1 to give up after linger", lambda: (
        "ended (linger" in world.logs() and not any(
            world.accounting(1).get(k) for k in ("mapped", "ports"))), timeout=15)
    assert 4 < time.monotonic() - t0 < 10
    assert server.page[CLI_LIVE] == 0


def test_an_unconfigured_domain_cannot_reach_a_servers_vchan(world):
    world.start(1, 2)
    world.wait_for("domain 2's vchan published", lambda: published(world))
    with world.host.xenstore(0) as xs:
        pub = read_published(xs, SERVER_PATH, 2)
    with SimBackend(3, world.sim_dir) as b3:
        with b3.open_xenstore() as xs3, pytest.raises(OSError):
            xs3.read(f"{SERVER_PATH}/ring-ref")  # r1 only: domain 3 may not even read it
        with pytest.raises(OSError):
            b3.bind_interdomain(2, pub.port)
        with pytest.raises(OSError):
            b3.map(2, [pub.ring_ref])
    # Untouched: the same vchan is still published, and domain 1 is served on it.
    with world.host.xenstore(0) as xs:
        assert read_published(xs, SERVER_PATH, 2) == pub
    s = vchan_connect(world)
    sent, got = echo_hashes(s, 1 << 16)
    assert sent == got
    s.close()


def test_a_stopping_client_finishes_its_stream_and_takes_no_new_one(world):
    conf = world.daemons[1].config
    conf.write_text(conf.read_text().replace("[daemon]\n", "[daemon]\nstop_timeout = 20\n", 1))
    world.start(1, 2)
    world.wait_for("domain 2's vchan published", lambda: published(world))
    s = vchan_connect(world)
    data = os.urandom(1 << 20)
    writer = threading.Thread(target=s.sendall, args=(data,))
    writer.start()  # nobody reads yet: the echo's bytes fill our socket and the right ring
    time.sleep(1)
    assert writer.is_alive(), "1 MiB went through with nobody reading: nothing stalled"
    world.daemons[1].signal(signal.SIGTERM)
    world.wait_for("the drain to begin", lambda: "may drain" in world.daemons[1].log())
    late = vchan_connect(world)  # queued in the backlog, never served
    time.sleep(1.5)
    proc = world.daemons[1].proc
    assert proc is not None and proc.poll() is None, "domain 1 stopped with bytes in flight"
    got = hashlib.sha256()
    n = 0
    while n < len(data):
        chunk = s.recv(1 << 16)
        assert chunk, f"EOF after {n} of {len(data)} bytes"
        got.update(chunk)
        n += len(chunk)
    writer.join(10)
    assert got.hexdigest() == hashlib.sha256(data).hexdigest()
    assert proc.wait(10) == 0
    late.settimeout(5)
    try:
        assert late.recv(100) == b""
    except ConnectionResetError:
        pass
    late.close()
    s.close()
    assert world.daemons[1].log().count("vchan echo2: connected to domain 2") == 1


def test_sigusr1_logs_the_vchans_with_the_channels(world):
    world.start(1, 2)
    world.wait_for("domain 2's vchan published", lambda: published(world))
    for dom in (1, 2):
        world.daemons[dom].signal(signal.SIGUSR1)
    world.wait_for("both tables logged", lambda: (
        f"vchan-server echo1 peer 1 at {SERVER_PATH}: published, streams 0, in 0 out 0 bytes"
        in world.logs() and f"vchan-client echo2 peer 2 at {SERVER_PATH}: idle, streams 0"
        in world.logs()))


def test_a_client_attaching_and_leaving_in_a_loop_costs_its_log_budget_only(server_only):
    world, hostile = server_only
    log2 = world.daemons[2].log
    cycles = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 11:  # a publication each time: 5 at once, then 1 a second
        pub = read_published(hostile.xs, SERVER_PATH, 2)
        v = _Opened(hostile.backend, 2, pub)
        world.wait_for("the service spliced in", lambda: world.xs_tree(SERVER_PATH) == [])
        v.close()
        cycles += 1
        world.wait_for("a fresh vchan", lambda old=pub: published(world) and read_published(
            hostile.xs, SERVER_PATH, 2) != old, timeout=15)
    assert cycles >= 12, cycles
    # Two lines a stream (connected, ended) would be 24 and more: the peer's budget is 10
    # lines in 10 s, and the rest is counted once its window ends.
    world.wait_for("the left-out lines counted", lambda: "more messages like the above were "
                   "left out" in log2())
    connected = log2().count("vchan echo1: domain 1 connected")
    assert connected < cycles, (connected, cycles)
